"""Temporal figures: repeat rates, transition heatmaps, autocorrelation vs lag.

Drawn from a finished ``temporal`` result (see :mod:`analyses.temporal` for its
variables and dims); registered through :func:`analyses.figures.hook`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import xarray as xr

from . import plotting
from .plotting import checkpoint_label, checkpoint_styles
from ..temporal import NAME, set_repeat_chance


def _band(ax, x, result, name, sel, style):
    lo, hi = f"{name}_lo", f"{name}_hi"
    if lo in result and hi in result:
        ax.fill_between(x, result[lo].sel(sel).values, result[hi].sel(sel).values, color=style["color"],
                        alpha=0.18, linewidth=0)


def figure(result: xr.Dataset, out_dir: Path, formats: Sequence[str] = ("png",)) -> list[Path]:
    """Repeat rates vs layer, transition heatmaps (earliest and final), autocorrelation vs lag."""
    result = result.compute()
    return [*_repeat_figure(result, out_dir, formats), *_transition_figure(result, out_dir, formats),
            *_autocorrelation_figure(result, out_dir, formats)]


def _repeat_figure(result: xr.Dataset, out_dir: Path, formats: Sequence[str]) -> list[Path]:
    """Top-1 and set repeat rates vs layer, one line per checkpoint."""
    E, k = int(result.attrs["num_experts"]), int(result.attrs["top_k"])
    layers, ckpts, steps = (result[name].values for name in ("layer", "checkpoint", "step"))
    styles = checkpoint_styles(steps)
    with plotting.style():
        fig, axes = plotting.new_figure(1, 2, panel_size=(3.4, 2.7), sharex=True)
        for ax, (var, ylabel, chance, clabel) in zip(axes.flat, (
            ("top1_repeat", "top-1 repeat P(top1_t = top1_t+1)", 1.0 / E, "chance 1/E"),
            ("set_repeat", "set repeat P(S_t ∩ S_t+1 ≠ ∅)", set_repeat_chance(E, k), "chance"),
        )):
            for ci, ckpt in enumerate(ckpts):
                st = styles[ci]
                sel = {"checkpoint": ckpt}
                _band(ax, layers, result, var, sel, st)
                ax.plot(layers, result[var].sel(sel).values, markersize=3,
                        label=checkpoint_label(ci, len(ckpts), steps[ci]), **st)
            if var == "top1_repeat":
                ax.plot(layers, result["top1_repeat_independent"].isel(checkpoint=-1).values, color="k",
                        linestyle=":", linewidth=1, label="if independent (final)")
            plotting.chance_line(ax, chance, label=clabel)
            ax.set_ylim(0, 1.02)
            ax.set_xticks(layers)
            plotting.label_axes(ax, "layer (MoE layer index)", ylabel)
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 3), frameon=False)
        fig.suptitle("Routing repeats between adjacent tokens of one sample\n(bands: 95 % bootstrap CI over "
                     "samples; grey dashed = earliest checkpoint, black = final)")
        return plotting.savefig(fig, out_dir, f"{NAME}_repeat", formats)


def _transition_figure(result: xr.Dataset, out_dir: Path, formats: Sequence[str]) -> list[Path]:
    """Top-1 transition heatmaps: earliest and final checkpoint, one panel per layer."""
    E = int(result.attrs["num_experts"])
    layers, ckpts, steps = (result[name].values for name in ("layer", "checkpoint", "step"))
    show = [0, len(ckpts) - 1] if len(ckpts) > 1 else [0]
    L = len(layers)
    rows_per, ncols = plotting.panel_grid(L)  # three heatmaps a row keep their tick labels readable
    trans = result["transition"]
    vmax = max(float(np.nanmax(trans.values)) if np.isfinite(trans.values).any() else 0.0, 2.0 / E)
    norm = plotting.mcolors.TwoSlopeNorm(vcenter=1.0 / E, vmin=0.0, vmax=vmax)
    cmap = plotting.plt.get_cmap(plotting.DIVERGING).with_extremes(bad="0.6")  # empty rows grey, not "chance"
    with plotting.style():
        side = min(max(1.8, 0.16 * E + 0.8), 3.2)
        fig, axes = plotting.new_figure(rows_per * len(show), ncols, panel_size=(side, side))
        im = None
        for r, ci in enumerate(show):
            for li, layer in enumerate(layers):
                ax = axes[r * rows_per + li // ncols, li % ncols]
                grid = trans.sel(checkpoint=ckpts[ci], layer=layer).values
                im = ax.imshow(grid, cmap=cmap, norm=norm, interpolation="nearest")
                ax.grid(False)
                ax.set_title(f"step {steps[ci]} · layer {layer}")
                if E <= 16:
                    ax.set_xticks(np.arange(E))
                    ax.set_yticks(np.arange(E))
                # x label under the last row of layers of each checkpoint, y label on the first column
                last_row = li // ncols == rows_per - 1 or li + ncols >= L
                plotting.label_axes(ax, "top-1 at t+1" if last_row else "", "top-1 at t" if li % ncols == 0 else "")
            for j in range(L, rows_per * ncols):
                axes[r * rows_per + j // ncols, j % ncols].set_visible(False)
        cbar = fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8)
        cbar.set_label("P(top1_t+1 = column | top1_t = row)")
        cbar.ax.axhline(1.0 / E, color="k", linewidth=0.8)
        fig.suptitle(f"Top-1 transitions, earliest (top) and final checkpoint\n(white = chance 1/E = {1 / E:.3g}; "
                     "grey = expert never top-1)")
        return plotting.savefig(fig, out_dir, f"{NAME}_transition", formats)


def _autocorrelation_figure(result: xr.Dataset, out_dir: Path, formats: Sequence[str]) -> list[Path]:
    """Mean autocorrelation vs lag, one panel per layer, one line per checkpoint."""
    layers, ckpts, steps = (result[name].values for name in ("layer", "checkpoint", "step"))
    styles = checkpoint_styles(steps)
    L = len(layers)
    rows_per, ncols = plotting.panel_grid(L)
    lags = result["lag"].values
    with plotting.style():
        fig, axes = plotting.new_figure(rows_per, ncols, panel_size=(2.5, 2.1), sharex=True, sharey=True)
        for li, layer in enumerate(layers):
            ax = axes.flat[li]
            for ci, ckpt in enumerate(ckpts):
                st = styles[ci]
                sel = {"checkpoint": ckpt, "layer": layer}
                _band(ax, lags, result, "autocorrelation_mean", sel, st)
                ax.plot(lags, result["autocorrelation_mean"].sel(sel).values, markersize=2.5,
                        label=checkpoint_label(ci, len(ckpts), steps[ci]), **st)
            plotting.chance_line(ax, 0.0, label="chance")
            ax.set_title(f"layer {layer}")
        plotting.outer_labels(axes, L, "lag m (tokens)", "mean autocorrelation (r)")
        plotting.hide_unused(axes, L)
        # the key under the panels, where it covers neither a curve nor the chance label
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4), frameon=False)
        fig.suptitle("Autocorrelation of expert activation along the sequence, mean over experts\n"
                     "(bands: 95 % CI over samples; grey dashed = earliest checkpoint, black = final)")
        return plotting.savefig(fig, out_dir, f"{NAME}_autocorrelation", formats)
