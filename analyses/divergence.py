"""Routing divergence between two conditions on aligned tokens.

The same content produced two ways (conditions A and B, samples linked by
``pair``) is routed at tokens aligned by their canonical content
(``aligned_token``, see ``capture/align.py``). Two views of the tokens:

``canonical``
    every aligned token pair (aligned tokens are canonical, i.e. non-whitespace);
``last_canonical``
    per pair of samples, the last canonical token of each (one token pair).

Per checkpoint, layer and view: each condition's expert usage (share of its
routing slots, uniform = 1/E), their difference, the difference thresholded at
max(percentile_q |Δ|, min_abs), total variation ½ Σ_e |usage_A − usage_B|, and
over token pairs the Jaccard index |S_A ∩ S_B| / |S_A ∪ S_B| (raw and
chance-corrected with the exact hypergeometric E[J]) and the intersection
|S_A ∩ S_B| / k. Intervals resample pairs of samples (not tokens). The mask
points of the last checkpoint (experts ranked by A−B, B−A and usage_A) are
written as JSON for ablation sweeps (:func:`artifacts`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from . import bootstrap as bs
from .token_pass import SAMPLE, Samples, per_sample_sums
from .figures import hook as figure_hook
from .outputs import Output, k_of_experts, per_expert
from .registry import Analysis, cube_sizes, finalise, is_lazy, json_number, register, safe_ratio, tidy, token_var

NAME = "divergence"
# The token views of a paired comparison (aligned pairs), not registry.VIEWS (views of one cube's tokens).
PAIR_VIEWS = ("canonical", "last_canonical")


# ---------------------------------------------------------------- token pairs


def conditions(routing: xr.Dataset, condition_a: str = "", condition_b: str = "") -> tuple[str, str]:
    """The two conditions to compare: the parameters, else the cube's attrs, else the only two present.

    Raises ValueError when they cannot be told or are absent from the cube.
    """
    a = condition_a or str(routing.attrs.get("condition_a", ""))
    b = condition_b or str(routing.attrs.get("condition_b", ""))
    if "condition" not in routing.coords:
        raise ValueError("routing cube: token coordinate 'condition' is missing")
    # the distinct labels first: converting every token's label to str is the slow part
    labels = pd.unique(np.asarray(routing["condition"].values).ravel())
    present = sorted(set(np.asarray(labels).astype(str).tolist()) - {""})
    if not a and not b and len(present) == 2:
        a, b = present
    if not a or not b:
        raise ValueError(f"paired analyses: name the two conditions (params condition_a/condition_b or "
                         f"[conditions] in the experiment); conditions in the cube: {present or 'none'}")
    for c in (a, b):
        if c not in present:
            raise ValueError(f"paired analyses: condition {c!r} has no token in the cube (present: {present or 'none'})")
    if a == b:
        raise ValueError(f"paired analyses: conditions A and B are both {a!r}")
    return a, b


def _last_canonical(routing: xr.Dataset) -> np.ndarray:
    if "last_canonical" in routing.coords:
        return np.asarray(routing["last_canonical"].values, dtype=bool)
    sample = np.asarray(routing["sample"].values)
    idx = np.flatnonzero(np.asarray(routing["canonical"].values, dtype=bool))
    out = np.zeros(sample.shape[0], dtype=bool)
    if idx.size:
        out[idx[np.r_[sample[idx[1:]] != sample[idx[:-1]], True]]] = True
    return out


def token_pairs(routing: xr.Dataset, a: str, b: str) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Token pairs (A token, B token) of each view, and the pair of samples each belongs to.

    Reads token coordinates only (condition, pair, aligned_token, canonical,
    last_canonical, sample).

    Returns
    -------
    {view: (tok_a (n,), tok_b (n,), unit (n,))} with ``unit`` an index 0..P-1
    of the pair of samples (the bootstrap unit), the same in every view.

    Raises
    ------
    ValueError when the cube has no alignment or no aligned pair.
    """
    if "aligned_token" not in routing.coords:
        raise ValueError("routing cube: token coordinate 'aligned_token' is missing; the cube was captured without "
                         "conditions (name them in [conditions] and rebuild the routing cube)")
    cond = np.asarray(routing["condition"].values).astype(str)
    pair = np.asarray(routing["pair"].values)  # as str only where needed (a large object array converts slowly)
    aligned = np.asarray(routing["aligned_token"].values).astype(np.int64)
    canonical = np.asarray(routing["canonical"].values, dtype=bool)
    n = cond.shape[0]
    t = np.flatnonzero((cond == a) & (aligned >= 0) & canonical)
    u = aligned[t]
    if (u >= n).any():
        raise ValueError(f"routing cube: 'aligned_token' points past the last token ({n})")
    ok = (cond[u] == b) & canonical[u]
    t, u = t[ok], u[ok]
    last = _last_canonical(routing)
    la = {p: i for p, i in zip(pair[last & (cond == a)].astype(str), np.flatnonzero(last & (cond == a)))}
    lb = {p: i for p, i in zip(pair[last & (cond == b)].astype(str), np.flatnonzero(last & (cond == b)))}
    names = sorted((set(la) & set(lb)) - {""})
    if t.size == 0 or not names:
        raise ValueError(f"paired analyses: no aligned token of condition {a!r} has a partner of condition {b!r} "
                         f"(check the 'pair' ids and that both conditions hold the same content)")
    # code of each token's pair id among the sorted names (-1: not a pair of samples with both sides)
    sorted_names, pair_t = np.asarray(names, dtype=str), pair[t].astype(str)
    code = np.minimum(np.searchsorted(sorted_names, pair_t), len(names) - 1)
    unit_t = np.where(sorted_names[code] == pair_t, code, -1).astype(np.int64)
    keep = unit_t >= 0
    return {
        "canonical": (t[keep], u[keep], unit_t[keep]),
        "last_canonical": (np.array([la[p] for p in names]), np.array([lb[p] for p in names]),
                           np.arange(len(names), dtype=np.int64)),
    }


def stacked_views(views: dict) -> tuple[np.ndarray, ...]:
    """The views' token pairs one after the other, so that one pass over the tokens serves every view.

    Parameters
    ----------
    views : {view: (tok_a (n_v,), tok_b (n_v,), unit (n_v,), *more (n_v,))} in :data:`PAIR_VIEWS` order.

    Returns
    -------
    (tok_a, tok_b, unit, *more, view_code), each (sum n_v,); ``view_code`` is the
    index of the view in :data:`PAIR_VIEWS`.
    """
    parts = [views[v] for v in PAIR_VIEWS]
    cols = [np.concatenate([np.asarray(p[i]) for p in parts]) for i in range(len(parts[0]))]
    code = np.repeat(np.arange(len(PAIR_VIEWS), dtype=np.int64), [len(p[0]) for p in parts])
    return (*cols, code)


def per_pair_sums(data, unit: np.ndarray, n_units: int, *, dim, by: dict | None = None):
    """Sums of ``data`` over the tokens of each pair of samples (:func:`analyses.token_pass.per_sample_sums`).

    Parameters
    ----------
    data : DataArray or Dataset, dims (..., token[, k]) with ``token`` the token pairs.
    unit : (token,) pair-of-samples index 0..n_units-1.
    dim : dims summed away (must include ``token``).
    by : extra groupers ``{out_dim: (codes, n)}`` as in ``per_sample_sums``
        (codes (…, token[, k]) or (token,), grouped into 0..n-1).

    Returns
    -------
    dims (..., sample, *by dims); ``sample`` = 0..n_units-1 indexes the pairs
    of samples (the bootstrap unit of :mod:`analyses.bootstrap`); a pair
    without any token holds 0.
    """
    unit = np.asarray(unit, dtype=np.int64)
    # Pairs of samples numbered in order of first appearance along ``token`` for the pass: the pair ids are
    # sorted names, unrelated to the cube's token order, while per_sample_sums keeps each token chunk's
    # partial sums only over the range of numbers the chunk holds (narrow when numbers follow the tokens).
    first = np.full(n_units, unit.size, dtype=np.int64)
    np.minimum.at(first, unit, np.arange(unit.size, dtype=np.int64))
    rank = np.empty(n_units, dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(n_units)
    # pairs without any token are ranked last and hold 0
    out = per_sample_sums(data, Samples.from_codes(rank[unit], n_units), dim=dim, by=by)
    return out.isel({SAMPLE: rank}).assign_coords({SAMPLE: np.arange(n_units)})


def _overlaps(ia: np.ndarray, ib: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per token pair: |S_A ∩ S_B| / k, the Jaccard index and 1, where both sides have a valid slot (else 0s).

    ia, ib : (..., k) expert ids (-1 = unwritten). Returns three float64 arrays (...).
    """
    # loops over the k (k × k) slots: elementwise passes beat numpy reductions over tiny trailing axes
    valid_a = [ia[..., i] >= 0 for i in range(ia.shape[-1])]
    na = sum(v.astype(np.int32) for v in valid_a)
    nb = sum((ib[..., j] >= 0).astype(np.int32) for j in range(ib.shape[-1]))
    # ids within a token's slots are distinct: equal (slot, slot) pairs count the shared experts
    inter = np.zeros(ia.shape[:-1], dtype=np.int32)
    for i, valid in enumerate(valid_a):
        for j in range(ib.shape[-1]):
            inter += (ia[..., i] == ib[..., j]) & valid
    both = (na > 0) & (nb > 0)
    inter = np.where(both, inter, 0)
    union = np.where(both, na + nb - inter, 1)
    with np.errstate(divide="ignore", invalid="ignore"):  # only repeated ids in a token's slots give 0 / 0
        jac = np.where(both, inter / union, 0.0)
    return inter / k, jac, both.astype(np.float64)


def per_token_vars(func, arrays: Sequence[xr.DataArray], names: Sequence[str], *, reduce: Sequence[str] = (),
                   **kwargs) -> xr.Dataset:
    """Several float64 variables computed together, block by block: one task per block, one slice per variable.

    Parameters
    ----------
    func : ``func(*blocks, **kwargs)`` -> tuple of ``len(names)`` float64 arrays with the blocks' broadcast
        shape less the ``reduce`` axes (a block lacking a dim of ``arrays[0]`` gets a length-1 axis there).
    arrays : DataArrays; the first has every dim, the others a subset of its dims.
    reduce : dims ``func`` reduces away (each must sit in one chunk).

    Returns
    -------
    Dataset of ``names``, dims those of ``arrays[0]`` without ``reduce``; lazy when any input is.
    Unlike ``xr.apply_ufunc(dask="parallelized")``, which adds two layers per output, the graph holds one
    layer of tasks plus one slice per variable.
    """
    import dask.array as da

    full = arrays[0].dims
    extra = sorted({d for a in arrays for d in a.dims} - set(full))
    if extra:
        raise ValueError(f"per_token_vars: dims {extra} are not dims of the first array {full}")
    out_dims = tuple(d for d in full if d not in reduce)
    arrays = [a.transpose(*[d for d in full if d in a.dims]) for a in arrays]
    missing = [tuple(i for i, d in enumerate(full) if d not in a.dims) for a in arrays]

    def stacked(*blocks):
        blocks = [np.expand_dims(b, m) if m else b for b, m in zip(blocks, missing)]
        return np.stack(func(*blocks, **kwargs), axis=0).astype(np.float64, copy=False)

    if any(isinstance(a.data, da.Array) for a in arrays):
        index = {d: f"i{n}" for n, d in enumerate(full)}
        args = []
        for a in arrays:
            args += [a.data, tuple(index[d] for d in a.dims)]
        data = da.blockwise(stacked, ("var", *(index[d] for d in out_dims)), *args, new_axes={"var": len(names)},
                            dtype=np.float64, concatenate=True, token=func.__name__.strip("_"))
    else:
        data = stacked(*[np.asarray(a.values) for a in arrays])
    coords = {c: v for c, v in arrays[0].coords.items() if set(v.dims) <= set(out_dims)}
    return xr.Dataset({name: (out_dims, data[i]) for i, name in enumerate(names)}, coords=coords)


def _split_dim(arr: xr.DataArray, dim: str, sizes: dict[str, int]) -> xr.DataArray:
    """``arr`` with its last dim ``dim`` (of size prod(sizes), row-major) split into the dims ``sizes``."""
    if arr.dims[-1] != dim:
        raise ValueError(f"_split_dim: {dim!r} must be the last dim of {arr.dims}")
    data = arr.data.reshape(arr.shape[:-1] + tuple(sizes.values()))
    coords = {c: v for c, v in arr.coords.items() if dim not in v.dims}
    return xr.DataArray(data, dims=(*arr.dims[:-1], *sizes), coords=coords, name=arr.name)


def expected_jaccard(E: int, k: int) -> float:
    """E[|S ∩ T| / |S ∪ T|] for independent uniform k-subsets S, T of E experts (exact).

    E[J] = Σ_i P(i)·i/(2k − i), P(i) = C(k,i)·C(E−k,k−i)/C(E,k) (hypergeometric).
    """
    total = math.comb(E, k)
    return sum(math.comb(k, i) * math.comb(E - k, k - i) / total * i / (2 * k - i) for i in range(0, k + 1))


# ---------------------------------------------------------------- the analysis


def _threshold(diff: xr.DataArray, q: float, min_abs: float) -> xr.DataArray:
    """max(percentile_q |Δ| over the layer × expert map, min_abs), per remaining dims."""
    a = abs(diff)
    if a.chunks is not None:
        a = a.chunk({"layer": -1, "expert": -1})

    def _pct(x):
        x = x.reshape(*x.shape[:-2], -1)
        with np.errstate(all="ignore"):
            out = np.full(x.shape[:-1], np.nan)
            ok = np.isfinite(x).any(-1)
            out[ok] = np.nanpercentile(x[ok], q, axis=-1)
        return out

    pct = xr.apply_ufunc(_pct, a, input_core_dims=[["layer", "expert"]], dask="parallelized",
                         output_dtypes=[np.float64])
    return np.maximum(pct, float(min_abs))


def _expected_jaccard(context) -> float:
    return expected_jaccard(context["num_experts"], context["top_k"])


_NAN_NO_PAIR = "no token pair of this view has valid slots on both sides at this checkpoint and layer"
_ESTIMATES = {
    "usage": Output("expert usage", "share of routing slots",
                    "share of the condition's routing slots (over the view's token pairs) going to the expert",
                    chance=per_expert, nan_where=_NAN_NO_PAIR),
    "usage_diff": Output("usage difference A − B", "share of routing slots",
                         "usage[{a}] − usage[{b}] on the same token pairs", chance=0.0, nan_where=_NAN_NO_PAIR),
    "usage_diff_thresholded": Output(
        "thresholded usage difference A − B", "share of routing slots",
        "usage[{a}] − usage[{b}] where |Δ| ≥ max(P{percentile:g}(|Δ|) over layers × experts, {min_abs:g}), else 0",
        chance=0.0),
    "threshold": Output("difference threshold", "share of routing slots",
                        "max(P{percentile:g} of |usage_diff| over layers × experts, min_abs={min_abs:g})"),
    "total_variation": Output("total variation of usage", "share of routing slots",
                              "½ Σ_e |usage_A − usage_B|: share of routing mass that would have to move",
                              chance="0 for identical routing; finite samples give > 0", nan_where=_NAN_NO_PAIR),
    "jaccard": Output("Jaccard index of expert sets", "fraction", "mean over token pairs of |S_A ∩ S_B| / |S_A ∪ S_B|",
                      chance=_expected_jaccard, nan_where=_NAN_NO_PAIR),
    "jaccard_corrected": Output("chance-corrected Jaccard", "fraction above chance",
                                "(J − E[J]) / (1 − E[J]), E[J] = {expected_jaccard:.4f} exact for independent uniform "
                                "{top_k}-of-{num_experts} sets (1 = identical, 0 = chance)", chance=0.0,
                                nan_where=_NAN_NO_PAIR),
    "intersection": Output("shared experts", "fraction of k", "mean over token pairs of |S_A ∩ S_B| / k",
                           chance=k_of_experts, nan_where=_NAN_NO_PAIR),
    "pairs": Output("token pairs compared", "token pairs",
                    "token pairs of the view with at least one valid slot on both sides"),
    "sample_pairs": Output("pairs of samples", "pairs", "pairs of samples with tokens in the view (the bootstrap unit)"),
}
_WITH_INTERVALS = ("total_variation", "jaccard", "jaccard_corrected", "intersection")
# the bounds are worded here, not by analyses.bootstrap.add_interval: they resample pairs of samples
OUTPUTS = {
    **_ESTIMATES,
    **{f"{name}_{side}": Output(
        f"{_ESTIMATES[name].long_name} ({bound} bound)", _ESTIMATES[name].units,
        "{ci_percent:g} % bootstrap interval over {n_boot} replicates resampling pairs of samples (not tokens)",
        nan_where=_NAN_NO_PAIR + "; or every replicate undefined")
       for name in _WITH_INTERVALS for side, bound in (("lo", "lower"), ("hi", "upper"))},
}


def divergence(
    routing: xr.Dataset,
    *,
    condition_a: str = "", condition_b: str = "", percentile: float = 99.0, min_abs: float = 0.005,
    n_boot: int = 200, ci: float = 0.95, seed: int = 0,
) -> xr.Dataset:
    """Routing of condition A vs condition B on aligned token pairs.

    Parameters
    ----------
    routing : routing cube with ``expert_ids`` (checkpoint, layer, token, k) and
        the token coordinates condition, pair, aligned_token, canonical
        (last_canonical used when present).
    condition_a, condition_b : the conditions ('' = the cube's attrs
        ``condition_a``/``condition_b``, else the two present, sorted).
    percentile, min_abs : threshold of the difference map: a cell is kept when
        |Δ| ≥ max(percentile-th percentile of |Δ| over layers × experts, min_abs).
    n_boot, ci, seed : bootstrap over pairs of samples (0 = no intervals).

    Returns
    -------
    xr.Dataset
        usage (checkpoint, layer, view, condition, expert) : share of the
            condition's routing slots (over the view's token pairs) per expert
        usage_diff, usage_diff_thresholded (checkpoint, layer, view, expert) :
            A − B, and A − B where |Δ| ≥ threshold else 0
        threshold (checkpoint, view) : the threshold used
        total_variation (checkpoint, layer, view) : ½ Σ_e |usage_A − usage_B|
        jaccard, jaccard_corrected, intersection (checkpoint, layer, view) :
            means over token pairs of |S_A∩S_B|/|S_A∪S_B|, (J − E[J])/(1 − E[J]),
            |S_A∩S_B|/k; ``*_lo``/``*_hi`` their bootstrap intervals
        pairs (checkpoint, layer, view) : token pairs with valid slots on both sides;
        sample_pairs (view) : pairs of samples contributing
    """
    E, k = cube_sizes(routing)
    a, b = conditions(routing, condition_a, condition_b)
    if not 0.0 <= float(percentile) <= 100.0 or float(min_abs) < 0:
        raise ValueError(f"divergence: percentile={percentile} must be in [0, 100] and min_abs={min_abs} >= 0")
    n_boot = int(n_boot)
    views = token_pairs(routing, a, b)
    ej = expected_jaccard(E, k)
    n_units = int(views["last_canonical"][2].size)
    weights = bs.bootstrap_weights(n_units, n_boot, seed) if n_boot else None
    counts, ps = _pair_sums(routing, views, n_units, E=E, k=k)
    tot = ps.sum(bs.SAMPLE)
    cnt = counts.sum(bs.SAMPLE)
    use = safe_ratio(cnt, cnt.sum("expert")).assign_coords(condition=np.array([a, b], dtype=object))
    out = {
        "usage": use,
        "usage_diff": use.isel(condition=0, drop=True) - use.isel(condition=1, drop=True),
        "total_variation": _total_variation(cnt),
        **_overlap_means(tot),
        "pairs": tot["n"].astype(np.int64),
    }
    out["jaccard_corrected"] = (out["jaccard"] - ej) / (1.0 - ej)
    if n_boot:
        out.update(_intervals(ps, counts, weights, ej, ci))
    res = xr.Dataset(out).assign_coords(view=np.array(PAIR_VIEWS, dtype=object))
    thr = _threshold(res["usage_diff"], float(percentile), float(min_abs))
    res["threshold"] = thr.fillna(float(min_abs))
    res["usage_diff_thresholded"] = res["usage_diff"].where(abs(res["usage_diff"]) >= thr, 0.0).fillna(0.0)
    res = res.transpose("checkpoint", "layer", "view", "condition", "expert", ...)
    sample_pairs = xr.DataArray([int(np.unique(views[v][2]).size) for v in PAIR_VIEWS], dims="view",
                                coords={"view": np.array(PAIR_VIEWS, dtype=object)})
    res["sample_pairs"] = sample_pairs.chunk() if is_lazy(routing) else sample_pairs  # lazy in, lazy out
    result = finalise(
        res, routing, name=NAME, outputs=OUTPUTS, context={"a": a, "b": b, "ci_percent": 100 * ci,
                                                            "expected_jaccard": ej},
        definition=_DEFINITION.format(a=repr(a), b=repr(b)), normalisation=_NORMALISATION,
        chance=_CHANCE.format(usage=1.0 / E, jaccard=ej, intersection=k / E),
        params={"condition_a": condition_a, "condition_b": condition_b, "percentile": percentile,
                "min_abs": min_abs, "n_boot": n_boot, "ci": ci, "seed": seed},
    )
    result.attrs["condition_a"], result.attrs["condition_b"] = a, b
    return result


_DEFINITION = (
    "Conditions A = {a}, B = {b}; token pairs aligned by canonical content (view 'canonical': every aligned pair; "
    "'last_canonical': each pair of samples' last canonical tokens). usage = share of the condition's routing slots "
    "per expert; usage_diff = A − B; thresholded at max(percentile, min_abs) of |Δ|; total_variation = ½ Σ_e |Δ|; "
    "jaccard = mean |S_A∩S_B|/|S_A∪S_B|; jaccard_corrected = (J − E[J])/(1 − E[J]); intersection = mean "
    "|S_A∩S_B|/k. Ids of -1 (unwritten) never count.")
_NORMALISATION = ("usage: share of routing slots (divide by k·tokens), sums to 1 over experts; overlaps per token "
                  "pair, averaged over pairs")
_CHANCE = ("usage 1/E = {usage:.4g}; Jaccard E[J] = {jaccard:.4g} (exact hypergeometric); intersection k/E = "
           "{intersection:.4g}; chance-corrected Jaccard 0")


def _overlap_means(sums: xr.Dataset) -> dict[str, xr.DataArray]:
    """jaccard and intersection from (resampled or plain) sums of jac, inter and n."""
    return {"jaccard": safe_ratio(sums["jac"], sums["n"]), "intersection": safe_ratio(sums["inter"], sums["n"])}


def _total_variation(count: xr.DataArray) -> xr.DataArray:
    """½ Σ_e |usage_A − usage_B| from slot counts (..., expert, condition)."""
    use = safe_ratio(count, count.sum("expert"))
    return 0.5 * abs(use.isel(condition=0) - use.isel(condition=1)).sum("expert", skipna=False)


def _intervals(ps: xr.Dataset, counts: xr.DataArray, weights, ej: float, ci: float) -> dict[str, xr.DataArray]:
    """``<name>_lo`` / ``_hi`` of jaccard, intersection, jaccard_corrected and total_variation (pairs of samples resampled)."""
    out = {}
    for name, rep in _overlap_means(bs.resample(ps, weights)).items():
        out[f"{name}_lo"], out[f"{name}_hi"] = bs.interval(rep, ci)
    out["jaccard_corrected_lo"] = (out["jaccard_lo"] - ej) / (1.0 - ej)
    out["jaccard_corrected_hi"] = (out["jaccard_hi"] - ej) / (1.0 - ej)
    out["total_variation_lo"], out["total_variation_hi"] = bs.interval(_total_variation(bs.resample(counts, weights)), ci)
    return out


def _pair_sums(routing: xr.Dataset, views: dict, n_units: int, *, E: int, k: int) -> tuple[xr.DataArray, xr.Dataset]:
    """The two token passes of :func:`divergence` over the aligned token pairs of every view.

    Returns
    -------
    counts : (checkpoint, layer, sample, expert, view, condition) slot counts per pair of samples
    ps : Dataset of inter, jac, n (checkpoint, layer, sample, view): per pair of samples, the sums over
        its token pairs of |S_A∩S_B|/k, |S_A∩S_B|/|S_A∪S_B| and the pairs with valid slots on both sides
    """
    tok_a, tok_b, unit, view_code = stacked_views(views)
    M = tok_a.size
    # One gather of both sides' ids, A tokens then B tokens (ckpt, layer, 2M, k), feeding two token passes:
    # slot counts per (pair of samples, expert, view, condition), and overlaps per (pair of samples, view).
    ids = token_var(routing, "expert_ids").isel(token=np.concatenate([tok_a, tok_b]))
    # view and condition of each gathered token as one grouper (one index fewer to build per slot)
    side = np.concatenate([view_code * 2, view_code * 2 + 1])
    # ids are -1..E-1 here (registry.checked_cube refused any other): -1 falls in no group
    counts = per_pair_sums(
        xr.ones_like(ids, dtype=np.int64), np.concatenate([unit, unit]), n_units, dim=("token", "k"),
        by={"expert": (ids, E), "side": (xr.DataArray(side, dims="token"), 2 * len(PAIR_VIEWS))},
    )
    counts = _split_dim(counts, "side", {"view": len(PAIR_VIEWS), "condition": 2})  # (.., sample, expert, view, cond.)
    # separate variables, not one stacked array: the token pass builds its index once for all of them
    parts = per_token_vars(_overlaps, [ids.isel(token=slice(0, M)), ids.isel(token=slice(M, None))],
                           ("inter", "jac", "n"), reduce=("k",), k=k)
    ps = per_pair_sums(parts, unit, n_units, dim="token",
                       by={"view": (xr.DataArray(view_code, dims="token"), len(PAIR_VIEWS))})  # (.., sample, view)
    return counts, ps


# ---------------------------------------------------------------- outputs


def mask_points(result: xr.Dataset, checkpoint=None, view: str = "last_canonical") -> dict[str, list[dict]]:
    """Experts ranked for ablation sweeps at one checkpoint (default: the last) and view.

    Returns
    -------
    {"<A>_minus_<B>": [...], "<B>_minus_<A>": [...], "<A>": [...]}: lists of
    {"layer", "expert", "value"} over every (layer, expert), sorted by value
    descending (ties: layer, then expert, ascending); layer is the model's own
    layer index.
    """
    a, b = result.attrs["condition_a"], result.attrs["condition_b"]
    sel = result.isel(checkpoint=-1) if checkpoint is None else result.sel(checkpoint=checkpoint)
    sel = sel.sel(view=view)
    diff = sel["usage_diff"].transpose("layer", "expert").values
    ua = sel["usage"].sel(condition=a).transpose("layer", "expert").values
    layers = [int(x) for x in sel["layer"].values]
    experts = [int(x) for x in sel["expert"].values]

    def ranked(grid):
        cells = [(float(grid[i, j]), layers[i], experts[j]) for i in range(len(layers)) for j in range(len(experts))
                 if np.isfinite(grid[i, j])]
        cells.sort(key=lambda c: (-c[0], c[1], c[2]))
        return [{"layer": l, "expert": e, "value": v} for v, l, e in cells]

    return {f"{a}_minus_{b}": ranked(diff), f"{b}_minus_{a}": ranked(-diff), a: ranked(ua)}


def artifacts(result: xr.Dataset, out_dir: Path) -> list[Path]:
    """Mask-point JSON files of the last checkpoint (every view) and the usage maps as CSV.

    Files: ``<checkpoint>/<view>_<A>_minus_<B>_points.json``, ``..._<B>_minus_<A>_points.json``,
    ``..._<A>_points.json`` (lists of {layer, expert, value}, value descending),
    and ``usage_maps.csv`` (checkpoint, view, layer, expert, usage per condition,
    difference, thresholded difference).
    """
    from .figures.plotting import safe_stem  # the figures' file-name rule; imported here, at report time

    result = result.compute()
    out_dir = Path(out_dir)
    ckpt = str(result["checkpoint"].values[-1])
    folder = out_dir / safe_stem(ckpt)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for view in map(str, result["view"].values):
        for key, points in mask_points(result, view=view).items():
            p = folder / f"{view}_{safe_stem(key)}_points.json"
            # one point per line: readable, and diffs of two runs line up
            p.write_text("[\n" + ",\n".join(" " + json.dumps(q) for q in points) + "\n]\n")
            paths.append(p)
    a, b = result.attrs["condition_a"], result.attrs["condition_b"]
    df = result[["usage_diff", "usage_diff_thresholded"]].to_dataframe().reset_index()
    for c in (a, b):
        u = result["usage"].sel(condition=c, drop=True).rename(f"usage_{c}").to_dataframe().reset_index()
        df = df.merge(u[["checkpoint", "view", "layer", "expert", f"usage_{c}"]],
                      on=["checkpoint", "view", "layer", "expert"])
    cols = ["checkpoint", "step", "view", "layer", "expert", f"usage_{a}", f"usage_{b}", "usage_diff",
            "usage_diff_thresholded"]
    p = out_dir / "usage_maps.csv"
    df[[c for c in cols if c in df.columns]].to_csv(p, index=False)
    paths.append(p)
    return paths


METRICS = ("total_variation", "jaccard", "jaccard_corrected", "intersection")


def table(result: xr.Dataset) -> pd.DataFrame:
    """Per-layer metrics: rows (checkpoint, layer, view) with TV, Jaccard (raw, corrected), intersection and CIs."""
    cols = [m + s for m in METRICS for s in ("", "_lo", "_hi")] + ["pairs"]
    return tidy(result, [c for c in cols if c in result])


def summary(result: xr.Dataset) -> dict:
    """At the last checkpoint, per view: mean TV / Jaccard / intersection over layers and the most divergent layer."""
    last = result.isel(checkpoint=-1).compute()
    out = {"checkpoint": str(last["checkpoint"].values), "condition_a": result.attrs["condition_a"],
           "condition_b": result.attrs["condition_b"]}
    for view in map(str, last["view"].values):
        v = last.sel(view=view)
        tv = v["total_variation"]
        out[view] = {
            "mean_total_variation": json_number(tv.mean()),
            "most_divergent_layer": json_number(v["layer"].values[int(np.nanargmax(tv.values))])
            if np.isfinite(tv.values).any() else None,
            "mean_jaccard": json_number(v["jaccard"].mean()),
            "mean_jaccard_corrected": json_number(v["jaccard_corrected"].mean()),
            "mean_intersection": json_number(v["intersection"].mean()),
            "sample_pairs": json_number(v["sample_pairs"]),
            "cells_above_threshold": int((v["usage_diff_thresholded"] != 0).sum()),
        }
    return out


ANALYSIS = register(
    Analysis(
        name=NAME,
        func=divergence,
        figure=figure_hook(NAME),
        title="Routing divergence between two conditions",
        caption=(
            "Tokens of the same content produced two ways (conditions A and B) are paired by their canonical "
            "(non-whitespace) characters. Maps, one figure per checkpoint: each condition's expert usage (share "
            "of its routing slots; white = uniform chance 1/E), the difference A − B and the difference kept only "
            "where |Δ| reaches max(99th percentile of |Δ|, 0.005); upper row over every aligned token pair, lower "
            "row over each sample pair's last canonical token. Curves: per layer, total variation ½Σ|Δ| (0 = "
            "same usage), Jaccard overlap of the selected expert sets per token pair (dashed: exact chance E[J] "
            "for random top-k sets), its chance-corrected form (0 = chance, 1 = identical) and the shared share "
            "of the k experts (chance k/E); colour = training step, band = 95 % bootstrap interval over sample "
            "pairs at the last checkpoint. Mask-point lists (experts ranked by A − B, B − A and usage of A) are "
            "linked for ablation sweeps."
        ),
        requires=("expert_ids",),
        table=table, summary=summary,
        artifacts=artifacts,
        outputs=OUTPUTS,
    )
)
