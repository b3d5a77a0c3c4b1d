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
import warnings
from pathlib import Path

import numpy as np
import xarray as xr
import zarr

from .schema import FILL_ID, TARGET_CHUNK_BYTES, VARIABLES, apply_result_coord_attrs, storage_chunks, validate_routing
from .schema import token_chunk_size as _schema_token_chunk_size
from . import atomic
from . import manifest as manifests

# Consolidated metadata is not part of the Zarr v3 spec, but xarray and zarr-python
# both read it and it saves one listing per open.
warnings.filterwarnings("ignore", message=".*Consolidated metadata.*")
warnings.filterwarnings("ignore", message=".*not part of the Zarr format 3 specification.*")
# The manifests (storage/manifest.py) are plain files at a store's root, which zarr skips with this warning.
warnings.filterwarnings("ignore", message=r"Object at \.moe-atlas-.* is not recognized")

class CubeError(ValueError):
    """A Zarr store is missing, truncated, or does not match what was expected."""


def token_chunk_size(n_tokens: int, *, top_k: int, num_experts: int, keep_logits: bool) -> int:
    """Tokens per chunk so that the widest variable's chunk holds ~4 MiB raw (``storage.schema.token_chunk_size``)."""
    return _schema_token_chunk_size(n_tokens, top_k=top_k, num_experts=num_experts, keep_logits=keep_logits)


def _encoding(ds: xr.Dataset, token_chunk: int) -> dict:
    """Zarr encoding of every data variable: chunks from ``storage_chunks`` (as the Dask chunks), schema fill."""
    enc = {}
    for name, var in ds.data_vars.items():
        spec = VARIABLES.get(name)
        e = {"chunks": storage_chunks(var.dims, dict(ds.sizes), token_chunk)}
        if spec is not None:
            e["fill_value"] = spec.fill
        enc[name] = e
    return enc


def _same(a, b) -> bool:
    return np.array_equal(np.asarray(a), np.asarray(b))


def _storage_chunked(ds: xr.Dataset, token_chunk: int) -> xr.Dataset:
    """``ds`` with every dask-backed data variable chunked exactly like its stored chunks.

    Writing a dask array whose blocks straddle Zarr chunks is refused (two
    blocks would write one chunk); dask's "auto" chunks (~128 MiB blocks) do
    for real sizes (48 layers × 128 experts × 50k tokens of logits). Both the
    Dask chunks and the Zarr encoding come from ``storage_chunks``.
    """
    from dask.array.core import normalize_chunks

    sizes = dict(ds.sizes)
    fix = {}
    for name, var in ds.data_vars.items():
        if var.chunks is None:  # numpy-backed: written as it is, no blocks to straddle
            continue
        want = storage_chunks(var.dims, sizes, token_chunk)
        if tuple(var.chunks) != normalize_chunks(want, var.shape):
            fix[name] = var.chunk(dict(zip(var.dims, want)))
    return ds.assign(fix) if fix else ds


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
    if token_chunk is None and "token_chunk" in template.attrs:
        token_chunk = int(template.attrs["token_chunk"])
    if token_chunk is None:
        token_chunk = token_chunk_size(
            template.sizes["token"],
            top_k=template.sizes["k"],
            num_experts=int(template.attrs["num_experts"]),
            keep_logits="router_logits" in template,
        )
    if path.exists() and not (path / "zarr.json").exists():
        # The first write goes through a temporary and a rename, so a directory without metadata is damage
        # (or not ours): never deleted, its metadata restored from the kept copy or the run refused.
        _restore_lost_metadata(path)
    if not (path / "zarr.json").exists():
        template.attrs["token_chunk"] = int(token_chunk)
        template = _storage_chunked(template, token_chunk)
        with atomic.staged(path) as tmp:
            template.to_zarr(tmp, mode="w", compute=False, encoding=_encoding(template, token_chunk), consolidated=True)
            manifests.seal_template(tmp)  # before the rename: a cube in place always has its template manifest
        return list(map(str, template.checkpoint.values))

    _repair_template(path, template, token_chunk)
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
            f"Use another output_dir, or move the cube away (mv {path} {path}.old) to recapture every checkpoint."
        )
    have = list(map(str, existing.checkpoint.values))
    new = [c for c in map(str, template.checkpoint.values) if c not in have]
    if new:
        # Appended checkpoints take the store's chunks, whatever this template was built with.
        stored = existing["expert_ids" if "expert_ids" in existing else next(iter(existing.data_vars))]
        token_chunk = int(existing.attrs.get("token_chunk") or stored.encoding["chunks"][stored.dims.index("token")])
        template = _storage_chunked(template, token_chunk)
        template.attrs["token_chunk"] = token_chunk
    for c in new:
        template.sel(checkpoint=[c]).to_zarr(path, append_dim="checkpoint", compute=False, consolidated=True)
    if new:
        zarr.consolidate_metadata(str(path))
        manifests.backup_metadata(path)
    return new


def _restore_lost_metadata(path: Path) -> None:
    """Put back the root ``zarr.json`` of a cube that lost it, or refuse; never delete what is there."""
    import logging

    if manifests.restore_metadata(path):
        logging.getLogger("moe_atlas.storage").warning(
            "%s: zarr.json was missing; restored it from the copy kept in %s (every region is verified before use)",
            path, manifests.state_file(path, manifests.META_COPY).name)
        return
    n = sum(len(files) for _, _, files in os.walk(path))
    raise CubeError(
        f"{path}: zarr.json is missing and no copy of it is kept, so the {n} files there cannot be read; moe-atlas "
        f"does not delete them. To start this cube over (recapturing every checkpoint): mv {path} {path}.damaged"
    )


def _repair_template(path: Path, template: xr.Dataset, token_chunk: int) -> None:
    """Restore damaged template chunks (token table coordinates, ...) of an existing cube, byte for byte.

    The template is rewritten into a temporary store from the current token
    tables; a lost or damaged chunk object is put back only if the fresh one
    has exactly the size and checksum recorded when the cube was made, so
    nothing is fabricated. Otherwise the cube is refused with what to do.
    """
    problems = manifests.check_template(path)
    if not problems:
        return
    import logging

    man = json.loads(manifests.state_file(path, manifests.TEMPLATE_MANIFEST).read_text())
    tmp = atomic.temp_path(path)
    try:
        fresh = template.copy()
        fresh.attrs["token_chunk"] = int(token_chunk)
        fresh = _storage_chunked(fresh, token_chunk)
        fresh.to_zarr(tmp, mode="w", compute=False, encoding=_encoding(fresh, token_chunk), consolidated=True)
        fixed = []
        for name, rec in man.get("arrays", {}).items():
            for key, (size, crc) in rec.get("present", {}).items():
                dst = path / key
                if dst.is_file() and dst.stat().st_size == size and manifests._digest(str(dst))[1] == crc:
                    continue
                src = tmp / key
                if not src.is_file() or tuple(manifests._digest(str(src))) != (size, crc):
                    raise CubeError(
                        f"{path}: variable {name!r}, template chunk {key} is lost or damaged and the current token "
                        "tables do not reproduce it; mv " f"{path} {path}.damaged to start this cube over"
                    )
                with atomic.staged(dst) as part:
                    shutil.copyfile(src, part)
                fixed.append(key)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # our own temporary, made above
    left = manifests.check_template(path)
    if left:
        raise CubeError(_problems_message(left))
    logging.getLogger("moe_atlas.storage").warning("%s: restored %d damaged template chunk(s) from the token tables "
                                                   "(checksums match what was written): %s", path, len(fixed),
                                                   ", ".join(fixed[:5]))


def _problems_message(problems: list, *, limit: int = 1) -> str:
    """One line: the first problem(s), and how many more (``moe-atlas verify`` lists them all)."""
    head = "; ".join(p.line() for p in problems[:limit])
    more = len(problems) - limit
    return head + (f" (and {more} more problem(s): moe-atlas verify lists them)" if more > 0 else "")


def _region_fix(path: Path, checkpoint: str) -> str:
    from .ownership import owned_root, rerun_command

    if owned_root(path) is not None:
        return f"{rerun_command(path)} (recaptures checkpoint {checkpoint!r})"
    return f"capture checkpoint {checkpoint!r} again"


def _damaged_regions(path: Path, names, cis) -> dict[int, list]:
    """Checkpoint index -> problems of its region (cheap: chunk keys and sizes), for the regions ``cis``."""
    cis = [int(c) for c in cis]
    if not cis:
        return {}
    out = {}
    if manifests.has_manifests(path):
        arrays = manifests.routing_arrays(path)
        for ci in cis:
            found = manifests.check_region(path, ci, str(names[ci]), fix=_region_fix(path, str(names[ci])),
                                           arrays=arrays)
            if found:
                out[ci] = found
        return out
    # A cube from before manifests: only 'expert_ids' can be checked (a captured chunk never equals its fill).
    for ci, (missing, expected, example) in _missing_chunks(path, cis).items():
        if missing:
            out[ci] = [manifests.Problem(
                str(path), "expert_ids", f"checkpoint {str(names[ci])!r} (index {ci})",
                f"marked complete but {missing} of its {expected} chunks are missing (e.g. {example})",
                _region_fix(path, str(names[ci])))]
    return out


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
    # The token table and the other template arrays: a lost chunk would read as token id 0, domain "" ...
    from .ownership import rerun_command

    problems = manifests.check_template(path, fix=f"{rerun_command(path)} (restores it from the token tables)")
    if problems:
        raise CubeError(_problems_message(problems))
    if complete_only:
        try:
            done = ds["complete"].values.astype(bool)
        except Exception as exc:
            raise CubeError(f"{path}: cannot read the 'complete' flags: {exc}") from exc
        damaged = _damaged_regions(path, ds.checkpoint.values, np.flatnonzero(done))
        if damaged:
            raise CubeError(_problems_message([p for ps in damaged.values() for p in ps]))
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


def routing_head(path: str | os.PathLike) -> tuple[dict, list[str]]:
    """The attrs and the checkpoint names of a routing cube, read cheaply (Zarr metadata and one small array).

    What the pipeline's completeness checks need, without opening the cube
    with xarray/Dask (``open_routing``), so that a re-run with nothing to do
    stays fast. The template's manifest is checked as ``open_routing`` does.

    Raises
    ------
    CubeError : no cube at ``path``, unreadable metadata, or a damaged template.
    """
    path = Path(path)
    if not (path / "zarr.json").exists():
        raise CubeError(f"{path}: no routing cube here (zarr.json missing)")
    try:
        g = zarr.open_group(str(path), mode="r")
        attrs = dict(g.attrs)
        names = [str(n) for n in np.asarray(g["checkpoint"][:]).ravel()]
    except Exception as exc:  # zarr raises many types for damaged stores
        raise CubeError(f"{path}: cannot open routing cube (truncated or corrupt store?): {exc}") from exc
    from .ownership import rerun_command

    problems = manifests.check_template(path, fix=f"{rerun_command(path)} (restores it from the token tables)")
    if problems:
        raise CubeError(_problems_message(problems))
    return attrs, names


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
    done = np.flatnonzero(g["complete"][:] == 1)
    damaged = _damaged_regions(path, names, done)
    return [str(names[ci]) for ci in done if ci not in damaged]


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
        # the one coordinate needed, read directly: opening the whole dataset decodes every coordinate's metadata
        names = [str(c) for c in self.group["checkpoint"][:]]
        if checkpoint not in names:
            raise CubeError(f"{self.path}: checkpoint {checkpoint!r} is not in the cube template ({names})")
        self.ci = names.index(checkpoint)
        self.checkpoint = checkpoint
        self.vars = [v for v in VARIABLES if v in self.group and v != "complete"]
        self._arrays = {v: self.group[v] for v in self.vars}  # opened once: each group[v] re-reads metadata
        self.num_experts = int(self.group.attrs["num_experts"])
        ids = self.group["expert_ids"]
        self.n_tokens = ids.shape[2]
        self.chunk = ids.chunks[2]
        self.n_layers = ids.shape[1]
        self.offset = 0  # tokens written
        self.buffer: dict[str, list[np.ndarray]] = {v: [] for v in self.vars}
        self.buffered = 0
        # Un-mark first: a recapture must never leave a stale "complete" over new, partial data.
        self.group["complete"][self.ci] = 0
        manifests.drop_region(self.path, self.ci)

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
        E = self.num_experts
        a = batch["expert_ids"]
        # Two reductions first; the element-wise mask (to name the layer) only for a batch that fails.
        if a.size and (a.min() < 0 or a.max() >= E):
            bad = (a < 0) | (a >= E)
            raise CubeError(
                f"{self.path}: checkpoint {self.checkpoint!r}, {self._layer_of(bad)}: expert id out of range "
                f"[{a.min()}, {a.max()}], expected 0..{E - 1}; not writing this checkpoint"
            )
        # Logits first: a NaN/inf router (diverged or corrupt weights, fp16 overflow) shows there first, and
        # would otherwise reach every analysis as numbers.
        for v in ("router_logits", "expert_weights"):
            if v in batch and batch[v].dtype.kind == "f" and not _all_finite(batch[v]):
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
        """Write every whole token chunk buffered (and, when ``final``, the last partial one).

        One Zarr call per variable covers all of them (chunk-aligned: Zarr
        encodes and stores the chunks concurrently); the caller's arrays are
        written from views, and only the tokens left for the next chunk are
        copied (the caller may reuse its arrays once ``append`` returns).
        """
        n = self.buffered if final else self.buffered // self.chunk * self.chunk
        if n <= 0:
            return
        for v in self.vars:
            tok_axis = VARIABLES[v].dims.index("token") - 1
            parts = self.buffer[v]
            cat = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=tok_axis)
            arr = self._arrays[v]
            sl = [slice(None)] * cat.ndim
            sl[tok_axis] = slice(self.offset, self.offset + n)
            arr[(self.ci, *sl)] = _token_range(cat, tok_axis, 0, n).astype(arr.dtype, copy=False)
            rest = _token_range(cat, tok_axis, n, cat.shape[tok_axis])
            self.buffer[v] = [rest.copy()] if rest.shape[tok_axis] else []
        self.offset += n
        self.buffered -= n

    def close(self) -> None:
        self._flush(final=True)
        if self.offset != self.n_tokens:
            raise CubeError(
                f"{self.path}: checkpoint {self.checkpoint!r} got {self.offset} tokens, the token table has "
                f"{self.n_tokens}; not marking it complete"
            )
        seal_region(self.path, self.ci)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        return False


def _token_range(a: np.ndarray, axis: int, start: int, stop: int) -> np.ndarray:
    """``a[..., start:stop, ...]`` along ``axis``: a view, no copy."""
    sl = [slice(None)] * a.ndim
    sl[axis] = slice(int(start), int(stop))
    return a[tuple(sl)]


def _all_finite(a: np.ndarray) -> bool:
    """No NaN/inf in float array ``a``, without an element-wise mask for the usual all-finite batch.

    float16 (numpy emulates its arithmetic, ~4x slower): NaN and inf are the
    values whose exponent bits are all ones. float32: the float64 sum is
    finite exactly when every element is (it cannot overflow).
    """
    if a.size == 0:
        return True
    if a.dtype == np.float16:
        return not bool(((a.view(np.uint16) & 0x7C00) == 0x7C00).any())
    if a.dtype == np.float32:
        return bool(np.isfinite(a.sum(dtype=np.float64)))
    return bool(np.isfinite(a).all())


def seal_region(path: str | os.PathLike, ci: int) -> None:
    """Mark checkpoint index ``ci`` complete: its manifest (chunk keys, sizes, CRC-32) first, then the flag.

    For every writer of a region (``RoutingWriter``, the importers): the
    region's data must be written; what is stored now is what readers verify.
    """
    path = Path(path)
    g = zarr.open_group(str(path), mode="r+")
    manifests.seal_region(path, int(ci), str(g["checkpoint"][int(ci)]))
    g["complete"][int(ci)] = 1


def set_routing_attrs(path: str | os.PathLike, attrs: dict, *, merge_json: dict | None = None) -> None:
    """Merge attributes into the routing cube (e.g. what capture learnt about the model).

    Safe when writers of different checkpoints call it at once (captures run
    concurrently in separate worker processes): zarr.json is read, merged and
    rewritten under an exclusive ``flock`` on the store directory itself, so
    no writer's attributes are lost. Region data and the ``complete`` flags
    need no lock: every checkpoint owns whole chunks (``schema.storage_chunks``).

    ``merge_json`` : ``{attr: {key: value}}`` for attrs holding a JSON object
    keyed e.g. by checkpoint: each entry is added to (or replaces its key in)
    the object already stored, under the same lock, so concurrent writers of
    different keys all keep theirs.
    """
    import fcntl

    fd = os.open(str(path), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        g = zarr.open_group(str(path), mode="r+")
        attrs = dict(attrs)
        for name, entries in (merge_json or {}).items():
            old = g.attrs.get(name)
            try:
                merged = json.loads(old) if old else {}
            except (TypeError, ValueError):
                raise ValueError(f"{path}: attribute {name!r} is not a JSON object; cannot merge into it") from None
            if not isinstance(merged, dict):
                raise ValueError(f"{path}: attribute {name!r} is not a JSON object; cannot merge into it")
            merged.update(entries)
            attrs[name] = json.dumps(merged, sort_keys=True)
        g.attrs.update(attrs)
        zarr.consolidate_metadata(str(path))
        if manifests.has_manifests(path):
            manifests.backup_metadata(path)
    finally:
        os.close(fd)  # releases the flock


# ---------------------------------------------------------------- results

FINGERPRINT_ATTR = "moe_atlas_fingerprint"


def fingerprint(*parts) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_result(ds: xr.Dataset, path: str | os.PathLike, *, fingerprint: str) -> None:
    """Write an (in-memory) analysis result atomically, stamped with its fingerprint.

    The store carries a manifest of every file it holds (sizes, CRC-32;
    ``storage.manifest``), written before the rename, so that readers can tell
    a whole result from a damaged one. Temporaries of earlier writes of the
    same target that were killed before their rename are removed first, inside
    a claimed run folder only (``storage.ownership``; the caller is the only
    writer of ``path``: pipeline stages hold the run lock, storage/lock.py).

    Raises
    ------
    CubeError : ``path`` exists and is not a result moe-atlas wrote (it is not replaced).
    """
    from .ownership import remove_own_temporaries

    path = Path(path)
    if path.exists() and not (manifests.result_sealed(path) or result_fingerprint(path, verify=False)):
        raise CubeError(f"{path}: exists and is not a result moe-atlas wrote (no manifest, no fingerprint); "
                        "not replacing it. Move it away or choose another output folder.")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_own_temporaries(path.parent, names={path.name})
    ds = ds.copy()
    apply_result_coord_attrs(ds)  # long_name/units of shared coordinates (position_bin edges...) where unset
    ds.attrs[FINGERPRINT_ATTR] = fingerprint
    for v in ds.variables.values():
        v.encoding = {}
    with atomic.staged(path) as tmp:
        ds.to_zarr(tmp, mode="w", consolidated=True)
        manifests.seal_result(tmp)


def result_fingerprint(path: str | os.PathLike, *, verify: bool = True) -> str | None:
    """The fingerprint a finished result was written with, or None.

    With ``verify`` (what pipeline stages use to decide whether to recompute)
    the store must also pass its manifest's cheap check (every file present,
    sizes as written; no data read): a damaged or unverifiable result is
    recomputed, never trusted on its fingerprint alone.
    """
    path = Path(path)
    meta = path / "zarr.json"
    if not meta.exists():
        return None
    try:
        fp = json.loads(meta.read_text()).get("attributes", {}).get(FINGERPRINT_ATTR)
    except (OSError, ValueError):
        return None
    if verify and fp is not None and manifests.check_result(path):
        return None
    return fp


def open_result(path: str | os.PathLike) -> xr.Dataset:
    """Read a result cube (analysis, token table) into memory, verified against its manifest.

    Raises
    ------
    CubeError : one line naming the store, the variable and the chunk object
        that is missing, truncated or cannot be decoded, and the fix.
    """
    path = Path(path)
    if not (path / "zarr.json").exists():
        raise CubeError(f"{path}: no result cube here (zarr.json missing)")
    from .ownership import owned_root, rerun_command

    fix = (f"{rerun_command(path)} (recomputes it)" if owned_root(path) is not None
           else "write this result again")
    if manifests.result_sealed(path):  # results from before manifests are read as they are
        problems = manifests.check_result(path, fix=fix)
        if problems:
            raise CubeError(_problems_message(problems))
    try:
        ds = xr.open_zarr(path, consolidated=None)
    except Exception as exc:  # zarr/numcodecs raise many types for damaged metadata or chunks
        raise CubeError(f"{path}: cannot read result cube (truncated or corrupt store?): {type(exc).__name__}: "
                        f"{exc}; fix: {fix}") from exc
    for name in list(ds.variables):
        try:
            ds.variables[name].load()  # in place, variable by variable, so an error can name it
        except Exception as exc:
            raise CubeError(f"{path}: variable {name!r} cannot be decoded (corrupt chunk?): {type(exc).__name__}: "
                            f"{exc}; fix: {fix}") from exc
    ds = _plain_strings(ds)
    for n, v in ds.data_vars.items():
        if v.dtype.kind == "T":
            ds[n] = v.astype(object)
    return ds


def clean_temporaries(directory: str | os.PathLike, names: set[str] | None = None) -> list[Path]:
    """Remove leftovers of writes that were killed before their rename; returns what was removed.

    Only in a claimed run folder and only temporaries of ``names`` (default:
    the stores and files a run keeps at its root) named by moe-atlas's own
    writers (``storage.ownership.remove_own_temporaries``): a folder that is
    not a moe-atlas run is never cleaned.
    """
    from .ownership import remove_own_temporaries

    return remove_own_temporaries(directory, names=names if names is not None else ROOT_NAMES)


# What a run writes at its root through temporaries (RunLayout: routing.zarr, summary.json).
ROOT_NAMES = {"routing.zarr", "summary.json"}


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
