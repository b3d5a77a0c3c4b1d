"""Specialization: do experts serve particular domains or particular tokens?

Four views per (checkpoint, layer), always read against the earliest
checkpoint — an untrained router already looks specialised, because domains
use different tokens and routing depends on the token:

1. **Domain specialization** per (expert, domain): the domain's usage of the
   expert (share of its routing slots, chance 1/E) against the pooled usage
   (``lift``), and a test of whether the difference is larger than chance.
   The test permutes domain labels across *samples*: tokens of one sample are
   not independent, so a token-level chi-square would be far too confident.
   The statistic is the cell's excess count n_de − u_e·n_d (u_e the pooled
   share); its exact mean (0) and variance under random relabelling of
   samples are known in closed form (sampling S_d of the S sample totals
   without replacement), and the two-sided p-value is the normal tail of
   the standardised excess (the randomisation z-test: continuous p-values
   that BH can use, at the cost of one pass). Benjamini–Hochberg
   (``scipy.stats.false_discovery_control``) runs across every cell of the
   result; ``significant`` = q ≤ ``fdr_q``.
2. **Mutual information** (bits) between domain and top-1 expert over tokens,
   with a floor from ``n_shuffle`` random relabellings of samples (mean and
   95th percentile): the plug-in MI is biased upwards and samples are
   clustered, so only MI above the floor means anything.
3. **Vocabulary specialization**: per token type (id), max_e count(id → e)/n_id,
   averaged over types seen ≥ ``min_count`` times, by input token and by next
   token (the id at t+1 of the same sample). Uniform reference k/E; the
   ``*_floor`` variables give the value expected if occurrences were routed
   independently of their id with the observed per-expert rates q_e
   (E[max_e Binomial(n_id, q_e)]/n_id, experts treated as independent).
4. **Specialization score** = mean of three components in [0, 1]:
   clip((MI − MI_floor_mean) / H(domain), 0, 1), the fraction of (expert,
   domain) cells with ``significant``, and clip((V − V_floor) / (1 − V_floor),
   0, 1) with V the input-token vocabulary specialization.

Tokens whose id is unknown (-1: traces that log no ids) are no token type: the
vocabulary statistics leave them out, and are NaN when no id is known (so is
the score). Fewer than two domains: the pipeline skips the analysis with that
reason (``min_domains``). On an aggregate-counts cube only usage, lift,
ratio_to_chance and excess exist; the rest is NaN with ``nan_where`` saying why.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import xarray as xr

from storage.schema import is_counts_cube

from .counts import NO_SAMPLES, slot_counts
from .figures import hook as figure_hook
from .outputs import Output, k_of_experts, per_expert
from .token_pass import Samples
from .bootstrap import (
    add_interval, bootstrap_weights, group_sums, interval, per_sample_sums, resample, sample_groups, sample_index
)
from .registry import Analysis, cube_sizes, finalise, json_number, register, routed_ids, safe_ratio, tidy, token_mask

NAME = "specialization"
LOG2 = np.log(2.0)


# ----------------------------------------------------------------------------- building blocks


def mutual_information(counts: xr.DataArray, a: str = "domain", b: str = "expert") -> xr.DataArray:
    """Plug-in mutual information (bits) of the joint count table over dims ``a`` × ``b``.

    Other dims are kept (checkpoint, layer, boot, shuffle...). NaN where the
    table is empty.
    """
    counts = counts.astype(np.float64)
    n = counts.sum((a, b))
    p = counts / n.where(n > 0)
    pa, pb = p.sum(b), p.sum(a)
    papb = pa * pb
    ratio = p / papb.where(papb > 0)
    terms = (p * np.log(ratio.where(p > 0, 1.0))).where(p > 0, 0.0)
    return (terms.sum((a, b)) / LOG2).where(n > 0)


def entropy_bits(counts: xr.DataArray, dim: str) -> xr.DataArray:
    """Entropy (bits) of the distribution given by ``counts`` along ``dim``; NaN where empty."""
    counts = counts.astype(np.float64)
    n = counts.sum(dim)
    p = counts / n.where(n > 0)
    return (-(p * np.log(p.where(p > 0, 1.0))).sum(dim) / LOG2).where(n > 0)


def shuffled_mi(counts: np.ndarray, codes: np.ndarray, *, n_groups: int) -> np.ndarray:
    """MI (bits) between group and expert after relabelling samples, one value per relabelling.

    Parameters
    ----------
    counts : (..., sample, expert) per-sample counts (e.g. of top-1 experts).
    codes : (shuffle, sample) group code of each sample in each relabelling.

    Returns
    -------
    (..., shuffle) float64. All (relabelling, group) × (leading index, expert)
    tables come from one sparse product of the relabellings' group
    memberships (one entry per (relabelling, sample): O(R·S·E) work) with the
    counts; entries are integers below 2**53, so the tables are exact in any
    summation order. Relabellings go in blocks to bound the memberships' memory.
    """
    from scipy.sparse import csc_array

    lead = counts.shape[:-2]
    S, E = counts.shape[-2:]
    x = counts.reshape(-1, S, E).astype(np.float64)
    G = x.shape[0]
    codes = np.asarray(codes, dtype=np.int64)
    R, D = codes.shape[0], int(n_groups)
    xs = np.ascontiguousarray(x.transpose(1, 0, 2)).reshape(S, G * E)  # (sample, lead·expert)
    out = np.empty((G, R))
    block = max(1, _MEMBER_BUDGET // max(S, 1))
    for r0 in range(0, R, block):
        c = codes[r0:r0 + block]
        b = c.shape[0]
        # column s holds rows r·D + code[r, s], already sorted by r: CSC without a sort
        rows = (np.arange(b)[:, None] * D + c).T.ravel()
        member = csc_array((np.ones(b * S), rows, np.arange(S + 1) * b), shape=(b * D, S))
        tables = (member @ xs).reshape(b, D, G, E)
        out[:, r0:r0 + b] = _mi_bits(tables.transpose(2, 0, 1, 3))
    return out.reshape(*lead, R)


_MEMBER_BUDGET = 1 << 22  # (relabelling, sample) entries of one block in shuffled_mi


def _mi_bits(table: np.ndarray) -> np.ndarray:
    """Plug-in MI (bits) of joint count tables (..., group, expert) -> (...); NaN for an empty table."""
    n = table.sum((-2, -1))
    with np.errstate(divide="ignore", invalid="ignore"):
        p = table / n[..., None, None]
        outer = p.sum(-1, keepdims=True) * p.sum(-2, keepdims=True)
        nz = p > 0
        terms = np.where(nz, p * np.log2(np.where(nz, p, 1.0) / np.where(nz, outer, 1.0)), 0.0)
    return np.where(n > 0, terms.sum((-2, -1)), np.nan)


def randomization_test(
    per_sample: xr.DataArray, labels: xr.DataArray
) -> tuple[xr.DataArray, xr.DataArray, xr.DataArray]:
    """Two-sided test of each (group, expert) cell against random relabelling of samples.

    Parameters
    ----------
    per_sample : (..., sample, expert) counts of each sample (slots per expert).
    labels : (sample,) group label of each sample, named by the group dim (e.g. ``domain``).

    Returns
    -------
    excess, z, p : (..., expert, group). excess = n_ge − u_e·n_g with u_e the
    pooled share; z = excess / sd of that excess under random relabelling
    (S_g of the S samples drawn without replacement); p = 2·Φ(−|z|), and 1
    where the variance is 0 (nothing varies between samples, so nothing to
    test). NaN where the (checkpoint, layer) has no slot at all.
    """
    from scipy.stats import norm

    x = per_sample.astype(np.float64)
    S = x.sizes["sample"]
    name = str(labels.name)
    n_s = x.sum("expert")
    u = x.sum("sample") / n_s.sum("sample").where(n_s.sum("sample") > 0)
    dev = x - u * n_s  # (..., sample, expert); sums to 0 over samples
    member = xr.DataArray(
        (np.asarray(labels.values).astype(str)[:, None] == np.unique(np.asarray(labels.values).astype(str))[None, :]),
        dims=("sample", name), coords={name: np.unique(np.asarray(labels.values).astype(str)).astype(object)},
    ).astype(np.float64)
    S_g = member.sum("sample")
    excess = xr.dot(dev, member, dim="sample")
    factor = S_g * (S - S_g) / (S * max(S - 1, 1))
    var = factor * (dev**2).sum("sample")
    z = excess / np.sqrt(var.where(var > 0))
    p = xr.apply_ufunc(lambda v: 2.0 * norm.sf(np.abs(v)), z, dask="parallelized", output_dtypes=[np.float64])
    p = p.where(~((var <= 0) & u.notnull()), 1.0)  # no between-sample variation: nothing to test
    return excess, z.where(var > 0, 0.0).where(u.notnull()), p


def bh_qvalues(p: xr.DataArray) -> xr.DataArray:
    """Benjamini–Hochberg adjusted p-values over *every* finite cell of ``p`` (NaN stays NaN)."""
    from scipy.stats import false_discovery_control

    def _bh(values):
        values = np.asarray(values, dtype=np.float64)
        out = np.full(values.shape, np.nan)
        ok = np.isfinite(values)
        if ok.any():
            out[ok] = false_discovery_control(np.clip(values[ok], 0.0, 1.0), method="bh")
        return out

    if p.chunks is not None:
        p = p.chunk({d: -1 for d in p.dims})  # one family: the adjustment needs every p-value at once
    return xr.apply_ufunc(_bh, p, input_core_dims=[list(p.dims)], output_core_dims=[list(p.dims)],
                          dask="parallelized", output_dtypes=[np.float64])


# Where a Chernoff–Hoeffding bound exp(−n·D(x ‖ q)) on a binomial tail is below exp(−38) ≈ 3.1e−17 (under
# half an ulp of 1), the CDF beyond that point rounds to exactly 0 or 1 in float64 (also as 1 − CDF).
_TAIL_NATS = 38.0
_BLOCK_CELLS = 1 << 20  # float64 cells of one padded (row, m) block in expected_max_share (8 MiB)


def expected_max_share(n: np.ndarray, q: np.ndarray) -> float:
    """Mean over types of E[max_e Binomial(n_t, q_e)] / n_t (experts treated as independent).

    Parameters
    ----------
    n : (types,) occurrence counts; types with 0 are skipped.
    q : (E,) per-token selection rates.

    Returns
    -------
    float; NaN when no type has an occurrence or a rate is not finite.

    Notes
    -----
    Per distinct count n, E[max] = Σ_m P(max > m), summed over a ±12 sd
    window [lo, hi] around n·max q (P(max > m) taken as 1 below it and 0
    above it), with P(max ≤ m) = Π_e F_e(m), F_e the binomial CDF.
    Chernoff–Hoeffding bounds mark what cannot change that sum in float64:
    below an edge ``a``, P(max ≤ m) ≤ F_max(m) < exp(−38), so the term is
    exactly 1; from the m where expert e's upper tail drops below exp(−38),
    F_e(m) is 1 to the last bit and e leaves the product; terms after every
    expert has left are below E·exp(−38). Each CDF left is SciPy's F_e(a)
    plus the pmf walked up from a with the ratio (n − m)/(m + 1) · q/(1 − q)
    and scaled to SciPy's mass of the run (a few ulp instead of one
    incomplete-beta evaluation per (m, expert)); the product over experts is
    a sum of logs per (count, m).
    """
    from scipy.stats import binom

    n = np.asarray(n, dtype=np.int64)
    n = n[n > 0]
    q = np.clip(np.asarray(q, dtype=np.float64), 0.0, 1.0)
    if n.size == 0 or not np.isfinite(q).all():
        return float("nan")
    qmax = float(q.max())
    if qmax >= 1.0:
        return 1.0  # one expert takes every occurrence: the max is n for every type
    values, inverse = np.unique(n, return_inverse=True)
    nf = values.astype(np.float64)
    sd = np.sqrt(nf * qmax * (1.0 - qmax))
    lo = np.maximum(0.0, np.floor(nf * qmax - 12 * sd - 1)).astype(np.int64)
    hi = np.minimum(nf - 1, np.ceil(nf * qmax + 12 * sd + 1)).astype(np.int64)

    def past_lower_edge(m):  # not (P(X_max <= m) < exp(-38))
        x = m / nf
        return ~((x < qmax) & (nf * _bernoulli_kl(x, qmax) > _TAIL_NATS))

    def settled(m):  # P(X_e > m) < exp(-38): F_e = 1 from m on
        x = (m + 1) / nf[:, None]
        return (x > q) & (nf[:, None] * _bernoulli_kl(x, q) > _TAIL_NATS)

    a = _first_true(past_lower_edge, lo, hi + 1)  # (value,)
    shape = (len(values), len(q))
    t = _first_true(settled, np.broadcast_to(a[:, None], shape), np.broadcast_to(hi[:, None] + 1, shape))
    length = np.maximum(np.minimum(hi + 1, t.max(1)) - a, 0)  # P(max > m) computed for m = a .. a + length - 1
    above = np.zeros(len(values))  # Σ of those terms
    vi, ej = np.nonzero(t > a[:, None])  # (value, expert) rows whose CDF is not 1 from a on
    if vi.size:
        width = np.minimum(t[vi, ej], hi[vi] + 1) - a[vi]  # a row's m run until its expert settles
        offset = np.cumsum(length) - length  # flat position of (value, a)
        log_le = np.zeros(int(length.sum()) + 1)  # Σ_e log F_e(m) per (value, m); the last cell takes padding
        f0 = binom.cdf(a[vi], values[vi], q[ej])
        # P(a < X <= last m of the run): the walk is scaled to it (SciPy's pmf is only good to ~1e-12)
        mass = np.maximum(binom.sf(a[vi], values[vi], q[ej]) - binom.sf(a[vi] + width - 1, values[vi], q[ej]), 0.0)
        bucket = np.floor(2.0 * np.log2(width)).astype(np.int64)  # widths within √2 share a padded block
        for key in np.unique(bucket):
            rows = np.flatnonzero(bucket == key)
            per = max(1, _BLOCK_CELLS // int(width[rows].max()))
            for r in np.array_split(rows, -(-rows.size // per)):
                cdf, inside = _binom_cdf_run(nf[vi[r]], q[ej[r]], a[vi[r]], width[r], f0[r], mass[r])
                cell = np.where(inside, offset[vi[r]][:, None] + np.arange(cdf.shape[1]), log_le.size - 1)
                with np.errstate(divide="ignore"):
                    log_le += np.bincount(cell.ravel(), weights=np.log(cdf).ravel(), minlength=log_le.size)
        ok = length > 0
        above[ok] = np.add.reduceat(-np.expm1(log_le[:-1]), offset[ok])
    share = (a + above) / nf
    return float(np.mean(share[inverse]))


def expected_max_share_plain(n: np.ndarray, q: np.ndarray) -> float:
    """:func:`expected_max_share` by its definition (the reference of the fast form, same window and guards).

    Per distinct count n: (lo + Σ_{m=lo..hi} (1 − Π_e F_e(m))) / n, with SciPy's binomial CDF per
    (m, expert). The fast form agrees to ~1e-12 relative; ``bench/specialization.py`` times both.
    """
    from scipy.stats import binom

    n = np.asarray(n, dtype=np.int64)
    n = n[n > 0]
    q = np.clip(np.asarray(q, dtype=np.float64), 0.0, 1.0)
    if n.size == 0 or not np.isfinite(q).all():
        return float("nan")
    qmax = float(q.max())
    if qmax >= 1.0:
        return 1.0
    values, inverse = np.unique(n, return_inverse=True)
    share = np.empty(len(values))
    for i, count in enumerate(values):
        sd = np.sqrt(count * qmax * (1.0 - qmax))
        lo = int(max(0, np.floor(count * qmax - 12 * sd - 1)))
        hi = int(min(count - 1, np.ceil(count * qmax + 12 * sd + 1)))
        m = np.arange(lo, hi + 1)
        p_le = np.prod(binom.cdf(m[:, None], count, q[None, :]), axis=1)
        share[i] = (lo + np.sum(1.0 - p_le)) / count
    return float(np.mean(share[inverse]))


def _binom_cdf_run(n, q, start, width, f0, mass):
    """Binomial CDFs F(m) for m = start .. start + width − 1, one run per row.

    Parameters
    ----------
    n, q, start, width : (row,) count, rate, first m and run length.
    f0, mass : (row,) F(start) and F(last m) − F(start) (from the survival
        function, which keeps the difference exact to an ulp of 1).

    Returns
    -------
    cdf : (row, max width), 1 past a row's run; inside : (row, max width)
    bool, True within the run. The pmf's shape comes from the ratio
    pmf(m + 1)/pmf(m) = (n − m)/(m + 1) · q/(1 − q), its scale from ``mass``.
    """
    L = int(width.max())
    col = np.arange(L)
    m = start[:, None] + col[:-1]  # m = start .. start + L - 2
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ratio = (n[:, None] - m) / (m + 1.0) * (q / (1.0 - q))[:, None]  # pmf(m + 1) / pmf(m)
    inside = col < width[:, None]
    ratio = np.where(inside[:, 1:], ratio, 0.0)  # the walk stops at the run's end
    walk = np.cumsum(np.cumprod(ratio, axis=1), axis=1)  # Σ_{u=1}^{j} pmf(start + u) / pmf(start), j = 1 .. L-1
    total = walk[:, -1] if L > 1 else np.zeros(len(n))
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(total > 0, mass / total, 0.0)
    cdf = np.empty((len(n), L))
    cdf[:, 0] = f0
    cdf[:, 1:] = f0[:, None] + scale[:, None] * walk
    np.minimum(cdf, 1.0, out=cdf)
    return np.where(inside, cdf, 1.0), inside


def _bernoulli_kl(x, q):
    """D(x ‖ q) in nats between Bernoulli rates, elementwise (inf where x > 0 = q)."""
    from scipy.special import xlogy

    with np.errstate(divide="ignore", invalid="ignore"):
        return xlogy(x, x / q) + xlogy(1.0 - x, (1.0 - x) / (1.0 - q))


def _first_true(pred, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Elementwise smallest integer m in [lo, hi) with pred(m), else hi; pred false then true in m."""
    lo, hi = np.array(lo, dtype=np.int64), np.array(hi, dtype=np.int64)
    while (open_ := lo < hi).any():
        mid = (lo + hi) // 2
        hit = pred(mid)
        hi = np.where(open_ & hit, mid, hi)
        lo = np.where(open_ & ~hit, mid + 1, lo)
    return lo


def _type_codes(token_ids: np.ndarray, keep: np.ndarray, min_count: int) -> tuple[np.ndarray, int]:
    """Code per token of its type among types seen >= min_count times in ``keep`` (-1 otherwise)."""
    codes = np.full(token_ids.shape, -1, dtype=np.int64)
    if not keep.any():
        return codes, 0
    types, inverse, counts = np.unique(token_ids[keep], return_inverse=True, return_counts=True)
    frequent = counts >= min_count
    remap = np.where(frequent, np.cumsum(frequent) - 1, -1)
    codes[np.flatnonzero(keep)] = remap[inverse]
    return codes, int(frequent.sum())


def vocabulary_specialization(
    ids: xr.DataArray, type_codes: np.ndarray, n_types: int, *, E: int, min_count: int
) -> tuple[xr.DataArray, xr.DataArray, xr.DataArray]:
    """Mean over token types of max_e count(type → e)/n_type, and its independence floor.

    Parameters
    ----------
    ids : (checkpoint, layer, token, k) expert ids (-1 = not counted).
    type_codes : (token,) type of each token, -1 for tokens not counted.
    n_types : number of type codes.

    Returns
    -------
    value, floor, types : (checkpoint, layer); ``types`` = types with at least
    ``min_count`` routed occurrences at that checkpoint and layer.
    """
    if n_types == 0:
        nan = xr.full_like(ids.isel(token=0, k=0, drop=True), np.nan, dtype=np.float64)
        return nan, nan, xr.zeros_like(nan, dtype=np.int64)
    counts, n = type_counts(ids, type_codes, n_types, E=E)
    ok = n >= min_count
    share = (counts.max("_expert") / n.where(ok)).astype(np.float64)
    value = share.mean("_type", skipna=True)
    q = safe_ratio(counts.where(ok, 0).sum("_type"), n.where(ok, 0).sum("_type"))  # (checkpoint, layer, _expert)

    def _floor(n_t, ok_t, q_e):
        return expected_max_share(np.where(ok_t, n_t, 0), q_e)

    floor = xr.apply_ufunc(
        _floor, n, ok, q, input_core_dims=[["_type"], ["_type"], ["_expert"]], vectorize=True,
        dask="parallelized", output_dtypes=[np.float64],
    )
    return value, floor, ok.sum("_type").astype(np.int64)


def type_counts(
    ids: xr.DataArray, type_codes: np.ndarray, n_types: int, *, E: int
) -> tuple[xr.DataArray, xr.DataArray]:
    """Slots per (token type, expert) and routed tokens per type, in one bincount per block.

    Parameters
    ----------
    ids : (checkpoint, layer, token, k) expert ids; ids outside 0..E-1 are not counted.
    type_codes : (token,) type of each token in 0..n_types-1, -1 for tokens not counted.
    n_types : number of type codes.

    Returns
    -------
    counts : (checkpoint, layer, _type, _expert) int64 slots.
    n : (checkpoint, layer, _type) int64 tokens with at least one counted slot.
    Lazy (one task per block, summed over token blocks) when ``ids`` is.
    """
    ids = ids.transpose(..., "token", "k")
    template = ids.isel(token=0, k=0, drop=True)
    size = n_types * (E + 1)  # n_types·E (type, expert) cells, then n_types routed-token cells
    codes = np.asarray(type_codes, dtype=np.int64)
    data = ids.data
    if isinstance(data, np.ndarray):
        flat = _type_counts_block(data, codes, n_types=n_types, E=E)[..., 0, :]
    else:
        import dask.array as da

        nd = data.ndim
        lead = tuple(range(nd - 2))
        parts = da.blockwise(
            _type_counts_block, lead + (nd - 2, nd), data, lead + (nd - 2, nd - 1),
            da.from_array(codes, chunks=(data.chunks[-2],)), (nd - 2,), new_axes={nd: size},
            adjust_chunks={nd - 2: 1}, concatenate=True, dtype=np.int64, n_types=n_types, E=E,
        )
        flat = parts.sum(axis=nd - 2)
    shape = template.shape
    counts = xr.DataArray(flat[..., : n_types * E].reshape(*shape, n_types, E),
                          dims=(*template.dims, "_type", "_expert"), coords=template.coords)
    n = xr.DataArray(flat[..., n_types * E:], dims=(*template.dims, "_type"), coords=template.coords)
    return counts, n


def _type_counts_block(ids: np.ndarray, codes: np.ndarray, *, n_types: int, E: int) -> np.ndarray:
    """(..., token, k) ids and (token,) type codes -> (..., 1, n_types·(E + 1)) counts (see type_counts).

    One bincount per rank k (a handful): 2-D temporaries only, uncounted slots go to a spare last cell.
    """
    size = n_types * (E + 1)
    lead = ids.shape[:-2]
    x = ids.reshape(-1, *ids.shape[-2:])  # (lead, token, k)
    G = x.shape[0]
    spare = G * size
    typed = codes >= 0
    base = (np.arange(G, dtype=np.int64) * size)[:, None] + codes * E  # (lead, token): cell of (type, expert 0)
    out = np.zeros(spare + 1, dtype=np.int64)
    routed = np.zeros(x.shape[:2], dtype=bool)
    for j in range(x.shape[-1]):
        xj = x[..., j]
        ok = (xj >= 0) & (xj < E) & typed
        routed |= ok
        out += np.bincount(np.where(ok, base + xj, spare).ravel(), minlength=spare + 1)
    # the routed-token cell of type c is n_types·E + c = base − c·E + n_types·E + c within the block
    out += np.bincount(np.where(routed, base + n_types * E + codes * (1 - E), spare).ravel(), minlength=spare + 1)
    return out[:spare].reshape(*lead, 1, size)


def top1_token_specialization(ids: xr.DataArray, type_codes: np.ndarray, n_types: int, *, E: int) -> xr.DataArray:
    """OLMoE's token specialization: mean over every token type of max_e count(type → top-1 e) / n_type.

    As ``do_token_analysis`` of OLMoE's run_moe_analysis.py: only the top-1
    expert (slot 0) of each token, every type seen at least once (no
    ``min_count``), types weighted equally.

    Parameters
    ----------
    ids : (checkpoint, layer, token, k) expert ids (-1 = not counted).
    type_codes : (token,) type of each token in 0..n_types-1, -1 for tokens not counted
        (from :func:`_type_codes` with ``min_count=1``).
    n_types : number of type codes.

    Returns
    -------
    (checkpoint, layer) float64; NaN where no type has a routed top-1.
    """
    if n_types == 0:
        return xr.full_like(ids.isel(token=0, k=0, drop=True), np.nan, dtype=np.float64)
    counts, n = type_counts(ids.isel(k=slice(0, 1)), type_codes, n_types, E=E)
    return (counts.max("_expert") / n.where(n > 0)).astype(np.float64).mean("_type", skipna=True)


def next_token_ids(routing: xr.Dataset) -> np.ndarray:
    """(token,) id of the next token of the same sample, -1 at a sample's last token (coordinates only)."""
    tid = np.asarray(routing["token_id"].values, dtype=np.int64)
    codes, _ = sample_index(routing)
    s = codes.values
    nxt = np.full(tid.shape, -1, dtype=np.int64)
    same = s[:-1] == s[1:]
    nxt[:-1] = np.where(same, tid[1:], -1)
    return nxt


# ----------------------------------------------------------------------------- the analysis


def _fdr_q(context) -> float:
    return float(context["fdr_q"])


_NAN_CL = "no routed token at this checkpoint and layer"
_NAN_DOMAIN = "the domain has no routed token at this checkpoint and layer"
_NAN_TYPES = "no token type with >= {min_count} routed occurrences"
_CELL = ("checkpoint", "layer", "expert", "domain")
OUTPUTS = {
    "usage": Output("expert usage by domain", "share of routing slots",
                    "slots of the domain's tokens going to the expert / all slots of the domain", chance=per_expert,
                    nan_where=_NAN_DOMAIN),
    "usage_all": Output("expert usage (all domains)", "share of routing slots",
                        "share of all routing slots going to the expert", chance=per_expert, nan_where=_NAN_CL),
    "lift": Output("domain lift", "ratio", "usage by the domain / pooled usage of the expert (1 = no preference)",
                   chance=1.0, nan_where="the expert or the domain has no slot at this checkpoint and layer"),
    "ratio_to_chance": Output("usage ratio to chance", "ratio", "usage by the domain × E (1 = uniform routing)",
                              chance=1.0, nan_where=_NAN_DOMAIN),
    "excess": Output("excess slots", "slots",
                     "n_(domain,expert) − u_expert · n_domain: slots above what the pooled usage predicts", chance=0.0,
                     nan_where=_NAN_CL),
    "z": Output("randomisation z", "standard deviations",
                "excess / its standard deviation under random relabelling of samples with domains", chance=0.0,
                nan_where=_NAN_CL),
    "p_value": Output("p-value", "probability",
                      "two-sided p of the excess under random relabelling of samples (normal approximation)",
                      nan_where=_NAN_CL),
    "q_value": Output("BH q-value", "probability",
                      "Benjamini–Hochberg adjusted p-value across all (checkpoint, layer, expert, domain) cells",
                      nan_where=_NAN_CL),
    "significant": Output("significant cell", "boolean",
                          "Benjamini–Hochberg q <= {fdr_q} (two-sided; the sign of 'excess' gives the direction)"),
    "mi": Output("mutual information domain–top-1", "bits", "I(domain; top-1 expert) over tokens, plug-in estimate",
                 chance=0.0, nan_where=_NAN_CL),
    "mi_floor_mean": Output("MI floor (mean)", "bits",
                            "mean MI over {n_shuffle} random relabellings of samples with domains", nan_where=_NAN_CL),
    "mi_floor_p95": Output("MI floor (95th percentile)", "bits",
                           "95th percentile of MI over {n_shuffle} random relabellings of samples", nan_where=_NAN_CL),
    "domain_entropy": Output("domain entropy", "bits",
                             "H(domain) over the tokens with a written top-1 (MI's upper bound)", nan_where=_NAN_CL),
    "vocab_input": Output(
        "vocabulary specialization (input token)", "share of occurrences",
        "mean over token types seen >= {min_count} times of max_e count(id → e)/n_id (tokens with an unknown id, "
        "-1, are left out); top-k membership, not OLMoE's top-1 over every type (token_specialization_olmoe_input)",
        chance=k_of_experts, nan_where=_NAN_TYPES + " (e.g. the source logs no token ids)"),
    "vocab_input_floor": Output(
        "vocabulary specialization floor (input token)", "share of occurrences",
        "the same if occurrences were routed independently of the id with the observed per-expert rates "
        "(mean over types of E[max_e Binomial(n_id, q_e)]/n_id)", chance=k_of_experts, nan_where=_NAN_TYPES),
    "vocab_input_types": Output("token types (input)", "types", "token types with >= {min_count} routed occurrences"),
    "vocab_next": Output("vocabulary specialization (next token)", "share of occurrences",
                         "as vocab_input, grouping token t by the id of token t+1 of the same sample",
                         chance=k_of_experts, nan_where="no next-token type with >= {min_count} routed occurrences"),
    "vocab_next_floor": Output("vocabulary specialization floor (next token)", "share of occurrences",
                               "independence floor of vocab_next", chance=k_of_experts,
                               nan_where="no next-token type with >= {min_count} routed occurrences"),
    "vocab_next_types": Output("token types (next)", "types",
                               "next-token types with >= {min_count} routed occurrences"),
    "token_specialization_olmoe_input": Output(
        "token specialization, OLMoE's definition (input token)", "share of occurrences",
        "OLMoE's run_moe_analysis.py: mean over every token type (seen at least once) of max_e "
        "count(id → top-1 expert e)/n_id; top-1 expert only, unlike vocab_input (top-k membership, types "
        "seen >= {min_count} times); no simple chance level: a type seen once scores 1, so rare types pull it up",
        nan_where="no token with a known id and a written top-1 slot"),
    "token_specialization_olmoe_next": Output(
        "token specialization, OLMoE's definition (next token)", "share of occurrences",
        "as token_specialization_olmoe_input, grouping token t by the id of token t+1 of the same sample "
        "(OLMoE's ground-truth next token)", nan_where="no token with a known next id and a written top-1 slot"),
    "significant_fraction": Output("fraction of significant cells", "share of (expert, domain) cells",
                                   "share of (expert, domain) cells with BH q <= {fdr_q}", chance=_fdr_q),
    "mi_component": Output("MI above floor / H(domain)", "fraction",
                           "clip((mi − mi_floor_mean) / domain_entropy, 0, 1)", chance=0.0, nan_where=_NAN_CL),
    "vocab_component": Output("vocabulary specialization above floor", "fraction",
                              "clip((vocab_input − vocab_input_floor) / (1 − vocab_input_floor), 0, 1)", chance=0.0,
                              nan_where=_NAN_TYPES),
    "score": Output("specialization score", "score in [0, 1]",
                    "mean of mi_component, significant_fraction and vocab_component",
                    chance="≈ fdr_q/3 (null: only false discoveries)", nan_where=_NAN_CL + ", or " + _NAN_TYPES),
}
# an aggregate-counts cube: usage, lift, ratio_to_chance and excess exact, the rest NaN (or none) and saying why
_NA = f"always: {NO_SAMPLES}"
_NO_IDS = {"description": "needs token ids", "nan_where": _NA, "chance": None}
COUNTS_OUTPUTS = {
    "usage": replace(OUTPUTS["usage"], description="slots of the domain counted for the expert / all slots of the "
                     "domain", nan_where="the domain has no counted slot at this checkpoint and layer"),
    "usage_all": replace(OUTPUTS["usage_all"], description="share of all counted routing slots going to the expert",
                         nan_where="no counted slot at this checkpoint and layer"),
    "lift": OUTPUTS["lift"],
    "ratio_to_chance": replace(OUTPUTS["ratio_to_chance"],
                               nan_where="the domain has no counted slot at this checkpoint and layer"),
    "excess": replace(OUTPUTS["excess"], nan_where=None),
    "z": Output("randomisation z", "standard deviations", "randomisation test of the excess", nan_where=_NA),
    "p_value": Output("p-value", "probability", "randomisation test of the excess", nan_where=_NA),
    "q_value": Output("BH q-value", "probability", "Benjamini–Hochberg adjusted p-value", nan_where=_NA),
    "significant": replace(OUTPUTS["significant"], description="always False: no randomisation test is possible "
                           "on slot counts (see attrs intervals)"),
    "mi": Output("mutual information domain–top-1", "bits",
                 "I(domain; top-1 expert) over tokens: needs each token's top-1 expert", nan_where=_NA),
    "mi_floor_mean": Output("MI floor (mean)", "bits", "MI under relabelled samples", nan_where=_NA),
    "mi_floor_p95": Output("MI floor (95th percentile)", "bits", "MI under relabelled samples", nan_where=_NA),
    "domain_entropy": Output("domain entropy", "bits", "H(domain) over tokens with a top-1", nan_where=_NA),
    "significant_fraction": Output("fraction of significant cells", "share of (expert, domain) cells",
                                   "share of cells with BH q <= fdr_q", nan_where=_NA),
    "mi_component": Output("MI above floor / H(domain)", "fraction", "needs mi", nan_where=_NA),
    **{name: replace(OUTPUTS[name], **_NO_IDS) for name in ("vocab_input", "vocab_input_floor", "vocab_next",
                                                             "vocab_next_floor", "vocab_component")},
    "vocab_input_types": replace(OUTPUTS["vocab_input_types"],
                                 description="token types counted: none without token ids"),
    "vocab_next_types": Output("token types (next)", "types", "token types counted: none without token ids"),
    "score": Output("specialization score", "score in [0, 1]",
                    "mean of mi_component, significant_fraction and vocab_component", nan_where=_NA),
}


def specialization(
    routing: xr.Dataset,
    *,
    canonical_only: bool = False, fdr_q: float = 0.05, n_shuffle: int = 200, min_count: int = 10,
    n_boot: int = 200, ci: float = 0.95, seed: int = 0,
) -> xr.Dataset:
    """Domain, mutual-information and vocabulary specialization per (checkpoint, layer).

    Parameters
    ----------
    routing : routing cube; uses ``expert_ids`` (checkpoint, layer, token, k)
        and the token coordinates ``sample``, ``domain`` (one per sample),
        ``token_id`` (and ``canonical`` with ``canonical_only``).
    canonical_only : use only tokens whose ``canonical`` flag is set.
    fdr_q : Benjamini–Hochberg level for ``significant``.
    n_shuffle : relabellings of samples for the MI floor.
    min_count : a token type enters vocabulary specialization when seen at
        least this many times (routed) at the checkpoint and layer.
    n_boot, ci, seed : stratified bootstrap over samples (within domains) for
        the CIs of ``lift`` and ``mi``; ``seed`` also seeds the shuffles.

    Returns
    -------
    xr.Dataset
        (checkpoint, layer, expert, domain): usage, lift [+_lo/_hi],
            ratio_to_chance, excess, z, p_value, q_value, significant
        (checkpoint, layer, expert): usage_all
        (checkpoint, layer): mi [+_lo/_hi], mi_floor_mean, mi_floor_p95,
            domain_entropy, mi_component, significant_fraction,
            vocab_input, vocab_input_floor, vocab_input_types,
            vocab_next, vocab_next_floor, vocab_next_types, vocab_component, score,
            token_specialization_olmoe_input, token_specialization_olmoe_next
            (OLMoE's top-1, every-type variant of vocab_input / vocab_next)

    Raises
    ------
    ValueError
        Fewer than two domains, a sample with two domains, bad parameters, or
        (at compute time for lazy input) ids outside -1..E-1.
    """
    E, k = cube_sizes(routing)
    _check_params(fdr_q=fdr_q, n_shuffle=n_shuffle, min_count=min_count, n_boot=n_boot)
    params = {"canonical_only": canonical_only, "fdr_q": fdr_q, "n_shuffle": int(n_shuffle),
              "min_count": int(min_count), "n_boot": int(n_boot), "ci": ci, "seed": seed}
    if is_counts_cube(routing):
        return _specialization_from_counts(routing, E=E, params=params)
    samples = Samples.of(routing)  # once: every token pass below shares it
    domains = sample_groups(routing, "domain", samples)  # (sample,), raises on a sample with two domains
    labels = np.unique(np.asarray(domains.values).astype(str))
    if len(labels) < 2:
        raise ValueError(f"specialization: the routing cube has {len(labels)} domain label(s) {labels.tolist()} on "
                         "coordinate 'domain'; domain specialization needs at least 2")
    domains = domains.astype(str).astype(object)
    ids = routed_ids(routing, canonical_only=canonical_only)
    top1 = ids.isel(k=0, drop=True)
    slots_s = per_sample_sums(xr.ones_like(ids, dtype=np.int32), samples, dim=("token", "k"),
                              by={"expert": (ids, E)}).astype(np.int64)  # (checkpoint, layer, sample, expert)
    top1_s = per_sample_sums(xr.ones_like(top1, dtype=np.int32), samples, dim="token",
                             by={"expert": (top1, E)}).astype(np.int64)

    out = {
        **_domain_specialization(slots_s, domains),
        **_mutual_information(top1_s, domains, labels, n_shuffle=int(n_shuffle), seed=seed),
        **_vocabulary(routing, ids, canonical_only=canonical_only, E=E, min_count=min_count),
    }
    if n_boot > 0:
        _add_intervals(out, slots_s, top1_s, domains, n_boot=n_boot, ci=ci, seed=seed)
    out.update(_score(out, fdr_q))
    return finalise(
        xr.Dataset(out), routing, name=NAME, outputs=OUTPUTS,
        definition=_DEFINITION.format(fdr_q=fdr_q, n_shuffle=int(n_shuffle), min_count=min_count),
        normalisation=_NORMALISATION,
        chance=_CHANCE.format(usage=1.0 / E, vocab=k / E, fdr_q=fdr_q),
        params=params,
    )


_DEFINITION = (
    "usage[c,l,e,d] = slots of domain d to expert e / slots of d; lift = usage / pooled usage; significance: "
    "two-sided randomisation test of the excess n_de − u_e·n_d under random relabelling of SAMPLES with domains "
    "(exact permutation mean and variance, normal tail; tokens of one sample are dependent, so a token-level "
    "chi-square would be anti-conservative), Benjamini–Hochberg across all cells, significant = q <= {fdr_q}. mi = "
    "I(domain; top-1 expert) in bits over tokens, floor from {n_shuffle} sample relabellings (mean, 95th "
    "percentile). vocab_* = mean over token types seen >= {min_count} times of max_e count(id→e)/n_id, by input "
    "token and by next token (same sample); token_specialization_olmoe_* = OLMoE's variant, top-1 expert only, over "
    "every type seen once or more. score = mean(clip((mi − mi_floor_mean)/H(domain), 0, 1), significant_fraction, "
    "clip((vocab_input − floor)/(1 − floor), 0, 1)).")
_NORMALISATION = ("usage: share of routing slots (1/E uniform); lift and ratio_to_chance: ratios; mi: bits; vocab: "
                  "share of a type's occurrences; score in [0, 1]")
_CHANCE = ("usage: 1/E = {usage:.4g}; lift, ratio_to_chance: 1; mi: ≈ mi_floor (0 asymptotically); vocab: uniform "
           "k/E = {vocab:.4g} (the max over experts sits above it: see vocab_*_floor); significant_fraction: ≤ fdr_q "
           "= {fdr_q} under the null")


def _check_params(*, fdr_q, n_shuffle, min_count, n_boot) -> None:
    """ValueError naming the first parameter of :func:`specialization` outside its range."""
    if not 0.0 < float(fdr_q) < 1.0:
        raise ValueError(f"specialization: fdr_q={fdr_q}; expected a level strictly between 0 and 1")
    for pname, v, least in (("n_shuffle", n_shuffle, 1), ("min_count", min_count, 1), ("n_boot", n_boot, 0)):
        if int(v) < least:
            raise ValueError(f"specialization: {pname}={v}; expected >= {least}")


def _domain_specialization(slots_s: xr.DataArray, domains: xr.DataArray) -> dict[str, xr.DataArray]:
    """usage, usage_all, lift, ratio_to_chance and the randomisation test (excess, z, p_value, q_value).

    ``slots_s`` (checkpoint, layer, sample, expert) slot counts per sample, ``domains`` (sample,) labels.
    """
    E = slots_s.sizes["expert"]
    count = group_sums(slots_s, domains)  # (checkpoint, layer, expert, domain)
    slots_d = count.sum("expert")
    usage = safe_ratio(count, slots_d)
    usage_all = safe_ratio(count.sum("domain"), slots_d.sum("domain"))
    excess, z, p = randomization_test(slots_s, domains)
    return {
        "usage": usage,
        "usage_all": usage_all.transpose("checkpoint", "layer", "expert"),
        "lift": safe_ratio(usage, usage_all),
        "ratio_to_chance": usage * E,
        "excess": excess.transpose(*_CELL),
        "z": z.transpose(*_CELL),
        "p_value": p.transpose(*_CELL),
        "q_value": bh_qvalues(p.transpose(*_CELL)),
    }


def _mutual_information(top1_s: xr.DataArray, domains: xr.DataArray, labels: np.ndarray, *, n_shuffle: int,
                        seed: int) -> dict[str, xr.DataArray]:
    """mi, its floor under ``n_shuffle`` relabellings of samples (mean, 95th percentile) and domain_entropy.

    ``top1_s`` (checkpoint, layer, sample, expert) top-1 counts per sample; results (checkpoint, layer).
    """
    top1_d = group_sums(top1_s, domains)  # (checkpoint, layer, expert, domain)
    rng = np.random.default_rng([seed, 1])
    domain_codes = np.searchsorted(labels, np.asarray(domains.values).astype(str))
    perms = xr.DataArray(
        np.stack([rng.permutation(domain_codes) for _ in range(n_shuffle)]).astype(np.int32),
        dims=("shuffle", "sample"),
    )
    mi_shuffled = xr.apply_ufunc(
        shuffled_mi, _one_sample_chunk(top1_s.drop_vars("sample")), perms, kwargs={"n_groups": len(labels)},
        input_core_dims=[["sample", "expert"], ["shuffle", "sample"]], output_core_dims=[["shuffle"]],
        dask="parallelized", output_dtypes=[np.float64],
    )
    return {
        "mi": mutual_information(top1_d),
        "mi_floor_mean": mi_shuffled.mean("shuffle"),
        "mi_floor_p95": mi_shuffled.quantile(0.95, dim="shuffle").drop_vars("quantile"),
        "domain_entropy": entropy_bits(top1_d.sum("expert"), "domain"),
    }


def _vocabulary(routing: xr.Dataset, ids: xr.DataArray, *, canonical_only: bool, E: int,
                min_count: int) -> dict[str, xr.DataArray]:
    """vocab_{input,next}[_floor, _types] and token_specialization_olmoe_{input,next} (checkpoint, layer)."""
    mask = token_mask(routing, canonical_only)
    keep = np.ones(routing.sizes["token"], dtype=bool) if mask is None else mask.values
    out = {}
    # an unknown token id (-1, e.g. traces that log no ids) is no token type: such tokens stay out,
    # and with no known id at all the vocabulary statistics are NaN rather than "one type, -1"
    for which, token_ids in (("input", np.asarray(routing["token_id"].values, dtype=np.int64)),
                             ("next", next_token_ids(routing))):
        known = keep & (token_ids >= 0)
        value, floor, types = vocabulary_specialization(ids, *_type_codes(token_ids, known, min_count), E=E,
                                                        min_count=min_count)
        out.update({f"vocab_{which}": value, f"vocab_{which}_floor": floor, f"vocab_{which}_types": types})
        # OLMoE's variant: top-1 only and every type (types seen once score 1, so it sits above vocab_*)
        out[f"token_specialization_olmoe_{which}"] = top1_token_specialization(
            ids, *_type_codes(token_ids, known, 1), E=E)
    return out


def _add_intervals(out: dict, slots_s, top1_s, domains, *, n_boot: int, ci: float, seed: int) -> None:
    """Add lift_lo/hi and mi_lo/hi to ``out``: bootstrap over samples stratified by domain."""
    weights = bootstrap_weights(domains.sizes["sample"], n_boot, seed, strata=domains)
    scheme = "resampling samples (not tokens) within each domain"
    count_reps = resample(slots_s, weights, groups=domains)  # (checkpoint, layer, boot, expert, domain)
    usage_reps = safe_ratio(count_reps, count_reps.sum("expert"))
    pooled_reps = safe_ratio(count_reps.sum("domain"), count_reps.sum(("expert", "domain")))
    lo, hi = interval(safe_ratio(usage_reps, pooled_reps), ci)
    add_interval(out, "lift", lo, hi, ci=ci, n_boot=n_boot, scheme=scheme)
    # Resampling duplicates samples, which adds to the plug-in MI's upward bias: centre the
    # replicates on the estimate (subtract their mean bias) before taking percentiles.
    mi_reps = mutual_information(resample(top1_s, weights, groups=domains))
    lo, hi = interval(mi_reps - (mi_reps.mean("boot") - out["mi"]), ci)
    lo, hi = lo.clip(0.0, None), hi.clip(0.0, None)  # MI is never negative
    add_interval(out, "mi", lo, hi, ci=ci, n_boot=n_boot,
                 scheme=scheme + ", shifted by the replicates' mean bias (mean replicate − estimate)")


def _score(parts: dict, fdr_q: float) -> dict[str, xr.DataArray]:
    """significant, significant_fraction, mi_component, vocab_component and score from the other estimates."""
    significant = (parts["q_value"] <= fdr_q).fillna(False)
    fraction = significant.astype(np.float64).mean(("expert", "domain"))
    mi_component = ((parts["mi"] - parts["mi_floor_mean"]) / parts["domain_entropy"]).clip(0.0, 1.0)
    floor = parts["vocab_input_floor"]
    vocab_component = ((parts["vocab_input"] - floor) / (1.0 - floor)).clip(0.0, 1.0)
    return {
        "significant_fraction": fraction,
        "mi_component": mi_component,
        "vocab_component": vocab_component,
        "score": (mi_component + fraction + vocab_component) / 3.0,
        "significant": significant.transpose(*_CELL),
    }


def _specialization_from_counts(routing: xr.Dataset, *, E: int, params: dict) -> xr.Dataset:
    """:func:`specialization` on an aggregate-counts cube: exact domain usage, lift and excess only.

    The randomisation test and the MI floor relabel samples, the MI needs each
    token's top-1 expert, the vocabulary statistics need token ids and the
    intervals resample samples: none exists in slot counts, so those variables
    are NaN (``significant`` False, ``*_types`` 0) with ``nan_where`` saying
    why, and attrs ``intervals`` says there are none. Same variables and dims
    as :func:`specialization`.
    """
    if params["canonical_only"]:
        raise ValueError("specialization: canonical_only=True needs per-token routing; an aggregate-counts cube "
                         "has no token text")
    count = slot_counts(routing).transpose(*_CELL)
    if count.sizes["domain"] < 2:
        raise ValueError(f"specialization: the counts cube has {count.sizes['domain']} domain(s); domain "
                         "specialization needs at least 2")
    slots_d = count.sum("expert")
    usage = safe_ratio(count, slots_d)
    usage_all = safe_ratio(count.sum("domain"), slots_d.sum("domain"))
    cell = xr.full_like(usage, np.nan, dtype=np.float64)
    layer = xr.full_like(usage.isel(expert=0, domain=0, drop=True), np.nan, dtype=np.float64)
    none = xr.zeros_like(layer, dtype=np.int64)
    out = {
        "usage": usage, "usage_all": usage_all, "lift": safe_ratio(usage, usage_all), "ratio_to_chance": usage * E,
        "excess": (count - usage_all.fillna(0.0) * slots_d).astype(np.float64),
        **{name: cell for name in ("z", "p_value", "q_value")},
        **{name: layer for name in ("mi", "mi_floor_mean", "mi_floor_p95", "domain_entropy", "significant_fraction",
                                    "mi_component", "vocab_input", "vocab_input_floor", "vocab_next",
                                    "vocab_next_floor", "vocab_component", "score")},
        "vocab_input_types": none, "vocab_next_types": none,
        "significant": xr.zeros_like(usage, dtype=bool),
    }
    result = finalise(
        xr.Dataset(out), routing, name=NAME, outputs=COUNTS_OUTPUTS,
        definition="from an aggregate-counts cube: usage[c,l,e,d] = slots of domain d counted for expert e / slots "
        "of d; lift = usage / pooled usage; excess = n_de − u_e·n_d. The randomisation test, MI (top-1), its "
        "shuffled floor, vocabulary specialization and the score need per-token routing and are NaN.",
        normalisation="usage: share of routing slots (1/E uniform); lift and ratio_to_chance: ratios",
        chance=f"usage: 1/E = {1.0 / E:.4g}; lift, ratio_to_chance: 1; excess: 0",
        params=params,
    )
    result.attrs["intervals"] = f"bootstrap intervals, randomisation tests and MI floors {NO_SAMPLES}"
    result.attrs["counts_only"] = 1
    return result


def table(result: xr.Dataset) -> pd.DataFrame:
    """Rows (checkpoint, layer, expert, domain) with the cell statistics, and the per-layer metrics merged in."""
    cells = tidy(result, ["usage", "lift", "lift_lo", "lift_hi", "ratio_to_chance", "excess", "z", "p_value",
                          "q_value", "significant"])
    per_layer = tidy(result, ["mi", "mi_lo", "mi_hi", "mi_floor_mean", "mi_floor_p95", "domain_entropy",
                              "significant_fraction", "vocab_input", "vocab_input_floor", "vocab_next",
                              "vocab_next_floor", "token_specialization_olmoe_input",
                              "token_specialization_olmoe_next", "score"]).drop(columns=["step"], errors="ignore")
    return cells.merge(per_layer, on=["checkpoint", "layer"], how="left")


def summary(result: xr.Dataset) -> dict:
    """Earliest vs final checkpoint (means over layers): MI and its floor, significant cells, vocabulary, score."""
    names = ["mi", "mi_floor_mean", "mi_floor_p95", "significant_fraction", "vocab_input", "vocab_input_floor",
             "vocab_next", "vocab_next_floor", "score"]
    res = result[names + ["significant"]].compute()

    def at(i):
        row = {"checkpoint": str(res["checkpoint"].values[i]), "step": int(res["step"].values[i])}
        for n in names:
            row[n] = json_number(res[n].isel(checkpoint=i).mean("layer"))
        row["significant_cells"] = int(res["significant"].isel(checkpoint=i).sum())
        return row

    def diff(name):
        a, b = at(0)[name], at(-1)[name]
        return None if a is None or b is None else b - a

    return {"earliest": at(0), "final": at(-1), "mi_final_minus_earliest": diff("mi"),
            "score_final_minus_earliest": diff("score")}


ANALYSIS = register(
    Analysis(
        name=NAME,
        func=specialization,
        figure=figure_hook(NAME),
        title="Expert specialization by domain and by token",
        caption=(
            "Always compare with the earliest checkpoint (grey dashed): an untrained router already looks "
            "specialised because domains use different tokens. Summary figure, per layer: mutual information "
            "between domain and top-1 expert (bits; dotted = 95th percentile of MI with domain labels shuffled "
            "across samples, the chance level), the share of (expert, domain) cells whose usage differs from the "
            "pooled usage (randomisation test across samples, Benjamini–Hochberg q ≤ fdr_q; dashed = q, the "
            "expected share under the null), vocabulary specialization by input and next token (mean max share "
            "of a token type's occurrences on one of its top-k experts, types seen ≥ 10 times; OLMoE's top-1 "
            "over every type is variable token_specialization_olmoe_*; dashed = uniform k/E, dotted = floor if "
            "routing ignored "
            "the token id), and the score = mean(clip((MI − floor)/H(domain)), significant share, "
            "clip((vocab − floor)/(1 − floor))). Lift figure: log2(usage by domain / pooled usage) per layer × "
            "expert for the earliest and final checkpoint (white = no preference, chance), dots = significant."
        ),
        requires=("expert_ids",),
        accepts_counts=True,
        min_domains=2,
        table=table, summary=summary,
        outputs=OUTPUTS,
    )
)


def _one_sample_chunk(obj: xr.DataArray) -> xr.DataArray:
    """``obj`` in one chunk along ``sample`` (per-sample sums come chunked along it)."""
    return obj.chunk({"sample": -1}) if obj.chunks is not None else obj
