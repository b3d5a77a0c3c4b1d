"""Router confidence: how peaked the routing distribution is, per layer and domain.

Per token: the entropy of the router's probabilities over all E experts
(normalised by ln E; needs ``router_logits``), the entropy of the k weights the
experts receive (renormalised, normalised by ln k), and the top-1 − top-2
weight margin. Each is averaged over the tokens of a (checkpoint, layer,
domain) group.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from . import plotting
from .registry import (
    Analysis,
    cube_sizes,
    describe,
    finalise,
    json_number,
    reduce_by_domain,
    register,
    routed_ids,
    safe_ratio,
    tidy,
    token_mask,
    token_var,
)

NAME = "confidence"
METRICS = ("entropy", "topk_entropy", "margin")


def _xlogx(p: xr.DataArray, logp: xr.DataArray) -> xr.DataArray:
    # 0·log 0 = 0: masked experts (logit −inf) must not turn the sum into NaN
    return p * logp.where(p > 0, 0.0)


def is_sigmoid_router(routing: xr.Dataset) -> bool:
    """True when the cube's ``router_semantics`` says the router scores with a sigmoid."""
    return "sigmoid" in str(routing.attrs.get("router_semantics", "")).lower()


def token_entropy(logits: xr.DataArray, *, sigmoid: bool = False) -> xr.DataArray:
    """Entropy (nats) of the router distribution p per token.

    Parameters
    ----------
    logits : (..., expert), any float dtype; computed in float32.
    sigmoid : p = σ(x) / Σ σ(x) instead of softmax(x).

    Returns
    -------
    (...) float32; NaN where any logit is NaN (unwritten).
    """
    x = logits.astype(np.float32)
    if sigmoid:
        s = 1.0 / (1.0 + np.exp(-x))
        p = s / s.sum("expert", skipna=False)
        logp = np.log(p)
    else:
        # skipna=False: unwritten (NaN) logits must give NaN, not log(0)
        z = x - x.max("expert", skipna=False)
        logp = z - np.log(np.exp(z).sum("expert", skipna=False))
        p = np.exp(logp)
    h = -_xlogx(p, logp).sum("expert", skipna=False)
    return h.where(x.notnull().all("expert"))


def confidence(routing: xr.Dataset, *, canonical_only: bool = False) -> xr.Dataset:
    """Mean router entropy, top-k weight entropy and margin per (checkpoint, layer, domain).

    Parameters
    ----------
    routing : routing cube; uses ``expert_ids`` and ``expert_weights``
        (checkpoint, layer, token, k) and, when present, ``router_logits``
        (checkpoint, layer, token, expert).
    canonical_only : average only over tokens whose ``canonical`` flag is set.

    Returns
    -------
    xr.Dataset with dims (checkpoint, layer, domain) for
        entropy        mean_t H(p_t) / ln E   (only with router_logits)
        topk_entropy   mean_t H(w̃_t) / ln k  (w̃ = received weights renormalised)
        margin         mean_t (w_t,1 − w_t,2)
        tokens         tokens averaged (with at least one valid slot)
    and ``<metric>_all`` (checkpoint, layer) pooling every domain.

    A token counts when it has a valid (id ≥ 0) slot; the entropy also needs
    all its logits written.
    """
    E, k = cube_sizes(routing)
    ids = routed_ids(routing, canonical_only=canonical_only)
    w = token_var(routing, "expert_weights").astype(np.float32)
    slot_ok = (ids >= 0) & w.notnull()
    token_ok = slot_ok.any("k")

    per_token = {}
    if "router_logits" in routing:
        logits = token_var(routing, "router_logits")
        mask = token_mask(routing, canonical_only)
        if mask is not None:
            logits = logits.where(mask)
        per_token["entropy"] = token_entropy(logits, sigmoid=is_sigmoid_router(routing)) / math.log(E)
    if k >= 2:
        wv = w.where(slot_ok, 0.0)
        total = wv.sum("k")
        q = wv / total.where(total > 0)
        hk = -_xlogx(q, np.log(q.where(q > 0, 1.0))).sum("k", skipna=False) / math.log(k)
        per_token["topk_entropy"] = hk.where(token_ok & (total > 0))
        first, second = (w.isel(k=i, drop=True) for i in (0, 1))
        both = slot_ok.isel(k=0, drop=True) & slot_ok.isel(k=1, drop=True)
        per_token["margin"] = (first - second).where(both)
    else:
        # one slot: no second weight and ln k = 0, so both are undefined
        per_token["topk_entropy"] = xr.full_like(token_ok, np.nan, dtype=np.float32)
        per_token["margin"] = xr.full_like(token_ok, np.nan, dtype=np.float32)

    parts = {"tokens": token_ok}
    for name, v in per_token.items():
        ok = v.notnull()
        parts[f"{name}_sum"] = v.where(ok, 0.0).astype(np.float64)
        parts[f"{name}_n"] = ok
    sums = reduce_by_domain(xr.Dataset(parts), routing, dim="token")

    info = {
        "entropy": (
            "router entropy", "fraction of ln E",
            "mean over tokens of H(p)/ln E, p = router probabilities over all experts "
            + ("(sigmoid scores renormalised to sum 1)" if is_sigmoid_router(routing) else "(softmax of logits)"),
        ),
        "topk_entropy": (
            "top-k weight entropy", "fraction of ln k",
            "mean over tokens of H(w/Σw)/ln k over the k weights the experts receive",
        ),
        "margin": (
            "top-1 − top-2 weight margin", "weight (as received by the experts)",
            "mean over tokens of w_1 − w_2, the received weights of the first two slots",
        ),
    }
    out = {"tokens": describe(sums["tokens"].astype(np.int64), "routed tokens", "tokens",
                              "tokens of the group with at least one valid slot")}
    nan_why = "no token of the group has the metric defined" + (" (top_k = 1)" if k < 2 else "")
    for name in per_token:
        long_name, units, desc = info[name]
        s, n = sums[f"{name}_sum"], sums[f"{name}_n"]
        out[name] = describe(safe_ratio(s, n), long_name, units, desc, nan_where=nan_why)
        out[f"{name}_all"] = describe(
            safe_ratio(s.sum("domain"), n.sum("domain")), f"{long_name} (all domains)", units,
            desc + ", every domain pooled", nan_where=nan_why,
        )
    result = xr.Dataset(out)
    return finalise(
        result, routing, name=NAME,
        definition="per token: H(p)/ln E (p = router probabilities over all E experts, float32), "
        "H(w/Σw)/ln k over the received top-k weights, and w_1 − w_2; each averaged over the tokens "
        "of the (checkpoint, layer, domain) group. Ids of -1 (unwritten) are excluded.",
        normalisation="entropies divided by their maximum (ln E, ln k): 1 = uniform, 0 = one-hot; "
        "margin in units of the received weights",
        chance="no chance level: uniform p gives entropy 1 (its maximum); uniform random routing does not fix "
        "the weights, so top-k entropy and margin have none either",
        params={"canonical_only": canonical_only},
    )


_YLABELS = {
    "entropy": "router entropy H(p) / ln E",
    "topk_entropy": "top-k entropy H(w̃) / ln k",
    "margin": "margin w₁ − w₂ (weight)",
}


def figure(result: xr.Dataset, out_dir: Path, formats: Sequence[str] = ("png",)) -> list[Path]:
    """Curves vs layer, one line per checkpoint coloured by step; rows = metric, columns = domain."""
    result = result.compute()
    metrics = [m for m in METRICS if m in result and np.isfinite(result[f"{m}_all"].values).any()]
    groups = [("all domains", None)] + [(plotting.display_label(d), d) for d in result["domain"].values]
    steps = result["step"].values
    colours, mappable = plotting.ordered_colours(steps)
    layers = result["layer"].values
    with plotting.style():
        fig, axes = plotting.new_figure(max(len(metrics), 1), len(groups), panel_size=(2.6, 2.1), sharex=True)
        for r, m in enumerate(metrics):
            for c, (label, dom) in enumerate(groups):
                ax = axes[r, c]
                var = result[f"{m}_all"] if dom is None else result[m].sel(domain=dom)
                for ci in range(result.sizes["checkpoint"]):
                    ax.plot(layers, var.isel(checkpoint=ci).values, color=colours[ci], marker="o", markersize=2)
                if m != "margin":
                    ax.set_ylim(0, 1.02)
                if r == 0:
                    ax.set_title(label)
                plotting.label_axes(ax, "layer (MoE layer index)" if r == len(metrics) - 1 else "",
                                    _YLABELS[m] if c == 0 else "")
        if metrics:
            cbar = fig.colorbar(mappable, ax=axes.ravel().tolist(), shrink=0.8)
            cbar.set_label("training step")
        fig.suptitle("Router confidence by layer")
        return plotting.savefig(fig, out_dir, NAME, formats)


def table(result: xr.Dataset) -> pd.DataFrame:
    """Rows (checkpoint, layer, domain) plus pooled rows with domain 'all'."""
    cols = [m for m in METRICS if m in result] + ["tokens"]
    df = tidy(result, cols)
    pooled = xr.Dataset({m: result[f"{m}_all"] for m in METRICS if m in result})
    pooled["tokens"] = result["tokens"].sum("domain")
    pooled = pooled.expand_dims(domain=["all"]).transpose("checkpoint", "layer", "domain")
    dfa = tidy(pooled.assign_coords(step=result["step"]), cols)
    return pd.concat([df, dfa[df.columns]], ignore_index=True)


def summary(result: xr.Dataset) -> dict:
    """Mean over layers of each pooled metric at the first and the last checkpoint."""
    out = {"first_checkpoint": str(result["checkpoint"].values[0]),
           "last_checkpoint": str(result["checkpoint"].values[-1])}
    for m in METRICS:
        if m in result:
            v = result[f"{m}_all"].compute()
            out[f"{m}_first"] = json_number(v.isel(checkpoint=0).mean("layer"))
            out[f"{m}_last"] = json_number(v.isel(checkpoint=-1).mean("layer"))
    return out


ANALYSIS = register(
    Analysis(
        name=NAME,
        func=confidence,
        figure=figure,
        title="Router confidence by layer",
        caption=(
            "How decided the routers are, per MoE layer (x). Rows: router entropy H(p)/ln E over all experts "
            "(needs router logits; 1 = uniform over experts, 0 = all mass on one), entropy of the k received "
            "weights H(w̃)/ln k (1 = equal weights), and the top-1 − top-2 weight margin. Columns: all domains "
            "pooled, then each domain. One line per checkpoint, coloured by training step (colour bar). "
            "There is no chance level: uniform routing probabilities give entropy 1, the maximum."
        ),
        requires=("expert_ids", "expert_weights"),
        optional=("router_logits",),
        params={"canonical_only": False},
        table=table,
        summary=summary,
    )
)
