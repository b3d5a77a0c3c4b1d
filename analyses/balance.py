"""Load balance: how evenly a layer spreads its routing slots over the experts.

Per (checkpoint, layer), from the pooled usage u_e (share of routing slots,
uniform 1/E):

* CV = std_e(u) / mean_e(u) (population std), 0 at perfect balance; and
  balance = 1 / (1 + CV), 1 at perfect balance.
* Switch load-balancing loss E · Σ_e f_e · P_e, f_e = fraction of tokens whose
  top-1 expert is e, P_e = mean router probability of e (softmax of the
  logits; normalised sigmoid scores for sigmoid routers); 1 at perfect
  balance. Needs ``router_logits``.
* dead experts: u_e < dead_fraction / E; cold experts: u_e < cold_fraction / E
  (cold includes dead).

Uniform random routing with N tokens is not perfectly balanced: its expected
CV² is (E − k) / (k · N) (each expert's slot count is binomial), reported per
cell as ``cv_chance`` so that a small CV can be read against sampling noise.

On an aggregate-counts cube (OLMoE's expert_counts, :mod:`analyses.counts`)
the same point estimates come from the pooled slot counts, without the Switch
loss (no probabilities) or intervals (no samples).
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import xarray as xr

from storage.schema import is_counts_cube

from . import bootstrap as bs
from .figures import hook as figure_hook
from .confidence import is_sigmoid_router, router_probabilities
from .outputs import Output, per_expert
from .registry import (
    Analysis, cube_sizes, finalise, json_number, over_slots, register, safe_ratio, tidy, token_var, view_ids,
    view_mask
)

NAME = "balance"


def coefficient_of_variation(usage: xr.DataArray, dim: str = "expert") -> xr.DataArray:
    """std / mean of ``usage`` over ``dim`` (population std); NaN where the mean is 0 or NaN."""
    return safe_ratio(usage.std(dim, ddof=0, skipna=False), usage.mean(dim, skipna=False))


def lb_loss(top1: xr.DataArray, psum: xr.DataArray, n: xr.DataArray, num_experts: int) -> xr.DataArray:
    """E · Σ_e (top1_e / n) · (psum_e / n) from sums over the same n tokens (dim ``expert``)."""
    f = safe_ratio(top1, n)
    p = safe_ratio(psum, n)
    return num_experts * (f * p).sum("expert", skipna=False)


def _top_k_block(x: np.ndarray, k: int) -> np.ndarray:
    """(..., E) scores -> (..., E) bool marking exactly k largest per row (argpartition: ties still give k)."""
    idx = np.argpartition(-x, k - 1, axis=-1)[..., :k]
    out = np.zeros(x.shape, dtype=bool)
    np.put_along_axis(out, idx, True, axis=-1)
    return out


def top_k_of_logits(logits: xr.DataArray, k: int) -> xr.DataArray:
    """(..., expert) bool: the k largest logits of each token, as transformers' aux loss selects them.

    ``load_balancing_loss_func`` re-selects with ``torch.topk(softmax(logits), k)``
    instead of reading the model's choice; softmax is monotone, so this is the
    top k of the logits (it differs from ``expert_ids`` for routers that add a
    bias or a group limit before choosing).
    """
    return xr.apply_ufunc(
        _top_k_block, logits, kwargs={"k": int(k)}, input_core_dims=[["expert"]], output_core_dims=[["expert"]],
        dask="parallelized", output_dtypes=[bool],
    )


_NAN_CELL = "no routed token in this view at this checkpoint and layer"
_NAN_LB = "no token with a written top-1 slot and logits at this checkpoint and layer"


def _k(context) -> float:
    return float(context["top_k"])


OUTPUTS = {
    "usage": Output("expert usage", "share of routing slots",
                    "share of the view's routing slots going to the expert (domains pooled)",
                    chance=per_expert, nan_where=_NAN_CELL),
    "cv": Output("coefficient of variation of usage", "ratio",
                 "std over experts / mean over experts of usage (population std); 0 = perfect balance",
                 nan_where=_NAN_CELL, extra={"ideal": 0.0}),
    "balance": Output("utilization balance", "ratio", "1 / (1 + CV); 1 = perfect balance", nan_where=_NAN_CELL,
                      extra={"ideal": 1.0}),
    "cv_chance": Output(
        "CV of uniform random routing", "ratio",
        "sqrt((E − k) / (k · N)), N = routed tokens: the root of the expected CV² when every token picks k "
        "distinct experts uniformly at random (the expected CV is slightly lower)", nan_where=_NAN_CELL),
    "dead": Output("dead expert", "boolean", "usage < {dead_fraction:g} / E ({dead_percent:g} % of uniform usage)"),
    "cold": Output("cold expert", "boolean",
                   "usage < {cold_fraction:g} / E ({cold_percent:g} % of uniform usage); includes dead"),
    "dead_count": Output("dead experts", "experts", "number of experts with usage < {dead_fraction:g} / E"),
    "cold_count": Output("cold experts", "experts",
                         "number of experts with usage < {cold_fraction:g} / E (dead ones included)"),
    "tokens": Output("routed tokens", "tokens", "tokens of the view with at least one valid slot"),
    "lb_loss": Output(
        "Switch load-balancing loss", "ratio",
        "E · Σ_e f_e · P_e, f_e = share of tokens whose top-1 expert is e, P_e = mean router probability of e "
        "({probabilities}), over tokens with a written top-1 and logits; 1 at perfect balance. Not transformers' "
        "load_balancing_loss_func, which counts all k slots and reads ≈ k at balance (lb_loss_hf)",
        nan_where=_NAN_LB, extra={"ideal": 1.0}),
    "lb_loss_hf": Output(
        "load-balancing loss, transformers' definition (per layer)", "ratio",
        "transformers' load_balancing_loss_func on this layer's router logits alone: E · Σ_e f_e · P_e with "
        "f_e = routing slots of expert e among the k largest logits of each token / tokens (all k slots "
        "counted, so it reads ≈ k at perfect balance, not 1 as lb_loss does), P_e = mean softmax probability "
        "(softmax even for sigmoid routers, as transformers does); same tokens as lb_loss; no interval",
        nan_where=_NAN_LB, extra={"ideal": _k}),
    "lb_loss_hf_all_layers": Output(
        "load-balancing loss, transformers' definition (all layers pooled)", "ratio",
        "transformers' load_balancing_loss_func on the tuple of every layer's router logits, the value a "
        "transformers MoE returns as aux_loss (before router_aux_loss_coef): E · Σ_e f_e · P_e with f_e and "
        "P_e pooled over the tokens of all layers (not the mean of lb_loss_hf over layers); ≈ k at perfect "
        "balance", nan_where="no token with a written top-1 slot and logits at this checkpoint",
        extra={"ideal": _k}),
}
_NAN_COUNTED = "no counted slot at this checkpoint and layer"
# an aggregate-counts cube: the same point estimates from the pooled slot counts
COUNTS_OUTPUTS = {
    **{name: OUTPUTS[name] for name in ("dead", "cold", "dead_count", "cold_count")},
    "usage": replace(OUTPUTS["usage"], description="share of the counted routing slots going to the expert "
                     "(domains pooled)", nan_where=_NAN_COUNTED),
    "cv": replace(OUTPUTS["cv"], nan_where=_NAN_COUNTED),
    "balance": replace(OUTPUTS["balance"], nan_where=_NAN_COUNTED),
    "cv_chance": replace(OUTPUTS["cv_chance"], description="sqrt((E − k) / (k · N)), N = slots / k tokens implied "
                         "by the counts", nan_where=_NAN_COUNTED),
    "tokens": replace(OUTPUTS["tokens"], description="slots / k: tokens implied by the counts"),
}


def _context(dead_fraction: float, cold_fraction: float, **extra) -> dict:
    """What the OUTPUTS templates need beyond the params: the thresholds in percent of uniform usage."""
    return {"dead_percent": 100 * dead_fraction, "cold_percent": 100 * cold_fraction, **extra}


def balance(
    routing: xr.Dataset,
    *,
    view: str = "all", dead_fraction: float = 0.01, cold_fraction: float = 0.25,
    n_boot: int = 200, ci: float = 0.95, seed: int = 0,
) -> xr.Dataset:
    """Utilization balance, Switch load-balancing loss, dead and cold experts per (checkpoint, layer).

    Parameters
    ----------
    routing : routing cube; uses ``expert_ids`` (checkpoint, layer, token, k)
        and, when present, ``router_logits`` (checkpoint, layer, token, expert).
    view : token view (``all``, ``canonical``, ``last_canonical``).
    dead_fraction, cold_fraction : thresholds as fractions of uniform usage 1/E.
    n_boot, ci, seed : bootstrap over samples (resampled within each domain);
        ``n_boot=0`` leaves the interval variables out.

    Returns
    -------
    xr.Dataset
        usage (checkpoint, layer, expert) : share of the view's routing slots
        cv, balance, cv_chance (checkpoint, layer)
        lb_loss (checkpoint, layer) : only with router_logits
        dead, cold (checkpoint, layer, expert) bool
        dead_count, cold_count, tokens (checkpoint, layer) int64
        cv_lo/hi, balance_lo/hi, lb_loss_lo/hi : bootstrap percentile intervals
    """
    E, k = cube_sizes(routing)
    if not 0.0 <= dead_fraction <= cold_fraction:
        raise ValueError(
            f"balance: dead_fraction={dead_fraction}, cold_fraction={cold_fraction}; expected 0 <= dead <= cold"
        )
    n_boot = int(n_boot)
    if is_counts_cube(routing):
        return _balance_from_counts(routing, E=E, k=k, view=view, dead_fraction=dead_fraction,
                                    cold_fraction=cold_fraction, n_boot=n_boot, ci=ci, seed=seed)
    ids = view_ids(routing, view)
    samples = bs.Samples.of(routing)  # once: every token pass below shares it
    groups = bs.sample_groups(routing, "domain", samples)
    parts = {"count": bs.per_sample_sums(xr.ones_like(ids, dtype=np.int64), samples, dim=("token", "k"),
                                         by={"expert": (ids, E)}),
             "tokens": bs.per_sample_sums(over_slots(ids >= 0, "any").astype(np.int64), samples, dim="token")}
    with_lb = "router_logits" in routing
    hf = _lb_sums(routing, ids, view, samples, parts) if with_lb else None
    ps = xr.Dataset(parts)
    tot = bs.group_sums(ps)
    out = _point_estimates(tot["count"], tot["tokens"].astype(np.int64), E=E, k=k, dead_fraction=dead_fraction,
                           cold_fraction=cold_fraction)
    if with_lb:
        out.update(_lb_estimates(tot, bs.group_sums(xr.Dataset(hf)), E))
    if n_boot > 0:
        weights = bs.bootstrap_weights(ps.sizes["sample"], n_boot, seed, strata=groups)
        reps = bs.resample(ps, weights)
        cv_reps = coefficient_of_variation(safe_ratio(reps["count"], reps["count"].sum("expert")))
        for name, r in (("cv", cv_reps), ("balance", 1.0 / (1.0 + cv_reps))):
            lo, hi = bs.interval(r, ci)
            bs.add_interval(out, name, lo, hi, ci=ci, n_boot=n_boot, scheme=bs.STRATIFIED)
        if with_lb:
            lo, hi = bs.interval(lb_loss(reps["top1"], reps["psum"], reps["n_lb"], E), ci)
            bs.add_interval(out, "lb_loss", lo, hi, ci=ci, n_boot=n_boot, scheme=bs.STRATIFIED)

    sigmoid = is_sigmoid_router(routing)
    return finalise(
        xr.Dataset(out), routing, name=NAME, outputs=OUTPUTS, context=_context(
            dead_fraction, cold_fraction, probabilities="normalised sigmoid scores" if sigmoid else "softmax of the logits"),
        definition=_DEFINITION.format(dead_fraction=dead_fraction, cold_fraction=cold_fraction, ci_percent=100 * ci,
                                      n_boot=n_boot),
        normalisation="CV is scale-free; balance in (0, 1]; LB loss is 1 at perfect balance and E at collapse "
        "onto one expert",
        chance="perfect balance: CV 0, balance 1, LB loss 1. Uniform random routing over N tokens gives "
        "E[CV²] = (E − k)/(k·N) (variable cv_chance), balance ≈ 1/(1 + cv_chance), LB loss ≈ 1, "
        "lb_loss_hf ≈ k",
        params={"view": view, "dead_fraction": float(dead_fraction), "cold_fraction": float(cold_fraction),
                "n_boot": n_boot, "ci": float(ci), "seed": int(seed)},
    )


_DEFINITION = (
    "per (checkpoint, layer), from pooled usage u_e = share of the view's routing slots: CV = std_e(u)/mean_e(u) "
    "(population std), balance = 1/(1+CV); Switch load-balancing loss E·Σ_e f_e·P_e (f_e = share of tokens whose "
    "top-1 is e, P_e = mean router probability; 1 at balance); lb_loss_hf / lb_loss_hf_all_layers: transformers' "
    "load_balancing_loss_func (f_e counts all k slots of its own top-k of the logits, so ≈ k at balance), per layer "
    "and over all layers pooled; dead: u_e < {dead_fraction:g}/E, cold: u_e < {cold_fraction:g}/E (cold includes "
    "dead). Intervals: {ci_percent:g} % percentile bootstrap over samples resampled within each domain ({n_boot} "
    "replicates).")


def _lb_estimates(tot: xr.Dataset, hf_tot: xr.Dataset, E: int) -> dict[str, xr.DataArray]:
    """lb_loss, lb_loss_hf and lb_loss_hf_all_layers from the group sums of :func:`_lb_sums`."""
    return {
        "lb_loss": lb_loss(tot["top1"], tot["psum"], tot["n_lb"], E),
        "lb_loss_hf": lb_loss(hf_tot["topk"], hf_tot["psum"], tot["n_lb"], E),
        # what transformers logs as the model's aux_loss: rows of every layer pooled before the product
        "lb_loss_hf_all_layers": lb_loss(hf_tot["topk"].sum("layer"), hf_tot["psum"].sum("layer"),
                                         tot["n_lb"].sum("layer"), E),
    }


def _lb_sums(routing: xr.Dataset, ids: xr.DataArray, view: str, samples, parts: dict) -> dict:
    """Per-sample sums of the load-balancing losses: adds psum, top1, n_lb to ``parts``; returns transformers' variant.

    The variant (lb_loss_hf: softmax even for sigmoid routers, its own top-k of the
    logits, all k slots counted) is kept apart so that the bootstrap resamples
    exactly what it did before.
    """
    E, k = cube_sizes(routing)
    logits = token_var(routing, "router_logits")
    mask = view_mask(routing, view)
    top1 = ids.isel(k=0, drop=True)
    ok = (top1 >= 0) & logits.notnull().all("expert")
    if mask is not None:
        ok = ok & mask
    sigmoid = is_sigmoid_router(routing)
    p = router_probabilities(logits, sigmoid=sigmoid).astype(np.float64)
    parts["psum"] = bs.per_sample_sums(p.where(ok, 0.0), samples, dim="token")
    parts["top1"] = bs.per_sample_sums(
        xr.ones_like(top1, dtype=np.int64), samples, dim="token", by={"expert": (top1.where(ok, -1), E)}
    )
    parts["n_lb"] = bs.per_sample_sums(ok.astype(np.int64), samples, dim="token")
    hf = {"topk": bs.per_sample_sums(top_k_of_logits(logits, k).where(ok, False).astype(np.int64), samples,
                                     dim="token")}
    hf["psum"] = (parts["psum"] if not sigmoid else bs.per_sample_sums(
        router_probabilities(logits).astype(np.float64).where(ok, 0.0), samples, dim="token"))
    return hf


def _point_estimates(count: xr.DataArray, tokens: xr.DataArray, *, E: int, k: int, dead_fraction: float,
                     cold_fraction: float) -> dict[str, xr.DataArray]:
    """usage, cv, balance, cv_chance, dead / cold flags and counts, tokens from pooled slot counts (dims (..., expert))."""
    usage = safe_ratio(count, count.sum("expert"))
    cv = coefficient_of_variation(usage)
    dead = usage < dead_fraction / E
    cold = usage < cold_fraction / E
    return {
        "usage": usage,
        "cv": cv,
        "balance": 1.0 / (1.0 + cv),
        "cv_chance": np.sqrt((E - k) / (k * tokens.where(tokens > 0))),
        "dead": dead,
        "cold": cold,
        "dead_count": dead.sum("expert").astype(np.int64),
        "cold_count": cold.sum("expert").astype(np.int64),
        "tokens": tokens,
    }


def _balance_from_counts(routing, *, E, k, view, dead_fraction, cold_fraction, n_boot, ci, seed) -> xr.Dataset:
    """:func:`balance` on an aggregate-counts cube: the same point estimates from the pooled slot counts.

    No Switch loss (no router probabilities) and no intervals (attrs
    ``intervals`` says why); ``tokens`` = slots / k.
    """
    from .counts import NO_SAMPLES, implied_tokens, slot_counts

    if view != "all":
        raise ValueError(f"balance: view {view!r} needs per-token routing; an aggregate-counts cube has only view 'all'")
    count = slot_counts(routing).sum("domain")
    out = _point_estimates(count, implied_tokens(count, k), E=E, k=k, dead_fraction=dead_fraction,
                           cold_fraction=cold_fraction)
    result = finalise(
        xr.Dataset(out), routing, name=NAME, outputs=COUNTS_OUTPUTS, context=_context(dead_fraction, cold_fraction),
        definition="per (checkpoint, layer), from pooled usage u_e = share of the counted routing slots (an "
        "aggregate-counts cube, domains pooled): CV = std_e(u)/mean_e(u) (population std), balance = 1/(1+CV); "
        f"dead: u_e < {dead_fraction:g}/E, cold: u_e < {cold_fraction:g}/E (cold includes dead).",
        normalisation="CV is scale-free; balance in (0, 1]",
        chance="perfect balance: CV 0, balance 1. Uniform random routing over N tokens gives E[CV²] = (E − k)/(k·N) "
        "(variable cv_chance)",
        params={"view": view, "dead_fraction": float(dead_fraction), "cold_fraction": float(cold_fraction),
                "n_boot": int(n_boot), "ci": float(ci), "seed": int(seed)},
    )
    result.attrs["intervals"] = f"bootstrap intervals {NO_SAMPLES}"
    result.attrs["lb_loss"] = "not available: the counts hold no router probabilities"
    result.attrs["counts_only"] = 1
    return result


def _steps_order(result):
    return np.argsort(result["step"].values, kind="stable")


def _param(result: xr.Dataset, key: str) -> float:
    """A threshold parameter of the result (from its ``params`` attr)."""
    return float(json.loads(result.attrs["params"])[key])


def table(result: xr.Dataset) -> pd.DataFrame:
    """Rows (checkpoint, layer) with every scalar metric, and the dead / cold expert indices."""
    cols = [v for v in ("tokens", "cv", "cv_lo", "cv_hi", "cv_chance", "balance", "balance_lo", "balance_hi",
                        "lb_loss", "lb_loss_lo", "lb_loss_hi", "lb_loss_hf", "dead_count", "cold_count")
            if v in result]
    df = tidy(result, cols)
    res = result[["dead", "cold"]].compute()
    experts = res["expert"].values
    for flag in ("dead", "cold"):
        arr = res[flag].transpose("checkpoint", "layer", "expert").values
        df[f"{flag}_experts"] = [" ".join(str(e) for e in experts[row]) for row in arr.reshape(-1, len(experts))]
    return df


def summary(result: xr.Dataset) -> dict:
    """Per-layer-mean balance, CV and LB loss at the earliest and final checkpoints, and dead/cold counts."""
    order = _steps_order(result)
    out = {}
    for which, ci in (("first", order[0]), ("last", order[-1])):
        cell = result.isel(checkpoint=ci).compute()
        out[f"{which}_checkpoint"] = str(cell["checkpoint"].values)
        for var in ("cv", "balance", "lb_loss", "cv_chance"):
            if var in cell:
                out[f"{var}_{which}"] = json_number(cell[var].mean("layer"))
        if "lb_loss_hf_all_layers" in cell:  # transformers' aux loss (≈ k at balance), already over all layers
            out[f"lb_loss_hf_all_layers_{which}"] = json_number(cell["lb_loss_hf_all_layers"])
        out[f"dead_experts_{which}"] = int(cell["dead_count"].sum())
        out[f"cold_experts_{which}"] = int(cell["cold_count"].sum())
    return out


ANALYSIS = register(
    Analysis(
        name=NAME,
        func=balance,
        figure=figure_hook(NAME),
        title="Load balance across checkpoints",
        caption=(
            "How evenly each MoE layer (one line per layer) spreads its routing slots over the experts, per "
            "training step (x). CV: coefficient of variation of usage over experts (0 = perfect balance; the "
            "dashed curve is what uniform random routing over the same number of tokens gives, sqrt((E−k)/(kN))). "
            "Balance = 1/(1+CV), 1 = perfect (dashed). Switch load-balancing loss E·Σ f·P (top-1 fractions times "
            "mean router probabilities; 1 = perfect balance, E = collapse; needs router logits; not transformers' "
            "aux loss, which counts all k slots and reads ≈ k at balance: variables lb_loss_hf, "
            "lb_loss_hf_all_layers). Last panel: "
            "experts below 25 % (cold, solid) and 1 % (dead, dotted) of uniform usage 1/E. Bands: 95 % bootstrap "
            "intervals over samples."
        ),
        requires=("expert_ids",),
        accepts_counts=True,
        optional=("router_logits",),
        table=table, summary=summary,
        outputs=OUTPUTS,
    )
)
