"""``moe-atlas check EXPERIMENT.toml``: validate an experiment and say what a run would do.

Prints the resolved output folder, the checkpoints and datasets (and whether
their files are there), and each analysis: run, or skipped and why (what the
experiment's capture options, checkpoints and conditions let it compute; with
an existing routing cube, the cube itself decides). Exit 0 when the file is
valid and its inputs exist, 1 when an input is missing (one line each), 2 when
the file is invalid (one line naming the file and key).
"""

from __future__ import annotations

from pathlib import Path

HELP = "validate an experiment file and say what would run (checkpoints, datasets, analyses, skips and why)"


def add_arguments(p) -> None:
    p.add_argument("experiment", metavar="EXPERIMENT.toml", help="the experiment file")


def predicted_skip(name: str, exp, n_checkpoints: int | None) -> str | None:
    """Why analysis ``name`` would be skipped for ``exp`` before anything is captured (None: it runs)."""
    from analyses import get

    a = get(name)
    cap, source = exp.capture, exp.model.source
    if source != "import":  # captured: the capture options say which variables the cube will have
        provided = {"expert_ids", "expert_weights", "nll"}
        if cap.keep_router_logits:
            provided.add("router_logits")
        if cap.logit_lens:
            provided.add("lens_logprob")
        if cap.js_divergence:
            provided.add("lens_js")
        missing = [v for v in a.requires if v not in provided and v != "capacity_dropped"]
        if missing:
            from .cmd_analyses import VARIABLE_NEEDS

            return f"needs {', '.join(VARIABLE_NEEDS.get(v, v) for v in missing)}"
        if "capacity_dropped" in a.requires:
            return None  # decided by the model (Switch Transformers only): skipped at run time otherwise
    from .cmd_analyses import PAIRED

    if name in PAIRED and not exp.conditions.a:
        return "needs two conditions ([conditions] a and b) and paired samples"
    if n_checkpoints is not None and n_checkpoints < a.min_checkpoints:
        return f"needs >= {a.min_checkpoints} checkpoints, the experiment has {n_checkpoints}"
    return None


def print_stages(exp, ckpts, where: str) -> list[str]:
    """Print the stages beyond the analyses ([experts], [masks], [interventions], training, [[runs]]);
    return one line per input they name that is missing."""
    problems: list[str] = []

    def exists(path: str, what: str) -> str:
        if Path(path).exists():
            return ""
        problems.append(f"{where}: {what} {path} does not exist")
        return "  MISSING"

    print("stages beyond the analyses:")
    e, m, iv, t = exp.experts, exp.masks, exp.interventions, exp.training
    names = ", ".join(c.name for c in ckpts) or "none"
    print(f"  experts: " + (f"router rows, FFN weights projected to {e.ffn_dim} dims and norms of layers "
                           f"{e.layers or 'all MoE'} at {names}; k-means k = {e.k_values}" if e.enabled else "off"))
    if m.enabled:
        last = m.checkpoint or (max(ckpts, key=lambda c: c.step).name if ckpts else "?")
        print(f"  masks: {', '.join(m.methods)} on {', '.join(m.components) or 'no component'} of layer(s) "
              f"{m.layers} at sparsity {m.sparsity} ({last}); {m.seeds} seeds, n = {m.n_similar}, "
              f"k = {m.k_values}; user masks: {len(m.user)}")
        for u in m.user:
            print(f"    {u.method} {u.component} layer {u.layer}: {u.path}{exists(u.path, 'mask file')}")
    else:
        print("  masks: off")
    if iv.enabled:
        from tasks.interventions import intervened_checkpoints, sweeps

        try:
            at = ", ".join(c.name for c in intervened_checkpoints(exp))
        except KeyError as err:
            problems.append(str(err.args[0]) if err.args else str(err))
            at = "?"
        sw = list(sweeps(exp))
        print(f"  interventions: {' and '.join(iv.kinds)} masks at {at}: {len(sw)} sweeps per checkpoint "
              f"({', '.join(sw)})")
    else:
        print("  interventions: off")
    if t.enabled and (t.logs or t.scores or exp.model.source == "demo" or exp.runs):
        print(f"  training: {len(t.logs)} log(s)" + (" + the demo's own" if exp.model.source == "demo" else "")
              + f", {len(t.scores)} score file(s)")
        for f in [*t.logs, *t.scores]:
            print(f"    {f.format}: {f.path}{exists(f.path, 'training file')}")
    else:
        print("  training: off")
    for r in exp.runs:
        print(f"  run compared side by side: {r.name} ({r.experiment}){exists(r.experiment, 'experiment of run')}")
    return problems


def run(args) -> int:
    from experiments.spec import load_experiment

    exp = load_experiment(args.experiment)  # SpecError: one line, exit 2
    import tasks
    from storage import cube as cubes

    layout = tasks._layout(exp)
    problems: list[str] = []
    print(f"{args.experiment}: valid experiment {exp.name!r} (model source {exp.model.source!r})")
    print(f"output_dir: {layout.root}")
    ckpts = tasks.checkpoints(exp)
    if exp.model.source == "import":
        t = exp.trace
        print(f"traces ({t.format}): {len(t.paths)}")
        for p in t.paths:
            ok = Path(p).exists()
            print(f"  {p}{'' if ok else '  MISSING'}")
            if not ok:
                problems.append(f"{args.experiment}: trace {p} does not exist")
        n_ckpt = len(t.paths)
    else:
        what = "trained by the demo" if exp.model.source == "demo" else "save_pretrained folders"
        print(f"checkpoints ({what}): {len(ckpts)}")
        for c in ckpts:
            state = ""
            if exp.model.source == "checkpoints":
                d = Path(c.path)
                if not (d / "config.json").is_file() or not any(d.glob("*.safetensors")):
                    state = "  MISSING (no config.json and *.safetensors there)"
                    problems.append(f"{args.experiment}: checkpoint {c.name!r}: {c.path} has no config.json and "
                                    f"*.safetensors")
            print(f"  {c.name} (step {c.step}): {c.path}{state}")
        n_ckpt = len(ckpts)
        ds = tasks.datasets(exp)
        print(f"datasets: {len(ds)}")
        for d in ds:
            p = Path(d.path)
            if p.is_file():
                state = f"{sum(1 for line in p.open(encoding='utf-8', errors='replace') if line.strip())} lines"
            elif exp.model.source == "demo":
                state = "written by the demo"
            else:
                state = "MISSING"
                problems.append(f"{args.experiment}: dataset {d.name!r}: {d.path} does not exist")
            print(f"  {d.name} ({d.format}): {d.path}  [{state}]")
    routing = None
    try:
        routing = cubes.open_routing(layout.routing, complete_only=False)
    except Exception:  # noqa: BLE001 - no cube yet (or a damaged one: the run reports that)
        routing = None
    print(f"analyses: {len(exp.analyses.run)}" + (" (judged on the existing routing cube)" if routing is not None
                                                   else ""))
    from analyses.registry import skip_reason

    for name in exp.analyses.run:
        reason = skip_reason(name, routing) if routing is not None else predicted_skip(name, exp, n_ckpt)
        print(f"  {name}: {'skipped: ' + reason if reason else 'runs'}")
    problems += print_stages(exp, ckpts, args.experiment)
    try:
        done = tasks.FullReport(experiment=str(Path(args.experiment).resolve())).complete()
    except Exception:  # noqa: BLE001
        done = False
    print(f"state: {'up to date (a run does nothing)' if done else 'work to do'}")
    for p in problems:
        print(f"moe-atlas check: error: {p}", file=__import__('sys').stderr)
    return 1 if problems else 0
