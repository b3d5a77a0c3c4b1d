"""Intervention figures: degradation curves with the random-control band, and observational vs causal scatter.

Drawn from :func:`analyses.interventions.delta_cube` results whose ``run`` dim
carries the coords ``ranking``, ``scope``, ``n_masked`` and ``seed`` (-1 for a
non-random ranking), and from a per-unit table of an observational measure vs
the causal ΔNLL.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import xarray as xr

from . import plotting

NAME = "interventions"


def degradation(cube: xr.Dataset, out_dir: Path, formats: Sequence[str] = ("png",), *, group: str = "all",
                stem: str = f"{NAME}_degradation") -> list[Path]:
    """ΔNLL vs number of masked experts per ranking (line + bootstrap CI), random controls as a min–max band."""
    dim = [d for d in cube.delta_nll.dims if d != "run"][0]
    c = cube.sel({dim: group})
    rank = np.asarray(c["ranking"].values).astype(str)
    n = np.asarray(c["n_masked"].values)
    with plotting.style():
        fig, axes = plotting.new_figure(1, 1, panel_size=(3.4, 2.4))
        ax = axes[0, 0]
        rnd = rank == "random"
        if rnd.any():
            xs = np.unique(n[rnd])
            vals = [c.delta_nll.values[rnd & (n == x)] for x in xs]
            ax.fill_between(xs, [v.min() for v in vals], [v.max() for v in vals], color="0.6", alpha=0.3,
                            linewidth=0, label=f"random ({int(len(np.unique(c['seed'].values[rnd])))} seeds)")
        for r in sorted(set(rank[~rnd]) - {"own top-1"}):
            sel = np.flatnonzero(rank == r)
            sel = sel[np.argsort(n[sel])]
            ax.errorbar(n[sel], c.delta_nll.values[sel],
                        yerr=[c.delta_nll.values[sel] - c.delta_nll_lo.values[sel],
                              c.delta_nll_hi.values[sel] - c.delta_nll.values[sel]], marker="o", markersize=3,
                        capsize=2, label=r)
        ax.axhline(0, **plotting.CHANCE_STYLE)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("experts masked (router mask, global top-n)")
        ax.set_ylabel(f"ΔNLL (nat), {dim} = {group}")
        ax.legend(loc="upper left")
        return plotting.savefig(fig, out_dir, stem, formats)


def scatter(measure: np.ndarray, effect: np.ndarray, units: Sequence[str], out_dir: Path,
            formats: Sequence[str] = ("png",), *, measure_name: str = "usage", rho: float | None = None,
            stem: str = f"{NAME}_obs_vs_causal") -> list[Path]:
    """One point per (layer, expert): the observational measure vs the ΔNLL of masking that expert alone."""
    with plotting.style():
        fig, axes = plotting.new_figure(1, 1, panel_size=(3.0, 2.6))
        ax = axes[0, 0]
        ax.scatter(measure, effect, s=10)
        gap = np.abs(np.argsort(np.argsort(measure)) - np.argsort(np.argsort(effect)))
        for i in np.argsort(-gap)[:3]:
            ax.annotate(str(units[i]), (measure[i], effect[i]), fontsize=6)
        ax.axhline(0, **plotting.CHANCE_STYLE)
        ax.set_xlabel(measure_name)
        ax.set_ylabel("ΔNLL when masked alone (nat)")
        if rho is not None:
            ax.set_title(f"Spearman ρ = {rho:.2f}")
        return plotting.savefig(fig, out_dir, stem, formats)
