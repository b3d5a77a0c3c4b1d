"""Lens figures: lens NLL per condition, its difference and JS per layer.

Drawn from a finished ``lens`` result (see :mod:`analyses.lens` for its
variables and dims); registered through :func:`analyses.figures.hook`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import xarray as xr

from . import plotting
from ..lens import NAME


def figure(result: xr.Dataset, out_dir: Path, formats: Sequence[str] = ("png",)) -> list[Path]:
    """Per view: lens NLL per condition (last checkpoint), the difference A − B and the JS, per layer."""
    result = result.compute()
    a, b = result.attrs["condition_a"], result.attrs["condition_b"]
    layers = [int(x) for x in result["layer"].values]
    views = [str(v) for v in result["view"].values]
    has_js = "js" in result
    ncols = 3 if has_js else 2
    last = result["checkpoint"].values[-1]
    colours, mappable = plotting.ordered_colours(result["step"].values)
    with plotting.style():
        fig, axes = plotting.new_figure(len(views), ncols, panel_size=(3.3, 2.5), sharex=True)
        for r, view in enumerate(views):
            ax = axes[r, 0]
            for c, style, colour in ((a, "-", plotting.OKABE_ITO[0]), (b, "--", plotting.OKABE_ITO[1])):
                sel = result.sel(checkpoint=last, view=view, condition=c)
                ax.plot(layers, sel["lens_nll"].values, ls=style, marker="o", ms=2.5, color=colour,
                        label=f"{plotting.display_label(c)}")
                if "lens_nll_lo" in result:
                    ax.fill_between(layers, sel["lens_nll_lo"].values, sel["lens_nll_hi"].values, color=colour,
                                    alpha=0.2, linewidth=0)
                if "model_nll" in result:
                    ax.plot([layers[-1]], [float(sel["model_nll"])], marker="*", ms=7, color=colour, ls="none",
                            label=f"model NLL ({plotting.display_label(c)})")
            ax.set_title(f"{view}: lens NLL")  # the checkpoint is named in the suptitle: short panel titles
            plotting.label_axes(ax, "layer (MoE layer index)", "−log p(target) (nats)")
            if r == 0:  # one key for both views, under the panels: inside it covered the curves
                handles, labels = ax.get_legend_handles_labels()
                fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), frameon=False)
            panels = [("lens_nll_diff", f"NLL {a} − {b}\n(nats)", "difference")]  # two lines: long condition names
            if has_js:
                panels.append(("js", "JS divergence (nats)", "JS divergence"))
            for j, (name, ylabel, title) in enumerate(panels, start=1):
                ax = axes[r, j]
                for ci, ckpt in enumerate(result["checkpoint"].values):
                    sel = result.sel(checkpoint=ckpt, view=view)
                    ax.plot(layers, sel[name].values, marker="o", ms=2.5, color=colours[ci])
                    if ckpt == last and f"{name}_lo" in result:
                        ax.fill_between(layers, sel[f"{name}_lo"].values, sel[f"{name}_hi"].values,
                                        color=colours[ci], alpha=0.2, linewidth=0)
                plotting.chance_line(ax, 0.0, label="no difference")
                ax.set_title(f"{view}: {title}")
                plotting.label_axes(ax, "layer (MoE layer index)", ylabel)
            for ax in axes[r]:
                ax.set_xticks(layers)
        cb = fig.colorbar(mappable, ax=axes[:, 1:].ravel().tolist(), shrink=0.8)
        cb.set_label("checkpoint (training step)")
        fig.suptitle(f"Logit lens by condition {a} vs {b} on aligned targets (bands: 95 % CI over sample pairs)\n"
                     f"lens NLL panels: checkpoint {last}")
        return plotting.savefig(fig, out_dir, f"{NAME}_curves", formats)
