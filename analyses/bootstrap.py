"""Bootstrap confidence intervals over samples, as cheap reductions.

Tokens of one sample are not independent, so intervals resample whole
*samples* (the ``sample`` coordinate of the routing cube), never tokens. To keep
that a reduction rather than a loop, every statistic is first reduced to
per-sample sufficient statistics (sums over the sample's tokens), and a
bootstrap replicate is then a weighted sum over samples, the weight of a sample
being how often the replicate drew it:

    samples = Samples.of(routing)                         # once per analysis
    per_sample = per_sample_sums(data, samples)           # (..., sample), analyses.token_pass
    weights = bootstrap_weights(samples.n, n_boot, seed)  # (boot, sample) counts
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

import numpy as np
import xarray as xr

# the token pass (analyses.token_pass), re-exported: callers written before the split import it from here
from .token_pass import SAMPLE, Samples, narrow_codes, per_sample_sums, sample_groups, sample_index

__all__ = [
    "BOOT", "SAMPLE", "STRATIFIED", "Samples", "add_interval", "bootstrap_weights", "group_sums", "interval",
    "per_sample_sums", "ratio_interval", "resample", "sample_groups", "sample_index",
]

BOOT = "boot"
STRATIFIED = "resampling samples (not tokens) within each domain"  # the ``scheme`` of a domain-stratified bootstrap


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
        gd = da.from_array(narrow_codes(gcodes, n_groups), chunks=(x.chunks[-1],))
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
