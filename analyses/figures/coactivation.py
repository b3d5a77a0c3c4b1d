"""Co-activation figures: clustered heatmaps per layer and partner TV vs layer.

Drawn from a finished ``coactivation`` result (see :mod:`analyses.coactivation` for its
variables and dims); registered through :func:`analyses.figures.hook`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import xarray as xr

from . import plotting
from .plotting import checkpoint_label, checkpoint_styles
from ..coactivation import NAME, cluster_order, coactivation_chance


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
            fig = plotting.plt.figure(
                figsize=plotting.report_size(0.8 + side * (0.45 + len(show)), side * len(page) + 0.6),
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
        fig, axes = plotting.new_figure(1, 1, panel_size=(7.2, 2.6))
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
        # the key beside the panel, not over a curve or the chance label
        ax.legend(frameon=False, fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        ax.set_title("How non-random co-selection is (bands: 95 % CI over samples)")
        paths += plotting.savefig(fig, out_dir, f"{NAME}_partner_tv", formats)
    return paths
