"""Time within a sequence: how routing at token t relates to routing at t+1 … t+M.

Per (checkpoint, layer), over pairs of tokens (t, t+m) of the **same sample**
(a pair never straddles two samples; both tokens must have a written routing):

* top-1 repeat  P(top1_t = top1_{t+1});            chance 1/E
* set repeat    P(S_t ∩ S_{t+1} ≠ ∅);              chance 1 − C(E−k, k)/C(E, k)
* transition    P(top1_{t+1} = j | top1_t = i)     chance 1/E per cell
* lag-m autocorrelation of each expert's activation indicator x_t = [e ∈ S_t],
  m = 1..M (Pearson correlation of x_t and x_{t+m} over within-sample pairs);
  chance 0.

All pair counts come from one vectorised numpy kernel (:func:`pair_stats`,
bincounts over flattened indices, no loop over tokens). On dask every
(checkpoint, layer, token) block is handed the next M tokens as look-ahead
(``dask.array.overlap`` with a right-only depth) and counts the pairs that
*start* in it, so a sample split by a token chunk keeps each pair exactly once
and chunking never changes a result; the ``sample`` coordinate says whether
t and t+m share a sample. A block returns the sums of only the samples it
touches. Confidence intervals resample samples (the sample of token t owns the
pair): per (checkpoint, layer) the per-sample sums are turned into bootstrap
replicates by one matrix product with the weights, inside the graph, so only
(checkpoint, layer, [lag,] boot) replicates leave it.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import xarray as xr

from storage.schema import FILL_ID, phases_present

from .figures import hook as figure_hook
from .outputs import Output, per_expert
from .bootstrap import add_interval, bootstrap_weights, interval, sample_index
from .registry import Analysis, cube_sizes, finalise, json_number, register, routed_ids, safe_ratio, tidy

NAME = "temporal"
PAIR_STATS = ("top1_pairs", "top1_repeats", "set_pairs", "set_repeats")
PIECE = 1 << 16  # (leading × token) cells the kernel handles at a time: cache-sized


def set_repeat_chance(num_experts: int, top_k: int) -> float:
    """P(S ∩ S' ≠ ∅) for two independent uniformly random k-subsets of E experts."""
    return 1.0 - math.comb(num_experts - top_k, top_k) / math.comb(num_experts, top_k)


def _pearson(n, sx, sy, sxy):
    """Pearson r of two binary series from their pair count and sums (NaN when either is constant).

    Takes DataArrays (point estimate) or broadcastable numpy arrays (bootstrap replicates).
    """
    cov = n * sxy - sx * sy
    var = (n * sx - sx**2) * (n * sy - sy**2)
    var = var.where(var > 0) if isinstance(var, xr.DataArray) else np.where(var > 0, var, np.nan)
    return cov / np.sqrt(var)


def _columns(E: int, M: int) -> dict[str, slice]:
    """Columns of the per-sample sums: the 4 :data:`PAIR_STATS`, n (M), sx, sy, sxy (M·E each, lag-major)."""
    sizes = {"pairs": 4, "n": M, "sx": M * E, "sy": M * E, "sxy": M * E}
    ends = np.cumsum(list(sizes.values()))
    return {name: slice(int(end - size), int(end)) for (name, size), end in zip(sizes.items(), ends)}


def _layout(E: int, S: int, M: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the sums packed (in this order) into one int64 vector per (checkpoint, layer).

    ``per_sample`` is sample-major, (S, R) with the columns of :func:`_columns`,
    so that one matrix product with the (boot, sample) weights resamples all of it.
    A block's local sums have the same layout with S = the samples it touches.
    """
    return {"transition": (E, E), "per_sample": (S, _columns(E, M)["sxy"].stop)}


def _size(E: int, S: int, M: int) -> int:
    """Length P of the packed sums of S samples."""
    return sum(int(np.prod(shp)) for shp in _layout(E, S, M).values())


def _unpack(packed: np.ndarray, E: int, S: int, M: int) -> dict[str, np.ndarray]:
    """Views (..., *shape) of the parts of packed sums (..., P), per :func:`_layout`.

    Writable views when ``packed`` is C-contiguous (splitting its last axis
    never copies): :func:`local_pair_stats` fills the packed vector through them.
    """
    out, offset = {}, 0
    for name, shp in _layout(E, S, M).items():
        size = int(np.prod(shp))
        out[name] = packed[..., offset:offset + size].reshape(packed.shape[:-1] + shp)
        offset += size
    return out


def _sample_range(sample: np.ndarray) -> tuple[int, int]:
    """(first, count) of the sample codes from min(sample) to max(sample); (0, 0) without tokens."""
    if len(sample) == 0:
        return 0, 0
    first = int(np.min(sample))
    return first, int(np.max(sample)) - first + 1


def _place(dense: np.ndarray, local: np.ndarray, first: int, count: int, *, E: int, S: int, M: int) -> None:
    """Add local sums (..., P_local) of samples first .. first + count - 1 into dense sums (..., P) of all S."""
    d, part = _unpack(dense, E, S, M), _unpack(local, E, count, M)
    d["transition"] += part["transition"]
    d["per_sample"][..., first:first + count, :] += part["per_sample"]


def pair_stats(ids: np.ndarray, sample: np.ndarray, n_core: int, *, E: int, S: int, M: int) -> np.ndarray:
    """Sums over the token pairs (t, t+m), m = 1..M, of one block, packed per leading index.

    Parameters
    ----------
    ids : (..., T, k) expert ids of T consecutive tokens; ids outside 0..E-1
        count as unwritten.
    sample : (T,) sample code (0..S-1) of each token.
    n_core : pairs start only at the first ``n_core`` tokens; the others are
        the look-ahead that lets a pair reach into the next block.
    E, S, M : experts, samples, largest lag.

    Returns
    -------
    int64 (..., P): the arrays of :func:`_layout`, raveled and concatenated:
    transition (E, E) of adjacent top-1 pairs; per_sample (S, R): per sample of the
    first token, the adjacent-pair counts, and per lag m the pair count n and
    the sums sx = Σ[e ∈ S_t], sy = Σ[e ∈ S_(t+m)], sxy = Σ[e ∈ both] (a slot
    is counted with its multiplicity). Samples the block does not touch hold 0
    (:func:`local_pair_stats` leaves them out).
    """
    first, count = _sample_range(np.asarray(sample))
    local = local_pair_stats(ids, sample, n_core, E=E, M=M)
    if (first, count) == (0, S):
        return local
    dense = np.zeros(local.shape[:-1] + (_size(E, S, M),), dtype=np.int64)
    _place(dense, local, first, count, E=E, S=S, M=M)
    return dense


def local_pair_stats(ids: np.ndarray, sample: np.ndarray, n_core: int, *, E: int, M: int) -> np.ndarray:
    """:func:`pair_stats` over only the samples the block touches.

    Returns
    -------
    int64 (..., P_local): the :func:`_layout` of ``count`` samples, the codes
    ``first .. first + count - 1`` of :func:`_sample_range` (sample).

    The block is counted in pieces of :data:`PIECE` (leading × token) cells
    (each with its own M-token look-ahead, as the dask blocks), by
    :func:`_add_pair_sums`.
    """
    lead = ids.shape[:-2]
    T, K = ids.shape[-2:]
    G = int(np.prod(lead, dtype=np.int64))
    sample = np.asarray(sample, dtype=np.int64)
    first, count = _sample_range(sample)
    packed = np.zeros((G, _size(E, count, M)), dtype=np.int64)
    out = _unpack(packed, E, count, M)
    n_core = int(min(max(n_core, 0), T))
    raw = np.asarray(ids).reshape(G, T, K)
    if K == 0:
        return packed.reshape(*lead, -1)
    sample = sample - first
    # Pieces of the block with the same look-ahead rule as the dask blocks: a
    # piece's index arrays and bincounts stay in cache across the M lags.
    step = max(PIECE // max(G, 1), 1)  # tokens per piece
    for lo in range(0, n_core, step):
        hi = min(lo + step, n_core)
        _add_pair_sums(out, raw[:, lo:hi + M], sample[lo:hi + M], hi - lo, E=E, M=M)
    ps = out["per_sample"]
    ps[..., 2] = ps[..., _columns(E, M)["n"].start]  # set pairs: both tokens written, i.e. the lag-1 pairs
    return packed.reshape(*lead, -1)


def _add_pair_sums(out: dict[str, np.ndarray], raw: np.ndarray, sample: np.ndarray, n_core: int, *, E: int, M: int):  # long: numerical kernel
    """Add the sums of the pairs starting at the first ``n_core`` of T tokens to ``out`` (:func:`pair_stats`).

    raw : (G, T, k) expert ids; sample : (T,) int64 sample codes, counted
    from the block's first sample (the rows of ``out["per_sample"]``); out :
    the (G, ...) views of :func:`_unpack`, updated in place.

    Every count is a bincount over a flattened (leading, sample[, expert])
    index sized to the samples these tokens touch. Per lag, sx, n and sy are
    the sums over all written tokens minus those of the tokens without a
    partner at that lag (sample ends, unwritten partners: few), so only the
    shared slots (sxy) take a full pass.
    """
    G, T, K = raw.shape
    cols = _columns(E, M)
    s0 = int(sample.min())
    n_local = int(sample.max()) - s0 + 1  # the tokens touch samples s0 .. s0 + n_local - 1 only
    local = slice(s0, s0 + n_local)
    base = np.arange(G, dtype=np.int64)[:, None] * n_local + (sample - s0)  # (G, T) flat (leading, sample)
    # Every bincount has two bins per cell, 2·cell + flag: a flag selects the
    # slots counted (a select costs more than the add that builds the index).
    # Slot cells are (leading, sample, 1 + E), cell 0 of each (leading, sample)
    # taking the unwritten slots, so no index needs masking either.
    e1 = E + 1
    n_tok, n_slot = G * n_local, G * n_local * e1
    idt = np.int16 if E < 2**14 else np.int64
    slots = [np.where((r >= 0) & (r < E), r, -1).astype(idt) for r in np.moveaxis(raw, -1, 0)]  # (G, T) each
    written = [s >= 0 for s in slots]
    # the second token of a pair marks unwritten slots -2, so they never match the first's -1
    slots_u = [np.where(w, s, -2).astype(idt) for s, w in zip(slots, written)]
    valid = np.logical_or.reduce(written)  # (G, T) the token has a written slot
    tok2 = 2 * base  # (G, T) token index, flag 0
    cell = 2 * (base * e1 + 1)
    codes2 = [cell + 2 * s for s in slots]  # (G, T) slot index, flag 0
    del cell
    scratch = np.empty(G * T, dtype=np.int64)

    def per_token(index, flag=1):
        return np.bincount(index.ravel(), minlength=2 * n_tok).reshape(G, n_local, 2)[..., flag]

    def per_slot(parts, flag=0):
        total = sum(np.bincount(p.ravel(), minlength=2 * n_slot) for p in parts)
        return total.reshape(G, n_local, e1, 2)[:, :, 1:, flag]

    def at(*parts):  # (leading, token) where the (G, n) masks starting at token lo are True
        flat = [(np.flatnonzero(mask), mask.shape[1], lo) for mask, lo in parts]
        return (np.concatenate([f // n for f, n, _ in flat]), np.concatenate([f % n + lo for f, n, lo in flat]))

    def lag_cols(name, m):
        return slice(cols[name].start + (m - 1) * E, cols[name].start + m * E)

    ps = out["per_sample"]
    slots_all = per_slot(codes2)
    tok_all = per_token(tok2 + valid)
    for m in range(1, M + 1):
        nm = min(n_core, max(T - m, 0))  # pairs start at t < nm
        if nm == 0:
            continue
        t, u = slice(0, nm), slice(m, m + nm)
        same = sample[t] == sample[u]
        pair = valid[:, t] & valid[:, u]
        pair &= same  # (G, nm) both tokens written, one sample
        # n, sx, sy: every written token, minus the (few) written ones without a partner at this lag
        gi, ti = at((valid[:, t] ^ pair, 0), (valid[:, nm:], nm))
        ps[:, local, cols["n"].start + m - 1] += tok_all - per_token(tok2[gi, ti], flag=0)
        ps[:, local, lag_cols("sx", m)] += slots_all - per_slot([c[gi, ti] for c in codes2])
        gi, ui = at((valid[:, u] ^ pair, m), (valid[:, :m], 0), (valid[:, m + nm:], m + nm))
        ps[:, local, lag_cols("sy", m)] += slots_all - per_slot([c[gi, ui] for c in codes2])
        # sxy: a slot of t whose expert is also in S_(t+m)
        hits = []
        for j in range(K):
            a = slots[j][:, t]
            hit = a == slots_u[0][:, u]
            for i in range(1, K):
                hit |= a == slots_u[i][:, u]
            hit &= same
            hits.append(hit)
        buf = scratch[: G * nm].reshape(G, nm)
        flagged = (np.add(c[:, t], h, out=buf) for c, h in zip(codes2, hits))
        ps[:, local, lag_cols("sxy", m)] += per_slot(flagged, flag=1)
        if m == 1:
            a = slots[0][:, t]
            top1 = written[0][:, t] & written[0][:, u] & same
            bt = tok2[:, t]
            ps[:, local, 0] += per_token(bt + top1)
            ps[:, local, 1] += per_token(bt + ((a == slots_u[0][:, u]) & same))
            ps[:, local, 3] += per_token(bt + np.logical_or.reduce(hits))
            cells = (np.arange(G, dtype=np.int64)[:, None] * E + a) * E + slots[0][:, u] + 1  # 0: not a pair
            out["transition"] += np.bincount((cells * top1).ravel(), minlength=G * E * E + 1)[1:].reshape(G, E, E)


def _block_stats(ids, sample, index, *, E, M, last_start):
    # A block that is not the last one carries the next block's first M tokens
    # as look-ahead (dask overlap, right side only); pairs start in its core.
    # The last block is told by where it starts: its predecessor's look-ahead
    # may reach the end of the tokens too (a last chunk shorter than M).
    last = index.size == 0 or index[0] == last_start
    n_core = ids.shape[-2] if last else ids.shape[-2] - M
    return local_pair_stats(ids, sample, n_core, E=E, M=M)


def _assemble(blocks, *, E, S, M, ranges):
    # blocks (..., Σ P_local): the local sums of a row of token blocks, one
    # after the other; ranges: (first, count) of each block's samples.
    if ranges == ((0, S),):  # one block touching every sample: already dense
        return blocks
    dense = np.zeros(blocks.shape[:-1] + (_size(E, S, M),), dtype=np.int64)
    offset = 0
    for first, count in ranges:
        size = _size(E, count, M)
        _place(dense, blocks[..., offset:offset + size], first, count, E=E, S=S, M=M)
        offset += size
    return dense


def _totals(packed: np.ndarray, *, E: int, S: int, M: int) -> np.ndarray:
    """Packed sums (..., P) → int64 (..., E·E + R): transition, per_sample summed over samples."""
    parts = _unpack(packed, E, S, M)
    lead = packed.shape[:-1]
    return np.concatenate(
        [parts["transition"].reshape(*lead, E * E), parts["per_sample"].sum(-2)], axis=-1
    )


def _nanmean(x: np.ndarray, axis: int) -> np.ndarray:
    """Mean over ``axis`` skipping NaN (NaN, without a warning, where every value is NaN), as xarray's skipna."""
    ok = ~np.isnan(x)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok, x, 0.0).sum(axis) / ok.sum(axis)


def _replicates(packed: np.ndarray, weights: np.ndarray, *, E: int, S: int, M: int) -> np.ndarray:
    """Bootstrap replicates of the ratio statistics from packed sums.

    Parameters
    ----------
    packed : (..., P) int64 sums of :func:`pair_stats` (all token blocks added).
    weights : (boot, sample) float64 bootstrap counts.

    Returns
    -------
    float64 (..., 2 + M, boot): top1_repeat, set_repeat, autocorrelation_mean at
    lags 1..M of each replicate (NaN where undefined).
    """
    cols = _columns(E, M)
    x = _unpack(packed, E, S, M)["per_sample"]  # (..., S, R)
    # One product resamples every column. Its terms are integers, so every
    # partial sum is exact while it stays below 2**24 (float32) or 2**53
    # (float64); |partial sum| <= max row sum of weights · max |x|.
    bound = float(np.abs(weights).sum(-1).max()) * float(max(x.max(initial=0), -x.min(initial=0)))
    dtype = np.float32 if bound < 2**24 else np.float64
    reps = np.matmul(weights.astype(dtype), x.astype(dtype))  # (..., B, R)
    # (R, boot) contiguous keeps boot last, so the mean over experts adds
    # them in the order xarray's skipna mean over (..., expert, boot) does
    reps = np.ascontiguousarray(np.swapaxes(reps, -1, -2), dtype=np.float64)  # (..., R, B)
    lead, B = reps.shape[:-2], reps.shape[-1]

    def ratio(num, den):
        return num / np.where(den != 0, den, np.nan)

    top1 = ratio(reps[..., 1, :], reps[..., 0, :])
    sets = ratio(reps[..., 3, :], reps[..., 2, :])
    n = reps[..., cols["n"], :][..., None, :]  # (..., M, 1, B)
    sx, sy, sxy = (reps[..., cols[v], :].reshape(*lead, M, E, B) for v in ("sx", "sy", "sxy"))
    ac = _nanmean(_pearson(n, sx, sy, sxy), axis=-2)  # (..., M, B)
    return np.concatenate([top1[..., None, :], sets[..., None, :], ac], axis=-2)


def _pair_sums(  # long: numerical kernel (block overlap + the fused pair pass in one graph)
    ids: xr.DataArray, sample: np.ndarray, *, E: int, S: int, M: int, weights: np.ndarray | None
) -> tuple[xr.Dataset, xr.Dataset | None]:
    """Pair sums over all samples, and their bootstrap replicates.

    In memory: one call of :func:`pair_stats`. On dask: each (checkpoint,
    layer, token) block gets the next M tokens appended (``overlap`` with a
    right-only depth) and is reduced to the sums of the samples it touches
    (:func:`local_pair_stats`); one task per (checkpoint, layer) adds them
    up, so a sample split across token chunks keeps every pair exactly once.
    Each (checkpoint, layer) is then reduced to totals and bootstrap
    replicates, and those (small) are gathered into one chunk.

    Returns
    -------
    totals : Dataset, int64: top1_pairs, top1_repeats, set_pairs, set_repeats
        (checkpoint, layer); transition (checkpoint, layer, expert,
        expert_next); n (checkpoint, layer, lag); sx, sy, sxy (checkpoint,
        layer, lag, expert).
    reps : Dataset, float64, or None without ``weights``: top1_repeat,
        set_repeat (checkpoint, layer, boot); autocorrelation_mean
        (checkpoint, layer, lag, boot).
    """
    ids = ids.transpose("checkpoint", "layer", "token", "k")
    T = ids.sizes["token"]
    Q = E * E + _columns(E, M)["sxy"].stop
    if weights is not None:
        weights = np.asarray(weights, dtype=np.float64)
    if ids.chunks is None:
        packed = pair_stats(ids.values, sample, T, E=E, S=S, M=M)
        tot = _totals(packed, E=E, S=S, M=M)
        rep = None if weights is None else _replicates(packed, weights, E=E, S=S, M=M)
    else:
        import dask.array as da

        data = ids.data
        tchunks = data.chunks[2]
        s_ext, i_ext, d_ext = da.from_array(sample, chunks=(tchunks,)), da.arange(T, chunks=(tchunks,)), data
        if len(tchunks) > 1:  # one token chunk needs no look-ahead
            s_ext = da.overlap.overlap(s_ext, depth={0: (0, M)}, boundary="none")
            i_ext = da.overlap.overlap(i_ext, depth={0: (0, M)}, boundary="none")
            d_ext = da.overlap.overlap(d_ext, depth={2: (0, M)}, boundary="none")
        if d_ext.chunks[2] != s_ext.chunks[0]:  # both see the same rechunking; refuse to pair misaligned blocks
            raise ValueError("temporal: token chunks of expert_ids and of the sample coordinate disagree")
        # Each block yields the sums of only the samples it touches (known
        # now from the sample codes), so no block carries all S samples; one
        # task per (checkpoint, layer) then places them.
        ext = d_ext.chunks[2]
        starts = np.concatenate([[0], np.cumsum([c - M for c in ext[:-1]])]).astype(int)
        if starts[-1] + ext[-1] != T:  # every block but the last must carry exactly M look-ahead tokens
            raise ValueError(f"temporal: unexpected look-ahead blocks {ext} for {T} tokens and max_lag={M}")
        ranges = tuple(_sample_range(sample[a:a + c]) for a, c in zip(starts, ext))
        blocks = da.blockwise(
            _block_stats, "clt", d_ext, "cltk", s_ext, "t", i_ext, "t",
            adjust_chunks={"t": tuple(_size(E, count, M) for _, count in ranges)}, concatenate=True,
            dtype=np.int64, meta=np.empty((0, 0, 0), dtype=np.int64), E=E, M=M, last_start=T - ext[-1],
        )
        packed = da.blockwise(
            _assemble, "clp", blocks, "clt", new_axes={"p": _size(E, S, M)}, concatenate=True, dtype=np.int64,
            meta=np.empty((0, 0, 0), dtype=np.int64), E=E, S=S, M=M, ranges=ranges,
        )
        tot = packed.map_blocks(
            _totals, chunks=packed.chunks[:2] + ((Q,),), dtype=np.int64, meta=np.empty((0, 0, 0), dtype=np.int64),
            E=E, S=S, M=M,
        ).rechunk({0: -1, 1: -1})
        rep = None
        if weights is not None:
            w = da.from_array(weights, chunks=weights.shape)
            rep = da.blockwise(
                _replicates, "clrb", packed, "clp", w, "bs", new_axes={"r": 2 + M}, concatenate=True,
                dtype=np.float64, meta=np.empty((0, 0, 0, 0), dtype=np.float64), E=E, S=S, M=M,
            ).rechunk({0: -1, 1: -1})
    lead = ("checkpoint", "layer")
    coords = {c: ids[c] for c in lead}
    cols = _columns(E, M)
    shape = tot.shape[:2]

    def part(start, stop, shp, dims):
        return xr.Variable(lead + dims, tot[:, :, start:stop].reshape(shape + shp))

    off = E * E
    out = {name: part(off + i, off + i + 1, (), ()) for i, name in enumerate(PAIR_STATS)}
    out["transition"] = part(0, E * E, (E, E), ("expert", "expert_next"))
    out["n"] = part(off + cols["n"].start, off + cols["n"].stop, (M,), ("lag",))
    for name in ("sx", "sy", "sxy"):
        out[name] = part(off + cols[name].start, off + cols[name].stop, (M, E), ("lag", "expert"))
    totals = xr.Dataset(out, coords=coords)
    if rep is None:
        return totals, None
    reps = xr.Dataset(
        {
            "top1_repeat": xr.Variable(lead + ("boot",), rep[:, :, 0]),
            "set_repeat": xr.Variable(lead + ("boot",), rep[:, :, 1]),
            "autocorrelation_mean": xr.Variable(lead + ("lag", "boot"), rep[:, :, 2:]),
        },
        coords=coords,
    )
    return totals, reps


def _set_chance(context) -> float:
    return set_repeat_chance(context["num_experts"], context["top_k"])


_NAN_PAIR = "no adjacent pair with written routing at this checkpoint and layer"
_NAN_PHASE = "no adjacent pair of this phase with written routing at this checkpoint and layer"
OUTPUTS = {
    "top1_repeat": Output("top-1 repeat", "share of adjacent pairs",
                          "P(top1_t = top1_(t+1)) over adjacent token pairs of the same sample", chance=per_expert,
                          nan_where=_NAN_PAIR),
    "set_repeat": Output("set repeat", "share of adjacent pairs",
                         "P(S_t ∩ S_(t+1) ≠ ∅) over adjacent token pairs of the same sample", chance=_set_chance,
                         nan_where=_NAN_PAIR),
    "top1_repeat_independent": Output(
        "top-1 repeat if independent", "share of adjacent pairs",
        "Σ_e f_e·f'_e with f, f' the top-1 shares of the first and second tokens of the pairs: the repeat "
        "rate expected from unequal expert usage alone, without any dependence along the sequence",
        chance=per_expert, nan_where=_NAN_PAIR),
    "top1_pairs": Output("adjacent top-1 pairs", "pairs",
                         "adjacent token pairs of one sample, both with a written top-1 expert"),
    "set_pairs": Output("adjacent set pairs", "pairs",
                        "adjacent token pairs of one sample, both with at least one written slot"),
    "transition_count": Output("top-1 transitions", "pairs",
                               "number of adjacent pairs with top1_t = expert and top1_(t+1) = expert_next"),
    "transition": Output("top-1 transition probability", "probability",
                         "P(top1_(t+1) = expert_next | top1_t = expert); each row sums to 1", chance=per_expert,
                         nan_where="expert is never the top-1 of a pair's first token"),
    "autocorrelation": Output(
        "activation autocorrelation", "Pearson r",
        "Pearson correlation of [e ∈ S_t] and [e ∈ S_(t+lag)] over token pairs lag apart in one sample",
        chance=0.0, nan_where="the expert is always or never selected over the pairs at this lag"),
    "autocorrelation_mean": Output("mean activation autocorrelation", "Pearson r",
                                   "autocorrelation averaged over the experts where it is defined", chance=0.0,
                                   nan_where="no expert has a defined autocorrelation at this lag"),
    "top1_repeat_by_phase": Output(
        "top-1 repeat by phase", "share of adjacent pairs",
        "top1_repeat over the adjacent pairs whose two tokens have this 'phase' (prefill / decode)",
        chance=per_expert, nan_where=_NAN_PHASE),
    "set_repeat_by_phase": Output(
        "set repeat by phase", "share of adjacent pairs",
        "set_repeat over the adjacent pairs whose two tokens have this 'phase' (prefill / decode)",
        chance=_set_chance, nan_where=_NAN_PHASE),
}


def temporal(
    routing: xr.Dataset, *, max_lag: int = 8, n_boot: int = 200, ci: float = 0.95, seed: int = 0
) -> xr.Dataset:
    """Repeat rates, top-1 transitions and activation autocorrelation along each sample.

    Parameters
    ----------
    routing : routing cube; uses ``expert_ids`` (checkpoint, layer, token, k)
        and the ``sample`` token coordinate (samples contiguous along token).
    max_lag : largest lag M of the autocorrelation (lags 1..M).
    n_boot, ci, seed : bootstrap over samples (replicates, level, RNG seed);
        ``n_boot=0`` leaves the intervals out.

    Returns
    -------
    xr.Dataset
        top1_repeat, set_repeat (checkpoint, layer) [+ _lo/_hi]: shares of adjacent pairs
        top1_repeat_independent (checkpoint, layer): Σ_e f_e·f'_e, the repeat
            expected if t+1 were drawn independently from the same top-1 usage
        top1_pairs, set_pairs (checkpoint, layer) int64: pairs counted
        transition_count (checkpoint, layer, expert, expert_next) int64
        transition (checkpoint, layer, expert, expert_next): row-normalised
        autocorrelation (checkpoint, layer, lag, expert)
        autocorrelation_mean (checkpoint, layer, lag) [+ _lo/_hi]: mean over experts
        top1_repeat_by_phase, set_repeat_by_phase (checkpoint, layer, view): the
            repeat rates over pairs whose two tokens share the inference phase
            (view prefill / decode), only when ``phase`` labels more than one

    Ids of -1 (unwritten) never form a pair; an id outside -1..E-1 raises
    ValueError (at compute time for lazy input).
    """
    E, k = cube_sizes(routing)
    max_lag = int(max_lag)
    if max_lag < 1:
        raise ValueError(f"temporal: max_lag={max_lag}; expected >= 1")
    if n_boot < 0:
        raise ValueError(f"temporal: n_boot={n_boot}; expected >= 0")
    ids = routed_ids(routing)
    codes, sample_ids = sample_index(routing)
    S = len(sample_ids)
    weights = bootstrap_weights(S, n_boot, seed) if n_boot > 0 else None
    totals, reps = _pair_sums(ids, codes.values, E=E, S=S, M=max_lag, weights=weights)
    lag_coords = {"lag": ("lag", np.arange(1, max_lag + 1, dtype=np.int32))}
    totals = totals.assign_coords(
        lag_coords | {"expert": ("expert", np.arange(E, dtype=np.int32)),
                      "expert_next": ("expert_next", np.arange(E, dtype=np.int32))}
    )
    trans = totals["transition"]
    n_pairs = trans.sum(("expert", "expert_next"))
    independent = (trans.sum("expert_next") * trans.sum("expert").rename(expert_next="expert")).sum("expert")
    independent = safe_ratio(independent, n_pairs**2)
    ac = totals[["n", "sx", "sy", "sxy"]].astype(np.float64)
    autocorr = _pearson(ac["n"], ac["sx"], ac["sy"], ac["sxy"]).transpose("checkpoint", "layer", "lag", "expert")

    chance_set = set_repeat_chance(E, k)
    out = {
        "top1_repeat": safe_ratio(totals["top1_repeats"], totals["top1_pairs"]),
        "set_repeat": safe_ratio(totals["set_repeats"], totals["set_pairs"]),
        "top1_repeat_independent": independent,
        "top1_pairs": totals["top1_pairs"],
        "set_pairs": totals["set_pairs"],
        "transition_count": trans.astype(np.int64),
        "transition": safe_ratio(trans, trans.sum("expert_next")),
        "autocorrelation": autocorr,
        "autocorrelation_mean": autocorr.mean("expert", skipna=True),
    }
    if len(phases_present(routing)) > 1:
        out.update(_repeat_by_phase(routing, ids, codes.values, E=E, S=S, M=max_lag))
    if reps is not None:
        reps = reps.assign_coords(lag_coords)
        scheme = "resampling samples (not tokens); a pair belongs to the sample of its first token"
        for name in ("top1_repeat", "set_repeat", "autocorrelation_mean"):
            lo, hi = interval(reps[name], ci)
            add_interval(out, name, lo, hi, ci=ci, n_boot=n_boot, scheme=scheme)
    return finalise(
        xr.Dataset(out), routing, name=NAME, outputs=OUTPUTS,
        definition=_DEFINITION.format(max_lag=max_lag), normalisation=_NORMALISATION,
        chance=_CHANCE.format(top1=1 / E, set=chance_set),
        params={"max_lag": max_lag, "n_boot": n_boot, "ci": ci, "seed": seed},
    )


_DEFINITION = (
    "over token pairs (t, t+m) of the same sample, both written: top1_repeat = P(top1_t = top1_(t+1)); set_repeat = "
    "P(S_t ∩ S_(t+1) ≠ ∅); transition[i, j] = P(top1_(t+1) = j | top1_t = i); autocorrelation[m, e] = Pearson r of "
    "[e ∈ S_t] and [e ∈ S_(t+m)], m = 1..{max_lag}. Pairs never cross a sample boundary.")
_NORMALISATION = "repeat rates: share of adjacent pairs; transition rows sum to 1; autocorrelation in [-1, 1]"
_CHANCE = (
    "top1_repeat and transition cells: 1/E = {top1:.4g}; set_repeat: 1 − C(E−k,k)/C(E,k) = {set:.4g}; "
    "autocorrelation: 0 (i.i.d. routing). top1_repeat_independent gives the repeat expected from the observed "
    "(unequal) top-1 usage alone")


def _repeat_by_phase(routing: xr.Dataset, ids: xr.DataArray, codes: np.ndarray, *, E: int, S: int, M: int) -> dict:
    """top1_repeat_by_phase, set_repeat_by_phase (checkpoint, layer, view): repeat rates per inference phase.

    Pairs whose two tokens are both of the phase count (the other tokens are
    masked to -1, which never forms a pair); one more pass over the tokens per phase.
    """
    present = phases_present(routing)
    phase = np.asarray(routing["phase"].values, dtype=object)
    top1, sets = [], []
    for p in present:
        masked = ids.where(xr.DataArray(phase == p, dims="token"), FILL_ID).astype(ids.dtype)
        tot, _ = _pair_sums(masked, codes, E=E, S=S, M=M, weights=None)
        top1.append(safe_ratio(tot["top1_repeats"], tot["top1_pairs"]))
        sets.append(safe_ratio(tot["set_repeats"], tot["set_pairs"]))
    view = {"view": np.asarray(present, dtype=object)}
    return {
        "top1_repeat_by_phase": xr.concat(top1, dim="view").assign_coords(view).transpose("checkpoint", "layer", "view"),
        "set_repeat_by_phase": xr.concat(sets, dim="view").assign_coords(view).transpose("checkpoint", "layer", "view"),
    }


def table(result: xr.Dataset) -> pd.DataFrame:
    """Rows (checkpoint, layer) with the repeat rates, their CIs and pair counts."""
    cols = ["top1_repeat", "top1_repeat_lo", "top1_repeat_hi", "top1_repeat_independent", "set_repeat",
            "set_repeat_lo", "set_repeat_hi", "top1_pairs", "set_pairs"]
    return tidy(result, cols)


def summary(result: xr.Dataset) -> dict:
    """Repeat rates (mean over layers) at the earliest and final checkpoint, against chance."""
    res = result[["top1_repeat", "set_repeat", "top1_repeat_independent", "autocorrelation_mean"]].compute()
    E, k = int(result.attrs["num_experts"]), int(result.attrs["top_k"])

    def at(i):
        return {
            "checkpoint": str(res["checkpoint"].values[i]),
            "step": int(res["step"].values[i]),
            "top1_repeat": json_number(res["top1_repeat"].isel(checkpoint=i).mean("layer")),
            "top1_repeat_independent": json_number(res["top1_repeat_independent"].isel(checkpoint=i).mean("layer")),
            "set_repeat": json_number(res["set_repeat"].isel(checkpoint=i).mean("layer")),
            "lag1_autocorrelation": json_number(res["autocorrelation_mean"].isel(checkpoint=i, lag=0).mean("layer")),
        }

    out = {
        "chance_top1_repeat": 1.0 / E,
        "chance_set_repeat": set_repeat_chance(E, k),
        "earliest": at(0),
        "final": at(-1),
    }
    if "top1_repeat_by_phase" in result:  # per inference phase, final checkpoint, mean over layers
        last = result[["top1_repeat_by_phase", "set_repeat_by_phase"]].isel(checkpoint=-1).mean("layer").compute()
        out["final_by_phase"] = {
            str(v): {"top1_repeat": json_number(last["top1_repeat_by_phase"].sel(view=v)),
                     "set_repeat": json_number(last["set_repeat_by_phase"].sel(view=v))}
            for v in last["view"].values
        }
    return out


ANALYSIS = register(
    Analysis(
        name=NAME,
        func=temporal,
        figure=figure_hook(NAME),
        title="Routing along the sequence: repeats, transitions, autocorrelation",
        caption=(
            "How the routing of token t+1 (t+m) depends on the routing of token t, over token pairs inside one "
            "sample (pairs never cross a sample boundary). Repeat figure: share of adjacent pairs whose top-1 "
            "expert repeats (left; chance 1/E; dotted: the repeat expected from unequal expert usage alone) and "
            "whose expert sets share an expert (right; chance 1 − C(E−k,k)/C(E,k)), per layer, one line per "
            "checkpoint (grey dashed = earliest), bands = 95 % bootstrap CI over samples. Transition figure: "
            "P(top-1 at t+1 | top-1 at t) for the earliest and final checkpoint, white = chance 1/E. "
            "Autocorrelation figure: Pearson r of each expert's activation indicator at lag m, averaged over "
            "experts; chance 0."
        ),
        requires=("expert_ids",),
        table=table, summary=summary,
        outputs=OUTPUTS,
    )
)
