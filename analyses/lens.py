"""Logit lens by condition: how well each layer already predicts the aligned content.

``lens_logprob`` (captured with ``[capture] logit_lens``) holds, per MoE layer,
log p(next token) read out through the final norm and the LM head. The
prediction *of* a token t is the value stored at t − 1. On the token pairs of
:mod:`analyses.divergence` (views ``canonical``: every aligned pair;
``last_canonical``: each pair of samples' last canonical tokens), per
checkpoint, layer and view:

- lens NLL per condition: mean −log p(target) over the view's targets;
- the paired difference A − B of those NLLs (same targets on both sides);
- with ``lens_js`` (``[capture] js_divergence``): the mean Jensen-Shannon
  divergence between the two conditions' lens distributions for the aligned
  targets (stored at the predicting positions);
- the model's own NLL on the same targets (``nll``), for reference.

At the last decoder layer the lens NLL equals the model's NLL (capture checks
it). Intervals resample pairs of samples.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import xarray as xr

from . import bootstrap as bs
from .figures import hook as figure_hook
from .divergence import PAIR_VIEWS, conditions, per_pair_sums, per_token_vars, stacked_views, token_pairs
from .outputs import Output
from .registry import Analysis, finalise, json_number, register, safe_ratio, token_var

NAME = "lens"


def _targets(routing: xr.Dataset, a: str, b: str):
    """Per view: predicting positions (t − 1) of the A and B targets, and the sample-pair unit.

    Targets at position 0 (nothing predicts them) are dropped.
    """
    position = np.asarray(routing["position"].values)
    aligned = np.asarray(routing["aligned_token"].values).astype(np.int64)
    out = {}
    for view, (ta, tb, unit) in token_pairs(routing, a, b).items():
        ok = (position[ta] > 0) & (position[tb] > 0)
        # JS is stored only where the two targets are each other's aligned partner
        js_ok = aligned[ta[ok]] == tb[ok]
        out[view] = (ta[ok] - 1, tb[ok] - 1, unit[ok], js_ok)
    return out


def _lens_parts(lp_a, lp_b, js=None, js_ok=None):
    """Per target pair: NLL_A, NLL_B, NLL_A − NLL_B and 1 where both are finite (else 0s); with ``js``: JS and 1
    where the targets are aligned partners and JS is finite (else 0s).

    lp_a, lp_b, js : (..., token) lens values at the predicting positions; js_ok : (..., token) bool.
    Returns a tuple of 4 (6 with ``js``) float64 arrays (..., token).
    """
    la, lb = -lp_a.astype(np.float64), -lp_b.astype(np.float64)
    ok = ~np.isnan(la) & ~np.isnan(lb)
    out = (np.where(ok, la, 0.0), np.where(ok, lb, 0.0), np.where(ok, la - lb, 0.0), ok.astype(np.float64))
    if js is None:
        return out
    j = np.where(js_ok, js.astype(np.float64), np.nan)
    jok = ~np.isnan(j)
    return out + (np.where(jok, j, 0.0), jok.astype(np.float64))


def _model_parts(nll_a, nll_b):
    """Per target pair: the model's NLL of A and of B where both are finite (else 0s), and 1 there.

    (..., token) -> tuple of 3 float64 arrays (..., token).
    """
    ma, mb = nll_a.astype(np.float64), nll_b.astype(np.float64)
    ok = ~np.isnan(ma) & ~np.isnan(mb)
    return np.where(ok, ma, 0.0), np.where(ok, mb, 0.0), ok.astype(np.float64)


_NAN_NONE = "no target of the view has a finite lens value on both sides at this checkpoint and layer"
_ESTIMATES = {
    "lens_nll": Output("logit-lens NLL", "nats", "mean over the view's targets of −log p(target) read out after the "
                       "layer (final norm + LM head)", nan_where=_NAN_NONE),
    "lens_nll_diff": Output("logit-lens NLL difference {a} − {b}", "nats",
                            "mean over target pairs of NLL[{a}] − NLL[{b}] (negative: {a} predicts the content better "
                            "at this layer)", chance=0.0, nan_where=_NAN_NONE),
    "targets": Output("target pairs", "token pairs", "target pairs whose lens values are finite on both sides"),
    "js": Output("Jensen-Shannon divergence between conditions", "nats",
                 "mean over aligned targets of JS(P_A ‖ P_B) of the two lens next-token distributions that predict "
                 f"them (0 = identical, ln 2 = {math.log(2):.3f} = disjoint)", chance=0.0,
                 nan_where=_NAN_NONE + "; or no target pair of the view is aligned"),
    "model_nll": Output("model NLL", "nats", "the model's own next-token NLL on the same targets (the lens at the "
                        "last decoder layer equals it)", nan_where="no target with a finite NLL"),
}
# the bounds are worded here, not by analyses.bootstrap.add_interval: they resample pairs of samples
OUTPUTS = {
    **_ESTIMATES,
    **{f"{name}_{side}": Output(
        f"{_ESTIMATES[name].long_name} ({bound} bound)", "nats",
        "{ci_percent:g} % bootstrap interval over {n_boot} replicates resampling pairs of samples (not tokens)",
        nan_where=_ESTIMATES[name].nan_where + "; or every replicate undefined")
       for name in ("lens_nll", "lens_nll_diff", "js") for side, bound in (("lo", "lower"), ("hi", "upper"))},
}


def _means(sums: xr.Dataset, condition: np.ndarray) -> dict[str, xr.DataArray]:
    """lens_nll (.., condition), lens_nll_diff and js (with ``sum_js``) from (resampled or plain) sums."""
    per_condition = xr.concat([sums["sum_a"], sums["sum_b"]], dim="condition")
    out = {"lens_nll": safe_ratio(per_condition, sums["n"]).assign_coords(condition=condition),
           "lens_nll_diff": safe_ratio(sums["sum_d"], sums["n"])}
    if "sum_js" in sums:
        out["js"] = safe_ratio(sums["sum_js"], sums["n_js"])
    return out


_DEFINITION = (
    "Conditions A = {a}, B = {b}. For each target token t of the view (aligned canonical tokens, or each sample "
    "pair's last canonical token) the lens value is lens_logprob at t − 1 = log p(t) read out after the layer; "
    "lens_nll = mean −log p; lens_nll_diff = mean of the paired differences; js = mean Jensen-Shannon divergence "
    "between the two conditions' read-out distributions for aligned targets.")
_NORMALISATION = "nats per target token; means over target pairs with finite values on both sides"
_CHANCE = "lens_nll: ln V for a uniform prediction over the vocabulary; difference 0; JS 0 for identical distributions"


def lens(
    routing: xr.Dataset,
    *,
    condition_a: str = "", condition_b: str = "",
    n_boot: int = 200, ci: float = 0.95, seed: int = 0,
) -> xr.Dataset:
    """Logit-lens NLL per layer for conditions A and B on aligned targets, their difference, and JS.

    Parameters
    ----------
    routing : routing cube with ``lens_logprob`` (checkpoint, layer, token);
        ``lens_js`` (checkpoint, layer, token) and ``nll`` (checkpoint, token)
        used when present; token coordinates as for :func:`analyses.divergence.divergence`.
    condition_a, condition_b : the conditions ('' = from the cube's attrs).
    n_boot, ci, seed : bootstrap over pairs of samples (0 = no intervals).

    Returns
    -------
    xr.Dataset
        lens_nll (checkpoint, layer, view, condition) : mean −log p(target), nats
        lens_nll_diff (checkpoint, layer, view) : mean over target pairs of NLL_A − NLL_B
        js (checkpoint, layer, view) : mean JS divergence (nats), only with lens_js
        model_nll (checkpoint, view, condition) : the model's own NLL on the same targets, only with nll
        targets (checkpoint, layer, view) : target pairs with both values finite
        ``*_lo`` / ``*_hi`` : bootstrap intervals of lens_nll, lens_nll_diff, js
    """
    a, b = conditions(routing, condition_a, condition_b)
    n_boot = int(n_boot)
    views = _targets(routing, a, b)
    pos_a, pos_b, unit, js_ok, view_code = stacked_views(views)
    n_units = int(unit.max()) + 1
    weights = bs.bootstrap_weights(n_units, n_boot, seed) if n_boot else None
    has_js = "lens_js" in routing
    has_nll = "nll" in routing
    condition = np.array([a, b], dtype=object)
    by_view = {"view": (xr.DataArray(view_code, dims="token"), len(PAIR_VIEWS))}

    def values(name, tokens):
        return token_var(routing, name).isel(token=tokens)

    # one token pass over every view: the per-target sums
    names = ["sum_a", "sum_b", "sum_d", "n"] + (["sum_js", "n_js"] if has_js else [])
    inputs = [values("lens_logprob", pos_a), values("lens_logprob", pos_b)]
    if has_js:
        inputs += [values("lens_js", pos_a), xr.DataArray(js_ok, dims="token")]
    # separate variables rather than one stacked array: the token pass then builds its (sample, view) index
    # once and runs one plain bincount per variable
    ps = per_pair_sums(per_token_vars(_lens_parts, inputs, names), unit, n_units, dim="token",
                       by=by_view)  # (checkpoint, layer, sample, view)

    tot = ps.sum(bs.SAMPLE)
    out = {**_means(tot, condition), "targets": tot["n"].astype(np.int64)}
    if n_boot:
        for name, rep in _means(bs.resample(ps, weights), condition).items():
            out[f"{name}_lo"], out[f"{name}_hi"] = bs.interval(rep, ci)
    if has_nll:
        # the model's own NLL has no layer dim: its own small pass over the (checkpoint, token) blocks
        model = per_token_vars(_model_parts, [values("nll", pos_a), values("nll", pos_b)], ["a", "b", "n"])
        model_sums = per_pair_sums(model, unit, n_units, dim="token", by=by_view).sum(bs.SAMPLE)
        out["model_nll"] = safe_ratio(xr.concat([model_sums["a"], model_sums["b"]], dim="condition"),
                                      model_sums["n"]).assign_coords(condition=condition)
    res = xr.Dataset(out).assign_coords(view=np.array(PAIR_VIEWS, dtype=object))
    res = res.transpose("checkpoint", "layer", "view", "condition", ...)

    result = finalise(
        res, routing, name=NAME, outputs=OUTPUTS, context={"a": a, "b": b, "ci_percent": 100 * ci},
        definition=_DEFINITION.format(a=repr(a), b=repr(b)), normalisation=_NORMALISATION, chance=_CHANCE,
        params={"condition_a": condition_a, "condition_b": condition_b, "n_boot": n_boot, "ci": ci, "seed": seed},
    )
    result.attrs["condition_a"], result.attrs["condition_b"] = a, b
    return result


def table(result: xr.Dataset) -> pd.DataFrame:
    """Per-layer metrics: rows (checkpoint, layer, view); NLL per condition, difference, JS, with CIs."""
    a, b = result.attrs["condition_a"], result.attrs["condition_b"]
    r = result.compute()
    base = r[["targets"]].to_dataframe().reset_index()
    for c in (a, b):
        for suffix in ("", "_lo", "_hi"):
            name = f"lens_nll{suffix}"
            if name in r:
                col = r[name].sel(condition=c, drop=True).rename(f"lens_nll_{c}{suffix}").to_dataframe().reset_index()
                base = base.merge(col[["checkpoint", "layer", "view", f"lens_nll_{c}{suffix}"]],
                                  on=["checkpoint", "layer", "view"])
    for name in ("lens_nll_diff", "lens_nll_diff_lo", "lens_nll_diff_hi", "js", "js_lo", "js_hi"):
        if name in r:
            col = r[name].to_dataframe().reset_index()
            base = base.merge(col[["checkpoint", "layer", "view", name]], on=["checkpoint", "layer", "view"])
    if "model_nll" in r:
        for c in (a, b):
            col = r["model_nll"].sel(condition=c, drop=True).rename(f"model_nll_{c}").to_dataframe().reset_index()
            base = base.merge(col[["checkpoint", "view", f"model_nll_{c}"]], on=["checkpoint", "view"])
    first = ["checkpoint", "step", "layer", "view"]
    return base[first + [c for c in base.columns if c not in first]]


def summary(result: xr.Dataset) -> dict:
    """At the last checkpoint, per view: NLL per condition at the last layer, the difference, the first layer's gap."""
    a, b = result.attrs["condition_a"], result.attrs["condition_b"]
    last = result.isel(checkpoint=-1).compute()
    out = {"checkpoint": str(last["checkpoint"].values), "condition_a": a, "condition_b": b}
    for view in map(str, last["view"].values):
        v = last.sel(view=view)
        d = {
            f"last_layer_nll_{a}": json_number(v["lens_nll"].sel(condition=a).isel(layer=-1)),
            f"last_layer_nll_{b}": json_number(v["lens_nll"].sel(condition=b).isel(layer=-1)),
            "last_layer_diff": json_number(v["lens_nll_diff"].isel(layer=-1)),
            "first_layer_diff": json_number(v["lens_nll_diff"].isel(layer=0)),
            "target_pairs": json_number(v["targets"].max()),
        }
        if "js" in v:
            d["mean_js"] = json_number(v["js"].mean())
        out[view] = d
    return out


ANALYSIS = register(
    Analysis(
        name=NAME,
        func=lens,
        figure=figure_hook(NAME),
        title="Logit lens: how well each layer predicts the content, by condition",
        caption=(
            "Each MoE layer's output is read through the model's final norm and LM head (logit lens, computed "
            "during capture); the curves show the mean negative log-probability of the next token for the same "
            "content in conditions A and B (left, last checkpoint, solid = A, dashed = B, stars = the model's own "
            "NLL, which the last layer's lens equals), the paired difference A − B per checkpoint (middle; below 0: "
            "A predicts the content better at that depth) and the Jensen-Shannon divergence between the two "
            "conditions' predicted distributions (right; 0 = identical, ln 2 = disjoint). Upper row: every aligned "
            "token; lower row: each sample pair's last canonical token. Bands: 95 % bootstrap intervals over "
            "sample pairs. A uniform prediction would score ln V nats."
        ),
        requires=("expert_ids", "lens_logprob"),
        optional=("lens_js", "nll"),
        table=table, summary=summary,
        outputs=OUTPUTS,
    )
)
