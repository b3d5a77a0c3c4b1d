"""Router probability vs usage: does the router's mean probability for an expert match the slots it gets?

mean_probability[c, l, e] = mean over routed tokens t of softmax(router_logits[c, l, t, :])[e]
usage[c, l, e] = slots routed to e / all valid slots (as in :mod:`analyses.usage`, domains pooled)

Both are shares that sum to 1 over experts and equal 1/E under uniform routing.
With top-k routing usage is the share of the *selected* experts; the mean
probability also counts the mass the router gave to experts it did not select,
so ``ratio = usage / mean_probability`` above 1 means top-k selection sharpens
the router's preference for the expert. This is the worked example of
docs/adding-an-analysis.md: one module (this), one figure module, one registry
line, one test file.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr

from .figures import hook as figure_hook
from .outputs import Output
from .registry import Analysis, cube_sizes, finalise, json_number, register, safe_ratio, tidy, token_var

NAME = "router_probability"

OUTPUTS = {
    "mean_probability": Output(
        "mean router probability", "probability",
        "mean over routed tokens of the softmax of the router logits over all experts",
        chance="1/num_experts", nan_where="no routed token at this checkpoint and layer"),
    "usage": Output(
        "expert usage", "share of routing slots", "share of the valid routing slots going to the expert",
        chance="1/num_experts", nan_where="no routed token at this checkpoint and layer"),
    "ratio": Output(
        "usage / mean router probability", "ratio",
        "how much top-k selection sharpens (> 1) or flattens (< 1) the router's mean preference",
        chance=1.0, nan_where="no routed token, or a zero mean probability"),
    "tokens": Output("routed tokens", "tokens", "tokens with at least one valid slot"),
}


def router_probability(routing: xr.Dataset) -> xr.Dataset:
    """Mean router probability and usage share per expert.

    Parameters
    ----------
    routing : routing cube; uses ``router_logits`` (checkpoint, layer, token, expert)
        and ``expert_ids`` (checkpoint, layer, token, k). Lazy in, lazy out.

    Returns
    -------
    xr.Dataset
        mean_probability (checkpoint, layer, expert) float64
        usage (checkpoint, layer, expert) float64
        ratio (checkpoint, layer, expert) float64 : usage / mean_probability
        tokens (checkpoint, layer) int64 : tokens with >= 1 valid slot (the ones averaged)

    Ids of -1 (unwritten) are excluded; a token with no valid slot is left out of the mean.
    """
    E, k = cube_sizes(routing)
    ids = token_var(routing, "expert_ids")
    logits = token_var(routing, "router_logits").astype(np.float64)
    routed = (ids >= 0).any("k")  # (checkpoint, layer, token)
    shifted = logits - logits.max("expert")  # softmax, stable
    prob = np.exp(shifted) / np.exp(shifted).sum("expert")
    tokens = routed.sum("token").astype(np.int64)
    prob_sum = prob.where(routed, 0.0).sum("token")
    expert = xr.DataArray(np.arange(E, dtype=np.int32), dims="expert")
    count = (ids == expert).sum(("token", "k")).astype(np.int64)  # ids of -1 match no expert
    mean_probability = safe_ratio(prob_sum, tokens)
    usage = safe_ratio(count, count.sum("expert"))
    order = ("checkpoint", "layer", "expert")
    result = xr.Dataset({
        "mean_probability": mean_probability.transpose(*order),
        "usage": usage.transpose(*order),
        "ratio": safe_ratio(usage, mean_probability).transpose(*order),
        "tokens": tokens,
    }).assign_coords(expert=("expert", np.arange(E, dtype=np.int32)))
    return finalise(
        result, routing, name=NAME, outputs=OUTPUTS,
        definition="mean_probability[c,l,e] = mean over tokens with a valid slot of softmax(router_logits)[e]; "
        "usage[c,l,e] = valid slots routed to e / all valid slots; ratio = usage / mean_probability. "
        f"Router semantics of the cube: {routing.attrs.get('router_semantics', 'not recorded')}.",
        normalisation="both sum to 1 over experts",
        chance=1.0 / E,
        params={},
    )


def table(result: xr.Dataset) -> pd.DataFrame:
    """Rows (checkpoint, layer, expert): mean_probability, usage, ratio."""
    return tidy(result, ["mean_probability", "usage", "ratio"])


def summary(result: xr.Dataset) -> dict:
    """At the final checkpoint: the largest |usage − mean probability| and the spread of the ratio."""
    last = int(np.argsort(result["step"].values, kind="stable")[-1])
    r = result.isel(checkpoint=last).compute()
    gap = abs(r["usage"] - r["mean_probability"])
    return {
        "checkpoint": str(result["checkpoint"].values[last]),
        "chance": 1.0 / result.sizes["expert"],
        "max_abs_gap": json_number(gap.max()),
        "max_ratio": json_number(r["ratio"].max()),
        "min_ratio": json_number(r["ratio"].min()),
    }


ANALYSIS = register(
    Analysis(
        name=NAME,
        func=router_probability,
        figure=figure_hook(NAME),
        title="Router probability vs expert usage",
        caption=(
            "For each expert, the mean probability the router gives it (softmax of the router logits over all "
            "experts, averaged over routed tokens; x) against the share of routing slots it actually receives "
            "(y), one point per layer × expert at the final checkpoint, coloured by layer. Both are 1/E under "
            "uniform routing (dotted lines); the diagonal is usage = probability. Points above the diagonal are "
            "experts whose share top-k selection raises above the router's mean preference."
        ),
        requires=("expert_ids", "router_logits"),
        table=table, summary=summary,
        outputs=OUTPUTS,
    )
)
