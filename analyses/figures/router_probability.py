"""Router-probability figure: mean router probability (x) against usage share (y) per layer × expert.

Drawn from a finished ``router_probability`` result (see :mod:`analyses.router_probability`);
registered through :func:`analyses.figures.hook`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import xarray as xr

from . import plotting
from ..router_probability import NAME


def figure(result: xr.Dataset, out_dir: Path, formats: Sequence[str] = ("png",)) -> list[Path]:
    """One PNG (and other ``formats``): a scatter at the final checkpoint, one colour per layer."""
    result = result.compute()
    steps = result["step"].values
    last = int(np.argsort(steps, kind="stable")[-1])
    layers = result["layer"].values
    E = result.sizes["expert"]
    colours, _ = plotting.ordered_colours(np.arange(len(layers)))
    with plotting.style():
        fig, axes = plotting.new_figure(1, 1, panel_size=(3.2, 2.8))
        ax = axes[0, 0]
        prob = result["mean_probability"].isel(checkpoint=last).values  # (layer, expert)
        usage = result["usage"].isel(checkpoint=last).values
        for i, layer in enumerate(layers):
            ax.scatter(prob[i], usage[i], s=10, color=colours[i], label=f"layer {layer}")
        finite = np.concatenate([prob[np.isfinite(prob)], usage[np.isfinite(usage)], [1.0 / E]])
        top = float(finite.max()) * 1.05
        ax.plot([0, top], [0, top], color="0.5", linewidth=0.8, linestyle="--")
        ax.axvline(1.0 / E, color="0.6", linewidth=0.8, linestyle=":")
        plotting.chance_line(ax, 1.0 / E, label="1/E")
        ax.set_xlim(0, top)
        ax.set_ylim(0, top)
        plotting.label_axes(ax, "mean router probability", "usage (share of slots)")
        ax.set_title(f"step {int(steps[last])}")
        if len(layers) <= 8:
            ax.legend(frameon=False, fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncols=4)
        return plotting.savefig(fig, out_dir, NAME, formats)
