"""Benchmark (issue 11): capture and its write path at an older commit against the working tree, in one process.

On a loaded shared host, wall times of separate runs move by tens of percent;
this runs both versions in one process on the same model and batches,
repetitions interleaved, and reports process-CPU and wall time as ratios to a
plain forward. ``capture/run.py`` and ``storage/cube.py`` of ``--rev`` are
loaded from git (``git show``) under other module names; everything else is
the working tree's.

Variants: ``plain`` (the forward alone, ``bench.capture.plain_forward``),
``old/new +logits+nll`` (``capture_model`` keeping router logits and NLL into a
discarding sink), ``old/new ->zarr`` (the same into that version's
``RoutingWriter``, one checkpoint region of a routing.zarr).

Run from the repository root::

    python -m bench.capture_ab --rev 4276af6 --preset olmoe-1b-7b --tokens 3072 --repeats 7
    python -m bench.capture_ab --rev 4276af6 --preset demo --tokens 6144 --repeats 7
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.analyses import emit, log, machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _load_at(rev: str, relpath: str, module: str, tmp: Path):
    """Module ``module`` from ``relpath`` as of ``rev``; its relative imports resolve in the working tree's package."""
    src = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{relpath}"], check=True, capture_output=True,
                         text=True).stdout
    path = tmp / f"{module.replace('.', '_')}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(module, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[module] = mod
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rev", required=True, help="git revision to compare with (e.g. the commit before the change)")
    p.add_argument("--preset", default="demo", help="demo or a bench.capture preset (run with --shrink)")
    p.add_argument("--tokens", type=int, default=3072)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args(argv)

    import numpy as np
    import torch

    from bench.capture import PRESETS, DiscardSink, demo_model, plain_forward, preset_model, token_table
    from capture import run as new_run
    from capture.load import describe_model
    from storage import cube as new_cube
    from storage.schema import empty_routing

    if args.preset != "demo" and args.preset not in PRESETS:
        raise SystemExit(f"--preset {args.preset}: expected demo or one of {sorted(PRESETS)}")
    torch.set_num_threads(1)
    start = machine()
    tmp = Path(tempfile.mkdtemp(prefix="moe-atlas-bench-ab-"))
    try:
        old_run = _load_at(args.rev, "capture/run.py", "capture._run_at_rev", tmp)
        old_cube = _load_at(args.rev, "storage/cube.py", "storage._cube_at_rev", tmp)
        if args.preset == "demo":
            model, cfg = demo_model()
            vocab, min_len, max_len = cfg.vocab_size, 64, cfg.seq_len
        else:
            model, kw = preset_model(args.preset, shrink=True)
            vocab, min_len, max_len = kw["vocab_size"], 128, 256
        tokens = token_table(args.tokens, min_len=min_len, max_len=max_len, vocab=vocab)
        info = describe_model(model)
        stores = {}
        for tag in ("old", "new"):
            template = empty_routing(
                tokens, checkpoints=["b"], steps=[0], layers=list(info.moe_layers), num_experts=info.num_experts,
                top_k=info.top_k, keep_logits=True, keep_nll=True,
                attrs={"model_family": info.family, "router_semantics": info.router_semantics,
                       "source": "bench.capture_ab"})
            stores[tag] = tmp / f"{tag}.zarr"
            new_cube.prepare_routing(stores[tag], template)
        opts = dict(keep_logits=True, keep_nll=True, batch_size=args.batch_size, progress=False)

        def written(run, cube, tag):
            with cube.RoutingWriter(stores[tag], "b") as w:
                run.capture_model(model, tokens, w, **opts)

        variants = {
            "plain": lambda: plain_forward(model, tokens, batch_size=args.batch_size),
            "old +logits+nll": lambda: old_run.capture_model(model, tokens, DiscardSink(), **opts),
            "new +logits+nll": lambda: new_run.capture_model(model, tokens, DiscardSink(), **opts),
            "old ->zarr": lambda: written(old_run, old_cube, "old"),
            "new ->zarr": lambda: written(new_run, new_cube, "new"),
        }
        for fn in variants.values():  # warm-up
            fn()
        names = list(variants)
        wall = {n: [] for n in names}
        cpu = {n: [] for n in names}
        for r in range(args.repeats):
            for n in names[r % len(names):] + names[: r % len(names)]:
                t, c = time.perf_counter(), time.process_time()
                variants[n]()
                wall[n].append(time.perf_counter() - t)
                cpu[n].append(time.process_time() - c)
            log(f"repeat {r + 1}/{args.repeats}")
        for tag in ("old", "new"):
            # both versions wrote a whole region (the old writer seals no manifest: read it unverified)
            got = new_cube.open_routing(stores[tag], complete_only=False)
            if int(got["complete"].values[0]) != 1 or not np.isfinite(got["router_logits"].values).all():
                raise RuntimeError(f"{stores[tag]}: the {tag} RoutingWriter did not write a complete region")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    pw, pc = statistics.median(wall["plain"]), statistics.median(cpu["plain"])
    emit({
        "benchmark": "capture_ab", "issue": 11, "rev": args.rev, "argv": sys.argv[1:] if argv is None else argv,
        "model": {"preset": args.preset, "moe_layers": len(info.moe_layers), "num_experts": info.num_experts,
                  "top_k": info.top_k},
        "tokens": int(tokens.sizes["token"]), "repeats": args.repeats,
        "cpu_ratio_to_plain": {n: statistics.median(cpu[n]) / pc for n in names},
        "wall_ratio_to_plain": {n: statistics.median(wall[n]) / pw for n in names},
        "plain_median_s": pw, "plain_cpu_median_s": pc,
        "machine_start": start, "machine_end": machine(),
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
