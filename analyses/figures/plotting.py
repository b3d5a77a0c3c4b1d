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

__all__ = [
    "DPI", "FORMATS", "OKABE_ITO", "SEQUENTIAL", "DIVERGING", "LINESTYLES", "CHANCE_STYLE", "RC",
    "REPORT_WIDTH_IN", "REPORT_WIDTH_PX", "report_size", "fit_report_width", "layout_problems", "plt", "mcolors", "np", "style", "new_figure", "safe_stem", "savefig", "ordered_colours",
    "series_colours", "chance_line", "label_axes", "hide_unused", "display_label", "panel_grid", "outer_labels", "checkpoint_styles",
    "checkpoint_label",
]

DPI = 300
FORMATS = ("png", "pdf", "svg")
# Every figure is this wide, so the report (which shows each image at its full column width)
# shows all of them at one scale: the same font size everywhere. 7.2 in at 300 dpi = 2160 px.
REPORT_WIDTH_IN = 7.2
REPORT_WIDTH_PX = round(REPORT_WIDTH_IN * DPI)

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
    """Figure of the report's width and a 2-D (nrows, ncols) array of axes.

    ``panel_size`` (inches) sets the panels' aspect ratio: the grid is scaled
    to :data:`REPORT_WIDTH_IN` wide, heights by the same factor.
    """
    kwargs.setdefault("squeeze", False)
    kwargs.setdefault("layout", "constrained")
    fig, axes = plt.subplots(nrows, ncols, figsize=report_size(panel_size[0] * ncols, panel_size[1] * nrows), **kwargs)
    return fig, axes


def fit_report_width(fig: plt.Figure) -> None:
    """Scale ``fig`` to the report's width (aspect kept) unless it is that wide already."""
    w, h = fig.get_size_inches()
    if abs(w - REPORT_WIDTH_IN) > 1e-9:
        fig.set_size_inches(*report_size(w, h))


def report_size(width: float, height: float) -> tuple[float, float]:
    """(width, height) in inches scaled to the report's width, aspect ratio kept."""
    return REPORT_WIDTH_IN, height * REPORT_WIDTH_IN / width


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
    fit_report_width(fig)
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
        # a light backing keeps the value legible where it crosses bars or curves
        bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.75, "pad": 0.6},
    )


def label_axes(ax: plt.Axes, xlabel: str, ylabel: str) -> None:
    """Axis labels; units belong in the label text, e.g. 'usage (share of slots)'."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)


def hide_unused(axes: np.ndarray, used: int) -> None:
    """Hide the axes of a grid beyond the first ``used`` panels."""
    for ax in axes.flat[used:]:
        ax.set_visible(False)


def panel_grid(n: int, max_cols: int = 3) -> tuple[int, int]:
    """(rows, cols) for ``n`` panels: at most ``max_cols`` columns, rows as evenly filled as can be.

    5 panels give 2 × 3 (not 2 × 4 with three empty cells), 4 give 2 × 2.
    """
    n = max(int(n), 1)
    rows = -(-n // max_cols)
    return rows, -(-n // rows)


def outer_labels(axes: np.ndarray, used: int, xlabel: str, ylabel: str) -> None:
    """Axis labels on the outer panels of a grid of which the first ``used`` are drawn.

    The y label on the first column; the x label, with its tick labels, on the
    lowest drawn panel of each column (a panel above an empty cell included).
    """
    nrows, ncols = axes.shape
    for i, ax in enumerate(axes.flat[:used]):
        r, c = divmod(i, ncols)
        lowest = (r + 1) * ncols + c >= used
        ax.set_xlabel(xlabel if lowest else "")
        ax.set_ylabel(ylabel if c == 0 else "")
        if lowest:
            ax.tick_params(axis="x", labelbottom=True)


def display_label(value) -> str:
    """Readable label for a group value ('' becomes '(unlabelled)')."""
    text = str(value)
    return text if text else "(unlabelled)"


def checkpoint_styles(steps: Sequence[int]) -> list[dict]:
    """Line style per checkpoint that makes "final vs earliest" obvious.

    Earliest: grey, dashed, square markers; final: black, solid; the others
    thin and coloured by step (viridis).
    """
    colours, _ = ordered_colours(np.asarray(steps, dtype=float))
    styles = []
    for i in range(len(steps)):
        if i == 0 and len(steps) > 1:
            styles.append({"color": "0.45", "linestyle": "--", "marker": "s", "linewidth": 1.8})
        elif i == len(steps) - 1:
            styles.append({"color": "k", "linestyle": "-", "marker": "o", "linewidth": 1.8})
        else:
            styles.append({"color": colours[i], "linestyle": "-", "marker": "o", "linewidth": 0.9, "alpha": 0.7})
    return styles


def checkpoint_label(i: int, n: int, step: int) -> str:
    """Legend label of the i-th of n checkpoints: 'earliest (step s)', 'final (step s)' or 'step s'."""
    if i == 0 and n > 1:
        return f"earliest (step {step})"
    return f"final (step {step})" if i == n - 1 else f"step {step}"


def _drawn_texts(fig: plt.Figure) -> list:
    """The non-empty Text artists that drawing ``fig`` actually renders (tick labels beyond the limits are not)."""
    from matplotlib.text import Text

    drawn = []
    original = Text.draw

    def recording(self, renderer):
        original(self, renderer)
        if self.get_visible() and self.get_text().strip():
            drawn.append(self)

    Text.draw = recording  # the renderer's own list of what it drew; restored below
    try:
        fig.canvas.draw()
    finally:
        Text.draw = original
    return list(dict.fromkeys(drawn))


def layout_problems(fig: plt.Figure, *, tolerance_px: float = 1.0) -> list[str]:
    """Layout defects of ``fig``, one line each: an empty list when it reads cleanly.

    Draws the figure, then checks every text it rendered (titles, axis and tick
    labels, legend entries, colour-bar labels, annotations): each lies inside
    the canvas, no two overlap by more than ``tolerance_px`` pixels (at the
    figure's dpi), and the figure is :data:`REPORT_WIDTH_IN` wide.
    """
    problems = []
    w = fig.get_size_inches()[0]
    if round(w * DPI) != REPORT_WIDTH_PX:
        problems.append(f"width {round(w * DPI)} px at {DPI} dpi; the report's width is {REPORT_WIDTH_PX} px")
    texts = _drawn_texts(fig)
    renderer = fig.canvas.get_renderer()
    canvas = fig.bbox
    boxes = [(t, t.get_window_extent(renderer)) for t in texts]
    t = tolerance_px
    for text, box in boxes:
        if box.x0 < canvas.x0 - t or box.y0 < canvas.y0 - t or box.x1 > canvas.x1 + t or box.y1 > canvas.y1 + t:
            problems.append(f"text {text.get_text()!r} runs outside the canvas")
    for i, (a, ba) in enumerate(boxes):
        for b, bb in boxes[i + 1:]:
            dx = min(ba.x1, bb.x1) - max(ba.x0, bb.x0)
            dy = min(ba.y1, bb.y1) - max(ba.y0, bb.y0)
            if dx > t and dy > t:
                problems.append(f"texts {a.get_text()!r} and {b.get_text()!r} overlap ({dx:.0f} x {dy:.0f} px)")
    return problems
