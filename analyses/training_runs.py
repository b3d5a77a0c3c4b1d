"""The training section: build its cubes from run folders (drawn by analyses/figures/training_runs.py).

One experiment may name further runs (``[[runs]]``: other experiment files). The
design is the least invasive one: **every run keeps its own run folder and
pipeline** (its routing cube is captured by the same Luigi tasks as any
experiment's), and one comparison stage (``tasks/training.py``) reads all of them
and writes cubes with a leading ``run`` dimension under the first run's
``analyses/training/``:

    logs.zarr         value (run, step, metric)               storage.training
    gate.zarr         router-weight diagnostics (run, step, layer[, expert])
    load.zarr         share (run, step, layer, expert), max_share, dead_experts, entropy (run, step, layer)
    compare.zarr      agreement_top1, overlap, first_divergent_token (run, checkpoint, layer) vs the first run
    scores.zarr       score, rank (run, step, task, metric)
    composition.zarr  tokens, samples (entry) with domain, dataset, source

The routing cube itself gains no ``run`` dimension: runs differ in checkpoints and
may differ in data, so each stays a valid cube of its own and the comparison says
on which checkpoints and tokens the runs were compared.

The functions here read through ``storage`` and compute through :mod:`analyses.training`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xarray as xr

from storage import cube as cubes
from storage import training as logs_io

from . import training as tr

PARTS = ("logs", "gate", "load", "compare", "scores", "composition")


@dataclass(frozen=True)
class RunInput:
    """What the training section reads of one run."""

    name: str
    routing: str = ""
    """routing.zarr of the run ("" = none)."""
    checkpoints: tuple = ()
    """(name, step, path) of each checkpoint whose weights hold the routers."""
    training_log: str = ""
    """The demo's training_log.json when the run trained the demo model."""
    training_log_source: str = ""
    """How the outputs name ``training_log``: relative to the run folder (default: its path)."""
    datasets: tuple = ()
    """(name, path) of its JSONL datasets (read for a per-sample ``source`` field)."""
    extra_logs: tuple = field(default_factory=tuple)
    """[[training.logs]] entries: dicts with path, format, run."""
    score_files: tuple = field(default_factory=tuple)
    """[[training.scores]] entries: dicts with path, format, run, checkpoint, step."""


def _open(path: str):
    if not path or not (Path(path) / "zarr.json").exists():
        return None
    ds = cubes.open_routing(path)
    return ds if ds.sizes.get("checkpoint", 0) and "expert_ids" in ds else None


def _by_step(ds: xr.Dataset) -> xr.Dataset:
    """checkpoint dim -> step dim (the runs' checkpoint names may differ; their steps line up)."""
    ds = ds.assign_coords(step=("checkpoint", ds["step"].values.astype(np.int64)))
    return ds.swap_dims(checkpoint="step").drop_vars("checkpoint")


def build(runs: Sequence[RunInput]) -> dict[str, xr.Dataset]:
    """The section's cubes (see the module docstring); a part without inputs is a Dataset with attrs ``skipped``."""
    out: dict[str, xr.Dataset] = {}
    main = runs[0]

    # ---- training logs
    entries = [{"path": r.training_log, "format": "demo", "run": r.name, "source": r.training_log_source}
               for r in runs if r.training_log]
    entries += [dict(e) for r in runs for e in r.extra_logs]
    if entries:
        cube = logs_io.read_training_logs(entries)
        for r in runs:
            if r.training_log:
                ideal = json.loads(Path(r.training_log).read_text()).get("aux_loss_ideal")
                if ideal is not None:
                    cube.attrs["aux_loss_ideal"] = float(ideal)
        out["logs"] = cube
    else:
        out["logs"] = _skipped("no training log: the runs neither trained the demo model nor name [[training.logs]]")

    # ---- router weights and logit scale
    routings = {r.name: _open(r.routing) for r in runs}
    gate_runs = [r for r in runs if r.checkpoints]
    if gate_runs:
        out["gate"] = _gate(gate_runs, routings)
    else:
        out["gate"] = _skipped("no checkpoints with weights (imported traces only)")

    # ---- expert load / entropy per run
    loads = {name: _by_step(tr.expert_load(ds)) for name, ds in routings.items() if ds is not None}
    out["load"] = tr.stack_runs(loads) if loads else _skipped("no routing cube")

    # ---- routing comparison vs the first run, on the same tokens
    base = routings.get(main.name)
    cmps, notes = {}, []
    for r in runs[1:]:
        other = routings.get(r.name)
        if base is None or other is None:
            notes.append(f"{r.name}: no routing cube")
            continue
        try:
            a, b = _common_datasets(base, other)
            cmps[r.name] = tr.compare_routing(a, b)
            cmps[r.name].attrs["datasets"] = sorted(set(map(str, a["dataset"].values))) if "dataset" in a.coords else []
        except ValueError as exc:
            notes.append(f"{r.name}: {exc}")
    if cmps:
        cmp = tr.stack_runs(cmps)
        cmp.attrs["against"] = main.name
        if notes:
            cmp.attrs["not_compared"] = "; ".join(notes)
        out["compare"] = cmp
    else:
        out["compare"] = _skipped("one run only" if len(runs) == 1 else "; ".join(notes))

    # ---- scores
    recs = []
    for r in runs:
        if r.training_log:
            recs += logs_io.demo_scores(r.training_log, run=r.name)
        for s in r.score_files:
            if s["format"] == "csv":
                recs += logs_io.read_scores_csv(s["path"])
            else:
                recs += logs_io.read_lm_eval(s["path"], run=s.get("run") or r.name, checkpoint=s["checkpoint"],
                                             step=int(s["step"]))
    if recs:
        sc = logs_io.scores_cube(recs)
        ranks = tr.score_ranks(sc)
        sc["rank"] = ranks["rank"]
        out["scores"] = tr.apply_outputs(sc, tr.SCORE_OUTPUTS, where="scores")
    else:
        out["scores"] = _skipped("no evaluation scores (no demo log, no [[training.scores]])")

    # ---- data composition of the first run
    recs = _composition_records(main, routings.get(main.name))
    out["composition"] = tr.composition(recs) if recs else _skipped("no data to describe")
    return out


def _common_datasets(a: xr.Dataset, b: xr.Dataset) -> tuple[xr.Dataset, xr.Dataset]:
    """Both cubes restricted to the tokens of the datasets they share (e.g. the demo's paired set is one run's only)."""
    if "dataset" not in a.coords or "dataset" not in b.coords:
        return a, b
    da, db = np.asarray(a["dataset"].values).astype(str), np.asarray(b["dataset"].values).astype(str)
    common = sorted(set(da) & set(db))
    if not common:
        raise ValueError("the runs share no dataset")
    return a.isel(token=np.flatnonzero(np.isin(da, common))), b.isel(token=np.flatnonzero(np.isin(db, common)))


def _skipped(reason: str) -> xr.Dataset:
    return xr.Dataset(attrs={"skipped": reason})


def _gate(runs: Sequence[RunInput], routings: dict) -> xr.Dataset:
    from storage.weights import iter_expert_tensors

    mats: dict[tuple[str, int], dict[int, np.ndarray]] = {}
    for r in runs:
        for _name, step, path in r.checkpoints:
            layers = {t.layer: t.array for t in iter_expert_tensors(path, kinds=("router",))}
            if layers:
                mats[(r.name, int(step))] = layers
    if not mats:
        return _skipped("no router weights found in the checkpoints' safetensors")
    names = list(dict.fromkeys(k[0] for k in mats))
    steps = sorted({k[1] for k in mats})
    layers = sorted({l for v in mats.values() for l in v})
    E, H = next(iter(next(iter(mats.values())).values())).shape
    arr = np.full((len(names), len(steps), len(layers), E, H), np.nan)
    for (run, step), by_layer in mats.items():
        for l, w in by_layer.items():
            if w.shape == (E, H):
                arr[names.index(run), steps.index(step), layers.index(l)] = w
    router = xr.DataArray(arr, dims=("run", "step", "layer", "expert", "hidden"),
                          coords={"run": names, "step": np.asarray(steps, np.int64), "layer": layers,
                                  "expert": np.arange(E)})
    scales = {}
    for name in names:
        ds = routings.get(name)
        if ds is not None and "router_logits" in ds:
            scales[name] = _by_step(tr.logit_scale(ds["router_logits"]).to_dataset(name="s"))["s"]
    scale = xr.concat([scales[n] for n in names if n in scales], dim=xr.Variable("run", [n for n in names if n in scales]),
                      join="outer") if scales else None
    return tr.gate_diagnostics(router, scale)


def _composition_records(run: RunInput, routing) -> list[dict]:
    recs = []
    if routing is not None and "sample" in routing.coords:
        src = _sample_sources(run.datasets)
        tok = xr.Dataset(coords={k: routing[k].load() for k in ("sample", "dataset", "domain") if k in routing.coords})
        df = tok.to_dataframe().reset_index(drop=True)
        if "domain" not in df:
            df["domain"] = ""
        df["source"] = [src.get((str(d), str(s)), "") for d, s in zip(df["dataset"], df["sample"])]
        g = df.groupby(["domain", "dataset", "source"], dropna=False)
        for (dom, dset, source), part in g:
            recs.append({"domain": dom or "(unlabelled)", "dataset": dset, "source": source,
                         "tokens": len(part), "samples": int(part["sample"].nunique())})
    if run.training_log:
        log = json.loads(Path(run.training_log).read_text())
        seqs = log.get("train_sequences_per_domain") or {}
        docs = (log.get("corpus") or {}).get("train_documents") or {}
        seq_len = _seq_len(Path(run.training_log))
        for dom, n in seqs.items():
            # packed training sequences of seq_len tokens (BOS included) per domain; samples = documents
            recs.append({"domain": dom, "dataset": "train", "source": "stream",
                         "tokens": int(n) * seq_len, "samples": int(docs.get(dom, 0))})
    return recs


def _seq_len(log_path: Path) -> int:
    """The demo's training sequence length, from the manifest beside its training log (capture/demo layout)."""
    try:
        return int(json.loads((log_path.parent / "manifest.json").read_text())["config"]["seq_len"])
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(f"{log_path.parent / 'manifest.json'}: no config.seq_len beside the demo training log") from None


def _sample_sources(datasets) -> dict[tuple[str, str], str]:
    """(dataset, sample id) -> the sample's ``source`` field, for JSONL datasets that have one."""
    out = {}
    for name, path in datasets:
        p = Path(path)
        if not p.is_file() or p.suffix != ".jsonl":
            continue
        with open(p, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict) and row.get("source") is not None and "id" in row:
                    out[(name, str(row["id"]))] = str(row["source"])
    return out
