"""Benchmark (issue 5): the whole pipeline from a clean checkout, then incremental re-runs.

1. ``git clone`` of the source repository's HEAD into a temporary directory
   (committed code only; the current virtualenv is used, nothing reinstalled;
   ``PYTHONPATH`` points at the clone so its packages shadow the editable install);
2. ``luigi --module tasks FullReport`` there (the embedded demo: train, tokenize,
   capture, analyse, report), timed;
3. the same command again: a no-op re-run, timed;
4. a second experiment with ``source = "checkpoints"`` naming the demo's trained
   checkpoints with one (a middle one) left out, over the demo's held-out data: run, timed;
5. the missing checkpoint added to that experiment: run, timed (only that checkpoint
   should be captured; analyses and report recomputed).

Prints JSON with each run's wall seconds, whether Luigi reported success and which
tasks ran (from Luigi's "done" log lines).

Run from the repository root::

    python -m bench.e2e                    # the default demo (a couple of minutes on 2 cores)
    python -m bench.e2e --tiny             # a very small demo model (smoke test)
    python -m bench.e2e --keep DIR         # keep the clone and the runs in DIR
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.analyses import emit, log, machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RUNNING = re.compile(r"\) running\s+(\w+)\((.*)\)\s*$")
DONE = re.compile(r"\) done\s+(\w+)\((.*)\)\s*$")
FAILED = re.compile(r"\) failed\s+(\w+)\((.*)\)\s*$")

# Small enough for a smoke test; the demo model of tests/test_pipeline.py's TINY_DEMO, one analysis.
TINY_DEMO = """
name = "tiny"
output_dir = "runs/tiny"
[model]
source = "demo"
[model.demo]
steps = 12
checkpoint_steps = [0, 6, 12]
hidden_size = 32
intermediate_size = 64
num_layers = 2
num_heads = 2
num_experts = 4
top_k = 2
vocab_size = 384
seq_len = 64
batch_size = 8
lr = 0.01
warmup_steps = 2
eval_samples_per_domain = 3
eval_max_chars = 300
train_chars_per_domain = 20000
[capture]
keep_router_logits = true
batch_size = 4
max_length = 64
[analyses]
run = ["usage"]
[dask]
n_workers = 1
"""


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise ValueError(f"cannot write {type(v).__name__} {v!r} as a TOML value")


def to_toml(table: dict, prefix: str = "") -> list[str]:
    """Lines of TOML for ``table`` (scalars, lists, sub-tables, arrays of tables), what tomllib reads back."""
    def is_tables(v):
        return isinstance(v, list) and v and all(isinstance(x, dict) for x in v)

    lines = [f"{k} = {toml_value(v)}" for k, v in table.items() if not isinstance(v, dict) and not is_tables(v)]
    for k, v in table.items():
        if isinstance(v, dict):
            lines += [f"[{prefix}{k}]"] + to_toml(v, f"{prefix}{k}.")
        elif is_tables(v):
            for item in v:
                lines += [f"[[{prefix}{k}]]"] + to_toml(item, f"{prefix}{k}.")
    return lines


def task_label(name: str, params: str) -> str:
    """``Name:param/param`` without the experiment path (the same in every task)."""
    parts = [p.split("=", 1)[1] for p in re.split(r",\s*", params) if "=" in p and not p.startswith("experiment=")]
    return f"{name}:{'/'.join(parts)}" if parts else name


def luigi_run(clone: Path, env: dict, experiment: str | None, log_file: Path) -> dict:
    """Run ``luigi --module tasks FullReport`` in ``clone``: wall seconds, tasks that ran and their seconds.

    Luigi's log lines carry no time, so each line is stamped as it arrives; a
    task's seconds run from its "running" line to its "done" line.
    """
    # A private lock directory: Luigi refuses to start while the same command line runs elsewhere
    # (another user's `luigi --module tasks FullReport` on this machine would stop the benchmark).
    cmd = [str(Path(sys.executable).parent / "luigi"), "--module", "tasks", "FullReport",
           "--lock-pid-dir", str(log_file.parent / "luigi-lock")]
    if experiment:
        cmd += ["--experiment", experiment]
    started: dict[str, float] = {}
    ran: list[str] = []
    failed: list[str] = []
    seconds: dict[str, float] = {}
    lines = []
    t0 = time.perf_counter()
    with subprocess.Popen(cmd, cwd=clone, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1) as proc:
        for line in proc.stdout:
            now = time.perf_counter()
            lines.append(f"{now - t0:9.3f} {line}")
            for pattern, sink in ((RUNNING, None), (DONE, ran), (FAILED, failed)):
                m = pattern.search(line)
                if not m:
                    continue
                label = task_label(*m.groups())
                if sink is None:
                    started[label] = now
                else:
                    sink.append(label)
                    if label in started:
                        seconds[label] = now - started[label]
        rc = proc.wait()
    wall = time.perf_counter() - t0
    out = "".join(lines)
    log_file.write_text(out)
    ok = rc == 0 and not failed and "This progress looks :)" in out
    return {"command": " ".join(["luigi"] + cmd[1:]), "cwd": str(clone), "wall_s": wall, "ok": ok,
            "returncode": rc, "tasks_ran": ran, "task_seconds": seconds, "tasks_failed": failed,
            "log": str(log_file)}


def checkpoints_experiment(demo: dict, demo_out: Path, out_dir: Path, ckpts: list[tuple[str, Path, int]]) -> str:
    """The demo experiment turned into a user's: ``source = "checkpoints"`` naming ``ckpts``.

    Everything but the model, the datasets, the name and the output directory
    is kept (capture options, conditions, analyses, report, dask), and the
    datasets are the demo's own held-out files, as ``tasks.datasets`` picks
    them for the demo (the paired file only when the experiment has conditions).
    """
    from capture.demo import EVAL_DATASET_NAME

    exp = {k: v for k, v in demo.items() if k not in ("name", "description", "output_dir", "model", "datasets")}
    data = demo_out / "model" / "data"
    datasets = [{"name": EVAL_DATASET_NAME, "path": str(data / "eval.jsonl")}]
    if demo.get("conditions", {}).get("a"):
        from capture.demo import PAIRED_DATASET_NAME

        datasets.append({"name": PAIRED_DATASET_NAME, "path": str(data / "paired.jsonl")})
    head = {"name": "checkpoints", "output_dir": str(out_dir),
            "model": {"source": "checkpoints",
                      "checkpoints": [{"name": n, "path": str(p), "step": s} for n, p, s in ckpts]},
            "datasets": datasets}
    # top-level scalars first: TOML puts everything after a table header into that table
    return "\n".join(to_toml({**{k: v for k, v in head.items() if k != "model" and k != "datasets"},
                              "model": head["model"], "datasets": datasets, **exp})) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default=str(REPO), help="repository to clone (its HEAD)")
    p.add_argument("--keep", default=None, help="keep the clone and runs in this directory (must not exist)")
    p.add_argument("--tiny", action="store_true", help="a very small demo model instead of the default demo")
    args = p.parse_args(argv)

    if args.keep:
        root = Path(args.keep)
        if root.exists():
            raise SystemExit(f"--keep {root}: already exists")
        root.mkdir(parents=True)
    else:
        root = Path(tempfile.mkdtemp(prefix="moe-atlas-bench-e2e-"))
    clone = root / "clone"
    doc = {"benchmark": "e2e", "issue": 5, "machine_start": machine(), "argv": sys.argv[1:] if argv is None else argv}
    try:
        head = subprocess.run(["git", "-C", args.source, "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        t = time.perf_counter()
        subprocess.run(["git", "clone", "--quiet", args.source, str(clone)], check=True)
        doc["clone"] = {"source": args.source, "commit": head, "seconds": time.perf_counter() - t}

        env = {**os.environ, "PYTHONPATH": str(clone), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "MPLBACKEND": "Agg"}
        where = subprocess.run([sys.executable, "-c", "import tasks, analyses; print(tasks.__file__)"], cwd=clone,
                               env=env, capture_output=True, text=True, check=True).stdout.strip()
        if not where.startswith(str(clone)):
            raise RuntimeError(f"the clone's packages do not shadow the installed ones: tasks from {where}")
        doc["code_from"] = where

        experiment = None
        if args.tiny:
            (clone / "experiments" / "tiny.toml").write_text(TINY_DEMO)
            experiment = "experiments/tiny.toml"
        runs = doc["runs"] = {}
        log("1/4 FullReport from a clean checkout")
        runs["full_from_clean"] = luigi_run(clone, env, experiment, root / "1-full.log")
        log("2/4 no-op re-run")
        runs["noop_rerun"] = luigi_run(clone, env, experiment, root / "2-noop.log")
        if not runs["full_from_clean"]["ok"]:
            raise RuntimeError(f"the demo run failed; see {runs['full_from_clean']['log']}")

        # The demo's own experiment file says where its run lives and how it captures.
        from experiments.spec import load_experiment

        demo_file = clone / (experiment or "experiments/demo.toml")
        exp = load_experiment(str(demo_file))
        demo_out = clone / exp.output_dir  # relative paths are taken from luigi's cwd, the clone
        if not demo_out.resolve().is_relative_to(root.resolve()):
            raise RuntimeError(f"the demo experiment writes to {demo_out}, outside the benchmark's directory {root}")
        ckpt_dirs = sorted((demo_out / "model" / "checkpoints").glob("step_*"))
        if len(ckpt_dirs) < 3:
            raise RuntimeError(f"{demo_out}: expected >= 3 demo checkpoints, found {[c.name for c in ckpt_dirs]}")
        ckpts = [(c.name, c, int(c.name.split("_")[1])) for c in ckpt_dirs]
        left_out = ckpts[len(ckpts) // 2]
        demo = tomllib.loads(demo_file.read_text())
        real = root / "checkpoints.toml"
        out_dir = root / "checkpoints-run"
        real.write_text(checkpoints_experiment(demo, demo_out, out_dir, [c for c in ckpts if c != left_out]))
        load_experiment(str(real))  # the spec's validator reads it back before Luigi does
        log(f"3/4 checkpoints experiment without {left_out[0]}")
        runs["checkpoints_minus_one"] = luigi_run(clone, env, str(real), root / "3-minus-one.log")
        real.write_text(checkpoints_experiment(demo, demo_out, out_dir, ckpts))
        log(f"4/4 checkpoint {left_out[0]} added")
        runs["add_one_checkpoint"] = luigi_run(clone, env, str(real), root / "4-add-one.log")
        doc["checkpoints"] = [c[0] for c in ckpts]
        doc["left_out_then_added"] = left_out[0]
        doc["add_one_captured_only_it"] = [t for t in runs["add_one_checkpoint"]["tasks_ran"]
                                           if t.startswith("Capture")] == [f"Capture:{left_out[0]}"]
    except Exception as exc:  # still print what was measured, and why it stopped
        doc["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        doc["machine_end"] = machine()
        if args.keep:
            doc["kept"] = str(root)
        else:
            shutil.rmtree(root, ignore_errors=True)
    emit(doc)
    return 0 if "error" not in doc and all(r["ok"] for r in doc["runs"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
