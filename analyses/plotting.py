"""One figure style for the whole project.

Colour-blind safe throughout: Okabe-Ito for categories, viridis for ordered
quantities (training step, layer), RdBu_r centred on the chance level for
"above / below chance" maps. Figures are written by :func:`savefig` (PNG at
300 dpi; PDF/SVG on request) without timestamps so reruns give identical files.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # batch figures on workers without a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import colors as mcolors  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402

DPI = 300
FORMATS = ("png", "pdf", "svg")

# Okabe & Ito (2008), the usual colour-blind safe categorical palette.
OKABE_ITO = (
    "#0072B2",  # blue
    "#E69F00",  # orange
    "#009E73",  # bluish green
    "#D55E00",  # vermillion
    "#CC79A7",  # reddish purple
    "#56B4E9",  # sky blue
    "#F0E442",  # yellow
    "#000000",  # black
)
SEQUENTIAL = "viridis"
DIVERGING = "RdBu_r"
LINESTYLES = ("-", "--", ":", "-.")
CHANCE_STYLE = {"color": "0.35", "linestyle": "--", "linewidth": 1.0}

RC = {
    "figure.dpi": 100,
    "savefig.dpi": DPI,
    "font.size": 8,
    "axes.titlesize": 9,
    "axes.labelsize": 8,
    "legend.fontsize": 7,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.5,
    "lines.linewidth": 1.3,
    "axes.prop_cycle": matplotlib.cycler(color=list(OKABE_ITO)),
    "image.cmap": SEQUENTIAL,
    "svg.hashsalt": "moe-atlas",  # stable SVG ids across runs
}


@contextlib.contextmanager
def style() -> Iterator[None]:
    """Context in which every figure of the project is drawn."""
    with plt.rc_context(RC):
        yield


def new_figure(
    nrows: int = 1, ncols: int = 1, *, panel_size: tuple[float, float] = (3.2, 2.5), **kwargs
) -> tuple[plt.Figure, np.ndarray]:
    """Figure and a 2-D array of axes sized ``panel_size`` inches per panel."""
    kwargs.setdefault("squeeze", False)
    kwargs.setdefault("layout", "constrained")
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(panel_size[0] * ncols, panel_size[1] * nrows), **kwargs
    )
    return fig, axes


def safe_stem(text: str) -> str:
    """File-name-safe version of ``text`` (checkpoint names can contain '/')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "x"


def savefig(fig: plt.Figure, out_dir: str | Path, stem: str, formats: Sequence[str] = ("png",)) -> list[Path]:
    """Write ``fig`` as ``out_dir/stem.<fmt>`` for each format, close it, return the paths.

    PNG at 300 dpi; PDF and SVG are vector. Metadata dates are left out so
    reruns give identical files. Raises ValueError on an unknown format.
    """
    formats = [f.lower().lstrip(".") for f in formats]
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        plt.close(fig)
        raise ValueError(f"savefig: formats {list(formats)}; expected some of {FORMATS}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metadata = {"png": {"Software": None}, "pdf": {"CreationDate": None}, "svg": {"Date": None}}
    paths = []
    try:
        for fmt in formats:
            path = out_dir / f"{safe_stem(stem)}.{fmt}"
            fig.savefig(path, format=fmt, dpi=DPI, metadata=metadata[fmt])
            paths.append(path)
    finally:
        plt.close(fig)
    return paths


def ordered_colours(values: Sequence[float], cmap: str = SEQUENTIAL) -> tuple[list, ScalarMappable]:
    """A colour per value from a sequential map, and the mappable for a colour bar."""
    values = np.asarray(values, dtype=float)
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    if hi <= lo:  # one value: keep a valid norm
        lo, hi = lo - 0.5, hi + 0.5
    norm = mcolors.Normalize(lo, hi)
    # stop short of viridis' pale yellow end, which vanishes on white
    cm = mcolors.LinearSegmentedColormap.from_list(
        f"{cmap}_trim", plt.get_cmap(cmap)(np.linspace(0.0, 0.9, 256))
    )
    mappable = ScalarMappable(norm=norm, cmap=cm)
    return [mappable.to_rgba(v) for v in values], mappable


def series_colours(labels: Sequence) -> tuple[list, ScalarMappable | None]:
    """Colours for one line per label: Okabe-Ito up to 8 labels, else sequential.

    Returns the colours and, in the sequential case, a mappable for a colour
    bar keyed on the labels themselves when they are numbers, else on their
    positions (None when a legend is the better key).
    """
    if len(labels) <= len(OKABE_ITO):
        return [OKABE_ITO[i] for i in range(len(labels))], None
    values = np.asarray(labels)
    if values.dtype.kind not in "iuf":
        values = np.arange(len(labels))
    return ordered_colours(values.astype(float))


def chance_line(ax: plt.Axes, value: float, *, label: str = "chance") -> None:
    """A dashed horizontal line at the chance level, its value written just above it at the right."""
    ax.axhline(value, **CHANCE_STYLE, zorder=1)
    ax.text(
        0.98, value, f"{label} = {value:.3g}", transform=ax.get_yaxis_transform(),
        ha="right", va="bottom", fontsize=6.5, color=CHANCE_STYLE["color"],
    )


def label_axes(ax: plt.Axes, xlabel: str, ylabel: str) -> None:
    """Axis labels; units belong in the label text, e.g. 'usage (share of slots)'."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)


def hide_unused(axes: np.ndarray, used: int) -> None:
    """Hide the axes of a grid beyond the first ``used`` panels."""
    for ax in axes.flat[used:]:
        ax.set_visible(False)


def display_label(value) -> str:
    """Readable label for a group value ('' becomes '(unlabelled)')."""
    text = str(value)
    return text if text else "(unlabelled)"
