"""Zarr I/O for the routing cube and for analysis results.

Only this module knows encodings, chunking and how completion is recorded.

The routing cube is written in three steps:

1. ``prepare_routing`` writes the template (metadata only; unwritten chunks read
   as the schema's fill values, e.g. expert id -1) or extends an existing cube
   with checkpoints it does not have yet;
2. a ``RoutingWriter`` per checkpoint fills that checkpoint's disjoint,
   chunk-aligned region;
3. the writer sets ``complete[checkpoint] = 1`` only after all of its data is
   written, so a killed capture is never mistaken for a finished one.

Analysis results are small: they are computed, written to a temporary sibling
store and renamed into place, with a fingerprint of their inputs in the attrs.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import uuid
import warnings
from pathlib import Path

import numpy as np
import xarray as xr
import zarr

from .schema import FILL_ID, VARIABLES, validate_routing

# Consolidated metadata is not part of the Zarr v3 spec, but xarray and zarr-python
# both read it and it saves one listing per open.
warnings.filterwarnings("ignore", message=".*Consolidated metadata.*")
warnings.filterwarnings("ignore", message=".*not part of the Zarr format 3 specification.*")

TARGET_CHUNK_BYTES = 4 * 2**20


class CubeError(ValueError):
    """A Zarr store is missing, truncated, or does not match what was expected."""


def token_chunk_size(n_tokens: int, *, top_k: int, num_experts: int, keep_logits: bool) -> int:
    """Tokens per chunk so that the widest variable's chunk holds ~4 MiB raw."""
    row = max(top_k * 4, num_experts * 2 if keep_logits else 0, 4)
    return int(max(1, min(n_tokens, TARGET_CHUNK_BYTES // row)))


def _encoding(ds: xr.Dataset, token_chunk: int) -> dict:
    enc = {}
    for name, var in ds.data_vars.items():
        spec = VARIABLES.get(name)
        chunks = tuple(1 if d in ("checkpoint", "layer") else token_chunk if d == "token" else ds.sizes[d] for d in var.dims)
        e = {"chunks": chunks}
        if spec is not None:
            e["fill_value"] = spec.fill
        enc[name] = e
    return enc


def _same(a, b) -> bool:
    return np.array_equal(np.asarray(a), np.asarray(b))


def prepare_routing(path: str | os.PathLike, template: xr.Dataset, *, token_chunk: int | None = None) -> list[str]:
    """Create the routing cube from ``template`` or extend it with new checkpoints.

    Parameters
    ----------
    template : xr.Dataset
        From ``storage.schema.empty_routing(..., lazy=True)``; dims
        (checkpoint, layer, token, k[, expert]).

    Returns
    -------
    The checkpoint names that were added (all of them for a new cube).

    Raises
    ------
    CubeError if an existing cube was built from other inputs (tokens, layers,
    experts, top-k or variables differ): mixing them would silently compare
    different things.
    """
    path = Path(path)
    validate_routing(template, where=f"template for {path}")
    if token_chunk is None:
        token_chunk = token_chunk_size(
            template.sizes["token"],
            top_k=template.sizes["k"],
            num_experts=int(template.attrs["num_experts"]),
            keep_logits="router_logits" in template,
        )
    if not (path / "zarr.json").exists():
        if path.exists():
            # A directory without metadata is the remains of a killed first write.
            shutil.rmtree(path)
        tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        template.attrs["token_chunk"] = int(token_chunk)
        template.to_zarr(tmp, mode="w", compute=False, encoding=_encoding(template, token_chunk), consolidated=True)
        os.replace(tmp, path)
        return list(map(str, template.checkpoint.values))

    existing = open_routing(path, complete_only=False)
    problems = []
    if existing.attrs.get("inputs_hash") != template.attrs["inputs_hash"]:
        problems.append("the token inputs differ (inputs_hash)")
    for dim in ("layer", "k", "expert"):
        if dim in template.dims and (dim not in existing.dims or not _same(existing[dim], template[dim])):
            problems.append(f"dim '{dim}' differs")
    if set(existing.data_vars) != set(template.data_vars):
        problems.append(f"variables differ: {sorted(existing.data_vars)} vs {sorted(template.data_vars)}")
    if problems:
        raise CubeError(
            f"{path}: existing routing cube does not match this experiment ({'; '.join(problems)}). "
            "Use another output directory or delete the cube to recapture."
        )
    have = list(map(str, existing.checkpoint.values))
    new = [c for c in map(str, template.checkpoint.values) if c not in have]
    for c in new:
        template.sel(checkpoint=[c]).to_zarr(path, append_dim="checkpoint", compute=False, consolidated=True)
    if new:
        zarr.consolidate_metadata(str(path))
    return new


def _plain_strings(ds: xr.Dataset) -> xr.Dataset:
    """Zarr 3 reads text as numpy's StringDType; give readers plain object arrays,
    the same as a cube built in memory (``astype(str)`` etc. then behave alike)."""
    fix = {n: (v.dims, v.values.astype(object), v.attrs) for n, v in ds.coords.items() if v.dtype.kind == "T"}
    return ds.assign_coords(fix) if fix else ds


TASK_BYTES = 32 * 2**20  # target bytes of the largest per-token variable in one Dask block


def _task_chunks(lazy: xr.Dataset) -> dict:
    """Dask chunks that read several stored (checkpoint, layer) chunks per task.

    The cube is stored one checkpoint × layer × token-chunk per object, which
    is the unit of writing. Reading it one object per Dask task makes the
    scheduler, not the arithmetic, the cost of a pass (about a millisecond per
    task on a distributed cluster, several tasks per block): blocks span
    several layers instead, up to :data:`TASK_BYTES` of the largest per-token
    variable. Always whole stored chunks, so no object is read twice.
    """
    per_layer = 0
    for var in lazy.data_vars.values():
        if "layer" in var.dims and "token" in var.dims:
            stored = var.encoding.get("chunks") or var.shape
            per_layer = max(per_layer, int(np.prod([c for d, c in zip(var.dims, stored) if d not in ("layer",)],
                                                   dtype=np.int64)) * var.dtype.itemsize)
    if not per_layer or "layer" not in lazy.dims:
        return {}
    return {"layer": int(max(1, min(lazy.sizes["layer"], TASK_BYTES // per_layer)))}


def _lazy_coords(ds: xr.Dataset, lazy: xr.Dataset) -> xr.Dataset:
    """Non-index coordinates of ``ds`` read on first use, then kept in memory.

    Opened with dask chunks, every token coordinate (domain, sample, text, ...)
    would be re-read from the store at each ``.values``; read eagerly, opening
    a cube of 10^7 tokens would cost seconds of string decoding that most
    analyses never need. ``lazy`` is the same store opened without dask, whose
    variables xarray loads once on first access. Text (numpy StringDType in
    zarr 3) is handed out as object arrays, as in a cube built in memory.
    """
    from xarray.coding.variables import lazy_elemwise_func
    from xarray.core import indexing

    fix = {}
    for name, var in ds.coords.items():
        if name in ds.indexes or name not in lazy.coords:
            continue
        src = lazy[name].variable
        data = src._data
        if src.dtype.kind == "T":
            data = lazy_elemwise_func(data, _as_object, np.dtype(object))
        fix[name] = xr.Variable(src.dims, indexing.MemoryCachedArray(data), src.attrs)
    return ds.assign_coords(fix) if fix else ds


def _as_object(values) -> np.ndarray:
    return np.asarray(values).astype(object)


def open_routing(path: str | os.PathLike, *, complete_only: bool = True, chunks="auto") -> xr.Dataset:
    """Open the routing cube lazily (dask arrays, one checkpoint × layer per chunk).

    With ``complete_only`` only checkpoints whose region was fully written are
    returned, sorted by step.
    """
    path = Path(path)
    if not (path / "zarr.json").exists():
        raise CubeError(f"{path}: no routing cube here (zarr.json missing)")
    try:
        lazy = xr.open_zarr(path, consolidated=None, chunks=None)
        if chunks == "auto":
            chunks = _task_chunks(lazy)
        ds = xr.open_zarr(path, consolidated=None, chunks=chunks)
        ds = _lazy_coords(ds, lazy)
    except Exception as exc:  # zarr raises many types for damaged stores
        raise CubeError(f"{path}: cannot open routing cube (truncated or corrupt store?): {exc}") from exc
    try:
        validate_routing(ds, where=str(path))
    except ValueError as exc:
        raise CubeError(str(exc)) from exc
    if complete_only:
        try:
            done = ds["complete"].values.astype(bool)
        except Exception as exc:
            raise CubeError(f"{path}: cannot read the 'complete' flags: {exc}") from exc
        for ci, (missing, expected, example) in _missing_chunks(path, np.flatnonzero(done)).items():
            if missing:
                raise CubeError(
                    f"{path}: truncated routing cube: checkpoint {str(ds.checkpoint.values[ci])!r} is marked "
                    f"complete but {missing} of its {expected} 'expert_ids' chunks are missing (e.g. {example}); "
                    "copy the store again, or delete it to recapture"
                )
        keep = np.flatnonzero(done)
        # one isel by step order: ``sortby`` reindexes through a deep copy of every
        # coordinate, which for the object-dtype token table costs seconds per 10^7 tokens
        keep = keep[np.argsort(np.asarray(ds["step"].values)[keep], kind="stable")]
        ds = ds.isel(checkpoint=keep)
    return ds


def _missing_chunks(path: Path, cis) -> dict[int, tuple[int, int, str]]:
    """For each checkpoint index in ``cis``: (missing, expected, an example key) of its 'expert_ids' chunk objects.

    Zarr stores no object for a chunk that equals the fill value, but a
    captured chunk never does (ids are 0..E-1, the fill is -1): a complete
    checkpoint has every chunk, and a missing one means the store was cut
    short (an interrupted copy, lost writes) and would read as unwritten.
    """
    from zarr.core.sync import sync

    cis = [int(c) for c in cis]
    if not cis:
        return {}
    g = zarr.open_group(str(path), mode="r")
    if "expert_ids" not in g:  # an imported cube without per-token ids (attrs has_token_ids = False)
        return {c: (0, 0, "") for c in cis}
    arr = g["expert_ids"]

    async def _keys():
        return {k async for k in arr.store.list_prefix(f"{arr.path}/")}

    have = sync(_keys())
    grid = list(itertools.product(*[range(-(-n // c)) for n, c in zip(arr.shape[1:], arr.chunks[1:])]))
    out = {}
    for ci in cis:
        absent = [k for k in (f"{arr.path}/{arr.metadata.encode_chunk_key((ci, *rest))}" for rest in grid) if k not in have]
        out[ci] = (len(absent), len(grid), absent[0] if absent else "")
    return out


def completed_checkpoints(path: str | os.PathLike) -> list[str]:
    """Names of the checkpoints whose region is written and whole, in cube order.

    A checkpoint marked complete whose chunks are missing (a truncated copy)
    is left out, so the pipeline recaptures it.
    """
    path = Path(path)
    if not (path / "zarr.json").exists():
        return []
    g = zarr.open_group(str(path), mode="r")
    names = g["checkpoint"][:]
    done = g["complete"][:]
    whole = _missing_chunks(path, np.flatnonzero(done == 1))
    return [str(names[ci]) for ci, (missing, _, _) in whole.items() if not missing]


class RoutingWriter:
    """Fill one checkpoint's region of the routing cube, token chunk by token chunk.

    ``append`` takes arrays for consecutive tokens (starting at token 0), in the
    layouts of ``storage.schema.VARIABLES`` without the checkpoint dim:
    ``expert_ids`` (layer, n, k), ``expert_weights`` (layer, n, k),
    ``router_logits`` (layer, n, expert), ``lens_logprob`` (layer, n),
    ``nll`` (n,). Full token chunks are written as soon as they are buffered,
    so memory stays bounded by one chunk. ``close`` checks that every token was
    written and only then marks the checkpoint complete.
    """

    def __init__(self, path: str | os.PathLike, checkpoint: str):
        self.path = Path(path)
        self.group = zarr.open_group(str(self.path), mode="r+")
        names = [str(c) for c in xr.open_zarr(self.path, consolidated=None).checkpoint.values]
        if checkpoint not in names:
            raise CubeError(f"{self.path}: checkpoint {checkpoint!r} is not in the cube template ({names})")
        self.ci = names.index(checkpoint)
        self.checkpoint = checkpoint
        self.vars = [v for v in VARIABLES if v in self.group and v != "complete"]
        ids = self.group["expert_ids"]
        self.n_tokens = ids.shape[2]
        self.chunk = ids.chunks[2]
        self.n_layers = ids.shape[1]
        self.offset = 0  # tokens written
        self.buffer: dict[str, list[np.ndarray]] = {v: [] for v in self.vars}
        self.buffered = 0
        # Un-mark first: a recapture must never leave a stale "complete" over new, partial data.
        self.group["complete"][self.ci] = 0

    def append(self, **arrays: np.ndarray) -> None:
        """Buffer the next tokens' arrays (see the class docstring); refuse the whole batch if any is invalid.

        Raises
        ------
        CubeError naming the cube, checkpoint and layer for a missing variable,
        token counts that disagree, expert ids outside 0..E-1, or NaN/inf in
        ``router_logits`` / ``expert_weights``.
        """
        missing = [v for v in self.vars if v not in arrays or arrays[v] is None]
        if missing:
            raise CubeError(f"{self.path}: capture did not provide {missing} (the cube template has them)")
        batch = {v: np.asarray(arrays[v]) for v in self.vars}
        n = None
        for v, a in batch.items():
            tok_axis = VARIABLES[v].dims.index("token") - 1
            if n is None:
                n = a.shape[tok_axis]
            if a.shape[tok_axis] != n:
                raise CubeError(f"{self.path}: '{v}' has {a.shape[tok_axis]} tokens in this batch, expected {n}")
        E = int(self.group.attrs["num_experts"])
        bad = (batch["expert_ids"] < 0) | (batch["expert_ids"] >= E)
        if bad.any():
            a = batch["expert_ids"]
            raise CubeError(
                f"{self.path}: checkpoint {self.checkpoint!r}, {self._layer_of(bad)}: expert id out of range "
                f"[{a.min()}, {a.max()}], expected 0..{E - 1}; not writing this checkpoint"
            )
        # Logits first: a NaN/inf router (diverged or corrupt weights, fp16 overflow) shows there first, and
        # would otherwise reach every analysis as numbers.
        for v in ("router_logits", "expert_weights"):
            if v in batch and batch[v].dtype.kind == "f":
                bad = ~np.isfinite(batch[v])
                if bad.any():
                    raise CubeError(
                        f"{self.path}: checkpoint {self.checkpoint!r}, {self._layer_of(bad)}: {int(bad.sum())} "
                        f"non-finite (NaN/inf) values in '{v}'; refusing to capture a broken router"
                    )
        if self.offset + self.buffered + n > self.n_tokens:
            raise CubeError(
                f"{self.path}: capture produced more tokens ({self.offset + self.buffered + n}) than the token table "
                f"({self.n_tokens})"
            )
        for v, a in batch.items():
            self.buffer[v].append(a)
        self.buffered += n
        self._flush(final=False)

    def _layer_of(self, bad: np.ndarray) -> str:
        """'layer L' (the model's own index) of the first flagged value of a (layer, token, ...) array."""
        i = int(np.argwhere(bad)[0][0])
        layers = self.group["layer"][:] if "layer" in self.group else np.arange(self.n_layers)
        return f"layer {int(layers[i])}"

    def _flush(self, *, final: bool) -> None:
        while self.buffered >= self.chunk or (final and self.buffered > 0):
            n = min(self.chunk, self.buffered)
            for v in self.vars:
                tok_axis = VARIABLES[v].dims.index("token") - 1
                cat = np.concatenate(self.buffer[v], axis=tok_axis) if len(self.buffer[v]) > 1 else self.buffer[v][0]
                head = np.take(cat, np.arange(n), axis=tok_axis)
                rest = np.take(cat, np.arange(n, cat.shape[tok_axis]), axis=tok_axis)
                sl = [slice(None)] * cat.ndim
                sl[tok_axis] = slice(self.offset, self.offset + n)
                self.group[v][(self.ci, *sl)] = head.astype(self.group[v].dtype, copy=False)
                self.buffer[v] = [rest] if rest.shape[tok_axis] else []
            self.offset += n
            self.buffered -= n

    def close(self) -> None:
        self._flush(final=True)
        if self.offset != self.n_tokens:
            raise CubeError(
                f"{self.path}: checkpoint {self.checkpoint!r} got {self.offset} tokens, the token table has "
                f"{self.n_tokens}; not marking it complete"
            )
        self.group["complete"][self.ci] = 1

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        return False


def set_routing_attrs(path: str | os.PathLike, attrs: dict) -> None:
    """Merge attributes into the routing cube (e.g. what capture learnt about the model)."""
    g = zarr.open_group(str(path), mode="r+")
    g.attrs.update(attrs)
    zarr.consolidate_metadata(str(path))


# ---------------------------------------------------------------- results

FINGERPRINT_ATTR = "moe_atlas_fingerprint"


def fingerprint(*parts) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_result(ds: xr.Dataset, path: str | os.PathLike, *, fingerprint: str) -> None:
    """Write an (in-memory) analysis result atomically, stamped with its fingerprint.

    Temporaries of earlier writes of the same target that were killed before
    their rename are removed first (the caller is the only writer of ``path``:
    pipeline stages hold the run lock, storage/lock.py).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in [*path.parent.glob(f"{path.name}.tmp-*"), *path.parent.glob(f"{path.name}.old-*")]:
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    ds = ds.copy()
    ds.attrs[FINGERPRINT_ATTR] = fingerprint
    for v in ds.variables.values():
        v.encoding = {}
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    ds.to_zarr(tmp, mode="w", consolidated=True)
    if path.exists():
        trash = path.with_name(f"{path.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(path, trash)
        os.replace(tmp, path)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, path)


def result_fingerprint(path: str | os.PathLike) -> str | None:
    """The fingerprint a finished result was written with, or None."""
    path = Path(path)
    meta = path / "zarr.json"
    if not meta.exists():
        return None
    try:
        return json.loads(meta.read_text()).get("attributes", {}).get(FINGERPRINT_ATTR)
    except (OSError, ValueError):
        return None


def open_result(path: str | os.PathLike) -> xr.Dataset:
    path = Path(path)
    if not (path / "zarr.json").exists():
        raise CubeError(f"{path}: no result cube here (zarr.json missing)")
    try:
        ds = xr.open_zarr(path, consolidated=None).load()
    except Exception as exc:  # zarr/numcodecs raise many types for damaged metadata or chunks
        raise CubeError(f"{path}: cannot read result cube (truncated or corrupt store?): {type(exc).__name__}: {exc}") from exc
    ds = _plain_strings(ds)
    for n, v in ds.data_vars.items():
        if v.dtype.kind == "T":
            ds[n] = v.astype(object)
    return ds


def clean_temporaries(directory: str | os.PathLike) -> None:
    """Remove leftovers of writes that were killed before their rename."""
    directory = Path(directory)
    if not directory.exists():
        return
    for p in directory.iterdir():
        if ".tmp-" in p.name or ".old-" in p.name:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


__all__ = [
    "CubeError",
    "FILL_ID",
    "RoutingWriter",
    "clean_temporaries",
    "completed_checkpoints",
    "fingerprint",
    "open_result",
    "open_routing",
    "prepare_routing",
    "result_fingerprint",
    "set_routing_attrs",
    "token_chunk_size",
    "write_result",
]
