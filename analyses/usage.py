"""Expert usage: which experts get the routing slots, per layer and domain.

usage[c, l, e, d] = (slots of domain d's tokens going to e) / (all valid slots
of domain d) at checkpoint c, layer l. Every token fills k slots, so the
denominator is k·tokens and uniform routing gives 1/E.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from . import plotting
from .registry import (
    Analysis,
    attach_guard,
    cube_sizes,
    describe,
    finalise,
    json_number,
    reduce_by_domain,
    refuse_if,
    register,
    routed_ids,
    safe_ratio,
    tidy,
    token_var,
)

NAME = "usage"


def usage(routing: xr.Dataset, *, canonical_only: bool = False) -> xr.Dataset:
    """Share of routing slots per expert, by checkpoint, layer and domain.

    Parameters
    ----------
    routing : routing cube; uses ``expert_ids`` (checkpoint, layer, token, k)
        and, when present, ``expert_weights`` (same dims).
    canonical_only : count only tokens whose ``canonical`` flag is set.

    Returns
    -------
    xr.Dataset
        count (checkpoint, layer, domain, expert) int64 : slots going to e
        tokens (checkpoint, layer, domain) int64 : tokens with >= 1 valid slot
        usage (checkpoint, layer, domain, expert) : count / Σ_e count
        usage_all (checkpoint, layer, expert) : the same over all domains
        weighted_usage, weighted_usage_all : Σ w(e) / Σ w (only with weights)

    Ids of -1 (unwritten) are excluded; an id outside -1..E-1 raises ValueError
    (when the result is computed, for lazy input).
    """
    E, k = cube_sizes(routing)
    ids = routed_ids(routing, canonical_only=canonical_only)

    count = reduce_by_domain(
        xr.ones_like(ids, dtype=np.int64), routing, dim=("token", "k"), expert_ids=ids, num_experts=E
    )
    tokens = reduce_by_domain((ids >= 0).any("k"), routing, dim="token").astype(np.int64)
    slots = count.sum("expert")

    chance = 1.0 / E
    out = {
        "count": describe(
            count, "routing slots", "slots",
            "number of routing slots (token × top-k position) of the group assigned to the expert",
        ),
        "tokens": describe(tokens, "routed tokens", "tokens", "tokens of the group with at least one valid slot"),
        "usage": describe(
            safe_ratio(count, slots), "expert usage", "share of routing slots",
            "count / (k · tokens) of the domain: share of the domain's routing slots going to the expert",
            chance=chance, nan_where="a domain has no routed token at this checkpoint and layer",
        ),
        "usage_all": describe(
            safe_ratio(count.sum("domain"), slots.sum("domain")), "expert usage (all domains)",
            "share of routing slots", "share of all routing slots going to the expert, every domain pooled",
            chance=chance, nan_where="no routed token at this checkpoint and layer",
        ),
    }
    if "expert_weights" in routing:
        w = token_var(routing, "expert_weights").astype(np.float64)
        wsum = reduce_by_domain(w, routing, dim=("token", "k"), expert_ids=ids, num_experts=E)
        out["weighted_usage"] = describe(
            safe_ratio(wsum, wsum.sum("expert")), "weighted expert usage", "share of routing weight",
            "Σ of the weights the expert receives / Σ of all weights, within the domain",
            chance=chance, nan_where="a domain has no routed token at this checkpoint and layer",
        )
        out["weighted_usage_all"] = describe(
            safe_ratio(wsum.sum("domain"), wsum.sum(("domain", "expert"))), "weighted expert usage (all domains)",
            "share of routing weight", "Σ of the weights the expert receives / Σ of all weights, every domain pooled",
            chance=chance, nan_where="no routed token at this checkpoint and layer",
        )
    result = xr.Dataset(out)

    # An id >= E (or < -1) would silently fall out of the groups: refuse instead.
    bad = ((ids >= E) | (ids < -1)).sum(("token", "k"))
    guard = refuse_if(bad, f"expert_ids: slots with ids outside -1..{E - 1} (num_experts={E})")
    result = attach_guard(result, guard)
    return finalise(
        result, routing, name=NAME,
        definition="usage[c,l,e,d] = #slots of domain d routed to expert e / #valid slots of domain d "
        "(checkpoint c, layer l); weighted_usage uses the received weights w instead of 1. "
        "Ids of -1 (unwritten) are excluded.",
        normalisation="share of routing slots (divide by k·tokens); sums to 1 over experts",
        chance=chance,
        params={"canonical_only": canonical_only},
    )


def figure(result: xr.Dataset, out_dir: Path, formats: Sequence[str] = ("png",)) -> list[Path]:
    """One heatmap per checkpoint: panels per domain ('all' first), layer × expert."""
    result = result.compute()
    E = result.sizes["expert"]
    chance = 1.0 / E
    vmax = max(float(np.nanmax(result["usage"].values)) if result["usage"].size else 0.0, 2 * chance)
    norm = plotting.mcolors.TwoSlopeNorm(vcenter=chance, vmin=0.0, vmax=vmax)
    panels = [("all", result["usage_all"])] + [
        (plotting.display_label(d), result["usage"].sel(domain=d)) for d in result["domain"].values
    ]
    ncols = min(len(panels), 4)
    nrows = -(-len(panels) // ncols)
    L = result.sizes["layer"]
    panel_size = (max(2.4, 0.14 * E + 1.0), max(1.6, 0.16 * L + 0.9))
    paths = []
    for ci, ckpt in enumerate(result["checkpoint"].values):
        step = int(result["step"].values[ci])
        with plotting.style():
            fig, axes = plotting.new_figure(nrows, ncols, panel_size=panel_size, sharex=True, sharey=True)
            for ax, (label, var) in zip(axes.flat, panels):
                grid = var.sel(checkpoint=ckpt).transpose("layer", "expert").values
                im = ax.imshow(grid, aspect="auto", cmap=plotting.DIVERGING, norm=norm, interpolation="nearest")
                ax.set_title(label)
                ax.grid(False)
                ax.set_yticks(np.arange(L))
                ax.set_yticklabels([str(v) for v in result["layer"].values])
                if E <= 16:
                    ax.set_xticks(np.arange(E))
                plotting.label_axes(ax, "expert (index)", "layer (MoE layer index)")
            plotting.hide_unused(axes, len(panels))
            cbar = fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.9)
            cbar.set_label("usage (share of routing slots)")
            cbar.ax.axhline(chance, color="k", linewidth=0.8)
            fig.suptitle(f"Expert usage — checkpoint {ckpt} (step {step}); white = chance 1/E = {chance:.3g}")
            paths += plotting.savefig(fig, out_dir, f"{NAME}_{ci:03d}_{ckpt}", formats)
    return paths


def table(result: xr.Dataset) -> pd.DataFrame:
    """Rows (checkpoint, layer, domain, expert) plus pooled rows with domain 'all'."""
    per_domain = ["count", "usage", "weighted_usage"]
    df = tidy(result, per_domain)
    tokens = result["tokens"].compute().to_dataframe().reset_index()[["checkpoint", "layer", "domain", "tokens"]]
    df = df.merge(tokens, on=["checkpoint", "layer", "domain"], how="left")
    pooled = result[[v for v in per_domain if v in result]].sum("domain")
    pooled["usage"] = result["usage_all"]
    if "weighted_usage" in result:
        pooled["weighted_usage"] = result["weighted_usage_all"]
    pooled["tokens"] = result["tokens"].sum("domain")
    pooled = pooled.expand_dims(domain=["all"]).transpose("checkpoint", "layer", "domain", "expert")
    dfa = tidy(pooled.assign_coords(step=result["step"]), per_domain + ["tokens"])
    return pd.concat([df, dfa[df.columns]], ignore_index=True)


def summary(result: xr.Dataset) -> dict:
    """Headline numbers at the last checkpoint: spread of pooled usage around 1/E."""
    last = result["usage_all"].isel(checkpoint=-1).compute()
    E = result.sizes["expert"]
    by_layer_cv = (last.std("expert") / last.mean("expert"))
    return {
        "checkpoint": str(result["checkpoint"].values[-1]),
        "chance": 1.0 / E,
        "max_usage": json_number(last.max()),
        "min_usage": json_number(last.min()),
        "max_ratio_to_chance": json_number(last.max() * E),
        "mean_cv_over_experts": json_number(by_layer_cv.mean()),
        "tokens": json_number(result["tokens"].isel(checkpoint=-1).sum("domain").max()),
    }


ANALYSIS = register(
    Analysis(
        name=NAME,
        func=usage,
        figure=figure,
        title="Expert usage by layer and domain",
        caption=(
            "Share of each group's routing slots that go to each expert (count / (k·tokens)), one heatmap per "
            "checkpoint: rows are MoE layers, columns experts, one panel per domain plus all domains pooled. "
            "The diverging colour scale is centred on the uniform-routing chance level 1/E (white): red cells "
            "are used more than uniform, blue less. Rows sum to 1."
        ),
        requires=("expert_ids",),
        optional=("expert_weights",),
        params={"canonical_only": False},
        table=table,
        summary=summary,
    )
)
