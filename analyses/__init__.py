"""The analysis library: pure functions over the routing cube, registered by name.

Importing the package registers every analysis, so ``analyses.REGISTRY`` is
complete on import. To add one (docs/adding-an-analysis.md): a module with the
function, its ``OUTPUTS`` table and ``register(Analysis(..., figure=figure_hook(NAME)))``,
its figures in ``analyses/figures/<name>.py`` (kept out of :data:`VERSION`, see
:func:`code_files`), one import line below, and one test file
(``tests/test_contract.py`` covers the contract for every registered analysis
automatically).

How an analysis stays near the speed of a numpy pass
----------------------------------------------------
* **One pass over the tokens.** Every per-token quantity an analysis needs is
  reduced in one fused kernel per (checkpoint, layer, token-chunk) block:
  :func:`analyses.token_pass.per_sample_sums` is a single ``np.bincount`` over a
  combined (row, sample, group...) index, restricted to the samples the block
  touches, for all variables of a Dataset at once. Overlapping views are
  passed as a partition (``registry.view_classes``) rather than one masked
  pass per view.
* **Small arrays in few chunks.** Per-sample sums come back with the
  checkpoint/layer blocks merged and chunked along ``sample`` only, so group
  totals, ratios, tests and figures are a handful of tasks, not one per block.
* **Bootstrap as BLAS.** Replicates are matrix products of per-sample sums with
  (boot, sample) draw counts, one per group (:func:`analyses.bootstrap.resample`);
  the point estimates are the same product with a row of ones.
* **Token coordinates read once** (``storage.cube.open_routing`` keeps them
  lazy and cached) and factorised once per analysis: the token pass
  (:mod:`analyses.token_pass`) takes an explicit ``Samples`` object
  (``Samples.of(routing)``: each token's sample code and the sample labels)
  that the analysis builds once and hands to every pass.

``bench/analyses.py`` measures each analysis against one ``np.bincount`` over
the cube's ids (README there has the figures).
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

def code_files(report: bool, root=None) -> list:
    """The source files whose hash is ``REPORT_VERSION`` (``report``) or ``VERSION`` (not ``report``).

    ``VERSION`` keys the result cache, so it covers the numerics only: the
    top-level ``analyses/*.py`` except ``report.py``. ``REPORT_VERSION`` covers
    what draws: ``report.py`` and every file of the ``figures`` package. A
    figure edit therefore re-renders the report and recomputes nothing.
    """
    from pathlib import Path

    root = Path(root) if root is not None else Path(__file__).parent
    if report:
        return sorted([root / "report.py", *(root / "figures").rglob("*.py")])
    return sorted(f for f in root.glob("*.py") if f.name != "report.py")


def _code_version(report: bool, root=None) -> str:
    """Hash of the files :func:`code_files` lists (under ``root``, default this package).

    Results computed by other code are recomputed.
    """
    import hashlib
    from pathlib import Path

    root = Path(root) if root is not None else Path(__file__).parent
    h = hashlib.sha256()
    for f in code_files(report, root):
        # the path relative to the package, so a figure moved between modules counts as an edit
        h.update(f.relative_to(root).as_posix().encode() + f.read_bytes())
    return h.hexdigest()[:12]


import functools  # noqa: E402

#: What runs every analysis (the check of the cube, finalise, the Dask runner): part of each one's version.
_EXECUTION = ("registry", "runner")


@functools.lru_cache(maxsize=None)
def _local_imports(path, root) -> frozenset:
    """Top-level modules of this package that ``path`` imports (also inside functions); figures excluded."""
    import ast

    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                out |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
            elif node.level == 0 and node.module and node.module.split(".")[0] == "analyses":
                parts = node.module.split(".")
                out |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("analyses.")}
    return frozenset(m for m in out if (root / f"{m}.py").is_file() and m != "report")


@functools.lru_cache(maxsize=None)
def module_version(module: str, root=None) -> str:
    """Hash of the numerics one analysis depends on: its module, the package modules it imports
    (transitively), and what runs every analysis (:data:`_EXECUTION`).

    An analysis' results are recomputed when this changes, and only then: an edit to another analysis, to
    the interventions or the expert stages leaves them done.
    """
    import hashlib
    from pathlib import Path

    root = Path(root) if root is not None else Path(__file__).parent
    h = hashlib.sha256()
    start = module.rsplit(".", 1)[-1]
    if not module.startswith("analyses.") or not (root / f"{start}.py").is_file():
        # an analysis registered from elsewhere: its own file, and what runs it
        import importlib
        import inspect
        import sys

        try:
            h.update(inspect.getsource(sys.modules.get(module) or importlib.import_module(module)).encode())
        except (ImportError, OSError, TypeError):  # no source to read (an interactive session): its name only
            h.update(module.encode())
        start = None
    todo, seen = [m for m in (start, *_EXECUTION) if m], set()
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += sorted(_local_imports(root / f"{m}.py", root) - seen)
    for m in sorted(seen):
        h.update(f"{m}.py".encode() + (root / f"{m}.py").read_bytes())
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
from . import capacity  # noqa: E402,F401
from . import router_probability  # noqa: E402,F401

__all__ = [
    "VERSION",
    "module_version",
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
