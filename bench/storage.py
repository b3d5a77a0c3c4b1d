"""Benchmark (issue 5): bytes on disk per routing decision, routing.zarr vs a JSON-per-token trace.

A *decision* is one token routed at one MoE layer of one checkpoint.

routing.zarr
    Real stores written by ``storage.cube`` (``prepare_routing`` + ``RoutingWriter``)
    from the skewed synthetic generator of ``bench/analyses.py`` (domain, token and
    expert-popularity biases, Mixtral semantics), one store with ids + weights and
    one with ids + weights + router logits, for each (experts, top-k) configuration
    asked for. Bytes are apparent file sizes; they are split into the routing
    variables, the token table (per token, not per decision) and metadata.
    ``--cube PATH`` also measures existing stores (e.g. a real demo capture).

JSON-per-token trace
    The same routing written as llama.cpp tensor-trace JSON (ErsjanKeri/BSC
    ``tools/parse_trace.py --export-json``; /work/shared/FORMATS.md item 5):
    ``token-NNNNN.json`` per decode step, ``json.dump(..., indent=2)``, three
    ``MUL_MAT_ID`` entries (gate/up/down) per layer, each with its three source
    tensors and ``expert_ids``/``num_experts``. Only a representative subset of
    tokens is written (``--json-tokens``); bytes per decision are extrapolated to
    the whole cube. The real trace also logs every other op of the graph (the
    BSC plan measures ~1.7 MB per token), so this is a lower bound; it carries
    no routing weights at all.

Run from the repository root::

    python -m bench.storage                       # 2 checkpoints x 16 layers x 65,536 tokens per config
    python -m bench.storage --cube runs/x/routing.zarr
    python -m bench.storage --tiny                # seconds; for the smoke test
"""

from __future__ import annotations

import argparse
import zlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.analyses import dir_bytes, emit, log, machine, write_synthetic_cube  # noqa: E402

ROUTING_VARS = ("expert_ids", "expert_weights", "router_logits", "lens_logprob", "nll", "complete")
BINARY_RECORD_BYTES = 1024  # tensor_trace.bin record (FORMATS.md item 5)
PROJECTIONS = (("gate", "ffn_gate_exps", "ffn_norm"), ("up", "ffn_up_exps", "ffn_norm"),
               ("down", "ffn_down_exps", "ffn_moe_swiglu"))


# --------------------------------------------------------------------------- zarr side


def store_breakdown(path: Path) -> dict:
    """Bytes of a routing.zarr split by variable, with per-decision figures.

    Returns
    -------
    dict: sizes (checkpoint, layer, token, k, expert), decisions, bytes per
    routing variable, ``token_table`` bytes (every coordinate along ``token``),
    ``other`` bytes (metadata, small coords), totals and per-decision ratios.
    """
    import zarr

    g = zarr.open_group(str(path), mode="r")
    ids = g["expert_ids"]
    C, L, T, K = ids.shape
    E = int(g.attrs["num_experts"])
    decisions = C * L * T
    per_var = {}
    token_table = 0
    other = 0
    for child in sorted(Path(path).iterdir()):
        b = dir_bytes(child)
        if child.name in ROUTING_VARS:
            per_var[child.name] = b
        elif child.is_dir() and child.name in g and g[child.name].shape[:1] == (T,) and g[child.name].ndim == 1:
            token_table += b
        else:
            other += b
    total = dir_bytes(path)
    routing = {v: b for v, b in per_var.items() if v != "complete"}
    return {
        "path": str(path),
        "sizes": {"checkpoint": C, "layer": L, "token": T, "k": K, "expert": E},
        "decisions": decisions,
        "token_chunk": int(ids.chunks[2]),
        "compressors": str(getattr(ids, "compressors", "")),
        "bytes": {**per_var, "token_table": token_table, "other": other, "total": total},
        "bytes_per_decision": {
            **{v: b / decisions for v, b in routing.items()},
            "ids_weights": (routing.get("expert_ids", 0) + routing.get("expert_weights", 0)) / decisions,
            "ids_weights_logits": (routing.get("expert_ids", 0) + routing.get("expert_weights", 0)
                                   + routing.get("router_logits", 0)) / decisions,
            "whole_store": total / decisions,
        },
        "raw_bytes_per_decision": {
            "expert_ids": 2 * K, "expert_weights": 4 * K, "router_logits": 2 * E,
        },
        "top1_entropy_bits": top1_entropy(g),
    }


def top1_entropy(g, max_tokens: int = 200_000) -> float:
    """Mean over (checkpoint, layer) of the entropy (bits) of the top-1 expert distribution.

    A reader can compare it with log2(E) (uniform) to judge how skewed the data is.
    """
    ids = g["expert_ids"]
    C, L, T, _ = ids.shape
    E = int(g.attrs["num_experts"])
    hs = []
    for c in range(C):
        for layer in range(L):
            top1 = np.asarray(ids[c, layer, : min(T, max_tokens), 0]).astype(np.int64)
            top1 = top1[top1 >= 0]
            if top1.size == 0:
                continue
            p = np.bincount(top1, minlength=E) / top1.size
            p = p[p > 0]
            hs.append(float(-(p * np.log2(p)).sum()))
    return float(np.mean(hs)) if hs else float("nan")


# --------------------------------------------------------------------------- JSON trace side


def _source(name: str, layer: int, size: int, ptr: int, *, disk: bool, where: int) -> dict:
    src = {"name": name, "tensor_ptr": f"0x{ptr:x}", "size_bytes": size, "layer_id": layer,
           "memory_source": "DISK" if disk else "BUFFER"}
    src["disk_offset" if disk else "buffer_id"] = where
    return src


def token_trace(step: int, ids: np.ndarray, *, num_experts: int, hidden: int = 4096, ffn: int = 14336,
                t0_ns: int = 1_700_000_000_000_000_000, rng=None) -> dict:
    """One ``token-NNNNN.json`` document for decode step ``step``.

    Parameters
    ----------
    ids : (layer, k) expert ids of this token, slots in the order the model selected them.
    num_experts, hidden, ffn : size the (synthetic) weight tensors so that byte counts look real.

    Returns
    -------
    dict in the layout of BSC ``parse_trace.py`` ``export_to_json_per_token``.
    """
    rng = rng or np.random.default_rng(step)
    L, K = ids.shape
    entries = []
    t = t0_ns + step * 25_000_000
    start = t
    # Q4-ish expert tensors: ~4.5 bits per weight; u32 in the binary record
    w_bytes = min(num_experts * hidden * ffn * 9 // 16, 2**32 - 1)
    for layer in range(L):
        for proj, weight, act in PROJECTIONS:
            t += int(rng.integers(20_000, 400_000))
            sources = [
                _source(f"blk.{layer}.{weight}.weight", layer, w_bytes, 0x7F0000000000 + layer * 0x30000000,
                        disk=True, where=0x2000000 + layer * 3 * w_bytes % 2**40),
                _source(f"{act}-{layer}", layer, (ffn if proj == "down" else hidden) * 4 * K,
                        0x55D000000000 + int(rng.integers(0, 2**24)) * 64, disk=False, where=int(rng.integers(0, 64))),
                _source(f"ffn_moe_topk-{layer}", layer, 4 * K, 0x55D100000000 + int(rng.integers(0, 2**24)) * 64,
                        disk=False, where=int(rng.integers(0, 64))),
            ]
            entries.append({
                "entry_id": len(entries),
                "timestamp_ns": t,
                "timestamp_relative_ms": round((t - start) / 1_000_000, 3),
                "token_id": step,
                "layer_id": layer,
                "thread_id": int(rng.integers(0, 8)),
                "phase": "GENERATE",
                "operation_type": "MUL_MAT_ID",
                "dst_name": f"ffn_moe_{proj}-{layer}",
                "num_sources": 3,
                "sources": sources,
                "expert_ids": [int(e) for e in ids[layer]],
                "num_experts": int(K),
            })
    return {
        "token_id": step,
        "metadata": {"total_entries": len(entries), "duration_ms": round((t - start) / 1_000_000, 3),
                     "timestamp_start_ns": start, "format_version": "1024-byte"},
        "entries": entries,
    }


def json_trace_bytes(cube: Path, out_dir: Path, *, n_tokens: int) -> dict:
    """Write the first ``n_tokens`` tokens of checkpoint 0 as token-NNNNN.json files; measure them.

    Returns
    -------
    dict: files, decisions written, bytes (plain and gzip -6 of the concatenated
    files, as a tar.gz would hold them), bytes per decision.
    """
    import zarr

    g = zarr.open_group(str(cube), mode="r")
    ids = g["expert_ids"]
    _, L, T, K = ids.shape
    E = int(g.attrs["num_experts"])
    n = min(n_tokens, T)
    block = np.asarray(ids[0, :, :n, :])  # (layer, n, k)
    out_dir.mkdir(parents=True, exist_ok=True)
    total = 0
    gz = zlib.compressobj(6, zlib.DEFLATED, 31)  # gzip container
    gz_bytes = 0
    for step in range(n):
        doc = token_trace(step, block[:, step, :], num_experts=E)
        f = out_dir / f"token-{step:05d}.json"
        with open(f, "w") as fh:
            json.dump(doc, fh, indent=2)
        data = f.read_bytes()
        total += len(data)
        gz_bytes += len(gz.compress(data))
    gz_bytes += len(gz.flush())
    decisions = n * L
    # The trace must hold exactly the cube's routing: read one file back the way the BSC plan does.
    back = json.loads((out_dir / "token-00000.json").read_text())
    got = [e["expert_ids"] for e in back["entries"] if e["operation_type"] == "MUL_MAT_ID"][::3]
    if got != block[:, 0, :].tolist():
        raise RuntimeError("JSON trace does not round-trip the cube's expert ids")
    return {
        "files": n,
        "decisions": decisions,
        "entries_per_decision": 3,
        "bytes": total,
        "gzip_bytes": gz_bytes,
        "bytes_per_decision": total / decisions,
        "gzip_bytes_per_decision": gz_bytes / decisions,
        "binary_record_bytes_per_decision": 3 * BINARY_RECORD_BYTES,
    }


# --------------------------------------------------------------------------- driver


def measure_config(work: Path, *, checkpoints: int, layers: int, tokens: int, experts: int, top_k: int,
                   json_tokens: int, seed: int) -> dict:
    """Both stores (ids+weights; +logits) and the JSON subset for one (experts, top-k) configuration."""
    res = {"experts": experts, "top_k": top_k}
    for label, logits in (("ids_weights", False), ("ids_weights_logits", True)):
        path = work / f"E{experts}k{top_k}-{label}.zarr"
        log(f"writing {path.name}: {checkpoints}x{layers}x{tokens} decisions")
        info = write_synthetic_cube(path, n_checkpoints=checkpoints, n_layers=layers, n_tokens=tokens,
                                    num_experts=experts, top_k=top_k, keep_logits=logits, keep_lens=False,
                                    keep_nll=False, seed=seed, progress=False)
        res[label] = {**store_breakdown(path), "write_seconds": info["seconds"]}
    cube = work / f"E{experts}k{top_k}-ids_weights.zarr"
    js = json_trace_bytes(cube, work / f"E{experts}k{top_k}-json", n_tokens=json_tokens)
    decisions = res["ids_weights"]["decisions"]
    js["extrapolated_bytes_for_cube"] = js["bytes_per_decision"] * decisions
    js["extrapolated_gzip_bytes_for_cube"] = js["gzip_bytes_per_decision"] * decisions
    js["extrapolated"] = js["decisions"] < decisions
    res["json_trace"] = js
    z_ids = res["ids_weights"]["bytes_per_decision"]["expert_ids"]
    z_iw = res["ids_weights"]["bytes_per_decision"]["ids_weights"]
    z_store = res["ids_weights"]["bytes_per_decision"]["whole_store"]
    res["json_over_zarr"] = {
        "json_vs_zarr_ids": js["bytes_per_decision"] / z_ids,
        "json_vs_zarr_ids_weights": js["bytes_per_decision"] / z_iw,
        "json_vs_zarr_whole_store": js["bytes_per_decision"] / z_store,
        "json_gzip_vs_zarr_whole_store": js["gzip_bytes_per_decision"] / z_store,
        "binary_trace_vs_zarr_whole_store": js["binary_record_bytes_per_decision"] / z_store,
    }
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoints", type=int, default=2)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--tokens", type=int, default=65536, help="tokens per cube (decisions = checkpoints x layers x tokens)")
    p.add_argument("--configs", nargs="*", default=["8x2", "64x8"],
                   help="EXPERTSxTOPK configurations (default: 8x2 Mixtral-like, 64x8 OLMoE-like)")
    p.add_argument("--json-tokens", type=int, default=200, help="tokens written as JSON files (then extrapolated)")
    p.add_argument("--cube", action="append", default=[], help="also measure this existing routing.zarr")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", default=None, help="keep the written stores in this directory")
    p.add_argument("--tiny", action="store_true", help="small stores, 5 JSON tokens (smoke test)")
    args = p.parse_args(argv)
    if args.tiny:
        args.checkpoints, args.layers, args.tokens, args.json_tokens, args.configs = 1, 2, 2000, 5, ["8x2"]
    configs = []
    for c in args.configs:
        try:
            e, k = (int(x) for x in c.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--configs: {c!r} is not EXPERTSxTOPK (e.g. 8x2)") from None
        if not 1 <= k <= e:
            raise SystemExit(f"--configs: {c!r} needs 1 <= top-k <= experts")
        configs.append((e, k))
    for c in args.cube:
        if not (Path(c) / "zarr.json").exists():
            raise SystemExit(f"--cube {c}: no routing.zarr there (zarr.json missing)")

    doc = {"benchmark": "storage", "issue": 5, "machine_start": machine(), "argv": sys.argv[1:] if argv is None else argv,
           "definitions": {
               "decision": "one token routed at one MoE layer of one checkpoint",
               "bytes": "apparent file sizes (sum of st_size), as du -b",
               "json_trace": "llama.cpp tensor-trace JSON (BSC parse_trace.py --export-json), MUL_MAT_ID entries only "
                             "(gate/up/down per layer), indent=2; ids only, no weights; the real trace also logs every "
                             "other op, so its size is a lower bound",
               "extrapolated": "JSON bytes per decision measured on --json-tokens tokens x all layers, multiplied by the "
                               "cube's decisions",
           }}
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="moe-atlas-bench-storage-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        doc["synthetic"] = [
            measure_config(work, checkpoints=args.checkpoints, layers=args.layers, tokens=args.tokens, experts=e,
                           top_k=k, json_tokens=args.json_tokens, seed=args.seed)
            for e, k in configs
        ]
        doc["existing"] = []
        for c in args.cube:
            b = store_breakdown(Path(c))
            js = json_trace_bytes(Path(c), work / f"json-{len(doc['existing'])}", n_tokens=args.json_tokens)
            b["json_trace"] = js
            b["json_over_zarr_whole_store"] = js["bytes_per_decision"] / b["bytes_per_decision"]["whole_store"]
            doc["existing"].append(b)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    doc["machine_end"] = machine()
    emit(doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
