"""Capacity-drop figure: drop rate per layer, by position bucket and by chosen expert.

Drawn from a finished ``capacity`` result (see :mod:`analyses.capacity` for its
variables and dims); registered through :func:`analyses.figures.hook`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import xarray as xr

from . import plotting
from ..capacity import CHANCE, NAME


def _band(ax, x, result, name, sel, colour):
    if f"{name}_lo" in result:
        lo, hi = (result[f"{name}_{side}"].isel(sel).values for side in ("lo", "hi"))
        ax.fill_between(x, lo, hi, color=colour, alpha=0.15, linewidth=0)


def figure(result: xr.Dataset, out_dir: Path, formats: Sequence[str] = ("png",)) -> list[Path]:
    """One PNG (and other ``formats``): three panels, layer / position bucket / expert on x."""
    result = result.compute()
    steps = result["step"].values
    C = len(steps)
    last = int(np.argsort(steps, kind="stable")[-1])
    layers = result["layer"].values
    styles = plotting.checkpoint_styles(steps)
    layer_colours, _ = plotting.ordered_colours(np.arange(len(layers)))
    with plotting.style():
        fig, axes = plotting.new_figure(1, 3, panel_size=(2.6, 2.3))
        ax = axes[0, 0]
        for c in range(C):
            ax.plot(layers, result["drop_rate"].isel(checkpoint=c).values, markersize=2,
                    label=plotting.checkpoint_label(c, C, int(steps[c])), **styles[c])
            _band(ax, layers, result, "drop_rate", {"checkpoint": c}, styles[c]["color"])
        plotting.chance_line(ax, CHANCE, label="balanced")
        if len(layers) <= 16:
            ax.set_xticks(layers)
        plotting.label_axes(ax, "MoE layer", "drop rate (share of slots)")
        ax.set_title("per layer")
        # legends below the panels: inside they would cover data or the chance label, wherever those fall
        ax.legend(frameon=False, fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncols=2)

        ax = axes[0, 1]
        mid = (result["position_start"].values + result["position_end"].values - 1) / 2
        for i, layer in enumerate(layers):
            sel = {"checkpoint": last, "layer": i}
            ax.plot(mid, result["drop_rate_by_position"].isel(sel).values, marker="o", markersize=2,
                    color=layer_colours[i], label=f"layer {layer}")
            _band(ax, mid, result, "drop_rate_by_position", sel, layer_colours[i])
        plotting.chance_line(ax, CHANCE, label="balanced")
        plotting.label_axes(ax, "token position in sample (bucket centre)", "drop rate (share of slots)")
        ax.set_title(f"by position, step {int(steps[last])}")
        if len(layers) <= 8:
            ax.legend(frameon=False, fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncols=4)

        ax = axes[0, 2]
        rate = result["drop_rate_by_expert"].isel(checkpoint=last).values  # (layer, expert)
        finite = rate[np.isfinite(rate)]
        top = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
        im = ax.imshow(np.ma.masked_invalid(rate), aspect="auto", cmap=plotting.SEQUENTIAL, vmin=0.0, vmax=top,
                       interpolation="nearest")
        ax.set_yticks(np.arange(len(layers)), [str(v) for v in layers])
        ax.grid(False)  # grid lines would cut through the cells
        plotting.label_axes(ax, "chosen expert", "MoE layer")
        ax.set_title(f"by chosen expert, step {int(steps[last])}")
        cbar = fig.colorbar(im, ax=ax, shrink=0.8)
        cbar.set_label("drop rate")
        fig.suptitle("Capacity drops (chance under balanced routing: 0)"
                     + ("; bands: bootstrap CI over samples" if "drop_rate_lo" in result else ""))
        return plotting.savefig(fig, out_dir, NAME, formats)
