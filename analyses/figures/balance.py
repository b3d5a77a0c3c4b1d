"""Balance figures: CV, balance, LB loss, dead/cold experts vs training step.

Drawn from a finished ``balance`` result (see :mod:`analyses.balance` for its
variables and dims); registered through :func:`analyses.figures.hook`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import xarray as xr

from . import plotting
from ..balance import NAME, _param, _steps_order


def figure(result: xr.Dataset, out_dir: Path, formats: Sequence[str] = ("png",)) -> list[Path]:
    """CV, balance, LB loss and dead/cold counts vs training step, one line per layer, CI bands."""
    result = result.compute()
    result = result.isel(checkpoint=_steps_order(result))
    steps = result["step"].values
    layers = result["layer"].values
    colours, mappable = plotting.series_colours(layers)
    panels = [("cv", "CV of usage over experts"), ("balance", "balance 1 / (1 + CV)")]
    if "lb_loss" in result:
        panels.append(("lb_loss", "Switch LB loss E·Σ f·P"))
    panels.append(("cold_count", "experts below threshold"))
    with plotting.style():
        # a 2 × 2 grid (not four panels squeezed into one row of the report)
        nrows, ncols = plotting.panel_grid(len(panels), max_cols=2)
        fig, axes = plotting.new_figure(nrows, ncols, panel_size=(3.0, 2.2), sharex=True)
        handles = []
        for ax, (var, ylabel) in zip(axes.flat, panels):
            for li, layer in enumerate(layers):
                if var == "cold_count":
                    ax.plot(steps, result["cold_count"].sel(layer=layer).values, color=colours[li], marker="o",
                            markersize=2.5)
                    ax.plot(steps, result["dead_count"].sel(layer=layer).values, color=colours[li], marker="x",
                            markersize=3, linestyle=":")
                    continue
                line = ax.plot(steps, result[var].sel(layer=layer).values, color=colours[li], marker="o",
                               markersize=2.5, label=f"layer {layer}")
                if var == "cv":
                    handles += line
                if f"{var}_lo" in result:
                    ax.fill_between(steps, result[f"{var}_lo"].sel(layer=layer).values,
                                    result[f"{var}_hi"].sel(layer=layer).values, color=colours[li], alpha=0.15,
                                    linewidth=0)
            if var == "cv":
                ax.plot(steps, result["cv_chance"].mean("layer").values, **plotting.CHANCE_STYLE)
                # the key in the panel title: a note inside the axes would sit on the curves
                ax.set_title("dashed: uniform random routing", fontsize=7, color=plotting.CHANCE_STYLE["color"])
                ax.set_ylim(bottom=0)
            elif var == "balance":
                plotting.chance_line(ax, 1.0, label="perfect")
                ax.set_ylim(0, 1.05)
            elif var == "lb_loss":
                plotting.chance_line(ax, 1.0, label="perfect")
                ax.set_ylim(bottom=0)
            else:
                ax.set_ylim(-0.2, result.sizes["expert"] + 0.2)
                ax.set_title("solid: cold (< {:g} % of 1/E); dotted: dead (< {:g} %)".format(
                    *[100 * _param(result, key) for key in ("cold_fraction", "dead_fraction")]), fontsize=7)
            plotting.label_axes(ax, "training step", ylabel)
        plotting.outer_labels(axes, len(panels), "training step", "")
        for ax, (_, ylabel) in zip(axes.flat, panels):
            ax.set_ylabel(ylabel)  # each panel has its own quantity
        plotting.hide_unused(axes, len(panels))
        if mappable is not None:
            cbar = fig.colorbar(mappable, ax=axes.ravel().tolist(), shrink=0.85)
            cbar.set_label("layer (MoE layer index)")
        else:
            fig.legend(handles=handles, loc="outside right center", frameon=False)
        fig.suptitle("Load balance across checkpoints" + ("; bands: bootstrap CI over samples" if "cv_lo" in result
                                                          else ""))
        return plotting.savefig(fig, out_dir, NAME, formats)
