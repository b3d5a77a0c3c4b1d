"""Specialization figures: MI and shares vs layer with their shuffled floors.

Drawn from a finished ``specialization`` result (see :mod:`analyses.specialization` for its
variables and dims); registered through :func:`analyses.figures.hook`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import xarray as xr

from . import plotting
from .plotting import checkpoint_label, checkpoint_styles
from ..specialization import NAME


def figure(result: xr.Dataset, out_dir: Path, formats: Sequence[str] = ("png",)) -> list[Path]:
    """Summary curves vs layer (earliest vs final highlighted) and lift heatmaps (earliest vs final)."""
    result = result.compute()
    return [*_summary_figure(result, out_dir, formats), *_lift_figure(result, out_dir, formats)]


def _summary_figure(result: xr.Dataset, out_dir: Path, formats: Sequence[str]) -> list[Path]:
    """MI, significant cells, vocabulary specialization and score vs layer, one line per checkpoint."""
    E, k = int(result.attrs["num_experts"]), int(result.attrs["top_k"])
    layers, ckpts, steps = (result[name].values for name in ("layer", "checkpoint", "step"))
    C = len(ckpts)
    styles = checkpoint_styles(steps)
    panels = (
        ("mi", "MI(domain; top-1) (bits)", "mi_floor_p95"),
        ("significant_fraction", "significant cells (share)", None),
        ("vocab_input", "vocab. spec., input token", "vocab_input_floor"),
        ("vocab_next", "vocab. spec., next token", "vocab_next_floor"),
        ("score", "specialization score", None),
    )
    # the floors of the earliest and the final checkpoint: unlike each other and unlike the curves
    floor_styles = {0: {"color": "0.45", "linestyle": ":", "marker": "x", "markersize": 3, "linewidth": 1.1},
                    C - 1: {"color": "k", "linestyle": "-.", "linewidth": 1.1}}
    with plotting.style():
        # five panels in a 2 × 3 grid; the sixth cell holds the key, so no legend covers a curve
        fig, axes = plotting.new_figure(2, 3, panel_size=(2.4, 2.0), sharex=True)
        floor_handles = {}
        for ax, (var, ylabel, floor) in zip(axes.flat, panels):
            for i in range(C):
                sel = {"checkpoint": ckpts[i]}
                st = styles[i]
                if f"{var}_lo" in result:
                    ax.fill_between(layers, result[f"{var}_lo"].sel(sel).values, result[f"{var}_hi"].sel(sel).values,
                                    color=st["color"], alpha=0.15, linewidth=0)
                ax.plot(layers, result[var].sel(sel).values, markersize=3, label=checkpoint_label(i, C, steps[i]), **st)
                if floor is not None and i in floor_styles:
                    (h,) = ax.plot(layers, result[floor].sel(sel).values, **floor_styles[i])
                    floor_handles[i] = h
            if var.startswith("vocab"):
                plotting.chance_line(ax, k / E, label="k/E")
            elif var == "significant_fraction":
                plotting.chance_line(ax, float(json.loads(result.attrs["params"])["fdr_q"]), label="q")
            ax.set_xticks(layers)
            plotting.label_axes(ax, "layer (MoE layer index)", ylabel)
        key = axes.flat[len(panels)]
        key.axis("off")
        handles, labels = axes.flat[0].get_legend_handles_labels()
        for i, h in sorted(floor_handles.items()):
            handles.append(h)
            labels.append(f"floor, {'earliest' if i == 0 and C > 1 else 'final'} checkpoint")
        key.legend(handles, labels, frameon=False, loc="center", title="MI floor: shuffled labels, 95th pct\n"
                   "vocab. floor: independence", title_fontsize=6.5)
        hide = [ax for ax in axes.flat[len(panels) + 1:]]
        for ax in hide:
            ax.set_visible(False)
        fig.suptitle("Specialization per layer (bands: 95 % CI over samples)")
        return plotting.savefig(fig, out_dir, f"{NAME}_summary", formats)


def _lift_figure(result: xr.Dataset, out_dir: Path, formats: Sequence[str]) -> list[Path]:
    """Lift heatmaps: earliest and final checkpoint, one column per domain, significant cells dotted."""
    E = int(result.attrs["num_experts"])
    layers, ckpts, steps = (result[name].values for name in ("layer", "checkpoint", "step"))
    C = len(ckpts)
    show = [0, C - 1] if C > 1 else [0]
    domains = result["domain"].values
    D = len(domains)
    # an expert a domain never uses has lift 0: show it as the strongest blue, not as a blank
    cap = 5.0
    log_lift = np.log2(result["lift"].clip(2.0**-cap, None))
    finite = np.abs(log_lift.values[np.isfinite(log_lift.values)])
    vmax = min(max(float(finite.max()) if finite.size else 1.0, 0.5), cap)
    norm = plotting.mcolors.TwoSlopeNorm(vcenter=0.0, vmin=-vmax, vmax=vmax)
    cmap = plotting.plt.get_cmap(plotting.DIVERGING).with_extremes(bad="0.6")
    L = len(layers)
    panel = (min(max(2.2, 0.16 * E + 1.0), 4.5), min(max(1.5, 0.16 * L + 0.9), 4.5))
    rows_per, ncols = plotting.panel_grid(D)  # many domains wrap onto several rows per checkpoint
    with plotting.style():
        fig, axes = plotting.new_figure(len(show) * rows_per, ncols, panel_size=panel, sharex=True, sharey=True)
        im = None
        for r, ci in enumerate(show):
            for j, dom in enumerate(domains):
                ax = axes[r * rows_per + j // ncols, j % ncols]
                grid = log_lift.sel(checkpoint=ckpts[ci], domain=dom).transpose("layer", "expert").values
                im = ax.imshow(grid, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
                sig = result["significant"].sel(checkpoint=ckpts[ci], domain=dom).transpose("layer", "expert").values
                yy, xx = np.nonzero(sig)
                ax.scatter(xx, yy, s=4, c="k", marker="o", linewidths=0)
                ax.grid(False)
                which = "earliest" if (ci == 0 and C > 1) else "final"
                ax.set_title(f"{plotting.display_label(dom)} · {which} (step {steps[ci]})")
                if L <= 32:
                    ax.set_yticks(np.arange(L))
                    ax.set_yticklabels([str(v) for v in layers])
                if E <= 16:
                    ax.set_xticks(np.arange(E))
                last_row = j // ncols == rows_per - 1 or j + ncols >= D
                plotting.label_axes(ax, "expert (index)" if last_row else "", "layer" if j % ncols == 0 else "")
                if last_row:
                    ax.tick_params(axis="x", labelbottom=True)
            for j in range(D, rows_per * ncols):
                axes[r * rows_per + j // ncols, j % ncols].set_visible(False)
        # horizontal, under the panels: a long label beside a short bar ran off the canvas
        cbar = fig.colorbar(im, ax=axes.ravel().tolist(), location="bottom", shrink=0.6, aspect=40)
        cbar.set_label(f"log2 lift (domain / pooled usage), clipped at ±{vmax:.2g}")
        fig.suptitle("Domain preference of each expert, earliest vs final checkpoint\n(white = no preference, "
                     "the chance level; dots = significant after BH; grey = undefined)")
        return plotting.savefig(fig, out_dir, f"{NAME}_lift", formats)
