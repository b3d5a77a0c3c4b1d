"""Exporters: the routing cube -> formats other projects' analysis scripts read.

* :func:`export_olmoe_jsonl` writes OLMoE ``run_moe_analysis.py`` files, one per
  checkpoint (``<prefix>_results_<step>.jsonl``, or ``<prefix>_results.jsonl``
  for the checkpoint named ``main``): one line per sample with ``input_ids``
  [n] and ``exp_ids`` [n][k][L] (layer axis last), so OLMoE's checkpoint
  comparison (``do_ckpt_analysis``) runs on them. ``predicted_token_ids`` is
  not written: the cube does not hold the LM's predictions.
* :func:`export_megatron_jsonl` writes Megatron-LM ``RouterTracer`` files, one
  folder per checkpoint: ``router_trace_rank<r>.jsonl`` with one line per
  (step = sample index, layer) and, when the cube has router logits, the
  headerless bfloat16 ``logits_rank<r>.bin`` sidecar with
  ``logit_offset``/``logit_bytes``/``logit_shape``.

What each format keeps: OLMoE keeps ids (slot order), token ids, sample
boundaries and layer order (not layer ids, domains, weights or logits);
Megatron keeps ids (slot order), layer ids, sample boundaries and logits at
bfloat16 precision (not token ids, positions, domains or weights). The
round-trip tests check that export -> import gives the same cube for exactly
those. Files are written to temporary names and renamed only once every file is whole; the cube
is read one batch of whole samples at a time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import xarray as xr

from . import atomic
from .schema import FILL_ID


def _open(cube) -> xr.Dataset:
    if isinstance(cube, xr.Dataset):
        return cube
    from .cube import open_routing

    return open_routing(cube, complete_only=True)


def _sample_batches(ds: xr.Dataset, max_tokens: int) -> Iterator[tuple[int, int, list[tuple[int, int, int]]]]:
    """(t0, t1, [(sample, start, stop), ...]) batches of whole samples of at most ~max_tokens tokens."""
    sample = np.asarray(ds["sample"].values)
    if sample.size == 0:
        return
    starts = np.flatnonzero(np.r_[True, sample[1:] != sample[:-1]])
    stops = np.r_[starts[1:], sample.size]
    batch: list[tuple[int, int, int]] = []
    t0 = 0
    for s, a, b in zip(sample[starts], starts, stops):
        if batch and b - t0 > max_tokens:
            yield t0, int(a), batch
            batch, t0 = [], int(a)
        batch.append((int(s), int(a), int(b)))
    yield t0, int(stops[-1]), batch


def _atomic_lines(path: Path):
    tmp = atomic.temp_path(path)
    return tmp, open(tmp, "w", encoding="utf-8")


def _check_written(ids: np.ndarray, ds: xr.Dataset, ci: int, t0: int) -> None:
    bad = np.argwhere(ids == FILL_ID)
    if bad.size:
        li, t = int(bad[0][0]), int(bad[0][1])
        raise ValueError(
            f"checkpoint {str(ds['checkpoint'].values[ci])!r}, layer {int(ds['layer'].values[li])}, token {t0 + t}: "
            "unwritten routing (expert id -1); the export format has no way to say 'missing'"
        )


def export_olmoe_jsonl(cube, out_dir: str | os.PathLike, *, prefix: str = "c4", main: str | None = "main",
                       max_tokens: int = 1 << 18) -> list[Path]:
    """One OLMoE results file per checkpoint of ``cube`` (a path or Dataset).

    dims in: expert_ids (checkpoint, layer, token, k). Out: lines {input_ids [n],
    exp_ids [n][k][L]} per sample. The checkpoint named ``main`` is written as
    ``<prefix>_results.jsonl``; the others as ``<prefix>_results_<step>.jsonl``.

    Raises ValueError when the cube has no expert ids or holds unwritten slots.
    """
    ds = _open(cube)
    if "expert_ids" not in ds:
        raise ValueError("export_olmoe_jsonl: the cube has no 'expert_ids' (aggregates or logits only)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    token_ids = np.asarray(ds["token_id"].values).astype(np.int64)
    pending: list[tuple[Path, Path]] = []
    try:
        for ci, (name, step) in enumerate(zip(ds["checkpoint"].values, ds["step"].values)):
            name = str(name)
            path = out_dir / (f"{prefix}_results.jsonl" if name == main else f"{prefix}_results_{int(step)}.jsonl")
            tmp, f = _atomic_lines(path)
            pending.append((tmp, path))
            with f:
                for t0, t1, samples in _sample_batches(ds, max_tokens):
                    ids = np.asarray(ds["expert_ids"].isel(checkpoint=ci, token=slice(t0, t1)).values)  # (L, n, k)
                    _check_written(ids, ds, ci, t0)
                    for _, a, b in samples:
                        exp = ids[:, a - t0:b - t0, :].transpose(1, 2, 0)  # (n, k, L): layer axis last
                        f.write(json.dumps({"input_ids": token_ids[a:b].tolist(), "exp_ids": exp.tolist()}) + "\n")
    except BaseException:
        for tmp, _ in pending:
            tmp.unlink(missing_ok=True)
        raise
    return _commit(pending)


def _commit(pending: list[tuple[Path, Path]]) -> list[Path]:
    """Rename every finished temporary into place (only once all of them are whole)."""
    for tmp, path in pending:
        atomic.replace(tmp, path)
    return [path for _, path in pending if path.suffix == ".jsonl"]


def _to_bf16(x: np.ndarray) -> np.ndarray:
    """float -> bfloat16 bit patterns (uint16), round to nearest even."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def export_megatron_jsonl(cube, out_dir: str | os.PathLike, *, rank: int = 0, with_logits: bool = True,
                          max_tokens: int = 1 << 18) -> list[Path]:
    """Megatron ``RouterTracer`` files per checkpoint of ``cube``: ``<out_dir>/<checkpoint>/router_trace_rank<r>.jsonl``.

    Sample s of the cube becomes step s; its tokens the record's rows. With
    router logits in the cube (and ``with_logits``) the bfloat16 sidecar
    ``logits_rank<r>.bin`` is written beside it.

    Raises ValueError when the cube has no expert ids, holds unwritten slots,
    or NaN logits.
    """
    ds = _open(cube)
    if "expert_ids" not in ds:
        raise ValueError("export_megatron_jsonl: the cube has no 'expert_ids' (aggregates or logits only)")
    use_logits = with_logits and "router_logits" in ds
    out_dir = Path(out_dir)
    layers = [int(x) for x in ds["layer"].values]
    k = int(ds.sizes["k"])
    pending: list[tuple[Path, Path]] = []
    lf = None
    try:
        for ci, name in enumerate(map(str, ds["checkpoint"].values)):
            folder = out_dir / name
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"router_trace_rank{rank}.jsonl"
            tmp, f = _atomic_lines(path)
            pending.append((tmp, path))
            if use_logits:
                lpath = folder / f"logits_rank{rank}.bin"
                ltmp = atomic.temp_path(lpath)
                pending.append((ltmp, lpath))
                lf = open(ltmp, "wb")
            offset = 0
            with f:
                for t0, t1, samples in _sample_batches(ds, max_tokens):
                    ids = np.asarray(ds["expert_ids"].isel(checkpoint=ci, token=slice(t0, t1)).values)
                    _check_written(ids, ds, ci, t0)
                    logits = (np.asarray(ds["router_logits"].isel(checkpoint=ci, token=slice(t0, t1)).values)
                              if use_logits else None)
                    if logits is not None and not np.all(np.isfinite(logits)):
                        raise ValueError(f"checkpoint {name!r}: NaN/inf router logits between tokens {t0} and {t1}")
                    for s, a, b in samples:
                        n = b - a
                        for li, layer in enumerate(layers):
                            rec = {"step": s, "stage": "pre_dispatch", "block": "decoder", "layer": layer,
                                   "rank": rank, "num_tokens": n, "topk": k}
                            if logits is not None:
                                raw = _to_bf16(logits[li, a - t0:b - t0, :]).tobytes()
                                lf.write(raw)
                                rec.update(logit_offset=offset, logit_bytes=len(raw), logit_shape=[n, logits.shape[2]])
                                offset += len(raw)
                            rec["top_indices"] = ids[li, a - t0:b - t0, :].tolist()
                            f.write(json.dumps(rec) + "\n")
            if lf is not None:
                lf.close()
                lf = None
    except BaseException:
        if lf is not None:
            lf.close()
        for tmp, _ in pending:
            tmp.unlink(missing_ok=True)
        raise
    return _commit(pending)


EXPORTERS = {"olmoe_jsonl": export_olmoe_jsonl, "megatron": export_megatron_jsonl}

__all__ = ["EXPORTERS", "export_megatron_jsonl", "export_olmoe_jsonl"]
