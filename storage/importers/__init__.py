"""Importers: routing traces written by other systems -> the routing cube of :mod:`storage.schema`.

Every importer produces the same cube as capture (expert ids always when the
source has them; weights and logits where the format has or implies them;
token, sample, domain and checkpoint coordinates from the file, its path or a
side table), so every analysis runs on it unchanged.

Formats (``IMPORTERS`` keys; each module's docstring details the layout)::

    llamacpp_json   llama.cpp tensor-trace per-token JSON folders (seed 004; steps split in record order)
    llamacpp_bin    llama.cpp tensor_trace.bin, packed 1024-byte records (top_k states the model's routing)
    moe_trace_csv   llama.cpp moe-trace CSVs: layer,expert | pos,layer,id.. | phase,token,layer,rank,expert
    libmoe          LibMoE analyst logs (per-token ids, or per-layer aggregates only)
    olmoe_jsonl     OLMoE run_moe_analysis.py <prefix>_results[_<step>].jsonl
    olmoe_counts    OLMoE routing_output/<model>/expert_counts/<domain>.pkl (a counts cube, no tokens)
    megatron        Megatron-LM router_trace_rank<r>.jsonl (+ bf16 logits sidecar)
    vllm_npy        vLLM routed_experts arrays saved with np.save, one per request
    sglang          SGLang responses: meta_info.routed_experts or choices[].sgl_ext.routed_experts (base64 int32)
    router_logits   output_router_logits saved with torch.save / safetensors + input ids
    segments_json   segment-level routing_probs reports (seed 002)
    vllm_routes_jsonl  vLLM routing-logger JSONL (meta line + one route line per token and layer)
    table           long routing tables, one row per (sample, layer, token): JSONL, CSV/TSV, Parquet
    serving_json    serving responses: SGLang sgl_ext / meta_info routed_experts, vLLM choices[].routed_experts

Usage::

    from storage.importers import import_trace
    import_trace("olmoe_jsonl", ["c4_results_5000.jsonl", "c4_results_120000.jsonl"], "runs/x/routing.zarr",
                 side_table="samples.csv")

Each source in ``source`` (a path or a list of paths) is one checkpoint; their
samples and tokens must be identical.

Sources without per-token expert ids (LibMoE logs that only hold per-layer
aggregates; router logits without stated semantics) give a cube *without*
``expert_ids`` (``attrs["has_token_ids"] = False``), holding the aggregate
variables ``agg_*`` of :mod:`storage.schema` or ``router_logits`` instead.
Keeping an all -1 ``expert_ids`` would let analyses run on nothing;
without it ``analyses.missing_requirements`` names what is missing.

How a run goes: the format's ``read`` parses the source once, streaming, and
yields samples and per-layer blocks; :class:`._core.Collector` validates each
block (ragged top-k, ids outside 0..E-1, repeated ids, layers missing from a
record) and appends it to one raw spool file per (variable, layer), so memory
stays bounded by one block; :func:`._core.write_cube` then writes the template
and each checkpoint's region chunk by chunk from the spool. The cube is written to a temporary
sibling of ``out_path`` and renamed into place only when every checkpoint is
written and marked complete; on any error nothing is left at ``out_path``.
"""

from __future__ import annotations

import inspect
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from . import csvtrace, libmoe, llamacpp, logits, megatron, olmoe, olmoe_counts, segments, serving, warmup, table, vllm_routes
from ._core import Collected, Collector, TraceError, read_side_table, spool_dir_for, total_size, write_cube

IMPORTERS: dict[str, Callable] = {
    "llamacpp_json": llamacpp.read_json,
    "llamacpp_bin": llamacpp.read_binary,
    "moe_trace_csv": csvtrace.read,
    "libmoe": libmoe.read,
    "olmoe_jsonl": olmoe.read,
    "olmoe_counts": olmoe_counts.read,
    "megatron": megatron.read,
    "vllm_npy": serving.read_vllm,
    "sglang": serving.read_sglang,
    "router_logits": logits.read,
    "segments_json": segments.read,
    "vllm_routes_jsonl": vllm_routes.read,
    "table": table.read,
    "serving_json": serving.read_serving,
}


# Options every per-token importer takes (the shared warm-up step, storage/importers/warmup.py).
SHARED_OPTIONS = ("keep_warmup", "warmup_min_run")
NO_TOKEN_FORMATS = frozenset({"olmoe_counts"})  # aggregate counts: no tokens, so no warm-up batches


def importer_options(fmt: str) -> list[str]:
    """The keyword options of importer ``fmt``: its own, then the shared ones."""
    own = [p for p in inspect.signature(_get(fmt)).parameters if p != "source"]
    return own + ([] if fmt in NO_TOKEN_FORMATS else [o for o in SHARED_OPTIONS if o not in own])


def _get(fmt: str) -> Callable:
    try:
        return IMPORTERS[fmt]
    except KeyError:
        raise ValueError(f"unknown trace format {fmt!r}; known: {sorted(IMPORTERS)}") from None


def import_trace(
    format: str,
    source: str | os.PathLike | list,
    out_path: str | os.PathLike,
    *,
    checkpoint: str | list[str] | None = None,
    step: int | list[int] | None = None,
    side_table: str | os.PathLike | dict | None = None,
    num_experts: int | None = None,
    model_family: str | None = None,
    overwrite: bool = False,
    **options,
) -> dict:
    """Import trace(s) of ``format`` into the routing cube at ``out_path``.

    Parameters
    ----------
    format : a key of :data:`IMPORTERS`.
    source : path, or list of paths, one per checkpoint.
    checkpoint, step : names / steps per source; default from the file where the
        format says (OLMoE step in the name, LibMoE results.json), else the
        source's file name and its index.
    side_table : CSV/JSON (or dict) mapping sample key -> dataset/domain/condition/pair.
    num_experts : E, when the format does not say it (ids are checked against it);
        otherwise inferred (largest id + 1, recorded as ``num_experts_inferred``).
    overwrite : replace an existing cube at ``out_path``.
    options : the format's own keyword options (see :func:`importer_options`).

    Returns
    -------
    dict: path, checkpoints, steps, tokens, samples, layers, num_experts, top_k,
    variables, has_token_ids, router_semantics, source, bytes_read, seconds.

    Raises
    ------
    FileNotFoundError for a missing source; ValueError (TraceError) naming the
    file, record and field for input that does not match the format;
    FileExistsError when ``out_path`` exists and ``overwrite`` is False.
    """
    t0 = time.perf_counter()
    read = _get(format)
    known = importer_options(format)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"importer {format!r}: unknown option(s) {unknown}; known: {known}")
    sources = [Path(s) for s in (source if isinstance(source, (list, tuple)) else [source])]
    if not sources:
        raise ValueError("import_trace: no source given")
    names = _per_source(checkpoint, len(sources), "checkpoint")
    steps = _per_source(step, len(sources), "step")
    out_path = Path(out_path)
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"{out_path}: already exists (pass overwrite=True to replace it)")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    side = read_side_table(side_table)
    keep_warmup = options.pop("keep_warmup", False)
    min_run = options.pop("warmup_min_run", warmup.DEFAULT_MIN_RUN)
    if not isinstance(keep_warmup, bool):
        raise ValueError(f"importer {format!r}: option keep_warmup={keep_warmup!r}; expected true or false")
    if isinstance(min_run, bool) or not isinstance(min_run, int) or min_run < 2:
        raise ValueError(f"importer {format!r}: option warmup_min_run={min_run!r}; expected an integer >= 2")
    spool = spool_dir_for(out_path)
    parts: list[Collected] = []
    try:
        for i, src in enumerate(sources):
            trace = read(src, **options)
            collector = None
            if trace.events is not None:
                collector = Collector(spool / str(i), num_experts=num_experts or trace.num_experts).feed(trace.events)
            parts.append(Collected(trace, collector, names[i] or trace.checkpoint or "", steps[i]))
        _name_checkpoints(parts, sources)
        # Shared step for every per-token format: warm-up / dummy batches are excluded unless kept.
        found = warmup.detect([p.collector for p in parts], min_run=min_run, num_experts=num_experts)
        shared = {"keep_warmup": keep_warmup, "warmup_min_run": min_run} if found.mask is not None else {}
        summary = write_cube(
            parts, out_path, side=side, num_experts=num_experts, top_k=options.get("top_k"),
            model_family=model_family, options={"format": format, **options, **shared}, overwrite=overwrite,
            exclude_tokens=None if keep_warmup or not found.n_flagged else found.mask,
            extra_attrs={"warmup_excluded": found.describe(parts[0].collector.metas, kept=keep_warmup)}
            if found.n_flagged else None,
        )
        summary["warmup_tokens"] = found.n_flagged
        summary["warmup_excluded"] = 0 if keep_warmup else found.n_flagged
    finally:
        shutil.rmtree(spool, ignore_errors=True)
    summary["bytes_read"] = int(sum(total_size(p.trace.paths) for p in parts))
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    return summary


def _per_source(value, n: int, what: str) -> list:
    if value is None:
        return [None] * n
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"import_trace: {len(value)} {what} value(s) for {n} source(s)")
        return list(value)
    if n != 1:
        raise ValueError(f"import_trace: one {what} for {n} sources; give a list")
    return [value]


def _name_checkpoints(parts: list[Collected], sources: list[Path]) -> None:
    """Fill missing names (file name) and steps (format's, else order); names must be unique."""
    for p, src in zip(parts, sources):
        if not p.checkpoint:
            p.checkpoint = src.stem if src.is_file() else src.name
        if p.step is None:
            p.step = p.trace.step
    known = [p.step for p in parts if p.step is not None]
    nxt = (max(known) + 1) if known else 0
    for i, p in enumerate(parts):
        if p.step is None:
            # e.g. OLMoE's 'main' revision: after the numbered checkpoints imported with it
            p.step = nxt if known else i
            p.trace.attrs.setdefault("step_inferred", f"checkpoint {p.checkpoint!r}: step {p.step} assumed")
            nxt += 1 if known else 0
    names = [p.checkpoint for p in parts]
    if len(set(names)) != len(names):
        for i, p in enumerate(parts):
            if names.count(p.checkpoint) > 1:
                p.checkpoint = f"{p.checkpoint}-{i}"


__all__ = ["IMPORTERS", "TraceError", "import_trace", "importer_options"]
