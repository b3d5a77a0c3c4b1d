"""Usage figures: heatmaps per checkpoint, per-domain maps, utilisation bars, position timeline.

Drawn from a finished ``usage`` result (see :mod:`analyses.usage` for its
variables and dims); registered through :func:`analyses.figures.hook`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import xarray as xr

from . import plotting
from ..usage import NAME, _ordered_checkpoints


def _main_view(result: xr.Dataset) -> str:
    views = [str(v) for v in result["view"].values]
    return "all" if "all" in views else views[0]


def _layer_grid(n: int) -> tuple[int, int]:
    return plotting.panel_grid(n)


def _heatmaps(result, out_dir, formats, view) -> list[Path]:
    """Layer × expert heatmaps, panels per domain ('all' first), at the earliest and the final checkpoint."""
    E = result.sizes["expert"]
    chance = 1.0 / E
    sub = result.sel(view=view)
    vmax = max(float(np.nanmax(sub["usage"].values)) if np.isfinite(sub["usage"].values).any() else 0.0, 2 * chance)
    norm = plotting.mcolors.TwoSlopeNorm(vcenter=chance, vmin=0.0, vmax=vmax)
    panels = [("all domains", sub["usage_all"])] + [
        (plotting.display_label(d), sub["usage"].sel(domain=d)) for d in result["domain"].values
    ]
    nrows, ncols = _layer_grid(len(panels))
    L = result.sizes["layer"]
    panel_size = (max(2.4, 0.14 * E + 1.0), max(1.6, 0.16 * L + 0.9))
    order = _ordered_checkpoints(result)
    picks = [("earliest", order[0]), ("final", order[-1])] if len(order) > 1 else [("final", order[-1])]
    paths = []
    for which, ci in picks:
        ckpt = result["checkpoint"].values[ci]
        step = int(result["step"].values[ci])
        with plotting.style():
            fig, axes = plotting.new_figure(nrows, ncols, panel_size=panel_size, sharex=True, sharey=True)
            for ax, (label, var) in zip(axes.flat, panels):
                grid = var.isel(checkpoint=ci).transpose("layer", "expert").values
                im = ax.imshow(grid, aspect="auto", cmap=plotting.DIVERGING, norm=norm, interpolation="nearest")
                ax.set_title(label)
                ax.grid(False)
                ax.set_yticks(np.arange(L))
                ax.set_yticklabels([str(v) for v in result["layer"].values])
                if E <= 16:
                    ax.set_xticks(np.arange(E))
            plotting.outer_labels(axes, len(panels), "expert (index)", "layer (MoE layer index)")
            plotting.hide_unused(axes, len(panels))
            cbar = fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.9)
            cbar.set_label("usage (share of routing slots)")
            cbar.ax.axhline(chance, color="k", linewidth=0.8)
            fig.suptitle(f"Expert usage ({view} tokens) — {which} checkpoint {ckpt} (step {step})\n"
                         f"white = chance 1/E = {chance:.3g}")
            paths += plotting.savefig(fig, out_dir, f"{NAME}_heatmap_{which}", formats)
    return paths


def _domain_heatmaps(result, out_dir, formats, view) -> list[Path]:
    """Domain × expert heatmap per layer at the final checkpoint."""
    E, D, L = result.sizes["expert"], result.sizes["domain"], result.sizes["layer"]
    chance = 1.0 / E
    ci = _ordered_checkpoints(result)[-1]
    sub = result["usage"].sel(view=view).isel(checkpoint=ci)
    vmax = max(float(np.nanmax(sub.values)) if np.isfinite(sub.values).any() else 0.0, 2 * chance)
    norm = plotting.mcolors.TwoSlopeNorm(vcenter=chance, vmin=0.0, vmax=vmax)
    nrows, ncols = _layer_grid(L)
    labels = [plotting.display_label(d) for d in result["domain"].values]
    with plotting.style():
        fig, axes = plotting.new_figure(
            nrows, ncols, panel_size=(max(2.4, 0.14 * E + 1.2), max(1.4, 0.22 * D + 0.9)), sharex=True, sharey=True
        )
        for ax, layer in zip(axes.flat, result["layer"].values):
            im = ax.imshow(sub.sel(layer=layer).transpose("domain", "expert").values, aspect="auto",
                           cmap=plotting.DIVERGING, norm=norm, interpolation="nearest")
            ax.set_title(f"layer {layer}")
            ax.grid(False)
            ax.set_yticks(np.arange(D))
            ax.set_yticklabels(labels)
            if E <= 16:
                ax.set_xticks(np.arange(E))
            plotting.label_axes(ax, "expert (index)", "domain")
        plotting.hide_unused(axes, L)
        cbar = fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.9)
        cbar.set_label("usage (share of slots)")
        cbar.ax.axhline(chance, color="k", linewidth=0.8)
        ckpt, step = result["checkpoint"].values[ci], int(result["step"].values[ci])
        fig.suptitle(f"Usage by domain ({view} tokens), checkpoint {ckpt} (step {step}); white = 1/E = {chance:.3g}")
        return plotting.savefig(fig, out_dir, f"{NAME}_domains", formats)


def _utilization(result, out_dir, formats) -> list[Path]:
    """Bars of pooled usage per expert, one panel per layer, one bar colour per view, CI error bars."""
    E, L = result.sizes["expert"], result.sizes["layer"]
    chance = 1.0 / E
    ci = _ordered_checkpoints(result)[-1]
    views = [str(v) for v in result["view"].values]
    width = 0.8 / len(views)
    has_ci = "usage_all_lo" in result
    nrows, ncols = _layer_grid(L)
    x = np.arange(E)
    with plotting.style():
        fig, axes = plotting.new_figure(nrows, ncols, panel_size=(max(2.8, 0.08 * E * len(views) + 1.2), 2.2),
                                        sharex=True, sharey=True)
        for ax, layer in zip(axes.flat, result["layer"].values):
            for vi, view in enumerate(views):
                def pick(name):
                    return result[name].isel(checkpoint=ci).sel(view=view, layer=layer).values

                val = pick("usage_all")
                yerr = None
                if has_ci:
                    lo, hi = pick("usage_all_lo"), pick("usage_all_hi")
                    yerr = np.clip(np.vstack([val - lo, hi - val]), 0, None)
                    yerr = np.where(np.isfinite(yerr), yerr, 0.0)
                ax.bar(x + (vi - (len(views) - 1) / 2) * width, val, width=width, yerr=yerr,
                       color=plotting.OKABE_ITO[vi % len(plotting.OKABE_ITO)], label=view,
                       error_kw={"elinewidth": 0.6, "capsize": 0})
            plotting.chance_line(ax, chance, label="1/E")
            ax.set_title(f"layer {layer}")
            if E <= 16:
                ax.set_xticks(x)
            plotting.label_axes(ax, "expert (index)", "usage (share of slots)")
        plotting.hide_unused(axes, L)
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside right center", frameon=False, title="token view")
        ckpt, step = result["checkpoint"].values[ci], int(result["step"].values[ci])
        fig.suptitle(f"Expert utilization, checkpoint {ckpt} (step {step})"
                     + (f"; bars: {100 * float(result['usage_all_lo'].attrs['ci']):g} % bootstrap CI over samples"
                        if has_ci else ""))
        return plotting.savefig(fig, out_dir, f"{NAME}_utilization", formats)


def _timeline(result, out_dir, formats) -> list[Path]:
    """Usage by position bucket per expert, one panel per layer: lines with CI bands (E <= 8) or a heatmap."""
    E, L = result.sizes["expert"], result.sizes["layer"]
    chance = 1.0 / E
    ci = _ordered_checkpoints(result)[-1]
    var = result["usage_by_position"].isel(checkpoint=ci)
    start, end = result["position_start"].values, result["position_end"].values
    centre = (start + end - 1) / 2.0
    nrows, ncols = _layer_grid(L)
    lines = E <= len(plotting.OKABE_ITO)
    with plotting.style():
        fig, axes = plotting.new_figure(nrows, ncols, panel_size=(2.9, 2.2), sharex=True, sharey=True)
        for ax, layer in zip(axes.flat, result["layer"].values):
            v = var.sel(layer=layer).transpose("position_bin", "expert").values
            if lines:
                for e in range(E):
                    ax.plot(centre, v[:, e], color=plotting.OKABE_ITO[e], marker="o", markersize=2, label=f"expert {e}")
                    if "usage_by_position_lo" in result:
                        lo = result["usage_by_position_lo"].isel(checkpoint=ci).sel(layer=layer, expert=e).values
                        hi = result["usage_by_position_hi"].isel(checkpoint=ci).sel(layer=layer, expert=e).values
                        ax.fill_between(centre, lo, hi, color=plotting.OKABE_ITO[e], alpha=0.15, linewidth=0)
                plotting.chance_line(ax, chance, label="1/E")
                plotting.label_axes(ax, "token position (bucket centre)", "usage (share of slots)")
            else:
                norm = plotting.mcolors.TwoSlopeNorm(vcenter=chance, vmin=0.0, vmax=max(np.nanmax(v), 2 * chance))
                im = ax.imshow(v.T, aspect="auto", cmap=plotting.DIVERGING, norm=norm, interpolation="nearest",
                               extent=(start[0] - 0.5, end[-1] - 0.5, E - 0.5, -0.5))
                ax.grid(False)
                plotting.label_axes(ax, "token position", "expert (index)")
            ax.set_title(f"layer {layer}")
        plotting.hide_unused(axes, L)
        if lines:
            handles, labels = axes.flat[0].get_legend_handles_labels()
            fig.legend(handles, labels, loc="outside right center", frameon=False)
        else:
            cbar = fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.9)
            cbar.set_label("usage (share of slots); white = 1/E")
        ckpt, step = result["checkpoint"].values[ci], int(result["step"].values[ci])
        fig.suptitle(f"Activation timeline: usage by token position, checkpoint {ckpt} (step {step})"
                     + ("; bands: bootstrap CI" if lines and "usage_by_position_lo" in result else ""))
        return plotting.savefig(fig, out_dir, f"{NAME}_timeline", formats)


def figure(result: xr.Dataset, out_dir: Path, formats: Sequence[str] = ("png",)) -> list[Path]:
    """Five figures whatever the number of checkpoints.

    Layer × expert heatmaps at the earliest and final checkpoints, domain ×
    expert heatmaps per layer, utilization bars per view with CIs, and the
    activation timeline (usage by position bucket), the last three at the
    final checkpoint.
    """
    result = result.compute()
    view = _main_view(result)
    return (
        _heatmaps(result, out_dir, formats, view)
        + _domain_heatmaps(result, out_dir, formats, view)
        + _utilization(result, out_dir, formats)
        # no timeline from an aggregate-counts cube: it has no token positions
        + (_timeline(result, out_dir, formats) if "usage_by_position" in result else [])
    )
