"""The token pass: per-sample sums of per-token quantities, in one pass over the cube.

Every statistic with an interval (:mod:`analyses.bootstrap`) is first reduced
to per-sample sufficient statistics: sums over each sample's tokens, optionally
split by integer codes (expert id, position bin, token view). This module does
that reduction and nothing else; resampling and intervals live in
:mod:`analyses.bootstrap`.

The samples are named once per analysis by a :class:`Samples` (the per-token
sample code and the sorted sample ids), built from the cube's ``sample``
coordinate with :meth:`Samples.of` and passed to every :func:`per_sample_sums`
and :func:`sample_groups` call of that analysis::

    samples = Samples.of(routing)                              # once
    per_sample = per_sample_sums(data, samples, dim="token")   # (..., sample)
    domains = sample_groups(routing, "domain", samples)        # (sample,)

A unit that is not a cube sample (a pair of samples, :func:`analyses.divergence.per_pair_sums`)
is just another :class:`Samples` built from its codes with :meth:`Samples.from_codes`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import xarray as xr

SAMPLE = "sample"


@dataclass(frozen=True, eq=False)
class Samples:
    """Which sample each token belongs to.

    Attributes
    ----------
    codes : int64 ndarray (token,), index of the token's sample into ``labels``.
    labels : ndarray (sample,), the sample ids (sorted for a cube; the
        ``sample`` coordinate of every per-sample sum).

    Both arrays are read-only. Build one per analysis with :meth:`of` (reads the
    cube's ``sample`` token coordinate into memory) and pass it to every token
    pass of that analysis.
    """

    codes: np.ndarray
    labels: np.ndarray

    def __post_init__(self):
        codes = np.asarray(self.codes, dtype=np.int64)
        labels = np.asarray(self.labels)
        if codes.ndim != 1 or labels.ndim != 1:
            raise ValueError(f"Samples: codes {codes.shape} and labels {labels.shape} must both be 1-D")
        if codes.size and (int(codes.min()) < 0 or int(codes.max()) >= labels.size):
            raise ValueError(f"Samples: codes must lie in 0..{labels.size - 1}, got "
                             f"{int(codes.min())}..{int(codes.max())}")
        for name, value in (("codes", codes), ("labels", labels)):
            value = value.view()
            value.flags.writeable = False
            object.__setattr__(self, name, value)

    @property
    def n(self) -> int:
        """Number of samples (the length of the ``sample`` dim of the sums)."""
        return int(self.labels.size)

    @property
    def n_tokens(self) -> int:
        return int(self.codes.size)

    @classmethod
    def of(cls, routing: xr.Dataset) -> Samples:
        """The samples of a routing cube, from its ``sample`` coordinate along ``token``.

        Labels are the distinct sample ids, sorted (every sample of the cube, so a
        sum over a subset of tokens still has every sample, holding 0).
        """
        if SAMPLE not in routing.coords:
            raise ValueError("routing cube: token coordinate 'sample' is missing (needed for the bootstrap over samples)")
        codes, labels = _factorize_ints(np.asarray(routing[SAMPLE].values))
        return cls(codes, labels)

    @classmethod
    def from_codes(cls, codes: np.ndarray, n: int) -> Samples:
        """Units numbered ``0..n-1`` by the caller (e.g. pairs of samples); labels are those integers."""
        return cls(np.asarray(codes, dtype=np.int64), np.arange(int(n), dtype=np.int64))


def _factorize_ints(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes into the sorted distinct values, those values) of an integer array.

    Tokens of a sample are contiguous and samples usually stored in id order:
    then one comparison with the neighbour gives the codes (no sort).
    """
    raw = raw.astype(np.int64, copy=False)
    if raw.size and np.all(raw[1:] >= raw[:-1]):
        starts = np.concatenate([[True], raw[1:] != raw[:-1]])
        return np.cumsum(starts) - 1, raw[starts]
    labels, codes = np.unique(raw, return_inverse=True)
    return codes.astype(np.int64), labels


def _samples(samples: Samples | xr.Dataset) -> Samples:
    # a routing cube in place of its Samples: callers not yet passing one (recomputed per call)
    return samples if isinstance(samples, Samples) else Samples.of(samples)


def sample_index(routing: xr.Dataset, samples: Samples | None = None) -> tuple[xr.DataArray, np.ndarray]:
    """Integer code per token for its sample, and the sorted sample ids.

    Returns
    -------
    codes : DataArray (token,) int64, index into ``labels``
    labels : int64 ndarray (sample,)
    """
    samples = samples if samples is not None else Samples.of(routing)
    return xr.DataArray(samples.codes, dims="token"), samples.labels


def sample_groups(routing: xr.Dataset, coord: str = "domain", samples: Samples | None = None) -> xr.DataArray:
    """The label of token coordinate ``coord`` per sample: DataArray (sample,) named ``coord``.

    ``samples`` defaults to ``Samples.of(routing)``. Raises ValueError when a
    sample's tokens carry more than one label (a per-sample group would then be
    ill-defined).
    """
    if coord not in routing.coords:
        raise ValueError(f"routing cube: token coordinate '{coord}' is missing")
    samples = samples if samples is not None else Samples.of(routing)
    raw = np.asarray(routing[coord].values)
    if raw.shape != samples.codes.shape:
        raise ValueError(f"sample_groups: coordinate '{coord}' has {raw.size} tokens, the samples {samples.n_tokens}")
    # hash-factorise the labels (fast on object arrays), then compare codes per sample
    lab_codes, uniques = pd.factorize(pd.Series(raw).astype(str), sort=True)
    per = pd.Series(lab_codes).groupby(samples.codes).agg(["min", "max"])
    lo, hi = per["min"].to_numpy(), per["max"].to_numpy()
    uniques = np.asarray(uniques, dtype=object)
    mixed = np.flatnonzero(lo != hi)
    if len(mixed):
        raise ValueError(
            f"routing cube: coordinate '{coord}' is not constant within sample(s) {samples.labels[mixed[:5]].tolist()}; "
            "expected one label per sample"
        )
    return xr.DataArray(uniques[lo].astype(object), dims=SAMPLE, coords={SAMPLE: samples.labels}, name=coord)


def per_sample_sums(
    data: xr.Dataset | xr.DataArray,
    samples: Samples | xr.Dataset,
    *,
    dim: str | tuple[str, ...] = "token",
    by: Mapping[str, tuple[xr.DataArray, int]] | None = None,
) -> xr.Dataset | xr.DataArray:
    """Sums of ``data`` over each sample's tokens, optionally split by integer codes.

    One pass over the tokens: every (checkpoint, layer, token-chunk) block is
    reduced with a single ``np.bincount`` over a combined (row, sample, group)
    index, restricted to the samples the block touches (tokens of a sample are
    contiguous in the cube, so a block holds a short range of samples). The
    partial sums are then added into a result chunked along ``sample``, so no
    task ever holds a (sample × group) array per block. All variables of a
    Dataset share the index computation.

    Parameters
    ----------
    data : dims (..., token[, k]); token coordinates are dropped.
    samples : the :class:`Samples` of the tokens (a routing cube is accepted in
        its place and read with :meth:`Samples.of`, once per call).
    dim : dims summed away (must include ``token``), e.g. ``("token", "k")``.
    by : extra groupers ``{out_dim: (codes, n)}``: codes (…, token[, k]) int,
        grouped into ``0..n-1`` (out_dim gets those integers as coordinate);
        codes outside that range (e.g. -1 = unwritten expert id) fall in no
        group and are excluded.

    Returns
    -------
    ``data`` with ``dim`` replaced by ``sample`` (coordinate: ``samples.labels``,
    every sample of the cube, so empty samples hold 0) and then the ``by`` dims. Integer
    and boolean data give int64 sums, floating data float64 (NaN propagates).
    Lazy (dask, chunked along ``sample``) when any input is.
    """
    dims = (dim,) if isinstance(dim, str) else tuple(dim)
    if "token" not in dims:
        raise ValueError(f"per_sample_sums: dim {dims} must include 'token'")
    samples = _samples(samples)
    codes, labels = samples.codes, samples.labels
    if isinstance(data, xr.Dataset):
        names = list(data.data_vars)
        arrays = [drop_token_coords(data[n]) for n in names]
    else:
        names, arrays = None, [drop_token_coords(data)]
    groupers = [(name, drop_token_coords(grp), int(n)) for name, (grp, n) in (by or {}).items()]
    sums = _grouped_sums(arrays, codes, len(labels), groupers, dims)
    group_coords = {name: np.arange(n, dtype=np.int32) for name, _, n in groupers}
    out = [
        s.assign_coords({SAMPLE: labels, **group_coords}).transpose(..., SAMPLE, *group_coords) for s in sums
    ]
    if names is None:
        return out[0].rename(data.name) if data.name is not None else out[0]
    return xr.Dataset(dict(zip(names, out)), attrs=data.attrs)


def _grouped_sums(arrays, sample_codes, n_samples, groupers, dims):
    """The engine of :func:`per_sample_sums`: a list of DataArrays (…, sample, *groups)."""
    import dask.array as da

    # token-only codes known in memory travel as 1-D arrays; everything else is broadcast with the data
    is_token_level = [g.dims == ("token",) and g.chunks is None for _, g, _ in groupers]
    token_level = [item for item, t in zip(groupers, is_token_level) if t]
    full = [item for item, t in zip(groupers, is_token_level) if not t]
    bcast = list(xr.broadcast(*arrays, *[g for _, g, _ in full]))
    missing = [d for d in dims if d not in bcast[0].dims]
    if missing:
        raise ValueError(f"per_sample_sums: dims {missing} are in neither the data nor the groupers "
                         f"(dims {bcast[0].dims})")
    lead = [d for d in bcast[0].dims if d not in dims]
    order = lead + list(dims)
    bcast = [b.transpose(*order) for b in bcast]
    data, fullg = bcast[: len(arrays)], bcast[len(arrays):]
    tok_axis = len(lead) + list(dims).index("token")
    ns = tuple(n for _, _, n in full) + tuple(n for _, _, n in token_level)
    if not all(a.dtype.kind in "biuf" for a in data):
        raise ValueError(f"per_sample_sums: data dtypes {[a.dtype for a in data]}; expected numbers or booleans")
    kinds = tuple("i" if a.dtype.kind in "biu" else "f" for a in data)
    sample_codes = np.asarray(sample_codes, dtype=np.int64)
    kernel_kw = dict(n_vars=len(data), n_full=len(full), ns=ns, lead_ndim=len(lead), tok_axis=tok_axis, kinds=kinds)
    lead_coords = {c: v for c, v in bcast[0].coords.items() if set(v.dims) <= set(lead)}
    lead_shape = tuple(bcast[0].sizes[d] for d in lead)
    out_dims = (*lead, SAMPLE, *[f"_g{i}" for i in range(len(ns))])
    group_names = [name for name, _, _ in full] + [name for name, _, _ in token_level]

    def wrap(arr):
        da_ = xr.DataArray(arr, dims=out_dims, coords=lead_coords)
        return da_.rename({f"_g{j}": name for j, name in enumerate(group_names)})

    lazy = any(isinstance(a.data, da.Array) for a in bcast)
    if not lazy:
        block = _sums_kernel(
            *[np.asarray(a.values) for a in data], *[np.asarray(g.values) for g in fullg],
            sample_codes, *[np.asarray(g.values) for _, g, _ in token_level], **kernel_kw,
        )
        lo = int(sample_codes.min()) if sample_codes.size else 0
        result = np.zeros((len(data), *lead_shape, n_samples, *ns), dtype=block.dtype)
        result[(slice(None),) * (1 + len(lead)) + (slice(lo, lo + block.shape[1 + len(lead)]),)] = block
        return [wrap(result[i]) for i in range(len(data))]

    ref = next(a.data for a in bcast if isinstance(a.data, da.Array))
    token_chunks = ref.chunks[tok_axis]
    # lead and token axes chunked like the cube; other summed dims (top-k slots) in one piece
    chunks = tuple(c if (ax < len(lead) or ax == tok_axis) else -1 for ax, c in enumerate(ref.chunks))
    dask_arrays = [
        a.data.rechunk(chunks) if isinstance(a.data, da.Array) else da.from_array(np.asarray(a.values), chunks=chunks)
        for a in bcast
    ]
    # token-level codes travel inside the graph: the narrowest integer type keeps it small
    tok_arrays = [da.from_array(narrow_codes(sample_codes, n_samples), chunks=(token_chunks,))] + [
        da.from_array(narrow_codes(np.asarray(g.values), n), chunks=(token_chunks,)) for _, g, n in token_level
    ]
    # each token chunk's sample range, as the kernel will find it
    bounds = np.cumsum((0,) + token_chunks)
    lo = np.array([sample_codes[a:b].min() for a, b in zip(bounds[:-1], bounds[1:])], dtype=np.int64)
    hi = np.array([sample_codes[a:b].max() for a, b in zip(bounds[:-1], bounds[1:])], dtype=np.int64)
    idx = [f"l{i}" for i in range(len(lead))]
    full_idx = tuple(idx + [("t" if ax == tok_axis else f"r{ax}") for ax in range(len(lead), len(order))])
    gidx = tuple(f"g{i}" for i in range(len(ns)))
    out_idx = ("v", *idx, "t", *gidx)
    args = []
    for arr in dask_arrays:
        args += [arr, full_idx]
    for arr in tok_arrays:
        args += [arr, ("t",)]
    dtype = np.int64 if all(k == "i" for k in kinds) else np.float64
    partial = da.blockwise(
        _sums_kernel, out_idx, *args, dtype=dtype, concatenate=True,
        new_axes={"v": len(data), **{g: n for g, n in zip(gidx, ns)}},
        adjust_chunks={"t": tuple(int(h - l + 1) for l, h in zip(lo, hi))},
        **kernel_kw,
    )
    total = _overlap_add(partial, lo, hi, n_samples, axis=1 + len(lead))
    return [wrap(total[i]) for i in range(len(data))]


def narrow_codes(codes: np.ndarray, n: int) -> np.ndarray:
    """``codes`` (integers meant to lie in -1..n) in the narrowest signed type that holds them."""
    codes = np.asarray(codes)
    if codes.dtype.kind not in "iub" or codes.size == 0:
        return codes
    lo, hi = int(codes.min()), int(codes.max())
    for dtype in (np.int8, np.int16, np.int32, np.int64):
        info = np.iinfo(dtype)
        if info.min <= min(lo, -1) and max(hi, n) <= info.max:
            return codes.astype(dtype, copy=False)
    return codes


def _sums_kernel(*blocks, n_vars, n_full, ns, lead_ndim, tok_axis, kinds):
    """Per-sample (and per-group) sums of one block: (n_vars, *lead, samples lo..hi, *ns).

    ``blocks``: the n_vars data blocks and the n_full grouper blocks (all of
    one shape: lead dims, then the summed dims), then the sample codes and the
    token-level grouper codes (1-D along the token axis). One bincount per
    variable over a flat (row, sample − lo, group...) index; entries whose
    group code is out of range go to one extra bin that is dropped (cheaper
    than compressing every array with a mask).
    """
    data, fullg = blocks[:n_vars], blocks[n_vars:n_vars + n_full]
    sample, tokg = blocks[n_vars + n_full], blocks[n_vars + n_full + 1:]
    shape = np.broadcast_shapes(*(np.shape(b) for b in data + fullg))
    if not ns and sample.size and np.all(sample[1:] >= sample[:-1]):
        return _segment_sums(data, np.asarray(sample), shape, lead_ndim, tok_axis, kinds)
    ndim = len(shape)
    along = [1] * ndim
    along[tok_axis] = -1
    sample = np.asarray(sample)
    lo = int(sample.min()) if sample.size else 0
    n_local = int(sample.max()) - lo + 1 if sample.size else 0
    P = int(np.prod(ns, dtype=np.int64))
    lead_shape = shape[:lead_ndim]
    R = int(np.prod(lead_shape, dtype=np.int64))
    size = R * n_local * P
    # the (row, sample) part of the index is small (no top-k axis): build it first
    rows = np.arange(R, dtype=np.intp).reshape(lead_shape + (1,) * (ndim - lead_ndim)) * n_local
    base = (rows + (sample.astype(np.intp) - lo).reshape(along)) * P
    strides = np.cumprod((1,) + tuple(ns[::-1]), dtype=np.int64)[::-1][1:]  # group strides within P
    comb = base
    bad = None
    for code, n, stride in zip(list(fullg) + [np.asarray(t).reshape(along) for t in tokg], ns, strides):
        code = np.asarray(code)
        out_of_range = (code < 0) | (code >= n)
        bad = out_of_range if bad is None else (bad | out_of_range)
        comb = comb + (code.astype(np.intp) * int(stride) if stride != 1 else code.astype(np.intp))
    comb = np.broadcast_to(comb, shape)
    if bad is not None and bad.any():
        comb = np.where(bad, size, comb)  # one dump bin past the end
    comb = comb.ravel()
    out_dtype = np.int64 if all(k == "i" for k in kinds) else np.float64
    out = np.empty((n_vars, size), dtype=out_dtype)
    for i, (values, kind) in enumerate(zip(data, kinds)):
        values = np.asarray(values)
        if kind == "i" and _all_ones(values):
            counts = np.bincount(comb, minlength=size + 1)  # counting: no weights to convert
        else:
            weights = np.broadcast_to(values, shape).ravel().astype(np.float64, copy=False)
            counts = np.bincount(comb, weights=weights, minlength=size + 1)
        counts = counts[:size]
        out[i] = np.rint(counts) if (kind == "i" and counts.dtype.kind == "f") else counts
    return out.reshape((n_vars, *lead_shape, n_local, *ns))


def _segment_sums(data, sample, shape, lead_ndim, tok_axis, kinds) -> np.ndarray:
    """:func:`_sums_kernel` without groupers on a block whose samples are contiguous runs.

    A sample's tokens are then one run along the token axis, and its sums one
    ``np.add.reduceat`` segment: a sequential pass, several times cheaper than a
    weighted bincount scatter.
    """
    lo = int(sample[0])
    n_local = int(sample[-1]) - lo + 1
    starts = np.flatnonzero(np.concatenate([[True], sample[1:] != sample[:-1]]))
    run_codes = sample[starts] - lo
    other = tuple(ax for ax in range(lead_ndim, len(shape)) if ax != tok_axis)
    out_dtype = np.int64 if all(k == "i" for k in kinds) else np.float64
    lead_shape = shape[:lead_ndim]
    out = np.zeros((len(data), *lead_shape, n_local), dtype=out_dtype)
    for i, values in enumerate(data):
        values = np.broadcast_to(np.asarray(values), shape)
        values = values.astype(out_dtype, copy=False)
        if other:
            values = values.sum(axis=other)  # top-k slots first, keeping the token axis at lead_ndim
        out[i][..., run_codes] = np.add.reduceat(values, starts, axis=lead_ndim)
    return out


def _all_ones(values: np.ndarray) -> bool:
    if values.dtype == bool:
        return bool(values.all())
    # a broadcast constant (e.g. ones_like through dask) has zero strides: one element says it all
    if values.size and all(s == 0 for s in values.strides):
        return bool(values.flat[0] == 1)
    return bool(np.all(values == 1))


MERGED_CHUNK_BYTES = 128 * 2**20  # target size of a per-sample-sums chunk once the lead blocks are merged


def _overlap_add(partial, lo, hi, n_samples: int, axis: int):
    """Add per-token-chunk partial sums over sample ranges [lo_j, hi_j] into (…, n_samples, …).

    ``partial`` is chunked along ``axis`` with chunk j holding samples lo_j..hi_j.
    The result is chunked along ``axis`` at the distinct lo_j; each output chunk
    adds the overlapping parts of the partials (usually one, plus the sample
    that straddles a chunk edge). The blocks of the leading axes (checkpoint,
    layer, ...) are merged into one chunk as far as a chunk stays under
    :data:`MERGED_CHUNK_BYTES` (first the axes after the first, then all): what
    follows a token pass works on small arrays, where one task per (checkpoint,
    layer) would cost more in scheduling than in arithmetic.
    """
    import itertools

    import dask.array as da
    from dask.highlevelgraph import HighLevelGraph

    edges = np.unique(np.concatenate([[0], lo, [n_samples]]))
    edges = edges[(edges >= 0) & (edges <= n_samples)]
    out_sample_chunks = tuple(int(b - a) for a, b in zip(edges[:-1], edges[1:]))
    itemsize = np.dtype(partial.dtype).itemsize
    rest_bytes = itemsize * max(out_sample_chunks, default=0) * int(
        np.prod([sum(c) for ax, c in enumerate(partial.chunks) if ax > axis], dtype=np.int64))

    def lead_chunks(merge_from):
        return [c if (ax == 0 or ax < merge_from) else (sum(c),) for ax, c in enumerate(partial.chunks[:axis])]

    for merge_from in (1, 2, axis):
        chunks_lead = lead_chunks(merge_from)
        if rest_bytes * int(np.prod([max(c) for c in chunks_lead], dtype=np.int64)) <= MERGED_CHUNK_BYTES:
            break
    name = "per-sample-sums-" + _tokenize(partial.name, tuple(lo), tuple(hi), n_samples, merge_from)
    src_offsets = [np.cumsum((0,) + c) for c in partial.chunks[:axis]]
    out_offsets = [np.cumsum((0,) + tuple(c)) for c in chunks_lead]
    layer = {}
    for out_lead in itertools.product(*[range(len(c)) for c in chunks_lead]):
        # the source blocks inside this output block, along every lead axis
        src_ranges = []
        for ax, o in enumerate(out_lead):
            a, b = out_offsets[ax][o], out_offsets[ax][o + 1]
            src_ranges.append([j for j in range(len(partial.chunks[ax])) if src_offsets[ax][j] >= a
                               and src_offsets[ax][j + 1] <= b])
        for i, (a, b) in enumerate(zip(edges[:-1], edges[1:])):
            spans, keys = [], []
            for src_lead in itertools.product(*src_ranges):
                dst_lead = [slice(int(src_offsets[ax][j] - out_offsets[ax][o]),
                                  int(src_offsets[ax][j + 1] - out_offsets[ax][o]))
                            for ax, (j, o) in enumerate(zip(src_lead, out_lead))]
                for j in range(len(lo)):
                    if lo[j] < b and hi[j] >= a:
                        s0, s1 = max(lo[j], a), min(hi[j] + 1, b)
                        spans.append((tuple(dst_lead), (int(s0 - a), int(s1 - a)), (int(s0 - lo[j]), int(s1 - lo[j]))))
                        keys.append((partial.name, *src_lead, j, *[0] * (partial.ndim - axis - 1)))
            shape = tuple(chunks_lead[ax][o] for ax, o in enumerate(out_lead)) + (int(b - a),) + tuple(
                sum(c) for c in partial.chunks[axis + 1:])
            layer[(name, *out_lead, i, *[0] * (partial.ndim - axis - 1))] = (
                _place, shape, partial.dtype, spans, keys,
            )
    chunks = tuple(tuple(c) for c in chunks_lead) + (out_sample_chunks,) + tuple(
        (sum(c),) for c in partial.chunks[axis + 1:])
    graph = HighLevelGraph.from_collections(name, layer, dependencies=[partial])
    return da.Array(graph, name, chunks=chunks, dtype=partial.dtype)


def _place(shape, dtype, spans, blocks):
    """Sum ``blocks`` into zeros of ``shape``: span = (lead slices, (dst0, dst1), (src0, src1)) on the sample axis."""
    out = np.zeros(shape, dtype=dtype)
    for (lead, (d0, d1), (s0, s1)), block in zip(spans, blocks):
        out[(*lead, slice(d0, d1))] += block[(*(slice(None),) * len(lead), slice(s0, s1))]
    return out


def _tokenize(*args) -> str:
    from dask.base import tokenize

    return tokenize(*args)


def drop_token_coords(obj):
    """``obj`` without its coordinates along ``token`` (sums keep none of them)."""
    drop = [c for c in obj.coords if "token" in obj[c].dims]
    return obj.drop_vars(drop)

