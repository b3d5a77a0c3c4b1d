"""Change figures: similarity to the final and previous checkpoint vs training step.

Drawn from a finished ``change`` result (see :mod:`analyses.change` for its
variables and dims); registered through :func:`analyses.figures.hook`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import xarray as xr

from . import plotting
from ..change import NAME, _PANELS


def figure(result: xr.Dataset, out_dir: Path, formats: Sequence[str] = ("png",)) -> list[Path]:
    """Curves vs training step, one line per layer with bootstrap bands, chance as a dashed line."""
    result = result.compute()
    E, k = int(result.attrs["num_experts"]), int(result.attrs["top_k"])
    chance = {"set": (k / E, "chance k/E"), "pos": (1.0 / E, "chance 1/E"), "drift": (1.0, "uniform")}
    layers = result["layer"].values
    colours, mappable = plotting.series_colours(layers)
    steps = result["step"].values
    panels = [p for p in _PANELS if p[0] in result]
    with plotting.style():
        fig, axes = plotting.new_figure(2, 3, panel_size=(2.7, 2.4), sharex=True)
        handles = []
        for ax, (var, ylabel, kind) in zip(axes.T.flat, panels):  # column-wise: final above previous
            handles = []
            for li, layer in enumerate(layers):
                handles += ax.plot(steps, result[var].sel(layer=layer).values, color=colours[li], marker="o",
                                   markersize=2.5, label=f"layer {layer}")
                if f"{var}_lo" in result:
                    ax.fill_between(steps, result[f"{var}_lo"].sel(layer=layer).values,
                                    result[f"{var}_hi"].sel(layer=layer).values, color=colours[li], alpha=0.15,
                                    linewidth=0)
            plotting.chance_line(ax, chance[kind][0], label=chance[kind][1])
            if kind == "drift":
                # cosines of usage vectors sit close to 1: zoom in rather than flatten them
                lows = [result[v].min() for v in (var, f"{var}_lo") if v in result]
                low = float(np.nanmin([float(x) for x in lows])) if lows else 0.0
                ax.set_ylim(min(max(low - 0.02, 0.0), 0.95) if np.isfinite(low) else 0.0, 1.005)
            else:
                ax.set_ylim(0, 1.05)
            plotting.label_axes(ax, "training step", ylabel)
        plotting.hide_unused(axes.T.reshape(1, -1), len(panels))
        if mappable is not None:
            cbar = fig.colorbar(mappable, ax=axes.ravel().tolist(), shrink=0.85)
            cbar.set_label("layer (MoE layer index)")
        else:
            fig.legend(handles=handles, loc="outside right center", frameon=False)
        fig.suptitle("Routing change across checkpoints" + ("; bands: bootstrap CI over samples"
                                                            if "saturation_lo" in result else ""))
        return plotting.savefig(fig, out_dir, NAME, formats)
