"""Benchmark (issue 6): import throughput of trace importers, in MB of input per second.

The script writes realistic synthetic traces (sizes below), imports each into
a routing cube with :func:`storage.importers.import_trace` in a fresh child
process (so its peak resident memory is the importer's own, and shows that a
trace is streamed, not loaded), and prints one JSON document:

* ``llamacpp_bin``: a packed ``tensor_trace.bin`` of 1024-byte records
  (24 layers, 32 experts, top-4; per token and layer 3 duplicated MUL_MAT_ID
  records among 12 other traced ops, as the seed-004 tool writes), >= 200 MB;
* ``olmoe_jsonl``: OLMoE ``c4_results_<step>.jsonl`` lines of 2048 tokens x
  top-8 x 16 layers (~1 MB each), >= 50 MB;
* ``llamacpp_json``: per-token JSON files of the seed-004 layout (entries with
  sources, indent=2, ~0.6 MB per token), >= 50 MB.

Run from the repository root::

    python -m bench.importers              # full sizes, 1 repeat
    python -m bench.importers --repeat 3   # median of 3
    python -m bench.importers --tiny       # seconds; a smoke run
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a file: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


# --------------------------------------------------------------------------- generators


def write_llamacpp_bin(path: Path, target_mb: float, *, layers=24, experts=32, k=4, other_ops=12, seed=0) -> int:
    """A tensor_trace.bin of about ``target_mb`` MB; returns the number of decode tokens."""
    from storage.importers.llamacpp import RECORD

    rng = np.random.default_rng(seed)
    per_token = layers * (other_ops + 3)
    tokens = max(1, int(target_mb * 2**20 / RECORD.itemsize / per_token))
    block = 64
    with open(path, "wb") as f:
        for t0 in range(0, tokens, block):
            n = min(block, tokens - t0)
            recs = np.zeros((n, layers, other_ops + 3), dtype=RECORD)
            tok = np.arange(t0, t0 + n, dtype=np.uint32)[:, None, None] + 1
            recs["token_id"] = tok
            recs["layer_id"] = np.arange(layers, dtype=np.uint16)[None, :, None]
            recs["phase"] = 1
            recs["timestamp_ns"] = 1 + np.arange(recs.size, dtype=np.uint64).reshape(recs.shape) + t0 * per_token
            recs["operation_type"] = rng.choice([2, 7, 25, 29, 46, 48], size=recs.shape).astype(np.uint8)
            recs["dst_name"] = b"blk.0.ffn_moe_gate"
            ids = np.argsort(rng.random((n, layers, experts)), axis=-1)[..., :k].astype(np.int32)
            for j in range(3):  # gate, up, down: the same ids
                recs["operation_type"][..., other_ops + j] = 30
                recs["num_experts"][..., other_ops + j] = k
                recs["expert_ids"][..., other_ops + j, :k] = ids
            recs.reshape(-1).tofile(f)
    return tokens


def write_olmoe_jsonl(path: Path, target_mb: float, *, n=2048, k=8, layers=16, experts=64, seed=0) -> int:
    rng = np.random.default_rng(seed)
    lines = 0
    with open(path, "w") as f:
        while f.tell() < target_mb * 2**20:
            ids = rng.integers(0, 50000, n)
            exp = np.argsort(rng.random((n, layers, experts)), axis=-1)[..., :k].transpose(0, 2, 1)
            f.write(json.dumps({"input_ids": ids.tolist(), "predicted_token_ids": ids.tolist(), "exp_ids": exp.tolist()}) + "\n")
            lines += 1
    return lines * n


def write_llamacpp_json(root: Path, target_mb: float, *, layers=24, experts=32, k=4, other_ops=30, seed=0) -> int:
    rng = np.random.default_rng(seed)
    tdir = root / "domain-1-code" / "traces"
    tdir.mkdir(parents=True)
    size, t = 0, 0
    src = [{"name": f"blk.{0}.ffn_gate_exps.weight", "tensor_ptr": "0x7f00deadbeef", "size_bytes": 1 << 20,
            "layer_id": 0, "memory_source": "DISK", "disk_offset": 123456}] * 3
    while size < target_mb * 2**20:
        t += 1
        entries = []
        for layer in range(layers):
            ids = np.argsort(rng.random(experts))[:k].tolist() + [0] * (16 - k)
            for j in range(other_ops + 3):
                moe = j >= other_ops
                entries.append({"entry_id": len(entries), "timestamp_ns": 10**12 + len(entries), "timestamp_relative_ms": 0.5,
                                "token_id": t, "layer_id": layer, "thread_id": 0, "phase": "GENERATE",
                                "operation_type": "MUL_MAT_ID" if moe else "MUL_MAT",
                                "dst_name": f"ffn_moe_{j}-{layer}", "num_sources": 3, "sources": src,
                                "expert_ids": ids if moe else [], "num_experts": k if moe else 0})
        text = json.dumps({"token_id": t, "metadata": {"total_entries": len(entries), "duration_ms": 3.1,
                                                       "timestamp_start_ns": 10**12, "format_version": "1024-byte"},
                           "entries": entries}, indent=2)
        (tdir / f"token-{t:05d}.json").write_text(text)
        size += len(text)
    return t


# --------------------------------------------------------------------------- measuring


def _child(fmt, source, out, options, queue):
    import resource

    import dask.array  # noqa: F401  (imported before the clock starts: a one-off cost, not throughput)
    import xarray  # noqa: F401
    import zarr  # noqa: F401

    from storage.importers import import_trace

    t0 = time.perf_counter()
    summary = import_trace(fmt, source, out, **options)
    seconds = time.perf_counter() - t0
    queue.put({"seconds": seconds, "tokens": summary["tokens"], "layers": len(summary["layers"]),
               "top_k": summary["top_k"], "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)})


def measure(fmt, source, out_dir: Path, options: dict, repeat: int) -> dict:
    ctx = mp.get_context("spawn")
    runs = []
    for r in range(repeat):
        out = out_dir / f"{fmt}-{r}.zarr"
        q = ctx.Queue()
        p = ctx.Process(target=_child, args=(fmt, source, out, options, q))
        p.start()
        res = q.get()
        p.join()
        if p.exitcode:
            raise RuntimeError(f"import of {fmt} failed (exit code {p.exitcode})")
        runs.append(res)
        shutil.rmtree(out, ignore_errors=True)
    paths = [source] if Path(source).is_file() else [p for p in Path(source).rglob("*") if p.is_file()]
    mb = sum(Path(p).stat().st_size for p in paths) / 2**20
    secs = [r["seconds"] for r in runs]
    med = statistics.median(secs)
    return {"format": fmt, "input_mb": round(mb, 1), "seconds_median": round(med, 3),
            "mb_per_s": round(mb / med, 1), "tokens": runs[0]["tokens"], "layers": runs[0]["layers"],
            "top_k": runs[0]["top_k"], "tokens_per_s": round(runs[0]["tokens"] / med),
            "peak_rss_mb_max": max(r["peak_rss_mb"] for r in runs), "seconds_all": [round(s, 3) for s in secs]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--tiny", action="store_true", help="small files (seconds), for a smoke run")
    ap.add_argument("--bin-mb", type=float, default=210.0)
    ap.add_argument("--json-mb", type=float, default=55.0)
    ap.add_argument("--workdir", default=None, help="where to write the synthetic traces (default: a temp dir)")
    args = ap.parse_args(argv)
    bin_mb, json_mb = (4.0, 2.0) if args.tiny else (args.bin_mb, args.json_mb)
    work = Path(tempfile.mkdtemp(prefix="bench-importers-", dir=args.workdir))
    try:
        load_before = os.getloadavg()
        t0 = time.perf_counter()
        (work / "bin").mkdir()
        write_llamacpp_bin(work / "bin" / "tensor_trace.bin", bin_mb)
        write_olmoe_jsonl(work / "c4_results_5000.jsonl", json_mb)
        write_llamacpp_json(work / "json", json_mb)
        gen_s = time.perf_counter() - t0
        results = [
            measure("llamacpp_bin", work / "bin" / "tensor_trace.bin", work, {"num_experts": 32}, args.repeat),
            measure("olmoe_jsonl", work / "c4_results_5000.jsonl", work, {"num_experts": 64}, args.repeat),
            measure("llamacpp_json", work / "json", work, {"num_experts": 32}, args.repeat),
        ]
        print(json.dumps({
            "benchmark": "importers",
            "unit": "MB of input file(s) per second, wall clock of import_trace (parse, validate, spool, write cube)",
            "results": results,
            "generation_seconds": round(gen_s, 1),
            "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                        "loadavg_before": [round(x, 2) for x in load_before],
                        "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
        }, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
