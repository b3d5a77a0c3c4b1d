"""Bootstrap confidence intervals over samples, as cheap reductions.

Tokens of one sample are not independent, so intervals resample whole
*samples* (the ``sample`` coordinate of the routing cube), never tokens. To keep
that a reduction rather than a loop, every statistic is first reduced to
per-sample sufficient statistics (sums over the sample's tokens), and a
bootstrap replicate is then a weighted sum over samples, the weight of a sample
being how often the replicate drew it:

    per_sample = per_sample_sums(data, routing)           # (..., sample)
    weights = bootstrap_weights(n_samples, n_boot, seed)  # (boot, sample) counts
    reps = resample(per_sample, weights)                  # (boot, ...)
    lo, hi = interval(reps)                               # (...)

A statistic that is a ratio of sums (usage = count / slots, mean entropy =
Σ entropy / tokens) is bootstrapped by resampling numerator and denominator
with the *same* weights and dividing replicate by replicate
(:func:`ratio_interval`). A non-linear function of sums (a cosine, a CV, an
entropy of usage) is computed on the resampled sums the same way. Such a
statistic is biased under resampling (a cosine of resampled usage vectors is
lower than the cosine of the full ones), so its percentile interval need not
contain the point estimate; it is reported as is.

Groups (domains)
----------------
When a statistic is per group, samples are resampled *within* each group
(a stratified bootstrap): ``bootstrap_weights(..., strata=codes)`` draws, for
every group g with n_g samples, n_g samples with replacement among that group's
samples. Every replicate therefore keeps each group's sample count, and a
pooled statistic computed from the same replicates is the stratified bootstrap
of the pooled value. ``resample(..., groups=labels)`` then sums each group's
samples separately, giving a group dim. Checkpoints and layers share the same
weights, so differences between checkpoints are paired (the same resampled
samples on both sides).

RNG draws (what the brute-force test replays): ``np.random.default_rng(seed)``;
without strata one call ``rng.integers(0, n, size=(n_boot, n))``; with strata,
one call ``rng.integers(0, n_g, size=(n_boot, n_g))`` per stratum, strata in
sorted label order, index j meaning the j-th sample of the stratum in sample
order.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
import xarray as xr

BOOT = "boot"
SAMPLE = "sample"
STRATIFIED = "resampling samples (not tokens) within each domain"  # the ``scheme`` of a domain-stratified bootstrap


def sample_index(routing: xr.Dataset) -> tuple[xr.DataArray, np.ndarray]:
    """Integer code per token for its sample, and the sorted sample ids.

    Reads the ``sample`` coordinate (one id per token) into memory: the groups
    must be known before the graph is built.

    Returns
    -------
    codes : DataArray (token,) int64, index into ``labels``
    labels : int64 ndarray (sample,)
    """
    if "sample" not in routing.coords:
        raise ValueError("routing cube: token coordinate 'sample' is missing (needed for the bootstrap over samples)")
    raw = np.asarray(routing["sample"].values)
    codes, labels = _memo(raw, "sample_index", lambda: _factorize_ints(raw))
    return xr.DataArray(codes, dims="token"), labels


_MEMO: dict = {}


def _memo(values: np.ndarray, what: str, compute):
    """``compute()`` remembered for as long as the coordinate array ``values`` lives.

    Token coordinates of an opened cube are read once and kept (see
    ``storage.cube.open_routing``), so the same array object comes back on
    every access; an analysis asks for the sample codes several times.
    """
    import weakref

    key = (id(values), what)
    hit = _MEMO.get(key)
    if hit is not None and hit[0]() is values:
        return hit[1]
    try:
        ref = weakref.ref(values)
    except TypeError:
        return compute()
    result = compute()
    _MEMO[key] = (ref, result)
    weakref.finalize(values, _MEMO.pop, key, None)
    return result


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


def sample_groups(routing: xr.Dataset, coord: str = "domain") -> xr.DataArray:
    """The label of token coordinate ``coord`` per sample: DataArray (sample,) named ``coord``.

    Raises ValueError when a sample's tokens carry more than one label (a
    per-sample group would then be ill-defined).
    """
    if coord not in routing.coords:
        raise ValueError(f"routing cube: token coordinate '{coord}' is missing")
    codes, labels = sample_index(routing)
    raw = np.asarray(routing[coord].values)

    def per_sample():
        # hash-factorise the labels (fast on object arrays), then compare codes per sample
        lab_codes, uniques = pd.factorize(pd.Series(raw).astype(str), sort=True)
        per = pd.Series(lab_codes).groupby(codes.values).agg(["min", "max"])
        return per["min"].to_numpy(), per["max"].to_numpy(), np.asarray(uniques, dtype=object)

    lo, hi, uniques = _memo(raw, f"sample_groups:{id(codes.values)}", per_sample)
    mixed = np.flatnonzero(lo != hi)
    if len(mixed):
        raise ValueError(
            f"routing cube: coordinate '{coord}' is not constant within sample(s) {labels[mixed[:5]].tolist()}; "
            "expected one label per sample"
        )
    return xr.DataArray(uniques[lo].astype(object), dims=SAMPLE, coords={SAMPLE: labels}, name=coord)


def per_sample_sums(
    data: xr.Dataset | xr.DataArray,
    routing: xr.Dataset,
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
    routing : the cube whose ``sample`` coordinate (along ``token``) names the samples.
    dim : dims summed away (must include ``token``), e.g. ``("token", "k")``.
    by : extra groupers ``{out_dim: (codes, n)}``: codes (…, token[, k]) int,
        grouped into ``0..n-1`` (out_dim gets those integers as coordinate);
        codes outside that range (e.g. -1 = unwritten expert id) fall in no
        group and are excluded.

    Returns
    -------
    ``data`` with ``dim`` replaced by ``sample`` (coordinate: every sample id of
    the cube, sorted, so empty samples hold 0) and then the ``by`` dims. Integer
    and boolean data give int64 sums, floating data float64 (NaN propagates).
    Lazy (dask, chunked along ``sample``) when any input is.
    """
    dims = (dim,) if isinstance(dim, str) else tuple(dim)
    if "token" not in dims:
        raise ValueError(f"per_sample_sums: dim {dims} must include 'token'")
    codes, labels = sample_index(routing)
    if isinstance(data, xr.Dataset):
        names = list(data.data_vars)
        arrays = [_drop_token_coords(data[n]) for n in names]
    else:
        names, arrays = None, [_drop_token_coords(data)]
    groupers = [(name, _drop_token_coords(grp), int(n)) for name, (grp, n) in (by or {}).items()]
    sums = _grouped_sums(arrays, codes.values, len(labels), groupers, dims)
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
    tok_arrays = [da.from_array(_narrow(sample_codes, n_samples), chunks=(token_chunks,))] + [
        da.from_array(_narrow(np.asarray(g.values), n), chunks=(token_chunks,)) for _, g, n in token_level
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


def _narrow(codes: np.ndarray, n: int) -> np.ndarray:
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


def _drop_token_coords(obj):
    drop = [c for c in obj.coords if "token" in obj[c].dims]
    return obj.drop_vars(drop)


def bootstrap_weights(
    n_samples: int, n_boot: int = 200, seed: int = 0, *, strata: np.ndarray | xr.DataArray | None = None
) -> np.ndarray:
    """How often each sample is drawn in each bootstrap replicate.

    Parameters
    ----------
    n_samples : number of samples S.
    n_boot : number of replicates B (>= 1).
    seed : seed of ``np.random.default_rng``.
    strata : optional (S,) labels; samples are then resampled within each
        stratum (each replicate keeps every stratum's sample count).

    Returns
    -------
    int64 ndarray (boot, sample); each row sums to S (per stratum: to n_g).
    """
    n_samples, n_boot = int(n_samples), int(n_boot)
    if n_samples < 1 or n_boot < 1:
        raise ValueError(f"bootstrap_weights: n_samples={n_samples}, n_boot={n_boot}; both must be >= 1")
    rng = np.random.default_rng(seed)
    if strata is None:
        members = [np.arange(n_samples)]
    else:
        strata = np.asarray(strata.values if isinstance(strata, xr.DataArray) else strata).astype(str)
        if strata.shape != (n_samples,):
            raise ValueError(f"bootstrap_weights: strata has shape {strata.shape}, expected ({n_samples},)")
        members = [np.flatnonzero(strata == g) for g in np.unique(strata)]
    weights = np.zeros((n_boot, n_samples), dtype=np.int64)
    rows = np.arange(n_boot)[:, None]
    for idx in members:
        draws = rng.integers(0, len(idx), size=(n_boot, len(idx)))
        np.add.at(weights, (rows, idx[draws]), 1)
    return weights


def _weights_array(weights, per_sample) -> xr.DataArray:
    w = weights if isinstance(weights, xr.DataArray) else xr.DataArray(np.asarray(weights), dims=(BOOT, SAMPLE))
    if w.dims != (BOOT, SAMPLE):
        raise ValueError(f"resample: weights have dims {w.dims}, expected ('{BOOT}', '{SAMPLE}')")
    if w.sizes[SAMPLE] != per_sample.sizes[SAMPLE]:
        raise ValueError(
            f"resample: weights cover {w.sizes[SAMPLE]} samples, the per-sample sums {per_sample.sizes[SAMPLE]}"
        )
    return w.assign_coords({SAMPLE: per_sample[SAMPLE].values, BOOT: np.arange(w.sizes[BOOT])})


def _group_members(groups: xr.DataArray, per_sample) -> tuple[str, np.ndarray, list[np.ndarray]]:
    if groups.dims != (SAMPLE,) or groups.sizes[SAMPLE] != per_sample.sizes[SAMPLE]:
        raise ValueError(
            f"resample: groups must have dims ('{SAMPLE}',) of size {per_sample.sizes[SAMPLE]}, got {groups.sizes}"
        )
    if not groups.name:
        raise ValueError("resample: groups must be named (the name becomes the group dim)")
    values = np.asarray(groups.values)
    labels = np.unique(values.astype(str))
    return str(groups.name), labels.astype(object), [np.flatnonzero(values.astype(str) == g) for g in labels]


def resample(
    per_sample: xr.Dataset | xr.DataArray,
    weights: np.ndarray | xr.DataArray,
    *,
    groups: xr.DataArray | None = None,
) -> xr.Dataset | xr.DataArray:
    """Sums over resampled sets of samples: Σ_s weights[b, s] · per_sample[..., s].

    Parameters
    ----------
    per_sample : dims (..., sample, ...), e.g. from :func:`per_sample_sums`.
    weights : (boot, sample) counts from :func:`bootstrap_weights` (or any
        weights: ones(1, S) gives the plain sums).
    groups : optional (sample,) labels named e.g. ``domain``; each group's
        samples are then summed separately, adding that dim (sorted labels) last.

    Returns
    -------
    ``per_sample`` with ``sample`` replaced by ``boot`` (in the same position),
    plus the group dim when ``groups`` is given. Lazy when the input is. One
    matrix product (BLAS, float64: exact for counts below 2^53) per chunk of
    samples; integer inputs and integer weights give int64 sums.
    """
    if isinstance(per_sample, xr.Dataset):
        return per_sample.map(resample, weights=weights, groups=groups)
    w = _weights_array(weights, per_sample)
    order = [BOOT if d == SAMPLE else d for d in per_sample.dims]
    integer = per_sample.dtype.kind in "biu" and w.dtype.kind in "biu"
    wv = np.asarray(w.values)
    if groups is None:
        name, labels, gcodes = None, None, np.zeros(wv.shape[1], dtype=np.int8)
    else:
        name, labels, members = _group_members(groups, per_sample)
        gcodes = np.zeros(wv.shape[1], dtype=np.int32)
        for g, idx in enumerate(members):
            gcodes[idx] = g
    n_groups = 1 if labels is None else len(labels)
    x = per_sample.transpose(..., SAMPLE)
    lead = list(x.dims[:-1])
    if x.chunks is None:
        prod = _resample_block(np.asarray(x.values), wv, gcodes, n_groups=n_groups)
    else:
        import dask.array as da

        # the (boot, sample) counts and the group codes travel in the graph, chunked like the
        # per-sample sums; each chunk of samples gives its (…, group, boot) partial sums
        if wv.dtype.kind in "iu" and (wv.size == 0 or np.abs(wv).max() < 2**31):
            wv = wv.astype(np.int32)
        wd = da.from_array(wv, chunks=(-1, x.chunks[-1]))
        gd = da.from_array(_narrow(gcodes, n_groups), chunks=(x.chunks[-1],))
        lead_idx = tuple(f"l{i}" for i in range(len(lead)))
        parts = da.blockwise(
            _resample_block, (*lead_idx, "s", "g", "b"), x.data, (*lead_idx, "s"), wd, ("b", "s"), gd, ("s",),
            n_groups=n_groups, keepdims=True, dtype=np.float64, concatenate=True,
            new_axes={"g": n_groups}, adjust_chunks={"s": 1},
        )
        prod = parts.sum(axis=len(lead))
    if integer:
        prod = np.rint(prod).astype(np.int64)  # a numpy ufunc: lazy on dask arrays too
    out = xr.DataArray(prod, dims=(*lead, "_group", BOOT),
                       coords={c: v for c, v in x.coords.items() if set(v.dims) <= set(lead)})
    out = out.assign_coords({BOOT: np.arange(w.sizes[BOOT])})
    if groups is None:
        return out.isel(_group=0, drop=True).transpose(*order)
    return out.rename({"_group": name}).assign_coords({name: labels}).transpose(*order, name)


def _resample_block(x: np.ndarray, w: np.ndarray, codes: np.ndarray, *, n_groups: int,
                    keepdims: bool = False) -> np.ndarray:
    """Σ over the samples of each group of w[b, s] · x[..., s]: (..., group, boot) float64.

    ``x`` (..., sample), ``w`` (boot, sample), ``codes`` (sample,) group of each
    sample. One matrix product per group over that group's samples only (a
    one-hot (group, boot, sample) weight tensor would multiply the work by the
    number of groups). ``keepdims`` keeps a size-1 axis where ``sample`` was.
    """
    x = np.asarray(x)
    lead = x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1])
    w = np.asarray(w)
    codes = np.asarray(codes)
    out = np.zeros((rows.shape[0], n_groups, w.shape[0]), dtype=np.float64)
    for g in range(n_groups):
        sel = np.flatnonzero(codes == g) if n_groups > 1 else slice(None)
        if n_groups > 1 and not len(sel):
            continue
        out[:, g, :] = rows[:, sel].astype(np.float64) @ w[:, sel].astype(np.float64).T
    out = out.reshape(*lead, n_groups, w.shape[0])
    return out[..., None, :, :] if keepdims else out


def group_sums(
    per_sample: xr.Dataset | xr.DataArray, groups: xr.DataArray | None = None
) -> xr.Dataset | xr.DataArray:
    """The plain (not resampled) sums over samples, per group when ``groups`` is given.

    The point estimate matching :func:`resample`: dims of ``per_sample`` without
    ``sample``, plus the group dim (sorted labels) last.
    """
    if groups is None:
        return per_sample.sum(SAMPLE)
    # the same product as one bootstrap replicate that draws every sample once
    ones = np.ones((1, per_sample.sizes[SAMPLE]), dtype=np.int32)
    return resample(per_sample, ones, groups=groups).isel({BOOT: 0}, drop=True)


def interval(replicates: xr.DataArray, ci: float = 0.95, dim: str = BOOT) -> tuple[xr.DataArray, xr.DataArray]:
    """Percentile interval of ``replicates`` along ``dim`` (NaN replicates skipped).

    Returns
    -------
    (lo, hi) with ``dim`` removed: the (1−ci)/2 and (1+ci)/2 quantiles (linear
    interpolation). NaN where every replicate is NaN.
    """
    if not 0.0 < float(ci) < 1.0:
        raise ValueError(f"interval: ci={ci}; expected a level strictly between 0 and 1")
    a = (1.0 - float(ci)) / 2.0
    if replicates.chunks is not None:
        # the quantile needs the whole dim in one block; rechunk the data only (``.chunk`` would
        # turn coordinates such as ``step`` into dask arrays that every later merge computes)
        axis = replicates.get_axis_num(dim)
        replicates = replicates.copy(data=replicates.data.rechunk({axis: -1}))
    bounds = [
        xr.apply_ufunc(
            _nanquantile, replicates.astype(np.float64), kwargs={"q": q}, input_core_dims=[[dim]],
            dask="parallelized", output_dtypes=[np.float64],
        )
        for q in (a, 1.0 - a)
    ]
    return bounds[0], bounds[1]


def _nanquantile(values: np.ndarray, q: float) -> np.ndarray:
    """``np.nanquantile(values, q, axis=-1)`` (linear method), vectorised.

    numpy falls back to a Python loop over cells once any NaN is present;
    sorting (NaN last) and interpolating at q·(n−1) per cell gives the same
    numbers in one pass. All-NaN cells give NaN without a warning (a group
    with no token is an expected NaN).
    """
    v = np.sort(np.asarray(values, dtype=np.float64), axis=-1)
    n = np.sum(~np.isnan(v), axis=-1)
    pos = q * np.maximum(n - 1, 0)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, np.maximum(n - 1, 0))
    a = np.take_along_axis(v, lo[..., None], axis=-1)[..., 0]
    b = np.take_along_axis(v, hi[..., None], axis=-1)[..., 0]
    frac = pos - lo
    out = a + (b - a) * frac
    out = np.where(frac == 0, a, out)  # no 0·inf when a bound is infinite
    return np.where(n > 0, out, np.nan)


def ratio_interval(
    numerator: xr.DataArray,
    denominator: xr.DataArray,
    weights: np.ndarray | xr.DataArray,
    *,
    groups: xr.DataArray | None = None,
    ci: float = 0.95,
) -> tuple[xr.DataArray, xr.DataArray]:
    """Percentile interval of Σ numerator / Σ denominator over resampled samples.

    ``numerator`` and ``denominator`` are per-sample sums (dims ``sample``,
    broadcastable against each other); both are resampled with the same
    ``weights``. A replicate with a zero denominator is NaN and skipped.
    """
    num = resample(numerator, weights, groups=groups)
    den = resample(denominator, weights, groups=groups)
    return interval(num / den.where(den != 0), ci)


def add_interval(
    out: dict[str, xr.DataArray],
    name: str,
    lo: xr.DataArray,
    hi: xr.DataArray,
    *,
    ci: float,
    n_boot: int,
    scheme: str = "resampling samples (not tokens)",
) -> None:
    """Store ``<name>_lo`` / ``<name>_hi`` in ``out``, described from ``out[name]``'s attrs.

    The bounds keep the main variable's units and ``nan_where`` (a bound is NaN
    at least where the estimate is); ``scheme`` says how replicates were drawn
    (:data:`STRATIFIED` for weights stratified by domain).
    """
    base = out[name].attrs
    dims = out[name].dims
    for side, value, q in (("lo", lo, (1 - ci) / 2), ("hi", hi, (1 + ci) / 2)):
        attrs = {
            "long_name": f"{base.get('long_name', name)}, {100 * ci:g} % CI {'lower' if side == 'lo' else 'upper'} bound",
            "units": base.get("units", ""),
            "description": f"{100 * q:g} percentile of {name} over {n_boot} bootstrap replicates "
            f"{scheme}",
            "ci": float(ci),
            "n_boot": int(n_boot),
        }
        if "nan_where" in base:
            attrs["nan_where"] = base["nan_where"] + "; or every bootstrap replicate undefined"
        else:
            attrs["nan_where"] = "every bootstrap replicate undefined (e.g. a group whose samples have no token)"
        var = value.transpose(*dims) if set(value.dims) == set(dims) else value
        var = var.copy()
        var.attrs = attrs
        out[f"{name}_{side}"] = var
