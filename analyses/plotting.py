"""Kept for old imports: the figure style lives in :mod:`analyses.figures.plotting`.

Nothing is defined here, so this file never changes and never moves
``analyses.VERSION`` (which hashes ``analyses/*.py``); style edits go to the
figures package, which only ``analyses.REPORT_VERSION`` hashes.
"""

from .figures.plotting import *  # noqa: F401,F403
from .figures.plotting import __all__  # noqa: F401
