"""Divergence figures: usage maps per condition and their difference, divergence per layer.

Drawn from a finished ``divergence`` result (see :mod:`analyses.divergence` for its
variables and dims); registered through :func:`analyses.figures.hook`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import xarray as xr

from . import plotting
from ..divergence import NAME, expected_jaccard


def _heat(ax, grid, norm, layers, E, title):
    im = ax.imshow(grid, aspect="auto", cmap=plotting.DIVERGING, norm=norm, interpolation="nearest")
    ax.set_title(title)
    ax.grid(False)
    ax.set_yticks(np.arange(len(layers)))
    ax.set_yticklabels([str(x) for x in layers])
    if E <= 16:
        ax.set_xticks(np.arange(E))
    return im


def figure(result: xr.Dataset, out_dir: Path, formats: Sequence[str] = ("png",)) -> list[Path]:
    """Usage maps (A, B, A − B, thresholded) per checkpoint, and the per-layer divergence curves."""
    result = result.compute()
    a, b = result.attrs["condition_a"], result.attrs["condition_b"]
    E, L = result.sizes["expert"], result.sizes["layer"]
    layers = [int(x) for x in result["layer"].values]
    views = [str(v) for v in result["view"].values]
    chance = 1.0 / E
    umax = max(float(np.nanmax(result["usage"].values)) if np.isfinite(result["usage"].values).any() else 0.0,
               2 * chance)
    unorm = plotting.mcolors.TwoSlopeNorm(vcenter=chance, vmin=0.0, vmax=umax)
    dmax = float(np.nanmax(np.abs(result["usage_diff"].values))) if np.isfinite(result["usage_diff"].values).any() else 0
    dnorm = plotting.mcolors.TwoSlopeNorm(vcenter=0.0, vmin=-max(dmax, 1e-6), vmax=max(dmax, 1e-6))
    panel = (max(2.4, 0.14 * E + 1.0), max(2.2, 0.16 * L + 0.9))
    la, lb = plotting.display_label(a), plotting.display_label(b)
    paths = []
    for ci, ckpt in enumerate(result["checkpoint"].values):
        step = int(result["step"].values[ci])
        with plotting.style():
            fig, axes = plotting.new_figure(len(views), 4, panel_size=panel, sharex=True, sharey=True)
            for r, view in enumerate(views):
                sel = result.sel(checkpoint=ckpt, view=view)
                # short panel titles: four panels share a 7 in row; the view names the row (y label)
                grids = [
                    (sel["usage"].sel(condition=a), unorm, f"usage {la}"),
                    (sel["usage"].sel(condition=b), unorm, f"usage {lb}"),
                    (sel["usage_diff"], dnorm, f"{la} − {lb}"),
                    (sel["usage_diff_thresholded"], dnorm, f"|Δ| ≥ {float(sel['threshold']):.3g}"),
                ]
                for c, (g, norm, title) in enumerate(grids):
                    _heat(axes[r, c], g.transpose("layer", "expert").values, norm, layers, E, title)
                axes[r, 0].set_ylabel(f"{view}\nMoE layer")
            for c in range(4):
                axes[-1, c].set_xlabel("expert (index)")
            # one horizontal colour bar under each pair of columns: the label below its ticks, never over them
            for cols, norm, label in (((0, 1), unorm, "usage (share of slots); line = chance"),
                                      ((2, 3), dnorm, f"usage {la} − {lb}")):
                cb = fig.colorbar(plotting.ScalarMappable(norm=norm, cmap=plotting.DIVERGING),
                                  ax=[axes[-1, c] for c in cols], location="bottom", shrink=0.9, aspect=30)
                cb.set_label(label)
                if cols == (0, 1):
                    cb.ax.axvline(chance, color="k", linewidth=0.8)
            fig.suptitle(f"Expert usage by condition — checkpoint {ckpt} (step {step})\n"
                         f"white = chance 1/E = {chance:.3g} (usage) or 0 (difference)")
            paths += plotting.savefig(fig, out_dir, f"{NAME}_maps_{ci:03d}_{ckpt}", formats)

    ej = expected_jaccard(E, int(result.attrs.get("top_k", 1)))
    k = int(result.attrs.get("top_k", 1))
    metrics = [("total_variation", "total variation\n(share of slots)", None),
               ("jaccard", "Jaccard |S_A∩S_B| / |S_A∪S_B|", ej),
               ("jaccard_corrected", "chance-corrected Jaccard", 0.0),
               ("intersection", "shared experts |S_A∩S_B| / k", k / E)]
    colours, mappable = plotting.ordered_colours(result["step"].values)
    with plotting.style():
        # one row per metric, one column per view: y labels stay readable at the report's width
        fig, axes = plotting.new_figure(len(metrics), len(views), panel_size=(3.4, 1.9), sharex=True)
        for c, view in enumerate(views):
            for r, (name, label, ch) in enumerate(metrics):
                ax = axes[r, c]
                for ci, ckpt in enumerate(result["checkpoint"].values):
                    y = result[name].sel(checkpoint=ckpt, view=view).values
                    ax.plot(layers, y, marker="o", ms=2.5, color=colours[ci])
                    if ci == result.sizes["checkpoint"] - 1 and f"{name}_lo" in result:
                        ax.fill_between(layers, result[f"{name}_lo"].sel(checkpoint=ckpt, view=view).values,
                                        result[f"{name}_hi"].sel(checkpoint=ckpt, view=view).values,
                                        color=colours[ci], alpha=0.2, linewidth=0)
                if ch is not None:
                    plotting.chance_line(ax, ch)
                if r == 0:
                    ax.set_title(f"view: {view}")
                plotting.label_axes(ax, "layer (MoE layer index)" if r == len(metrics) - 1 else "",
                                    label if c == 0 else "")
                ax.set_xticks(layers)
        cb = fig.colorbar(mappable, ax=axes.ravel().tolist(), shrink=0.6)
        cb.set_label("checkpoint (training step)")
        fig.suptitle(f"Routing divergence {la} vs {lb} on aligned tokens\n(band: 95 % CI over pairs, last checkpoint)")
        paths += plotting.savefig(fig, out_dir, f"{NAME}_curves", formats)
    return paths
