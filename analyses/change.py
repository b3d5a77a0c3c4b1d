"""Routing change across checkpoints: how far each checkpoint's routing is from
the final one and from the previous one, on identical input tokens.

Set-based (primary): |S_c ∩ S_ref| / k per token, averaged. Rank-aware
(secondary): share of slots i with id_c[i] = id_ref[i]. Checkpoints are ordered
by ``step``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from storage.schema import FILL_ID

from . import plotting
from .registry import (
    Analysis,
    attach_guard,
    checkpoint_steps,
    cube_sizes,
    describe,
    finalise,
    json_number,
    refuse_if,
    register,
    routed_ids,
    safe_ratio,
    tidy,
)

NAME = "change"


def set_intersection(a: xr.DataArray, b: xr.DataArray) -> xr.DataArray:
    """|S_a ∩ S_b| per token: (..., k) ids -> (...) int; -1 slots never match.

    Ids within one token's slots are distinct, so counting equal (slot, slot)
    pairs counts the shared experts.
    """
    eq = (a == b.rename({"k": "k_b"})) & (a >= 0)
    return eq.sum(("k", "k_b"))


def change(routing: xr.Dataset, *, canonical_only: bool = False) -> xr.Dataset:
    """Saturation vs the final checkpoint and overlap with the previous one, per (checkpoint, layer).

    Parameters
    ----------
    routing : routing cube with ``expert_ids`` (checkpoint, layer, token, k) and
        at least two checkpoints; every checkpoint must have the same slots
        written (same -1 pattern).
    canonical_only : use only tokens whose ``canonical`` flag is set.

    Returns
    -------
    xr.Dataset with dims (checkpoint, layer), checkpoints sorted by step:
        saturation            Σ_t |S_c ∩ S_final| / Σ_t |S_c|   (= mean_t ·/k)
        overlap_prev          Σ_t |S_c ∩ S_{c-1}| / Σ_t |S_c|   (NaN at the first checkpoint)
        switch_fraction       1 − overlap_prev
        position_match_final  share of valid slots with id_c[i] = id_final[i]
        position_match_prev   the same against the previous checkpoint
        tokens                tokens compared

    Raises
    ------
    ValueError
        Fewer than two checkpoints, duplicate checkpoint names, or (at compute
        time for lazy input) a token/slot written in one checkpoint and not in
        another, or ids outside -1..E-1.
    """
    E, k = cube_sizes(routing)
    C = routing.sizes.get("checkpoint", 0)
    if C < 2:
        raise ValueError(
            f"change: the routing cube has {C} checkpoint(s) on dim 'checkpoint'; at least 2 are needed"
        )
    names = np.asarray(routing["checkpoint"].values)
    if len(set(names.tolist())) != len(names):
        raise ValueError(f"change: checkpoint names are not unique: {names.tolist()}")
    routing = routing.isel(checkpoint=np.argsort(checkpoint_steps(routing), kind="stable"))

    ids = routed_ids(routing, canonical_only=canonical_only)
    valid = ids >= 0
    final = ids.isel(checkpoint=-1, drop=True)
    prev = ids.shift(checkpoint=1, fill_value=FILL_ID)
    has_prev = xr.DataArray(np.arange(C) > 0, dims="checkpoint", coords={"checkpoint": ids["checkpoint"]})

    slots = valid.sum(("token", "k"))
    tokens = valid.any("k").sum("token")
    overlap_final = safe_ratio(set_intersection(ids, final).sum("token"), slots)
    overlap_prev = safe_ratio(set_intersection(ids, prev).sum("token"), slots).where(has_prev)
    pos_final = safe_ratio(((ids == final) & valid).sum(("token", "k")), slots)
    pos_prev = safe_ratio(((ids == prev) & valid).sum(("token", "k")), slots).where(has_prev)

    set_chance, pos_chance = k / E, 1.0 / E
    nan_first = "first checkpoint (no previous one); or no valid slot at this layer"
    result = xr.Dataset(
        {
            "saturation": describe(
                overlap_final, "saturation vs final checkpoint", "fraction of k",
                "mean over tokens of |S_c ∩ S_final| / k: share of the final checkpoint's expert set "
                "already selected at this checkpoint", chance=set_chance,
                nan_where="no valid slot at this layer",
            ),
            "overlap_prev": describe(
                overlap_prev, "overlap with previous checkpoint", "fraction of k",
                "mean over tokens of |S_c ∩ S_(c-1)| / k", chance=set_chance, nan_where=nan_first,
            ),
            "switch_fraction": describe(
                1.0 - overlap_prev, "switch fraction", "fraction of k",
                "1 − overlap_prev: share of selected experts that changed since the previous checkpoint",
                chance=1.0 - set_chance, nan_where=nan_first,
            ),
            "position_match_final": describe(
                pos_final, "position match vs final checkpoint", "share of slots",
                "share of slots i (rank-aware) with id_c[i] = id_final[i]", chance=pos_chance,
                nan_where="no valid slot at this layer",
            ),
            "position_match_prev": describe(
                pos_prev, "position match vs previous checkpoint", "share of slots",
                "share of slots i (rank-aware) with id_c[i] = id_(c-1)[i]", chance=pos_chance,
                nan_where=nan_first,
            ),
            "tokens": describe(tokens.astype(np.int64), "tokens compared", "tokens",
                               "tokens with at least one valid slot"),
        }
    )

    # Change metrics are only meaningful on identical inputs: the single token
    # axis guarantees the tokens, this guarantees every checkpoint wrote them.
    mismatch = (valid != valid.isel(checkpoint=-1, drop=True)).sum(("token", "k"))
    result = attach_guard(result, refuse_if(
        mismatch,
        f"change: expert_ids has slots written (id >= 0) in one checkpoint and unwritten (-1) in the final "
        f"checkpoint {ids['checkpoint'].values[-1]!s} or vice versa; identical inputs are required (capture "
        "every checkpoint completely, or select the complete ones); mismatching slots",
    ))
    out_of_range = ((ids >= E) | (ids < FILL_ID)).sum(("token", "k"))
    result = attach_guard(result, refuse_if(
        out_of_range, f"change: expert_ids has slots with ids outside -1..{E - 1} (num_experts={E})"
    ))
    return finalise(
        result, routing, name=NAME,
        definition="per (checkpoint c, layer): saturation = mean_t |S_c ∩ S_final|/k, overlap_prev = "
        "mean_t |S_c ∩ S_(c-1)|/k, switch_fraction = 1 − overlap_prev, position_match_* = share of slots "
        "with the same expert at the same rank; checkpoints ordered by step, -1 slots excluded",
        normalisation="set overlaps divided by k (Σ|S_c| when slots are missing); position match per slot",
        chance=f"saturation and overlap_prev: k/E = {set_chance:.4g}; switch_fraction: 1 − k/E = "
        f"{1 - set_chance:.4g}; position_match_*: 1/E = {pos_chance:.4g}",
        params={"canonical_only": canonical_only},
    )


_PANELS = (
    ("saturation", "saturation vs final\n|S_c ∩ S_final| / k", "set"),
    ("overlap_prev", "overlap with previous\n|S_c ∩ S_c−1| / k", "set"),
    ("position_match_final", "position match vs final\n(share of slots)", "pos"),
    ("position_match_prev", "position match vs previous\n(share of slots)", "pos"),
)


def figure(result: xr.Dataset, out_dir: Path, formats: Sequence[str] = ("png",)) -> list[Path]:
    """Curves vs training step, one line per layer, chance as a dashed line."""
    result = result.compute()
    E, k = int(result.attrs["num_experts"]), int(result.attrs["top_k"])
    chance = {"set": k / E, "pos": 1.0 / E}
    layers = result["layer"].values
    colours, mappable = plotting.series_colours(layers)
    steps = result["step"].values
    with plotting.style():
        fig, axes = plotting.new_figure(1, len(_PANELS), panel_size=(2.7, 2.4), sharex=True, sharey=True)
        for ax, (var, ylabel, kind) in zip(axes.flat, _PANELS):
            handles = []
            for li, layer in enumerate(layers):
                handles += ax.plot(steps, result[var].sel(layer=layer).values, color=colours[li], marker="o", markersize=2.5,
                        label=f"layer {layer}")
            plotting.chance_line(ax, chance[kind], label="chance " + ("k/E" if kind == "set" else "1/E"))
            ax.set_ylim(0, 1.02)
            plotting.label_axes(ax, "training step", ylabel)
        if mappable is not None:
            cbar = fig.colorbar(mappable, ax=axes.ravel().tolist(), shrink=0.85)
            cbar.set_label("layer (MoE layer index)")
        else:
            fig.legend(handles=handles, loc="outside right center", frameon=False)
        fig.suptitle("Routing change across checkpoints")
        return plotting.savefig(fig, out_dir, NAME, formats)


def table(result: xr.Dataset) -> pd.DataFrame:
    """Rows (checkpoint, layer) with every metric as a column."""
    return tidy(result, ["saturation", "overlap_prev", "switch_fraction", "position_match_final",
                         "position_match_prev", "tokens"])


def summary(result: xr.Dataset) -> dict:
    """Saturation and switch fraction per step (mean over layers), and the first step reaching 90 % saturation."""
    res = result[["saturation", "switch_fraction"]].compute()
    sat = res["saturation"].mean("layer")
    sw = res["switch_fraction"].mean("layer")
    steps = [int(s) for s in res["step"].values]
    reached = [s for s, v in zip(steps, sat.values) if np.isfinite(v) and v >= 0.9]
    E, k = int(result.attrs["num_experts"]), int(result.attrs["top_k"])
    return {
        "chance_saturation": k / E,
        "saturation_by_step": {str(s): json_number(v) for s, v in zip(steps, sat.values)},
        "switch_fraction_by_step": {str(s): json_number(v) for s, v in zip(steps, sw.values)},
        "first_step_saturation_ge_0.9": reached[0] if reached else None,
    }


ANALYSIS = register(
    Analysis(
        name=NAME,
        func=change,
        figure=figure,
        title="Routing change across checkpoints",
        caption=(
            "How routing settles during training, on the same input tokens at every checkpoint (x: training "
            "step; one line per MoE layer). Saturation: mean share of the final checkpoint's top-k expert set "
            "already selected (reaches 1 at the final checkpoint). Overlap with previous: mean share of the "
            "expert set kept since the previous checkpoint (switch fraction = 1 − overlap). Position match: "
            "rank-aware share of slots holding the same expert. Dashed lines: chance under uniform random "
            "routing, k/E for set overlaps and 1/E for position match."
        ),
        requires=("expert_ids",),
        params={"canonical_only": False},
        table=table,
        summary=summary,
    )
)
