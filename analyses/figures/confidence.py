"""Confidence figures: metric curves vs layer per checkpoint, and per-token histograms.

Drawn from a finished ``confidence`` result (see :mod:`analyses.confidence` for its
variables and dims); registered through :func:`analyses.figures.hook`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import xarray as xr

from . import plotting
from ..confidence import HISTOGRAMS, METRICS, NAME


_YLABELS = {
    "entropy": "per-token entropy\nH(p) / ln E",
    "topk_entropy": "top-k entropy\nH(w̃) / ln k",
    "margin": "margin\nw₁ − w₂ (weight)",
    "boundary": "boundary\ns_(k) − s_(k+1) (logit)",
    "marginal_entropy": "marginal entropy\nH(usage) / ln E",
}


def _curves(result, out_dir, formats) -> list[Path]:
    metrics = [m for m in METRICS if m in result and np.isfinite(result[f"{m}_all"].values).any()]
    groups = [("all domains", None)] + [(plotting.display_label(d), d) for d in result["domain"].values]
    steps = result["step"].values
    C = len(steps)
    # a few checkpoints are categories (a legend: earliest / final marked); many are a continuum (a colour bar)
    discrete = C <= len(plotting.OKABE_ITO)
    colours, mappable = plotting.ordered_colours(steps)
    styles = (plotting.checkpoint_styles(steps) if discrete
              else [{"color": c, "marker": "o", "markersize": 2} for c in colours])
    layers = result["layer"].values
    with plotting.style():
        # rows tall enough for two-line y labels however many domain columns share the width
        fig, axes = plotting.new_figure(max(len(metrics), 1), len(groups), panel_size=(2.6, 0.5 * len(groups) + 0.7),
                                        sharex=True)
        for r, m in enumerate(metrics):
            for c, (label, dom) in enumerate(groups):
                ax = axes[r, c]
                name = f"{m}_all" if dom is None else m
                var = result[name] if dom is None else result[name].sel(domain=dom)
                for ci in range(result.sizes["checkpoint"]):
                    ax.plot(layers, var.isel(checkpoint=ci).values, markersize=2,
                            label=plotting.checkpoint_label(ci, C, int(steps[ci])), **styles[ci])
                    if f"{name}_lo" in result:
                        lo, hi = (result[f"{name}_{side}"] for side in ("lo", "hi"))
                        if dom is not None:
                            lo, hi = lo.sel(domain=dom), hi.sel(domain=dom)
                        ax.fill_between(layers, lo.isel(checkpoint=ci).values, hi.isel(checkpoint=ci).values,
                                        color=styles[ci]["color"], alpha=0.15, linewidth=0)
                # the y-axis follows the data (often 0.85–1 for entropies): a fixed 0–1 axis flattens it
                if m == "marginal_entropy":
                    plotting.chance_line(ax, 1.0, label="uniform")
                if r == 0:
                    ax.set_title(label)
                if len(layers) <= 16:
                    ax.set_xticks(layers)
                plotting.label_axes(ax, "MoE layer" if r == len(metrics) - 1 else "",
                                    _YLABELS[m] if c == 0 else "")
        if metrics and discrete:
            handles, labels = axes[0, 0].get_legend_handles_labels()
            fig.legend(handles, labels, loc="outside lower center", ncols=min(C, 4), frameon=False)
        elif metrics:
            cbar = fig.colorbar(mappable, ax=axes.ravel().tolist(), shrink=0.8)
            cbar.set_label("training step")
        fig.suptitle("Router confidence by layer" + ("; bands: bootstrap CI over samples"
                                                     if any(k.endswith("_lo") for k in result.data_vars) else ""))
        return plotting.savefig(fig, out_dir, NAME, formats)


def _histograms(result, out_dir, formats) -> list[Path]:
    names = [n for n in HISTOGRAMS if f"{n}_hist" in result and np.isfinite(result[f"{n}_hist"].values).any()]
    if not names:
        return []
    steps = result["step"].values
    colours, mappable = plotting.ordered_colours(steps)
    layers = result["layer"].values
    edges = np.r_[result["bin_start"].values, result["bin_end"].values[-1]]
    ncols = min(len(layers), 6)
    rows_per = -(-len(layers) // ncols)  # each metric starts a new block of rows
    with plotting.style():
        fig, axes = plotting.new_figure(rows_per * len(names), ncols, panel_size=(2.4, 2.0))
        for r, n in enumerate(names):
            block = axes[r * rows_per:(r + 1) * rows_per].ravel()
            for ax, layer in zip(block, layers):
                for ci in range(result.sizes["checkpoint"]):
                    ax.stairs(result[f"{n}_hist"].isel(checkpoint=ci).sel(layer=layer).values, edges,
                              color=colours[ci])
                ax.set_title(f"layer {layer}")
                plotting.label_axes(ax, _YLABELS[n], "share of tokens")
            plotting.hide_unused(block[None, :], len(layers))
        cbar = fig.colorbar(mappable, ax=axes.ravel().tolist(), shrink=0.8)
        cbar.set_label("training step")
        fig.suptitle("Distribution of per-token entropies (1 = uniform over experts / over the k weights)")
        return plotting.savefig(fig, out_dir, f"{NAME}_histograms", formats)


def figure(result: xr.Dataset, out_dir: Path, formats: Sequence[str] = ("png",)) -> list[Path]:
    """Curves vs layer (one line per checkpoint, CI bands; rows = metric, columns = domain) and entropy histograms."""
    result = result.compute()
    result = result.isel(checkpoint=np.argsort(result["step"].values, kind="stable"))
    return _curves(result, out_dir, formats) + _histograms(result, out_dir, formats)
