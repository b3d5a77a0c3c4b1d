"""Co-activation: which experts are selected together for the same token.

C[c, l, a, b] = count(a ∈ S and b ∈ S) / count(a ∈ S) over the tokens of
checkpoint c, layer l, counting **every** pair of S (not only adjacent ranks).
Under uniform random routing of k-subsets, C[a, b] = (k − 1)/(E − 1) for a ≠ b.
Row a of C sums to k − 1 (every token holding a holds k − 1 other experts), so
π[a, ·] = C[a, ·]/(k − 1) is a's *partner distribution*; its total variation
distance from uniform over the E − 1 other experts, averaged over experts with
weight count(a), is the one-number summary ``partner_tv`` (0 when partners
are chosen at random).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from storage.schema import FILL_ID

from . import plotting
from .temporal import checkpoint_label, checkpoint_styles
from .bootstrap import add_interval, bootstrap_weights, interval, per_sample_sums, resample
from .registry import (
    Analysis,
    attach_guard,
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

NAME = "coactivation"


def coactivation_chance(num_experts: int, top_k: int) -> float:
    """C[a, b] (a ≠ b) under uniform random k-subsets: (k − 1)/(E − 1)."""
    return (top_k - 1) / (num_experts - 1)


def _off_diagonal(E: int) -> xr.DataArray:
    return xr.DataArray(~np.eye(E, dtype=bool), dims=("expert", "expert_b"))


def partner_tv(both: xr.DataArray, active: xr.DataArray) -> xr.DataArray:
    """Count-weighted mean over experts a of TV(π[a, ·], uniform over the other E − 1 experts).

    Parameters
    ----------
    both : (..., expert, expert_b) pair counts, diagonal ignored.
    active : (..., expert) tokens holding each expert (the weights).

    Returns
    -------
    (...) in [0, 1 − 1/(E − 1)]; NaN where no expert has a partner.
    """
    E = both.sizes["expert"]
    both = both.where(_off_diagonal(E), 0).astype(np.float64)
    row = both.sum("expert_b")
    pi = both / row.where(row > 0)
    tv = 0.5 * abs(pi - 1.0 / (E - 1)).where(_off_diagonal(E), 0.0).sum("expert_b", skipna=False)
    w = active.astype(np.float64).where(row > 0, 0.0)
    return safe_ratio((tv.fillna(0.0) * w).sum("expert"), w.sum("expert"))


def coactivation(
    routing: xr.Dataset, *, canonical_only: bool = False, n_boot: int = 200, ci: float = 0.95, seed: int = 0
) -> xr.Dataset:
    """Co-activation matrix per (checkpoint, layer) and its departure from random partners.

    Parameters
    ----------
    routing : routing cube; uses ``expert_ids`` (checkpoint, layer, token, k)
        and the ``sample`` coordinate (bootstrap units).
    canonical_only : count only tokens whose ``canonical`` flag is set.
    n_boot, ci, seed : bootstrap over samples; ``n_boot=0`` leaves the intervals out.

    Returns
    -------
    xr.Dataset
        coactivation (checkpoint, layer, expert, expert_b) [+ _lo/_hi]:
            count(a, b ∈ S) / count(a ∈ S); NaN on the diagonal
        coactivation_ratio (same dims): coactivation / ((k − 1)/(E − 1))
        pair_count (same dims) int64: tokens holding both a and b (diagonal:
            tokens holding a)
        active_count (checkpoint, layer, expert) int64: tokens holding a
        partner_tv (checkpoint, layer) [+ _lo/_hi]: weighted mean TV of the
            partner distributions from uniform

    Raises
    ------
    ValueError
        top_k < 2 (no pairs), or (at compute time for lazy input) ids outside -1..E-1.
    """
    E, k = cube_sizes(routing)
    if k < 2:
        raise ValueError(f"coactivation: the routing cube has top_k={k}; co-activation needs top_k >= 2")
    if n_boot < 0:
        raise ValueError(f"coactivation: n_boot={n_boot}; expected >= 0")
    ids = routed_ids(routing, canonical_only=canonical_only)
    a = ids
    b = ids.rename(k="k_b")
    slot_a = xr.DataArray(np.arange(k), dims="k")
    slot_b = xr.DataArray(np.arange(k), dims="k_b")
    # every ordered pair of distinct slots of one token: ids within a token are distinct
    pair = (a >= 0) & (b >= 0) & (slot_a != slot_b)
    codes_a = a.where(pair, FILL_ID).transpose("checkpoint", "layer", "token", "k", "k_b")
    codes_b = b.where(pair, FILL_ID).transpose("checkpoint", "layer", "token", "k", "k_b")
    both_s = per_sample_sums(
        xr.ones_like(codes_a, dtype=np.int32), routing, dim=("token", "k", "k_b"),
        by={"expert": (codes_a, E), "expert_b": (codes_b, E)},
    )  # (checkpoint, layer, sample, expert, expert_b)
    active_s = per_sample_sums(
        xr.ones_like(ids, dtype=np.int32), routing, dim=("token", "k"), by={"expert": (ids, E)}
    )  # (checkpoint, layer, sample, expert)
    both_s = both_s.assign_coords(expert_b=both_s["expert"].values)
    both = both_s.sum("sample").astype(np.int64)
    active = active_s.sum("sample").astype(np.int64)
    eye = xr.DataArray(np.eye(E, dtype=bool), dims=("expert", "expert_b"))
    pair_count = xr.where(eye, active, both).transpose("checkpoint", "layer", "expert", "expert_b")

    chance = coactivation_chance(E, k)
    off = _off_diagonal(E)
    coact = safe_ratio(both, active).where(off).transpose("checkpoint", "layer", "expert", "expert_b")
    nan_coact = "diagonal (a = b), or expert a never selected at this checkpoint and layer"
    out = {
        "coactivation": describe(
            coact, "co-activation", "share of a's tokens",
            "count(a ∈ S and b ∈ S) / count(a ∈ S): share of the tokens routed to expert a (row) that are "
            "also routed to expert b (column), over all pairs of the token's top-k set",
            chance=chance, nan_where=nan_coact,
        ),
        "coactivation_ratio": describe(
            coact / chance, "co-activation ratio to chance", "ratio",
            "coactivation / ((k − 1)/(E − 1)); 1 = as often as under random routing", chance=1.0,
            nan_where=nan_coact,
        ),
        "pair_count": describe(
            pair_count, "tokens holding both experts", "tokens",
            "number of tokens whose top-k set holds both expert and expert_b (diagonal: tokens holding expert)",
        ),
        "active_count": describe(
            active.transpose("checkpoint", "layer", "expert"), "tokens holding the expert", "tokens",
            "number of tokens whose top-k set holds the expert",
        ),
        "partner_tv": describe(
            partner_tv(both, active), "partner non-randomness (TV)", "total variation distance",
            "mean over experts a, weighted by count(a ∈ S), of ½ Σ_(b≠a) |C[a,b]/Σ_b' C[a,b'] − 1/(E−1)|: "
            "how far "
            "a's partners are from a uniform choice among the other experts (0 = random partners)",
            chance=0.0, nan_where="no token with two written slots at this checkpoint and layer",
        ),
    }
    if n_boot > 0:
        weights = bootstrap_weights(both_s.sizes["sample"], n_boot, seed)
        both_r = resample(both_s, weights)
        active_r = resample(active_s, weights)
        scheme = "resampling samples (not tokens)"
        # the diagonal is undefined in every replicate: keep it out of the quantiles, mask it after
        lo, hi = interval(safe_ratio(both_r, active_r).where(off, 0.0), ci)
        lo, hi = lo.where(off), hi.where(off)
        add_interval(out, "coactivation", lo, hi, ci=ci, n_boot=n_boot, scheme=scheme)
        lo, hi = interval(partner_tv(both_r, active_r), ci)
        add_interval(out, "partner_tv", lo, hi, ci=ci, n_boot=n_boot, scheme=scheme)
    result = xr.Dataset(out)

    bad = ((ids >= E) | (ids < FILL_ID)).sum(("token", "k"))
    result = attach_guard(result, refuse_if(
        bad, f"coactivation: expert_ids has slots with ids outside -1..{E - 1} (num_experts={E})"
    ))
    return finalise(
        result, routing, name=NAME,
        definition="C[c,l,a,b] = count(a ∈ S_t and b ∈ S_t) / count(a ∈ S_t) over tokens t, all pairs of the "
        "top-k set S (not only adjacent ranks); partner_tv = count-weighted mean over a of the total variation "
        "distance between a's partner distribution C[a,·]/Σ_b C[a,b] and uniform over the other E−1 experts. "
        "Ids of -1 (unwritten) are excluded.",
        normalisation="row-normalised by the tokens holding expert a; rows sum to k−1 (off-diagonal)",
        chance=f"coactivation: (k−1)/(E−1) = {chance:.4g}; coactivation_ratio: 1; partner_tv: 0 (plus a small "
        "finite-sample bias)",
        params={"canonical_only": canonical_only, "n_boot": n_boot, "ci": ci, "seed": seed},
    )


# ----------------------------------------------------------------------------- figure


def cluster_order(coact: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Leaf order and linkage of average-linkage clustering on 1 − symmetric co-activation.

    ``coact`` is one (E, E) co-activation matrix (diagonal ignored, NaN rows
    treated as never co-active). Returns ``(order, Z)``; Z is None for E < 3.
    """
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    E = coact.shape[0]
    if E < 3:
        return np.arange(E), None
    c = np.nan_to_num(np.asarray(coact, dtype=float), nan=0.0)
    sym = (c + c.T) / 2.0
    dist = np.clip(1.0 - sym, 0.0, None)
    np.fill_diagonal(dist, 0.0)
    Z = linkage(squareform(dist, checks=False), method="average")
    return leaves_list(Z), Z


def figure(result: xr.Dataset, out_dir: Path, formats: Sequence[str] = ("png",)) -> list[Path]:
    """Per layer: dendrogram, co-activation at the final and at the earliest checkpoint (same order)."""
    from scipy.cluster.hierarchy import dendrogram

    result = result.compute()
    E, k = int(result.attrs["num_experts"]), int(result.attrs["top_k"])
    chance = coactivation_chance(E, k)
    layers = result["layer"].values
    ckpts = result["checkpoint"].values
    steps = result["step"].values
    show = [len(ckpts) - 1, 0] if len(ckpts) > 1 else [0]
    coact = result["coactivation"]
    finite = coact.values[np.isfinite(coact.values)]
    vmax = max(float(finite.max()) if finite.size else 0.0, 2 * chance, 1e-6)
    norm = plotting.mcolors.TwoSlopeNorm(vcenter=chance, vmin=0.0, vmax=vmax) if chance > 0 else None
    side = min(max(1.9, 0.17 * E + 0.8), 4.0)
    cmap = plotting.plt.get_cmap(plotting.DIVERGING).with_extremes(bad="0.6")  # grey diagonal, not "chance" white
    paths = []
    per_page = 4  # layers per figure: deep models get several pages, not one endless image
    pages = [layers[i:i + per_page] for i in range(0, len(layers), per_page)]
    for pi, page in enumerate(pages):
        with plotting.style():
            fig = plotting.plt.figure(figsize=(0.8 + side * (0.45 + len(show)), side * len(page) + 0.6),
                                      layout="constrained")
            grid = fig.add_gridspec(len(page), 1 + len(show), width_ratios=[0.45] + [1.0] * len(show))
            im = None
            for li, layer in enumerate(page):
                final = coact.sel(checkpoint=ckpts[-1], layer=layer).values
                order, Z = cluster_order(final)
                dax = fig.add_subplot(grid[li, 0])
                if Z is not None:
                    dendrogram(Z, orientation="left", ax=dax, no_labels=True, color_threshold=0,
                               above_threshold_color="0.3", link_color_func=lambda _: "0.3")
                    dax.set_ylim(0, 10 * E)
                dax.set_axis_off()
                dax.set_title(f"layer {layer}\n1 − sym. C", fontsize=7)
                for j, ci in enumerate(show):
                    ax = fig.add_subplot(grid[li, 1 + j])
                    m = coact.sel(checkpoint=ckpts[ci], layer=layer).values[np.ix_(order, order)]
                    im = ax.imshow(m, origin="lower", extent=(0, E, 0, E), cmap=cmap, norm=norm,
                                   interpolation="nearest", aspect="auto")  # auto: rows line up with the dendrogram
                    ax.grid(False)
                    which = "final" if ci == len(ckpts) - 1 else "earliest"
                    ax.set_title(f"layer {layer} · {which} (step {steps[ci]})")
                    if E <= 24:
                        ticks = np.arange(E) + 0.5
                        ax.set_xticks(ticks)
                        ax.set_xticklabels([str(e) for e in order], fontsize=5)
                        ax.set_yticks(ticks)
                        ax.set_yticklabels([str(e) for e in order], fontsize=5)
                    plotting.label_axes(ax, "expert b (clustered order)", "expert a")
            cbar = fig.colorbar(im, ax=fig.axes, shrink=0.6)
            cbar.set_label("C[a,b] = P(b ∈ S | a ∈ S)")
            cbar.ax.axhline(chance, color="k", linewidth=0.8)
            fig.suptitle(f"Expert co-activation, final vs earliest\nwhite = chance (k−1)/(E−1) = {chance:.3g}; "
                         "grey = diagonal\norder: clustering of the final checkpoint", fontsize=8)
            stem = f"{NAME}_heatmaps" if len(pages) == 1 else f"{NAME}_heatmaps_{pi:02d}"
            paths += plotting.savefig(fig, out_dir, stem, formats)

    styles = checkpoint_styles(steps)
    with plotting.style():
        fig, axes = plotting.new_figure(1, 1, panel_size=(3.6, 2.6))
        ax = axes[0, 0]
        for i, ckpt in enumerate(ckpts):
            sel = {"checkpoint": ckpt}
            if "partner_tv_lo" in result:
                ax.fill_between(layers, result["partner_tv_lo"].sel(sel).values,
                                result["partner_tv_hi"].sel(sel).values, color=styles[i]["color"], alpha=0.18,
                                linewidth=0)
            ax.plot(layers, result["partner_tv"].sel(sel).values, markersize=3,
                    label=checkpoint_label(i, len(ckpts), steps[i]), **styles[i])
        plotting.chance_line(ax, 0.0, label="random partners")
        ax.set_xticks(layers)
        plotting.label_axes(ax, "layer (MoE layer index)", "partner TV from uniform")
        ax.legend(frameon=False, fontsize=6)
        ax.set_title("How non-random co-selection is\n(bands: 95 % CI over samples; grey dashed = earliest)")
        paths += plotting.savefig(fig, out_dir, f"{NAME}_partner_tv", formats)
    return paths


def table(result: xr.Dataset) -> pd.DataFrame:
    """Rows (checkpoint, layer, expert, expert_b) with C, its CI and ratio; partner_tv repeated per layer."""
    df = tidy(result, ["coactivation", "coactivation_lo", "coactivation_hi", "coactivation_ratio", "pair_count"])
    tv = tidy(result, ["partner_tv", "partner_tv_lo", "partner_tv_hi"]).drop(columns=["step"], errors="ignore")
    return df.merge(tv, on=["checkpoint", "layer"], how="left")


def summary(result: xr.Dataset) -> dict:
    """partner_tv (mean over layers) at the earliest and final checkpoint, and the final's most over-chance pairs."""
    res = result[["partner_tv", "coactivation_ratio"]].compute()
    E, k = int(result.attrs["num_experts"]), int(result.attrs["top_k"])

    def at(i):
        return {
            "checkpoint": str(res["checkpoint"].values[i]),
            "step": int(res["step"].values[i]),
            "partner_tv": json_number(res["partner_tv"].isel(checkpoint=i).mean("layer")),
            "max_coactivation_ratio": json_number(res["coactivation_ratio"].isel(checkpoint=i).max()),
        }

    ratio = res["coactivation_ratio"].isel(checkpoint=-1).to_series().dropna().sort_values(ascending=False)
    top = [{"layer": int(lay), "expert": int(a), "expert_b": int(b), "ratio": json_number(v)}
           for (lay, a, b), v in ratio.head(5).items()]
    return {"chance": coactivation_chance(E, k), "earliest": at(0), "final": at(-1), "top_pairs_final": top}


ANALYSIS = register(
    Analysis(
        name=NAME,
        func=coactivation,
        figure=figure,
        title="Expert co-activation",
        caption=(
            "C[a,b]: of the tokens routed to expert a (row), the share also routed to expert b (column), over all "
            "pairs of each token's top-k set. One row of heatmaps per MoE layer: the final checkpoint beside the "
            "earliest one, experts in the same order (average-linkage clustering of 1 − symmetric co-activation "
            "at the final checkpoint; dendrogram on the left). The diverging scale is centred on the chance "
            "level (k−1)/(E−1) under uniform random routing (white); red pairs are chosen together more often "
            "than chance. Second figure: partner TV, the count-weighted mean total-variation distance of each "
            "expert's partner distribution from uniform (0 = random partners), per layer and checkpoint, with "
            "95 % bootstrap CIs over samples."
        ),
        requires=("expert_ids",),
        params={"canonical_only": False, "n_boot": 200, "ci": 0.95, "seed": 0},
        table=table,
        summary=summary,
    )
)
