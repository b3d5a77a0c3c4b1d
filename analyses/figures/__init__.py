"""Figures of the analyses, kept apart from the numerics.

One module per analysis, ``analyses/figures/<name>.py``, with a
``figure(result, out_dir, formats=("png",)) -> list[Path]``; common styling in
:mod:`analyses.figures.plotting`; the demo's training curve in
:mod:`analyses.figures.training`.

Why a package of its own: ``analyses.VERSION`` (the result cache key) hashes the
numeric modules ``analyses/*.py`` only, while ``analyses.REPORT_VERSION`` hashes
``report.py`` and everything here. Editing a figure re-renders the report and
recomputes nothing.

Import direction: figure modules import the numeric modules (for names such as
``NAME`` or a chance level); numeric modules never import a figure module, they
register :func:`hook` instead, which imports it on first call. So computing a
result never imports matplotlib.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path

__all__ = ["hook", "figure_module"]


def figure_module(name: str):
    """The module ``analyses.figures.<name>`` (ModuleNotFoundError names it when absent)."""
    return importlib.import_module(f"{__name__}.{name}")


def hook(name: str):
    """The registry's figure callable for analysis ``name``: imports its figure module when first called.

    Parameters
    ----------
    name : analysis name; ``analyses/figures/<name>.py`` must define ``figure``.

    Returns
    -------
    ``(result, out_dir, formats=("png",)) -> list[Path]`` calling ``analyses.figures.<name>.figure``.
    """

    def figure(result, out_dir: Path, formats: Sequence[str] = ("png",)) -> list[Path]:
        return figure_module(name).figure(result, out_dir, formats)

    figure.__name__ = f"figure_{name}"
    figure.__qualname__ = figure.__name__
    figure.__doc__ = f"Figures of the {name!r} analysis (analyses/figures/{name}.py)."
    return figure
