"""The analysis library: pure functions over the routing cube, registered by name.

Importing the package registers every analysis, so ``analyses.REGISTRY`` is
complete on import. To add one: a module that calls ``register(Analysis(...))``,
one import line below, and its tests (``tests/test_contract.py`` covers the
contract for every registered analysis automatically).
"""

from .registry import (
    REGISTRY,
    RESULT_ATTRS,
    RESULT_DIMS,
    VARIABLE_ATTRS,
    Analysis,
    check_result,
    get,
    missing_requirements,
    register,
    run,
)

def _code_version(report: bool) -> str:
    """Hash of this package's source: results computed by other code are recomputed.

    The report module is hashed apart: a new report layout needs no recomputation.
    """
    import hashlib
    from pathlib import Path

    h = hashlib.sha256()
    for f in sorted(Path(__file__).parent.glob("*.py")):
        if (f.name == "report.py") == report:
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:12]


VERSION = _code_version(report=False)
REPORT_VERSION = _code_version(report=True)

# One line per analysis module: importing it registers the analysis.
from . import usage  # noqa: E402,F401
from . import confidence  # noqa: E402,F401
from . import change  # noqa: E402,F401
from . import balance  # noqa: E402,F401
from . import coactivation  # noqa: E402,F401
from . import temporal  # noqa: E402,F401
from . import specialization  # noqa: E402,F401
from . import divergence  # noqa: E402,F401
from . import lens  # noqa: E402,F401

__all__ = [
    "VERSION",
    "REPORT_VERSION",
    "REGISTRY",
    "RESULT_ATTRS",
    "RESULT_DIMS",
    "VARIABLE_ATTRS",
    "Analysis",
    "check_result",
    "get",
    "missing_requirements",
    "register",
    "run",
]
