"""Interventions: ΔNLL / Δaccuracy of masked runs, with bootstrap CIs over samples, and observational vs causal.

Pure functions over per-token scores (``capture.interventions.token_scores``
gives them for a model under a mask); nothing here touches a model.

* :func:`per_sample` reduces per-token NLL / accuracy to per-sample sums.
* :func:`delta_cube` turns a baseline and masked runs into ΔNLL, Δaccuracy per
  run and domain (or condition), each with a paired bootstrap CI over samples
  (the same resampled samples on both sides), stratified by domain.
* :func:`rank_masks` lists the expert sets a sweep masks: the top-n of a
  ranking per layer or globally, n = 1, 2, 4, …; :func:`random_ranking` gives
  the seeded random controls (the chance band).
* :func:`obs_vs_causal`: Spearman ρ between an observational measure per
  (layer, expert) and the causal ΔNLL of masking that expert alone, with a
  bootstrap CI over samples, and the experts where the two disagree most.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import xarray as xr
from scipy.stats import rankdata

from .bootstrap import STRATIFIED, bootstrap_weights, interval, resample
from .outputs import Output, apply_outputs

OUTPUTS = {
    "delta_nll": Output("change in next-token NLL under the mask", "nat",
                        "mean NLL of the masked run minus the unmasked run over the scored tokens of the group "
                        "(tokens with a next token), ratio of sums over samples", chance=0.0,
                        nan_where="no scored token in the group"),
    "delta_accuracy": Output("change in next-token accuracy under the mask", "1",
                             "argmax accuracy of the masked run minus the unmasked run over the group's scored tokens",
                             chance=0.0, nan_where="no scored token in the group"),
    "n_tokens": Output("scored tokens", "count", "tokens with a next token in the group"),
    "rho": Output("Spearman rank correlation, observational measure vs causal ΔNLL", "1",
                  "Spearman ρ over (layer, expert) between the measure and the ΔNLL of masking that expert alone",
                  chance=0.0, nan_where="a constant measure or effect"),
}


def per_sample(scores: Mapping[str, np.ndarray], sample: np.ndarray) -> xr.Dataset:
    """Per-sample sums of per-token scores.

    Parameters
    ----------
    scores : {"nll": (token,), "correct": (token,)}; NaN where a token has no next token.
    sample : (token,) sample id of each token (samples contiguous).

    Returns
    -------
    Dataset (sample): ``nll``, ``correct`` sums and ``n`` scored tokens (float64).
    """
    sample = np.asarray(sample)
    ids, codes = np.unique(sample, return_inverse=True)
    ok = np.isfinite(scores["nll"])
    out = {}
    for name in ("nll", "correct"):
        out[name] = np.bincount(codes[ok], weights=np.asarray(scores[name])[ok], minlength=len(ids))
    out["n"] = np.bincount(codes[ok], minlength=len(ids)).astype(np.float64)
    return xr.Dataset({k: ("sample", v) for k, v in out.items()}, coords={"sample": ids})


def delta_cube(base: xr.Dataset, runs: xr.Dataset, groups: xr.DataArray, *, n_boot: int = 200, seed: int = 0,
               ci: float = 0.95) -> xr.Dataset:
    """ΔNLL and Δaccuracy of masked runs against the baseline, per group, with paired bootstrap CIs.

    Parameters
    ----------
    base : (sample) per-sample sums of the unmasked run (:func:`per_sample`).
    runs : (run, sample) per-sample sums of the masked runs, same samples.
    groups : (sample) labels named after the grouping (``domain``, ``condition``); "all" is added.

    Returns
    -------
    Dataset (run, <group>): ``delta_nll``, ``delta_accuracy`` with ``_lo``/``_hi``, ``n_tokens``.
    Replicates resample samples within each group, shared across runs (paired).
    """
    name = str(groups.name)
    labels = np.asarray(groups.values).astype(str)
    w = bootstrap_weights(base.sizes["sample"], n_boot, seed, strata=labels)
    allg = xr.DataArray(np.full(labels.shape, "all", dtype=object), dims="sample", name=name)
    out = {}
    pieces = []
    for g in (groups.astype(str).rename(name), allg):
        diff = runs[["nll", "correct"]] - base[["nll", "correct"]]
        full = resample(diff, np.ones((1, diff.sizes["sample"]), dtype=np.int64), groups=g).isel(boot=0, drop=True)
        n = resample(base["n"], np.ones((1, base.sizes["sample"]), dtype=np.int64), groups=g).isel(boot=0, drop=True)
        reps = resample(diff, w, groups=g)
        nreps = resample(base["n"], w, groups=g)
        piece = {}
        for var, outname in (("nll", "delta_nll"), ("correct", "delta_accuracy")):
            piece[outname] = full[var] / n.where(n > 0)
            lo, hi = interval(reps[var] / nreps.where(nreps > 0), ci)
            piece[f"{outname}_lo"], piece[f"{outname}_hi"] = lo, hi
        piece["n_tokens"] = n.astype(np.int64)
        pieces.append(xr.Dataset(piece))
    res = xr.concat(pieces, dim=name)
    res = apply_outputs(res, OUTPUTS, where="interventions")
    for v in res.data_vars:
        if v.endswith(("_lo", "_hi")):
            res[v].attrs.update(ci=float(ci), n_boot=int(n_boot), scheme=STRATIFIED + "; paired with the baseline")
    return res


def random_ranking(num_experts: int, layers: Sequence[int], seed: int) -> np.ndarray:
    """A seeded random ranking score per (layer, expert): ``default_rng(seed).random((layer, expert))``."""
    return np.random.default_rng(int(seed)).random((len(layers), int(num_experts)))


def rank_masks(score: np.ndarray, layers: Sequence[int], ns: Sequence[int], *, scope: str) -> list[dict]:
    """Expert sets of a sweep: the top-n experts by ``score`` (layer, expert), highest first.

    ``scope`` "layer": for each layer and n, that layer's top-n; "global": the top-n (layer, expert)
    pairs over all layers. Ties go to the lower (layer, expert) index.

    Returns
    -------
    [{"scope": "L<layer>" | "global", "n_masked": n, "static": {layer: [experts]}}]
    """
    score = np.asarray(score, dtype=np.float64)
    L, E = score.shape
    out = []
    if scope == "layer":
        for i, layer in enumerate(layers):
            order = np.argsort(-score[i], kind="stable")
            for n in ns:
                if n < E:
                    out.append({"scope": f"L{layer}", "n_masked": int(n), "static": {int(layer): order[:n].tolist()}})
    elif scope == "global":
        order = np.argsort(-score.reshape(-1), kind="stable")
        for n in ns:
            st: dict[int, list[int]] = {}
            for flat in order[:n]:
                st.setdefault(int(layers[flat // E]), []).append(int(flat % E))
            if all(len(v) < E for v in st.values()):
                out.append({"scope": "global", "n_masked": int(n), "static": st})
    else:
        raise ValueError(f"rank_masks: scope {scope!r}; expected 'layer' or 'global'")
    return out


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return np.nan
    return float(np.corrcoef(rankdata(x[ok]), rankdata(y[ok]))[0, 1])


def obs_vs_causal(effect: xr.DataArray, n: xr.DataArray, measures: Mapping[str, xr.DataArray], *,
                  n_boot: int = 200, seed: int = 0, ci: float = 0.95, top: int = 3) -> xr.Dataset:
    """Spearman ρ between observational measures and causal effect, with a bootstrap CI over samples.

    Parameters
    ----------
    effect : (unit, sample) per-sample sums of NLL(masked) − NLL(base) when unit (a (layer, expert)) alone is masked.
    n : (sample) scored tokens per sample.
    measures : {name: (unit, sample) per-sample sums of the measure} (e.g. routed slots for usage); a measure is
        the ratio Σ measure / Σ n, resampled with the same weights as the effect.

    Returns
    -------
    Dataset: ``rho``, ``rho_lo``, ``rho_hi`` (measure); ``disagree`` (measure, rank) the units whose rank under
    the measure and under the effect differ most.
    """
    names = list(measures)
    S = effect.sizes["sample"]
    w = np.vstack([np.ones((1, S), dtype=np.int64), bootstrap_weights(S, n_boot, seed)])
    eff = resample(effect, w) / resample(n, w)
    rho = np.full((len(names), w.shape[0]), np.nan)
    dis = []
    for i, m in enumerate(names):
        val = resample(measures[m], w) / resample(n, w)
        e, v = eff.transpose("boot", "unit").values, val.transpose("boot", "unit").values
        rho[i] = [_spearman(v[b], e[b]) for b in range(w.shape[0])]
        gap = np.abs(rankdata(v[0]) - rankdata(e[0]))
        dis.append(np.asarray(effect["unit"].values)[np.argsort(-gap, kind="stable")[:top]])
    reps = xr.DataArray(rho[:, 1:], dims=("measure", "boot"), coords={"measure": names})
    lo, hi = interval(reps, ci)
    res = xr.Dataset({"rho": (("measure",), rho[:, 0]), "rho_lo": lo, "rho_hi": hi},
                     coords={"measure": names})
    res = apply_outputs(res, OUTPUTS, where="interventions")
    res["disagree"] = (("measure", "rank"), np.asarray(dis).astype(str))
    res["disagree"].attrs = {"long_name": "units whose observational and causal ranks differ most", "units": "1",
                             "description": "(layer, expert) labels, largest |rank(measure) - rank(ΔNLL)| first"}
    return res
