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
    raw = np.asarray(routing["sample"].values).astype(np.int64)
    labels, codes = np.unique(raw, return_inverse=True)
    return xr.DataArray(codes.astype(np.int64), dims="token"), labels


def sample_groups(routing: xr.Dataset, coord: str = "domain") -> xr.DataArray:
    """The label of token coordinate ``coord`` per sample: DataArray (sample,) named ``coord``.

    Raises ValueError when a sample's tokens carry more than one label (a
    per-sample group would then be ill-defined).
    """
    if coord not in routing.coords:
        raise ValueError(f"routing cube: token coordinate '{coord}' is missing")
    codes, labels = sample_index(routing)
    values = pd.Series(np.asarray(routing[coord].values).astype(str))
    per = values.groupby(codes.values).agg(["first", "nunique"])
    mixed = per.index[per["nunique"].to_numpy() > 1]
    if len(mixed):
        raise ValueError(
            f"routing cube: coordinate '{coord}' is not constant within sample(s) {labels[mixed[:5]].tolist()}; "
            "expected one label per sample"
        )
    return xr.DataArray(
        per["first"].to_numpy().astype(object), dims=SAMPLE, coords={SAMPLE: labels}, name=coord
    )


def per_sample_sums(
    data: xr.Dataset | xr.DataArray,
    routing: xr.Dataset,
    *,
    dim: str | tuple[str, ...] = "token",
    by: Mapping[str, tuple[xr.DataArray, int]] | None = None,
) -> xr.Dataset | xr.DataArray:
    """Sums of ``data`` over each sample's tokens: a lazy flox groupby-sum.

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
    the cube, sorted, so empty samples hold 0) and then the ``by`` dims.
    """
    dims = (dim,) if isinstance(dim, str) else tuple(dim)
    if "token" not in dims:
        raise ValueError(f"per_sample_sums: dim {dims} must include 'token'")
    codes, labels = sample_index(routing)
    groupers = [codes.rename("_sample")]
    expected = [np.arange(len(labels))]
    names = []
    for name, (grp, n) in (by or {}).items():
        groupers.append(_drop_token_coords(grp).rename(f"_{name}"))
        expected.append(np.arange(int(n)))
        names.append(name)
    import flox.xarray

    out = flox.xarray.xarray_reduce(
        _drop_token_coords(data), *groupers, func="sum", dim=dims, expected_groups=tuple(expected), fill_value=0
    )
    out = out.rename({"_sample": SAMPLE}).assign_coords({SAMPLE: labels})
    for name, (_, n) in (by or {}).items():
        out = out.rename({f"_{name}": name}).assign_coords({name: np.arange(int(n), dtype=np.int32)})
    return out.transpose(..., SAMPLE, *names)


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
    plus the group dim when ``groups`` is given. Lazy when the input is.
    """
    if isinstance(per_sample, xr.Dataset):
        return per_sample.map(resample, weights=weights, groups=groups)
    w = _weights_array(weights, per_sample)
    order = [BOOT if d == SAMPLE else d for d in per_sample.dims]
    if groups is None:
        return xr.dot(w, per_sample, dim=SAMPLE).transpose(*order)
    name, labels, members = _group_members(groups, per_sample)
    parts = [xr.dot(w.isel({SAMPLE: idx}), per_sample.isel({SAMPLE: idx}), dim=SAMPLE) for idx in members]
    out = xr.concat(parts, dim=name, coords="minimal", compat="override", join="override")
    return out.assign_coords({name: labels}).transpose(*order, name)


def group_sums(
    per_sample: xr.Dataset | xr.DataArray, groups: xr.DataArray | None = None
) -> xr.Dataset | xr.DataArray:
    """The plain (not resampled) sums over samples, per group when ``groups`` is given.

    The point estimate matching :func:`resample`: dims of ``per_sample`` without
    ``sample``, plus the group dim (sorted labels) last.
    """
    if groups is None:
        return per_sample.sum(SAMPLE)
    name, labels, members = _group_members(groups, per_sample)
    onehot = np.zeros((per_sample.sizes[SAMPLE], len(labels)), dtype=np.int64)
    for j, idx in enumerate(members):
        onehot[idx, j] = 1
    onehot = xr.DataArray(onehot, dims=(SAMPLE, name), coords={name: labels})
    if isinstance(per_sample, xr.Dataset):
        return per_sample.map(lambda v: xr.dot(v, onehot, dim=SAMPLE).transpose(..., name))
    return xr.dot(per_sample, onehot, dim=SAMPLE).transpose(..., name)


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
        replicates = replicates.chunk({dim: -1})  # the quantile needs the whole dim in one block
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
