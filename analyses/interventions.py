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
from pathlib import Path

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
    "condition_gap": Output("ΔNLL under condition {a} minus under {b}", "nat",
                            "divergence between the conditions of the paired data: delta_nll_by_condition of {a} "
                            "minus that of {b}", chance=0.0, nan_where="a condition without scored tokens"),
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


def condition_gap(base: xr.Dataset, runs: xr.Dataset, conditions: np.ndarray, pair: tuple[str, str], *,
                  n_boot: int = 200, seed: int = 0, ci: float = 0.95) -> xr.Dataset:
    """ΔNLL under condition A minus under condition B, per run, with a bootstrap CI.

    Parameters
    ----------
    base : (sample) ``nll``, ``n`` of the unmasked run; runs : (run, sample) ``nll`` of the masked runs.
    conditions : (sample,) condition label of each sample; pair : (A, B).

    Returns
    -------
    Dataset (run,): ``condition_gap`` with ``_lo``/``_hi``. The replicates are those of
    :func:`delta_cube` by condition (same seed, samples resampled within each condition),
    so gap and ``delta_nll_by_condition`` come from one set of draws. The samples of A
    and B are drawn independently, not by pair: for positively correlated pairs the
    interval is wider than a pair bootstrap's (conservative).
    """
    labels = np.asarray(conditions).astype(str)
    g = xr.DataArray(labels, dims="sample", name="condition")
    w = bootstrap_weights(base.sizes["sample"], n_boot, seed, strata=labels)
    diff = runs["nll"] - base["nll"]

    def per_token(weights):
        return resample(diff, weights, groups=g) / resample(base["n"], weights, groups=g).where(lambda n: n > 0)

    def gap(x):
        return x.sel(condition=pair[0], drop=True) - x.sel(condition=pair[1], drop=True)

    full = gap(per_token(np.ones((1, labels.size), dtype=np.int64))).isel(boot=0, drop=True)
    lo, hi = interval(gap(per_token(w)), ci)
    res = xr.Dataset({"condition_gap": full, "condition_gap_lo": lo, "condition_gap_hi": hi})
    res = apply_outputs(res, OUTPUTS, where="interventions", context={"a": pair[0], "b": pair[1]})
    for v in ("condition_gap_lo", "condition_gap_hi"):
        res[v].attrs.update(ci=float(ci), n_boot=int(n_boot),
                            scheme=STRATIFIED + " by condition, A and B drawn independently (not by pair)")
    return res


def random_ranking(num_experts: int, layers: Sequence[int], seed: int) -> np.ndarray:
    """A seeded random ranking score per (layer, expert): ``default_rng(seed).random((layer, expert))``."""
    return np.random.default_rng(int(seed)).random((len(layers), int(num_experts)))


def rank_masks(score: np.ndarray, layers: Sequence[int], ns: Sequence[int], *, scope: str) -> list[dict]:
    """Expert sets of a sweep: the top-n experts by ``score`` (layer, expert), highest first.

    ``scope`` "layer": for each layer and n, that layer's top-n; "global": the top-n (layer, expert)
    pairs over all layers. Ties go to the lower (layer, expert) index. Experts without a finite score (not
    ranked, e.g. absent from a points file) are never masked: a set that would need them is left out.

    Returns
    -------
    [{"scope": "L<layer>" | "global", "n_masked": n, "static": {layer: [experts]}}]
    """
    score = np.asarray(score, dtype=np.float64)
    L, E = score.shape
    out = []
    if scope == "layer":
        for i, layer in enumerate(layers):
            order = np.argsort(-np.where(np.isfinite(score[i]), score[i], -np.inf), kind="stable")
            ranked = int(np.isfinite(score[i]).sum())
            for n in ns:
                if n < E and n <= ranked:
                    out.append({"scope": f"L{layer}", "n_masked": int(n), "static": {int(layer): order[:n].tolist()}})
    elif scope == "global":
        order = np.argsort(-np.where(np.isfinite(score), score, -np.inf).reshape(-1), kind="stable")
        ranked = int(np.isfinite(score).sum())
        for n in ns:
            if n > ranked:
                continue
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


def _spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """:func:`_spearman` of each row pair of (boot, unit) arrays, vectorised over the rows without NaN."""
    out = np.full(x.shape[0], np.nan)
    clean = np.isfinite(x).all(1) & np.isfinite(y).all(1)
    if clean.any():
        rx, ry = rankdata(x[clean], axis=1), rankdata(y[clean], axis=1)
        rx -= rx.mean(1, keepdims=True)
        ry -= ry.mean(1, keepdims=True)
        den = np.sqrt((rx ** 2).sum(1) * (ry ** 2).sum(1))
        with np.errstate(invalid="ignore", divide="ignore"):
            r = (rx * ry).sum(1) / den
        out[clean] = np.where((den > 0) & (x.shape[1] >= 3), r, np.nan)
    for b in np.flatnonzero(~clean):
        out[b] = _spearman(x[b], y[b])
    return out


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
        rho[i] = _spearman_rows(v, e)
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


# ------------------------------------------------------------------ the pipeline's sweeps (tasks/interventions.py)

VERSION = "interventions-3"
"""Bump when a sweep's numbers change meaning: every intervention stage then recomputes."""

#: One forward pass = one batch of ``batch_size`` samples through the whole model.
COST_NOTE = ("cost in forward passes: one scoring of the samples = ceil(samples / batch_size) passes; a sweep's cost "
             "is its mask sets x that; the baseline adds one scoring (two with output-aware importance)")


def safe_name(ranking: str) -> str:
    """File- and task-safe form of a ranking name (``usage:code`` -> ``usage-code``; ``points:dir/x.json`` ->
    ``points-x``)."""
    base, _, arg = ranking.partition(":")
    if base == "points":
        return "points-" + Path(arg).stem.replace(":", "-")
    return ranking.replace(":", "-")


#: A points file is a short list; anything this large is not one.
MAX_POINTS_BYTES = 64 << 20


def read_points(path: str | Path, *, layers: Sequence[int], num_experts: int) -> np.ndarray:
    """(layer, expert) ranking score from a points.json written elsewhere (highest masked first).

    Accepts seed 001's mask-point lists and this project's own (``analyses.divergence.artifacts``): a JSON
    list (or ``{"points": [...]}``) of ``{"layer", "expert"[, "value"]}`` objects or ``[layer, expert[,
    value]]`` pairs, in ranking order. With values the score is the value; without, the list order (first =
    highest). Experts not listed rank last (NaN).

    Raises
    ------
    ValueError, one line naming the file and the record: not JSON, not a list, a record without layer and
    expert, a layer the model has no router on, an expert out of range, a repeated (layer, expert), a value
    that is not a finite number, or values on some records only.
    """
    import json

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no points file here")
    if path.stat().st_size > MAX_POINTS_BYTES:
        raise ValueError(f"{path}: {path.stat().st_size} bytes; a points file is a short list")
    try:
        doc = json.loads(path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path}: not JSON ({str(e).splitlines()[0][:120] or type(e).__name__})") from None
    points = doc.get("points") if isinstance(doc, dict) else doc
    if not isinstance(points, list) or not points:
        raise ValueError(f"{path}: expected a non-empty list of points (or {{\"points\": [...]}})")
    row = {int(l): i for i, l in enumerate(layers)}
    out = np.full((len(layers), int(num_experts)), np.nan)
    has_value = []
    for i, p in enumerate(points):
        if isinstance(p, dict) and "layer" in p and "expert" in p:
            layer, expert, value = p["layer"], p["expert"], p.get("value", p.get("score"))
        elif isinstance(p, list) and len(p) in (2, 3):
            layer, expert, value = p[0], p[1], (p[2] if len(p) == 3 else None)
        else:
            raise ValueError(f"{path}: record {i}: expected {{\"layer\", \"expert\"[, \"value\"]}} or "
                             f"[layer, expert[, value]], got {str(p)[:80]}")
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in (layer, expert)):
            raise ValueError(f"{path}: record {i}: layer and expert must be integers, got {layer!r}, {expert!r}")
        if layer not in row:
            raise ValueError(f"{path}: record {i}: layer {layer} has no router (MoE layers: {sorted(row)})")
        if not 0 <= expert < num_experts:
            raise ValueError(f"{path}: record {i}: expert {expert} outside [0, {num_experts})")
        if not np.isnan(out[row[layer], expert]):
            raise ValueError(f"{path}: record {i}: (layer {layer}, expert {expert}) is listed twice")
        if value is not None:
            try:
                value = float(value) if not isinstance(value, bool) and isinstance(value, (int, float)) else None
            except OverflowError:
                value = None
            if value is None or not np.isfinite(value):
                raise ValueError(f"{path}: record {i}: value must be a finite number, got "
                                 f"{str(p.get('value', p.get('score')) if isinstance(p, dict) else p[2])[:40]}")
        has_value.append(value is not None)
        out[row[layer], expert] = float(value) if value is not None else float(len(points) - i)
    if any(has_value) and not all(has_value):
        raise ValueError(f"{path}: record {has_value.index(not has_value[0])}: values on some records only")
    return out


def sweep_names(kinds: Sequence[str], *, drop_top1: bool, causal: bool, rankings: Sequence[str],
                random_seeds: int) -> dict[str, dict]:
    """The sweeps an ``[interventions]`` table declares: ``{name: {"kind", "sweep", "ranking", "seed"}}``.

    Names are ``<kind>.drop_top1``, ``<kind>.single`` (every expert alone), ``<kind>.rank.<ranking>`` and
    ``<kind>.random`` (seeds 0 .. random_seeds-1); each is one stage of the pipeline, keyed by its own parameters.
    """
    out = {}
    for kind in kinds:
        if drop_top1:
            out[f"{kind}.drop_top1"] = {"kind": kind, "sweep": "drop_top1", "ranking": "own top-1", "seed": -1}
        if causal:
            out[f"{kind}.single"] = {"kind": kind, "sweep": "single", "ranking": "single", "seed": -1}
        if rankings:
            for r in rankings:
                item = {"kind": kind, "sweep": "mask", "ranking": r, "seed": -1}
                if r.startswith("points:"):  # label by file name; the path stays in the sweep's parameters
                    item.update(ranking=f"points:{Path(r[7:]).name}", file=r[7:])
                out[f"{kind}.rank.{safe_name(r)}"] = item
            if random_seeds:
                out[f"{kind}.random"] = {"kind": kind, "sweep": "random", "ranking": "random", "seed": -1,
                                         "seeds": int(random_seeds)}
    return out


def ranking_score(ranking: str, checkpoint: str, *, layers: Sequence[int], num_experts: int, seed: int = -1,
                  usage: xr.Dataset | None = None, specialization: xr.Dataset | None = None,
                  divergence: xr.Dataset | None = None, importance: xr.DataArray | None = None,
                  divergence_view: str = "last_canonical", where: str = "interventions") -> np.ndarray:
    """Score per (layer, expert) of a ranking at one checkpoint (highest masked first).

    Parameters
    ----------
    ranking : "usage", "weighted_usage", "usage:<domain>" (usage analysis, view "all"); "lift" (the largest
        specialization lift over domains), "lift:<domain>"; "importance" (``importance`` (layer, expert, sample)
        summed over samples); "divergence:a_minus_b" | "b_minus_a" | "usage_a" (divergence's points.json
        rankings, :func:`analyses.divergence.mask_points`); "random" (``seed``).
    layers : the model's MoE layer indices, the rows of the result.

    Returns
    -------
    (layer, expert) float64; NaN ranks last.
    """
    base, _, arg = ranking.partition(":")
    L, E = len(layers), int(num_experts)

    def grid(da: xr.DataArray) -> np.ndarray:
        da = da.transpose("layer", "expert")
        out = np.full((L, E), np.nan)
        have = {int(l): i for i, l in enumerate(da["layer"].values)}
        for i, layer in enumerate(layers):
            if int(layer) in have:
                out[i, : da.sizes["expert"]] = np.asarray(da.values[have[int(layer)]], dtype=np.float64)
        return out

    def need(ds, name):
        if ds is None:
            raise ValueError(f"{where}: ranking {ranking!r} needs the {name} analysis' result")
        if "checkpoint" in ds.dims and checkpoint not in set(map(str, ds["checkpoint"].values)):
            raise ValueError(f"{where}: ranking {ranking!r}: the {name} analysis has no checkpoint {checkpoint!r}")
        return ds.sel(checkpoint=checkpoint) if "checkpoint" in ds.dims else ds

    def domain_of(da, name):
        doms = [str(d) for d in da["domain"].values]
        if arg not in doms:
            raise ValueError(f"{where}: ranking {ranking!r}: no domain {arg!r} in the {name} analysis "
                             f"(domains: {', '.join(doms)})")
        return da.sel(domain=arg)

    if ranking == "random":
        return random_ranking(E, layers, seed)
    if base in ("usage", "weighted_usage"):
        u = need(usage, "usage")
        if arg:
            u = u["usage"]
            u = u.sel(view="all") if "view" in u.dims else u
            return grid(domain_of(u, "usage"))
        u = u[f"{base}_all"]
        return grid(u.sel(view="all") if "view" in u.dims else u)
    if base == "lift":
        lift = need(specialization, "specialization")["lift"]
        return grid(domain_of(lift, "specialization") if arg else lift.max("domain", skipna=True))
    if base == "importance":
        if importance is None:
            raise ValueError(f"{where}: ranking 'importance' needs the baseline's output-aware importance")
        return grid(importance.sum("sample"))
    if base == "divergence":
        from .divergence import mask_points

        div = divergence
        if div is None:
            raise ValueError(f"{where}: ranking {ranking!r} needs the divergence analysis' result")
        if checkpoint not in set(map(str, div["checkpoint"].values)):
            raise ValueError(f"{where}: ranking {ranking!r}: the divergence analysis has no checkpoint {checkpoint!r}")
        a, b = div.attrs["condition_a"], div.attrs["condition_b"]
        key = {"a_minus_b": f"{a}_minus_{b}", "b_minus_a": f"{b}_minus_{a}", "usage_a": a}.get(arg)
        if key is None:
            raise ValueError(f"{where}: ranking {ranking!r}: expected divergence:a_minus_b, b_minus_a or usage_a")
        out = np.full((L, E), np.nan)
        row = {int(l): i for i, l in enumerate(layers)}
        for p in mask_points(div, checkpoint=checkpoint, view=divergence_view)[key]:
            if int(p["layer"]) in row and int(p["expert"]) < E:
                out[row[int(p["layer"])], int(p["expert"])] = float(p["value"])
        return out
    raise ValueError(f"{where}: unknown ranking {ranking!r}")


def mask_sets(sweep: Mapping, *, layers: Sequence[int], num_experts: int, n_values: Sequence[int] = (),
              scopes: Sequence[str] = ("global",), score: np.ndarray | None = None) -> list[dict]:
    """The mask sets of one sweep, each a label dict plus its plain mask (``capture.interventions.mask_from_spec``).

    Returns
    -------
    [{"run": label, "intervention", "kind", "ranking", "scope", "unit", "n_masked", "seed", "masked": "L0E3 L1E5",
    "mask": {"kind", "static", "drop_top"}}]
    """
    kind = sweep["kind"]

    def item(intervention, ranking, scope, n, static=None, drop=(), unit="", seed=int(sweep.get("seed", -1))):
        masked = " ".join(f"L{l}E{e}" for l in sorted(static or {}) for e in sorted(static[l])) if static else \
            " ".join(f"L{l}top1" for l in drop)
        run = f"{intervention}|{kind}|{ranking}|{scope}|n={n}|seed={seed}" + (f"|{unit}" if unit else "")
        return {"run": run, "intervention": intervention, "kind": kind, "ranking": ranking, "scope": scope,
                "unit": unit, "n_masked": int(n), "seed": seed, "masked": masked,
                "mask": {"kind": kind, "static": {int(l): [int(e) for e in v] for l, v in (static or {}).items()},
                         "drop_top": [int(l) for l in drop]}}

    if sweep["sweep"] == "drop_top1":
        return [item("drop_top1", "own top-1", f"L{l}", 1, drop=[l]) for l in layers]
    if sweep["sweep"] == "single":
        return [item("single", "single", f"L{l}", 1, static={l: [e]}, unit=f"L{l}E{e}")
                for l in layers for e in range(int(num_experts))]
    out = []
    if sweep["sweep"] == "random":
        scores = [(s, random_ranking(num_experts, layers, s)) for s in range(int(sweep["seeds"]))]
    else:
        scores = [(int(sweep.get("seed", -1)), np.asarray(score, dtype=np.float64))]
    for seed, sc in scores:
        for scope in scopes:
            for m in rank_masks(sc, layers, n_values, scope=scope):
                out.append(item("mask", sweep["ranking"], m["scope"], m["n_masked"], static=m["static"], seed=seed))
    return out


def sweep_dataset(scores: Sequence[Mapping[str, np.ndarray]], sets: Sequence[Mapping], sample: np.ndarray) -> xr.Dataset:
    """Per-sample sums of each mask set's scores: (run, sample) ``nll``, ``correct``, ``n`` with the label coords."""
    parts = [per_sample(s, sample) for s in scores]
    ds = xr.concat(parts, dim="run") if parts else per_sample({"nll": np.full(len(sample), np.nan),
                                                              "correct": np.full(len(sample), np.nan)},
                                                             sample).expand_dims(run=0).isel(run=slice(0, 0))
    coords = {"run": [s["run"] for s in sets]}
    for k in ("intervention", "kind", "ranking", "scope", "unit", "masked"):
        coords[k] = ("run", np.asarray([str(s[k]) for s in sets], dtype=object))
    for k in ("n_masked", "seed"):
        coords[k] = ("run", np.asarray([int(s[k]) for s in sets], dtype=np.int64))
    return ds.assign_coords(coords)


def observed(expert_ids: np.ndarray, expert_weights: np.ndarray, token_sample: np.ndarray, samples: np.ndarray,
             num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """Routed slots and summed gate weights per (layer, expert, sample) of a captured checkpoint.

    Parameters
    ----------
    expert_ids, expert_weights : (layer, token, k) as in routing.zarr (-1 = not written: not counted).
    token_sample : (token,) sample id; samples : (sample,) the ids to count (others ignored).

    Returns
    -------
    slots, weights : (layer, expert, sample) float64.
    """
    ids = np.asarray(expert_ids)
    L, T, K = ids.shape
    pos = np.searchsorted(samples, token_sample)
    pos = np.clip(pos, 0, len(samples) - 1)
    keep = samples[pos] == token_sample
    S, E = len(samples), int(num_experts)
    ok = (ids >= 0) & keep[None, :, None]
    layer = np.broadcast_to(np.arange(L)[:, None, None], ids.shape)
    s = np.broadcast_to(pos[None, :, None], ids.shape)
    flat = ((layer * E + np.where(ok, ids, 0)) * S + s)[ok]
    slots = np.bincount(flat, minlength=L * E * S).reshape(L, E, S).astype(np.float64)
    w = np.bincount(flat, weights=np.asarray(expert_weights, dtype=np.float64)[ok], minlength=L * E * S)
    return slots, w.reshape(L, E, S)


MEASURES = {
    "usage": "routed slots per scored token (captured routing)",
    "weighted_usage": "summed gate weight per scored token (captured routing)",
    "importance": "output-aware importance per scored token: gate weight x ||expert output|| x (1 - cos(h_before, "
                  "h_after)) (EASY-EP), from the unmasked model",
    "lift": "specialization lift of the sample's domain (usage in the domain / usage overall), token-weighted",
    "delta_usage": "usage under condition A minus condition B (slots per token of each condition), paired samples",
}


def checkpoint_cube(baseline: xr.Dataset, sweeps: Sequence[xr.Dataset], *, n_boot: int = 200, seed: int = 0,
                    ci: float = 0.95, lift: xr.DataArray | None = None, conditions: tuple[str, str] | None = None,
                    top: int = 3) -> xr.Dataset:
    """The interventions cube of one checkpoint: Δ per run and domain / condition, and observational vs causal.

    Parameters
    ----------
    baseline : (sample) ``nll``, ``correct``, ``n`` of the unmasked model; (layer, expert, sample) ``slots``,
        ``weights`` and optionally ``importance``; sample coords ``domain``, ``condition``.
    sweeps : (run, sample) per-sample sums (:func:`sweep_dataset`), same samples.
    lift : (layer, expert, domain) specialization lift at this checkpoint, optional.
    conditions : (A, B) of paired data, optional.

    Returns
    -------
    Dataset: (run, domain) ``delta_nll``, ``delta_accuracy`` (+ ``_lo``/``_hi``), ``n_tokens``; with conditions,
    (run, condition) the same named ``*_by_condition`` and ``condition_gap`` = ΔNLL(A) − ΔNLL(B); with a
    ``single`` sweep, (layer, expert, domain) ``effect`` (+ CI), (measure, layer, expert) ``measure_value``,
    (measure, domain) ``rho`` (+ CI) and (measure, domain, rank) ``disagree``.
    """
    runs = xr.concat([sw[["nll", "correct", "n"]].drop_vars(["layer", "expert"], errors="ignore") for sw in sweeps],
                     dim="run", data_vars="all", coords="different", compat="equals", join="exact")
    dom = baseline["domain"].astype(str)
    base = baseline[["nll", "correct", "n"]]
    out = delta_cube(base, runs[["nll", "correct"]], dom.rename("domain"), n_boot=n_boot, seed=seed, ci=ci)
    if conditions and "condition" in baseline.coords:
        cond = np.asarray(baseline["condition"].values).astype(str)
        paired = np.isin(cond, list(conditions))
        if paired.any():
            sel = np.flatnonzero(paired)
            byc = delta_cube(base.isel(sample=sel), runs[["nll", "correct"]].isel(sample=sel),
                             xr.DataArray(cond[sel], dims="sample", name="condition"), n_boot=n_boot, seed=seed, ci=ci)
            byc = byc.rename({v: f"{v}_by_condition" for v in byc.data_vars})
            out = out.merge(byc, compat="override", join="outer")
            a, b = conditions
            if {a, b} <= set(map(str, out["condition"].values)):
                out = out.merge(condition_gap(base.isel(sample=sel), runs[["nll", "correct"]].isel(sample=sel),
                                              cond[sel], (a, b), n_boot=n_boot, seed=seed, ci=ci), compat="override")
    for k in ("intervention", "kind", "ranking", "scope", "unit", "n_masked", "seed"):
        out = out.assign_coords({k: runs[k]})
    out["masked"] = ("run", np.asarray(runs["masked"].values).astype(str).astype(object))
    out["masked"].attrs = {"long_name": "experts masked by the run", "units": "1",
                           "description": "L<layer>E<expert> of a static mask; L<layer>top1 = each token's own top-1"}
    single = np.flatnonzero(np.asarray(runs["intervention"].values).astype(str) == "single")
    if single.size:
        out = out.merge(_obs_vs_causal_cube(baseline, runs.isel(run=single), n_boot=n_boot, seed=seed, ci=ci,
                                            lift=lift, conditions=conditions, top=top, deltas=out.isel(run=single)),
                        compat="override", join="outer")
    return out


def _obs_vs_causal_cube(baseline, single, *, n_boot, seed, ci, lift, conditions, top, deltas) -> xr.Dataset:
    layers = baseline["layer"].values
    E = baseline.sizes["expert"]
    units = [f"L{int(l)}E{e}" for l in layers for e in range(E)]
    unit_of = dict(zip(np.asarray(single["unit"].values).astype(str), range(single.sizes["run"])))
    order = [unit_of[u] for u in units]
    eff = xr.DataArray(single["nll"].transpose("run", "sample").values[order] - baseline["nll"].values[None],
                       dims=("unit", "sample"), coords={"unit": units})
    n = baseline["n"]
    doms = np.asarray(baseline["domain"].values).astype(str)

    def per_unit(da):  # (layer, expert, sample) -> (unit, sample)
        return xr.DataArray(np.asarray(da.transpose("layer", "expert", "sample").values).reshape(len(units), -1),
                            dims=("unit", "sample"), coords={"unit": units})

    measures = {"usage": per_unit(baseline["slots"]), "weighted_usage": per_unit(baseline["weights"])}
    if "importance" in baseline:
        measures["importance"] = per_unit(baseline["importance"])
    if lift is not None:
        lv = lift.transpose("layer", "expert", "domain").sel(layer=layers)
        have = [str(d) for d in lv["domain"].values]
        mat = np.stack([np.nan_to_num(lv.sel(domain=d).values.reshape(-1)) if d in have else np.zeros(len(units))
                        for d in doms], axis=1)
        measures["lift"] = xr.DataArray(mat * n.values[None], dims=("unit", "sample"), coords={"unit": units})
    if conditions and "condition" in baseline.coords:
        cond = np.asarray(baseline["condition"].values).astype(str)
        a, b = conditions
        ta, tb = float(n.values[cond == a].sum()), float(n.values[cond == b].sum())
        if ta > 0 and tb > 0:
            sign = np.where(cond == a, 1 / ta, np.where(cond == b, -1 / tb, 0.0)) * float(n.values.sum())
            measures["delta_usage"] = measures["usage"] * xr.DataArray(sign, dims="sample")
    pieces = []
    for d in ["all", *sorted(set(doms))]:
        idx = np.flatnonzero(doms == d) if d != "all" else np.arange(len(doms))
        if idx.size < 3:
            continue
        r = obs_vs_causal(eff.isel(sample=idx), n.isel(sample=idx), {k: v.isel(sample=idx) for k, v in measures.items()},
                          n_boot=n_boot, seed=seed, ci=ci, top=top)
        pieces.append(r.expand_dims(domain=[d]))
    res = xr.concat(pieces, dim="domain")
    tot = float(n.sum())
    mv = np.stack([(measures[m].sum("sample").values / tot).reshape(len(layers), E) for m in measures])
    res["measure_value"] = (("measure", "layer", "expert"), mv)
    res["measure_value"].attrs = {"long_name": "observational measure per (layer, expert), all samples",
                                  "units": "1", "description": "; ".join(f"{k}: {MEASURES[k]}" for k in measures)}
    res = res.assign_coords(layer=layers, expert=np.arange(E))
    d = deltas.assign_coords(run=np.asarray(deltas["unit"].values).astype(str))
    effects = {}
    for v in ("delta_nll", "delta_nll_lo", "delta_nll_hi"):
        vals = d[v].sel(run=units).transpose("run", "domain").values.reshape(len(layers), E, -1)
        effects[v.replace("delta_nll", "effect")] = xr.DataArray(
            vals, dims=("layer", "expert", "domain"),
            coords={"layer": layers, "expert": np.arange(E), "domain": d["domain"].values}, attrs=d[v].attrs)
    res = xr.merge([res, xr.Dataset(effects)], join="outer", combine_attrs="override")
    res["effect"].attrs = {"long_name": "causal effect: ΔNLL when the expert alone is masked", "units": "nat",
                           "chance": 0.0, "description": "ΔNLL of the single-expert mask of (layer, expert), per domain"}
    return res


def select_tokens(sample: np.ndarray, groups: Sequence[np.ndarray], max_samples: int) -> np.ndarray:
    """(token,) bool: the tokens of the first ``max_samples`` samples of each group (0 = every token).

    ``groups``: (token,) label arrays (dataset, domain, condition); a group is one combination of labels, so a
    subset keeps every domain and both conditions of paired data.
    """
    sample = np.asarray(sample)
    if not max_samples:
        return np.ones(sample.shape, dtype=bool)
    key = np.asarray(["\x1f".join(t) for t in zip(*[np.asarray(g).astype(str) for g in groups])]) if len(groups) \
        else np.zeros(sample.shape, dtype=str)
    keep = np.zeros(sample.shape, dtype=bool)
    for k in np.unique(key):
        ids = list(dict.fromkeys(sample[key == k].tolist()))[: int(max_samples)]
        keep |= (key == k) & np.isin(sample, ids)
    return keep


def baseline_dataset(scores: Mapping[str, np.ndarray], tokens: Mapping[str, np.ndarray], *, layers: Sequence[int],
                     slots: np.ndarray, weights: np.ndarray, importance: np.ndarray | None = None) -> xr.Dataset:
    """The unmasked run of one checkpoint, what its sweeps and the cube start from.

    Parameters
    ----------
    scores : per-token ``nll``, ``correct`` (token,) of the unmasked model.
    tokens : (token,) ``sample``, ``position``, ``token_id``, ``domain``, ``condition`` of the scored tokens.
    slots, weights, importance : (layer, expert, sample) per-sample sums (:func:`observed`, importance pass).

    Returns
    -------
    Dataset: (sample) ``nll``, ``correct``, ``n`` with coords ``domain``, ``condition``; (layer, expert, sample)
    ``slots``, ``weights`` [, ``importance``]; (token) ``token_sample``, ``token_position``, ``token_id``.
    """
    sample = np.asarray(tokens["sample"])
    ds = per_sample(scores, sample)
    first = np.searchsorted(sample, ds["sample"].values) if np.all(np.diff(sample) >= 0) else \
        np.asarray([np.flatnonzero(sample == s)[0] for s in ds["sample"].values])
    for k in ("domain", "condition"):
        ds = ds.assign_coords({k: ("sample", np.asarray(tokens[k]).astype(str)[first].astype(object))})
    dims = ("layer", "expert", "sample")
    coords = {"layer": np.asarray(layers, dtype=np.int64), "expert": np.arange(np.asarray(slots).shape[1])}
    ds = ds.assign_coords(coords)
    ds["slots"], ds["weights"] = (dims, np.asarray(slots, dtype=np.float64)), (dims, np.asarray(weights, np.float64))
    if importance is not None:
        ds["importance"] = (dims, np.asarray(importance, dtype=np.float64))
    ds["token_sample"] = ("token", sample.astype(np.int64))
    ds["token_position"] = ("token", np.asarray(tokens["position"]).astype(np.int64))
    ds["token_id"] = ("token", np.asarray(tokens["token_id"]).astype(np.int64))
    return ds


def combine(parts: Mapping[tuple[str, int], tuple[xr.Dataset, Sequence[xr.Dataset]]], *, n_boot: int = 200,
            seed: int = 0, ci: float = 0.95, lift: xr.DataArray | None = None,
            conditions: tuple[str, str] | None = None) -> xr.Dataset:
    """The interventions cube over checkpoints: :func:`checkpoint_cube` of each, stacked on ``checkpoint``.

    Parameters
    ----------
    parts : {(checkpoint, step): (baseline, [sweep datasets])}.
    lift : (checkpoint, layer, expert, domain) specialization lift, optional.

    Returns
    -------
    Dataset with a leading ``checkpoint`` dim (coord ``step``) on every variable of :func:`checkpoint_cube`.
    """
    cubes = []
    for (name, step), (base, sweeps) in parts.items():
        lf = None
        if lift is not None and name in set(map(str, lift["checkpoint"].values)):
            lf = lift.sel(checkpoint=name, drop=True)
        c = checkpoint_cube(base, sweeps, n_boot=n_boot, seed=seed, ci=ci, lift=lf, conditions=conditions)
        if "masked" in c.coords:  # which experts a ranking picks differs by checkpoint: a variable per checkpoint
            c = c.reset_coords("masked")
        cubes.append(c.expand_dims(checkpoint=[name]).assign_coords(step=("checkpoint", [int(step)])))
    out = xr.concat(cubes, dim="checkpoint", join="outer", coords="minimal", compat="override",
                    combine_attrs="drop_conflicts")
    # a run one checkpoint lacks (a top-n the ranking could not fill there) keeps the labels the others give it
    labels = {}
    for c in cubes:
        for k, v in c.coords.items():
            if v.dims == ("run",):
                seen = labels.setdefault(k, ({}, v.dtype))[0]
                for r, x in zip(c["run"].values, v.values):
                    seen.setdefault(r, x)
    out = out.assign_coords({k: ("run", np.asarray([seen[r] for r in out["run"].values], dtype=dt), out[k].attrs)
                             for k, (seen, dt) in labels.items()})
    if "masked" in out and out["masked"].dtype == object:
        out["masked"] = out["masked"].where(out["masked"].notnull(), "")
    out.attrs.update({"definition": "ΔNLL / Δaccuracy of masked runs minus the unmasked run, ratio of sums over "
                                    "scored tokens; causal effect = ΔNLL of one expert masked alone",
                      "chance": "0 (no change); random rankings give the chance band of the ranked sweeps",
                      "intervals": f"{int(100 * ci)} % percentile bootstrap over samples ({n_boot} replicates, "
                                   f"paired with the baseline)"})
    return out
