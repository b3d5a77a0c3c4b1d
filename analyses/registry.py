"""The analysis registry and the conventions every analysis follows.

An analysis is a pure function ``(routing: xr.Dataset, *, **params) -> xr.Dataset``
over the routing cube of :mod:`storage.schema`, registered here by name with
its figure, table and summary functions and its ``OUTPUTS`` table. Adding an
analysis touches one analysis module (function, ``OUTPUTS``, :func:`register`),
one figure module ``analyses/figures/<name>.py``, one import line in
``analyses/__init__.py`` and one test file: docs/adding-an-analysis.md walks
through ``router_probability``.

Conventions (checked by :func:`check_result` and the contract test)
-------------------------------------------------------------------
* Result dims are drawn from :data:`RESULT_DIMS`; ``step`` stays a coordinate
  on ``checkpoint``.
* Result attrs :data:`RESULT_ATTRS` say what was computed, how it is
  normalised and the chance level under uniform random routing.
* Every data variable carries :data:`VARIABLE_ATTRS`; a variable that may
  legitimately hold NaN says when in its ``nan_where`` attr; all others must be
  finite.
* Lazy in, lazy out: on a dask-backed cube the function only builds a graph
  (chunk-wise reductions, ``flox`` for grouped ones) and never reads a cube
  variable; the caller computes. Token *coordinates* (e.g. ``domain``, one
  label per token) may be read eagerly to fix group labels.
* Unwritten slots (``FILL_ID`` = -1) never count. Ids outside ``-1..E-1`` never
  reach an analysis: :func:`run` checks them once, where it hands the cube over
  (:func:`checked_cube`); analyses carry no guard of their own.
* Outputs are declared as data: each module's ``OUTPUTS`` maps a variable to an
  :class:`analyses.outputs.Output` (long_name, units, description, chance,
  nan_where), and :func:`finalise` stamps it (bootstrap ``_lo``/``_hi`` bounds
  inherit their variable's).
* Parameters are the function's keyword-only parameters with type annotations
  and defaults (``Analysis.params`` reads them back; nothing is written twice);
  their allowed values come from ``Annotated[T, Range(...)]``,
  ``Analysis.constraints`` or the shared :data:`PARAM_RULES`, and
  :func:`validate_params` checks an experiment's ``[analyses.params.<name>]``
  against them before anything runs.

The helpers below the registry (``token_var``, ``view_ids``, ``safe_ratio``,
``finalise``, ``tidy``...) are the shared building blocks that keep those
conventions in one place.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from storage.schema import FILL_ID

from .outputs import Output, apply_outputs

# Dims an analysis result may use. Later analyses add names here (one place),
# so that reports and writers know every dim they can meet.
RESULT_DIMS: tuple[str, ...] = (
    "checkpoint",
    "layer",
    "expert",
    "expert_b",
    "domain",
    "condition",
    "lag",
    "view",  # token views: all / canonical / last_canonical (see view_mask)
    "position_bin",  # buckets of the token position inside its sample
    "bin",  # histogram bins
    "expert_next",  # top-1 expert of the next token (temporal transitions)
)
RESULT_ATTRS: tuple[str, ...] = ("analysis", "definition", "normalisation", "chance")
VARIABLE_ATTRS: tuple[str, ...] = ("long_name", "units", "description")

FigureFunc = Callable[..., list[Path]]


@dataclass(frozen=True)
class Analysis:
    """One registered analysis.

    Attributes
    ----------
    name : registry key, also the file stem of its outputs.
    func : ``(routing, **params) -> xr.Dataset``; pure, lazy when the input is.
    figure : ``(result, out_dir, formats=("png",)) -> list[Path]``; PNG at 300 dpi, the report's
        width. Registered as ``analyses.figures.hook(name)``: the drawing lives in
        ``analyses/figures/<name>.py``, outside ``VERSION`` (the result cache key).
    title, caption : what the figure shows, how to read it, the chance level.
    requires : cube variables that must be present.
    params : (property) the default parameters, read from ``func``'s keyword-only
        parameters with defaults; there is no second list to keep in step.
    table : ``result -> pandas.DataFrame`` (tidy), written as ``tables/<name>.csv``.
    summary : ``result -> dict`` of a few JSON-able headline numbers.
    optional : cube variables used when present (their outputs are left out
        otherwise).
    artifacts : optional ``(result, out_dir) -> list[Path]`` writing extra files
        for downstream tools (e.g. JSON mask-point lists) under ``out_dir``
        (the report passes ``tables/<name>/``) and linking them in the report.
    constraints : per-parameter constraints (:class:`Range`, :class:`OneOf`,
        :class:`SubsetOf`) overriding :data:`PARAM_RULES` for this analysis; a
        ``typing.Annotated[int, Range(...)]`` annotation on ``func`` does the same.
    outputs : the module's ``OUTPUTS`` table (variable -> :class:`analyses.outputs.Output`),
        which :func:`finalise` stamps on the result.
    """

    name: str
    func: Callable[..., xr.Dataset]
    figure: FigureFunc
    title: str
    caption: str
    requires: tuple[str, ...]
    table: Callable[[xr.Dataset], pd.DataFrame]
    summary: Callable[[xr.Dataset], dict]
    optional: tuple[str, ...] = field(default=())
    artifacts: Callable[[xr.Dataset, Path], list[Path]] | None = field(default=None)
    constraints: Mapping[str, Any] = field(default_factory=dict)
    # What the data must offer (skip_reason): an aggregate-counts cube (layer × domain × expert
    # slot counts, no tokens) only for analyses that accept one; at least this many checkpoints /
    # distinct domain labels.
    accepts_counts: bool = False
    min_checkpoints: int = 1
    min_domains: int = 1
    outputs: Mapping[str, Output] = field(default_factory=dict)

    @property
    def params(self) -> dict[str, Any]:
        """The default parameters: ``func``'s keyword-only parameters and their defaults."""
        import inspect

        return {p.name: p.default for p in inspect.signature(self.func).parameters.values()
                if p.kind is p.KEYWORD_ONLY and p.default is not p.empty}

    def __call__(self, routing: xr.Dataset, **params) -> xr.Dataset:
        return run(self.name, routing, **params)


REGISTRY: dict[str, Analysis] = {}


def register(analysis: Analysis, *, replace: bool = False) -> Analysis:
    """Add ``analysis`` to :data:`REGISTRY` and return it.

    Raises ValueError on a duplicate name (unless ``replace``) or a malformed entry.
    """
    if not analysis.name or not analysis.name.isidentifier():
        raise ValueError(f"analysis name {analysis.name!r} must be a non-empty identifier (it names files)")
    if analysis.name in REGISTRY and not replace:
        raise ValueError(f"analysis {analysis.name!r} is already registered")
    for attr in ("func", "figure", "table", "summary"):
        if not callable(getattr(analysis, attr)):
            raise ValueError(f"analysis {analysis.name!r}: field '{attr}' must be callable")
    if not isinstance(analysis.requires, tuple) or "expert_ids" not in analysis.requires:
        raise ValueError(f"analysis {analysis.name!r}: 'requires' must be a tuple naming at least 'expert_ids'")
    REGISTRY[analysis.name] = analysis
    return analysis


def get(name: str) -> Analysis:
    """The registered analysis called ``name`` (KeyError lists the known names)."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown analysis {name!r}; known: {sorted(REGISTRY)}") from None


def missing_requirements(name: str, routing: xr.Dataset) -> list[str]:
    """Cube variables that analysis ``name`` requires and ``routing`` lacks."""
    return [v for v in get(name).requires if v not in routing.data_vars]


def skip_reason(name: str, routing: xr.Dataset) -> str | None:
    """Why analysis ``name`` cannot run on ``routing`` (one sentence), or None when it can.

    Reasons, in order: the cube holds aggregate counts only and the analysis
    needs per-token routing; required variables are missing; fewer checkpoints
    or distinct domain labels than the analysis needs. Reads only coordinates.
    """
    from storage.schema import is_counts_cube

    analysis = get(name)
    source = routing.attrs.get("source", "unknown source")
    counts = is_counts_cube(routing)
    if counts and not analysis.accepts_counts:
        return (f"the routing cube holds aggregate counts only (routing slots per layer × domain × expert, no "
                f"tokens; source: {source}); {name!r} needs per-token routing")
    if not counts:
        missing = missing_requirements(name, routing)
        if missing:
            return f"the routing cube has no {', '.join(missing)} (source: {source})"
    C = routing.sizes.get("checkpoint", 0)
    if "complete" in routing.data_vars and analysis.min_checkpoints > 1:
        C = int((np.asarray(routing["complete"].values) == 1).sum())  # a small read: one flag per checkpoint
    if C < analysis.min_checkpoints:
        return (f"{name!r} compares checkpoints and needs at least {analysis.min_checkpoints}; the routing cube "
                f"has {C} complete checkpoint(s)")
    if analysis.min_domains > 1:
        if counts:
            labels = [str(d) for d in np.asarray(routing["domain"].values)]
        elif "domain" in routing.coords:
            labels = [str(d) for d in pd.unique(pd.Series(np.asarray(routing["domain"].values), dtype=object))]
        else:
            labels = []
        if len(set(labels)) < analysis.min_domains:
            shown = sorted(set(labels))[:5]
            return (f"{name!r} compares domains and needs at least {analysis.min_domains} distinct domain labels; "
                    f"the routing cube has {len(set(labels))} ({shown}; give a side table with a 'domain' column "
                    "to label samples)")
    return None


def run(name: str, routing: xr.Dataset, **params) -> xr.Dataset:
    """Run analysis ``name`` on ``routing`` with its defaults overridden by ``params``.

    Raises ValueError naming the missing cube variables or unknown parameters,
    ParamError (a ValueError) for a parameter outside its declared type/range
    (:func:`validate_params`), or ValueError when the result breaks the
    conventions (:func:`check_result`).
    """
    analysis = get(name)
    missing = [] if analysis.accepts_counts and _is_counts(routing) else missing_requirements(name, routing)
    if missing:
        raise ValueError(
            f"analysis {name!r} needs cube variable(s) {missing}; the cube has {sorted(routing.data_vars)}"
        )
    unknown = sorted(set(params) - set(analysis.params))
    if unknown:
        raise ValueError(f"analysis {name!r}: unknown parameter(s) {unknown}; known: {sorted(analysis.params)}")
    params = validate_params(name, params)  # a wrong type or range fails here, naming the key, not deep in a graph
    result = analysis.func(checked_cube(routing, analysis.requires), **params)
    check_result(result, name)  # metadata only: cheap, and stops a malformed result at its source
    return result


# What a valid cube holds, checked where an analysis opens it (:func:`run`), never in the analyses:
# variable -> (the bad cells, the dims a message sums over, the message).
def _bad_ids(ids, E):
    return (ids >= E) | (ids < FILL_ID)


def _id_checks(routing: xr.Dataset, requires: Sequence[str]) -> dict:
    from storage.schema import is_counts_cube

    if is_counts_cube(routing):
        return {"slot_counts": (lambda a: a < 0, ("expert",), "slot_counts: cells not recorded (-1) in the counts cube")}
    E, _ = cube_sizes(routing)
    checks = {"expert_ids": (lambda a: _bad_ids(a, E), ("token", "k"),
                             f"expert_ids: slots with ids outside -1..{E - 1} (num_experts={E})")}
    if "capacity_dropped" in requires:
        checks["capacity_dropped"] = (lambda a: (a < -1) | (a > 1), ("token", "k"),
                                      "capacity_dropped outside -1..1: slots")
    return checks


def checked_cube(routing: xr.Dataset, requires: Sequence[str] = ("expert_ids",)) -> xr.Dataset:
    """``routing`` whose expert ids (and the other variables ``requires`` names that have a valid range) are checked.

    An id outside ``-1..E-1`` would silently fall out of every group, so it is refused
    here, once, for every analysis. In memory the check runs now and raises ValueError
    naming the (checkpoint, layer) cells and how many slots are bad. On dask each block
    of the variable is checked as it is read, inside the graph: no extra pass over the
    cube, and every kernel downstream sees checked blocks only, so the ValueError is
    what computing the result raises. An aggregate-counts cube gets its ``slot_counts``
    checked for unrecorded (-1) cells the same way.
    """
    out = routing
    for vname, (is_bad, over, what) in _id_checks(routing, requires).items():
        if vname not in routing.data_vars:
            continue
        var = routing[vname]
        checked = _checked_data(var, is_bad, over, what)
        if checked is not None:
            out = out.copy() if out is routing else out
            out[vname] = var.copy(data=checked)
    return out


def _checked_data(var: xr.DataArray, is_bad, over: Sequence[str], what: str):
    """None after checking an in-memory ``var`` now; for dask, its data with a check per block."""
    axes = tuple(var.get_axis_num(d) for d in over if d in var.dims)
    keep = [i for i in range(var.ndim) if i not in axes]
    labels = {var.dims[i]: (np.asarray(var[var.dims[i]].values) if var.dims[i] in var.coords
                            else np.arange(var.shape[i])) for i in keep}

    def check(block, block_info=None):
        bad = np.asarray(is_bad(np.asarray(block))).sum(axis=axes)
        if np.any(bad):
            offset = [block_info[0]["array-location"][i][0] for i in keep] if block_info else None
            raise ValueError(f"{what} at " + offenders(bad, labels, offset))
        return block

    if var.chunks is None:
        check(var.values)
        return None
    return var.data.map_blocks(check, dtype=var.dtype)


def _is_counts(routing: xr.Dataset) -> bool:
    from storage.schema import is_counts_cube

    return is_counts_cube(routing)


def check_result(result: xr.Dataset, name: str | None = None) -> None:
    """Raise ValueError listing every way ``result`` breaks the result conventions."""
    where = f"result of analysis {name!r}" if name else "analysis result"
    problems = []
    if not isinstance(result, xr.Dataset):
        raise ValueError(f"{where}: expected an xarray.Dataset, got {type(result).__name__}")
    if not result.data_vars:
        problems.append("no data variables")
    for attr in RESULT_ATTRS:
        if attr not in result.attrs or result.attrs[attr] in ("", None):
            problems.append(f"attribute '{attr}' missing or empty")
    if name and result.attrs.get("analysis") not in (None, name):
        problems.append(f"attrs['analysis'] is {result.attrs.get('analysis')!r}, expected {name!r}")
    bad_dims = sorted(set(result.dims) - set(RESULT_DIMS))
    if bad_dims:
        problems.append(f"dims {bad_dims} not among {RESULT_DIMS}")
    if "checkpoint" in result.dims and "step" not in result.coords:
        problems.append("coordinate 'step' missing on dim 'checkpoint'")
    for vname, var in result.data_vars.items():
        for attr in VARIABLE_ATTRS:
            if not var.attrs.get(attr):
                problems.append(f"variable '{vname}' lacks attribute '{attr}'")
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems))


# ---------------------------------------------------------------------------
# Building blocks for analysis authors
# ---------------------------------------------------------------------------


def is_lazy(obj: xr.Dataset | xr.DataArray) -> bool:
    """True when any data variable of ``obj`` is a dask array."""
    variables = obj.data_vars.values() if isinstance(obj, xr.Dataset) else [obj]
    return any(v.chunks is not None for v in variables)


def cube_sizes(routing: xr.Dataset) -> tuple[int, int]:
    """``(num_experts, top_k)`` of the cube, checked against its dims.

    Raises ValueError when the attrs are missing or disagree with ``expert_ids``.
    """
    for attr in ("num_experts", "top_k"):
        if attr not in routing.attrs:
            raise ValueError(f"routing cube: attribute '{attr}' is missing")
    E, k = int(routing.attrs["num_experts"]), int(routing.attrs["top_k"])
    if "expert_ids" in routing and routing["expert_ids"].sizes.get("k") != k:
        raise ValueError(
            f"routing cube: 'expert_ids' has {routing['expert_ids'].sizes.get('k')} slots (dim 'k'), "
            f"attrs say top_k={k}"
        )
    if E < 1 or k < 1 or k > E:
        raise ValueError(f"routing cube: attrs num_experts={E}, top_k={k}; expected 1 <= top_k <= num_experts")
    return E, k


def checkpoint_steps(routing: xr.Dataset) -> np.ndarray:
    """The ``step`` of each checkpoint as int64 numpy (a small coordinate read)."""
    if "step" not in routing.coords:
        raise ValueError("routing cube: coordinate 'step' (on dim 'checkpoint') is missing")
    return np.asarray(routing["step"].values, dtype=np.int64)


def token_var(routing: xr.Dataset, name: str) -> xr.DataArray:
    """Cube variable ``name`` stripped of its token and other non-index coordinates.

    The token table travels as coordinates; dropping them keeps graphs small
    and stops labels such as ``domain`` clashing with result dims. ``step``
    goes too: once a result is rechunked it would become a dask array that
    every later merge compares by computing it; :func:`finalise` puts it back.
    """
    if name not in routing:
        raise ValueError(f"routing cube: variable '{name}' is missing")
    var = routing[name].reset_coords(drop=True)
    if "token" in var.coords:
        var = var.drop_vars("token")
    return var


def token_mask(routing: xr.Dataset, canonical_only: bool) -> xr.DataArray | None:
    """Boolean mask along ``token`` of the tokens to keep, or None for all."""
    if not canonical_only:
        return None
    if "canonical" not in routing.coords:
        raise ValueError("routing cube: coordinate 'canonical' is missing (needed by canonical_only=True)")
    return xr.DataArray(np.asarray(routing["canonical"].values, dtype=bool), dims="token")


def routed_ids(routing: xr.Dataset, *, canonical_only: bool = False) -> xr.DataArray:
    """``expert_ids`` (checkpoint, layer, token, k) with dropped tokens set to ``FILL_ID``."""
    ids = token_var(routing, "expert_ids")
    mask = token_mask(routing, canonical_only)
    if mask is not None:
        ids = ids.where(mask, FILL_ID).astype(ids.dtype)
    return ids


def safe_ratio(num: xr.DataArray, den: xr.DataArray) -> xr.DataArray:
    """``num / den`` with NaN (not inf, no warning) where ``den`` is 0."""
    return (num / den.where(den != 0)).astype(np.float64)


def refuse_if(bad: xr.DataArray, what: str) -> xr.DataArray:
    """A zero-valued guard that raises ValueError when ``bad`` has a non-zero cell.

    The message is ``what`` followed by the offending cells named by their
    coordinate labels and values. In memory the check runs now. On dask it runs
    block by block inside the graph, so a check that needs the whole cube costs
    no extra pass, adds no barrier between chunks, and surfaces as a clear
    ValueError when the caller computes. Add the guard to every result variable
    (:func:`attach_guard`) so that computing any of them runs it.
    """
    labels = {
        d: (np.asarray(bad[d].values) if d in bad.coords else np.arange(bad.sizes[d])) for d in bad.dims
    }

    def _check(values, block_info=None):
        values = np.asarray(values)
        if np.any(values):
            offset = [loc[0] for loc in block_info[0]["array-location"]] if block_info else None
            raise ValueError(f"{what} at " + offenders(values, labels, offset))
        return np.zeros(values.shape, dtype=np.int8)

    if bad.chunks is None:
        return bad.copy(data=_check(bad.values))
    return bad.copy(data=bad.data.map_blocks(_check, dtype=np.int8))


def attach_guard(result: xr.Dataset, guard: xr.DataArray) -> xr.Dataset:
    """Make every data variable of ``result`` depend on ``guard`` (zeros), keeping dtypes and attrs."""
    guard = guard.drop_vars([c for c in guard.coords if c not in guard.dims])
    # reduced to one zero: a guard chunked like the cube, added to results chunked
    # otherwise, would rechunk every variable; a 0-d sum still runs every check
    guard = guard.astype(np.int64).sum()
    out = result.copy()
    for name, var in result.data_vars.items():
        g = guard.astype(var.dtype) if var.dtype.kind in "iuf" else guard
        new = var + g
        new = new.transpose(*var.dims)
        new.attrs = dict(var.attrs)
        out[name] = new
    return out


def offenders(
    bad: np.ndarray, labels: Mapping[str, Sequence], offset: Sequence[int] | None = None, limit: int = 5
) -> str:
    """Text naming the first ``limit`` non-zero cells of ``bad`` by coordinate labels.

    ``offset`` is the position of ``bad`` inside the full array (for a block).
    """
    idx = np.argwhere(bad)
    offset = list(offset) if offset is not None else [0] * bad.ndim
    parts = []
    for cell in idx[:limit]:
        where = ", ".join(f"{d} {labels[d][i + o]}" for d, i, o in zip(labels, cell, offset))
        parts.append(f"{where or 'all'}: {int(bad[tuple(cell)])}")
    more = f" (and {len(idx) - limit} more)" if len(idx) > limit else ""
    return "; ".join(parts) + more


def json_number(x) -> float | int | None:
    """A JSON-safe Python number (NaN/inf -> None)."""
    x = np.asarray(x).item()
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, int):
        return int(x)
    x = float(x)
    return x if math.isfinite(x) else None


def finalise(
    result: xr.Dataset,
    routing: xr.Dataset,
    *,
    name: str,
    definition: str,
    normalisation: str,
    chance: float | str,
    params: Mapping[str, Any],
    outputs: Mapping[str, Output] | None = None,
    context: Mapping[str, Any] | None = None,
) -> xr.Dataset:
    """Attach coordinates and attrs every result carries.

    ``step`` (numpy, on ``checkpoint``), the provenance of the cube
    (num_experts, top_k, inputs_hash, source, model_family, router_semantics)
    and the analysis' own ``definition``/``normalisation``/``chance``/``params``.
    With ``outputs`` (the module's ``OUTPUTS`` table) every data variable gets its
    declared attrs (:func:`analyses.outputs.apply_outputs`; an undeclared variable
    is refused). The declarations' templates are filled from the cube's
    ``num_experts`` and ``top_k``, ``params`` and ``context`` (what else the
    analysis knows, e.g. whether the router is a sigmoid one).
    """
    if outputs is not None:
        sizes = {key: int(routing.attrs[key]) for key in ("num_experts", "top_k") if key in routing.attrs}
        result = apply_outputs(result, outputs, where=f"result of analysis {name!r}",
                               context={**sizes, **params, **(context or {})})
    if "checkpoint" in result.dims:
        steps = pd.Series(checkpoint_steps(routing), index=np.asarray(routing["checkpoint"].values))
        result = result.assign_coords(
            step=("checkpoint", steps.loc[np.asarray(result["checkpoint"].values)].to_numpy())
        )
        result["step"].attrs.update(long_name="training step", units="step")
    attrs = {
        "analysis": name,
        "definition": definition,
        "normalisation": normalisation,
        "chance": chance if isinstance(chance, str) else float(chance),
        "params": json.dumps(dict(params), sort_keys=True),
    }
    for key in ("num_experts", "top_k"):
        if key in routing.attrs:
            attrs[key] = int(routing.attrs[key])
    for key in ("inputs_hash", "source", "model_family", "router_semantics"):
        if key in routing.attrs:
            attrs[key] = str(routing.attrs[key])
    result.attrs = attrs
    return result


def tidy(result: xr.Dataset, variables: Sequence[str]) -> pd.DataFrame:
    """Long table of ``variables`` (which must share dims) with one row per cell.

    Columns: the dims, ``step`` when there is a checkpoint dim, then one
    column per variable.
    """
    present = [v for v in variables if v in result]
    if not present:
        raise ValueError(f"tidy: none of {list(variables)} in result {sorted(result.data_vars)}")
    sub = result[present].compute()
    df = sub.to_dataframe().reset_index()
    keep = list(sub[present[0]].dims) + (["step"] if "step" in df.columns else []) + present
    return df[keep]


# Token views shared by analyses that compare token selections (METRICS.md "Views").
VIEWS: tuple[str, ...] = ("all", "canonical", "last_canonical")
# Per-phase views (the ``phase`` token coordinate): the tokens of a served prompt / of the generated
# output. Analyses add them by themselves when a cube labels more than one phase.
PHASE_VIEWS: tuple[str, ...] = ("prefill", "decode")


def last_canonical_mask(routing: xr.Dataset) -> np.ndarray:
    """Boolean (token,) numpy mask of the last canonical token of each sample.

    The last canonical token of a sample is its token with the largest index
    along ``token`` whose ``canonical`` coordinate is True; a sample with no
    canonical token contributes none. Reads the ``sample`` and ``canonical``
    coordinates (no cube variable).
    """
    for coord in ("sample", "canonical"):
        if coord not in routing.coords:
            raise ValueError(f"routing cube: token coordinate '{coord}' is missing (needed by view 'last_canonical')")
    canonical = np.asarray(routing["canonical"].values, dtype=bool)
    sample = np.asarray(routing["sample"].values)
    idx = np.flatnonzero(canonical)
    last = pd.Series(idx).groupby(sample[idx]).max().to_numpy()
    mask = np.zeros(canonical.shape, dtype=bool)
    mask[last] = True
    return mask


def view_mask(routing: xr.Dataset, view: str) -> xr.DataArray | None:
    """Boolean mask along ``token`` of the tokens of ``view`` (None for 'all').

    Views: ``all`` every token; ``canonical`` tokens whose ``canonical`` flag is
    set (non-whitespace); ``last_canonical`` the last canonical token of each
    sample (:func:`last_canonical_mask`).
    """
    if view == "all":
        return None
    if view == "canonical":
        return token_mask(routing, True)
    if view == "last_canonical":
        return xr.DataArray(last_canonical_mask(routing), dims="token")
    if view in PHASE_VIEWS:
        if "phase" not in routing.coords:
            raise ValueError(f"routing cube: token coordinate 'phase' is missing (needed by view {view!r})")
        return xr.DataArray(np.asarray(routing["phase"].values, dtype=object) == view, dims="token")
    raise ValueError(f"unknown token view {view!r}; expected one of {VIEWS + PHASE_VIEWS}")


def view_ids(routing: xr.Dataset, view: str) -> xr.DataArray:
    """``expert_ids`` (checkpoint, layer, token, k) with tokens outside ``view`` set to ``FILL_ID``."""
    ids = token_var(routing, "expert_ids")
    mask = view_mask(routing, view)
    if mask is not None:
        ids = ids.where(mask, FILL_ID).astype(ids.dtype)
    return ids


def view_classes(routing: xr.Dataset, views: Sequence[str]) -> tuple[xr.DataArray, xr.DataArray]:
    """Token classes that partition the tokens so that every view is a union of classes.

    The views are nested (last_canonical ⊂ canonical ⊂ all), so three classes
    suffice: 0 not canonical, 1 canonical but not the last of its sample, 2 the
    last canonical token of its sample. A token pass grouped by class (one pass,
    3 × the bins) then gives every view by summing classes, instead of one
    masked pass per view.

    Returns
    -------
    codes : DataArray (token,) int8, the class of each token (numpy: reads the
        ``canonical`` and ``sample`` coordinates)
    member : DataArray (view, view_class) int64, 1 where the class belongs to the view
    """
    views = list(views)
    bad = [v for v in views if v not in VIEWS]
    if bad:
        raise ValueError(f"unknown token view(s) {bad}; expected among {VIEWS}")
    codes = np.zeros(routing.sizes["token"], dtype=np.int8)
    if any(v != "all" for v in views):
        canonical = np.asarray(token_mask(routing, True).values)
        codes[canonical] = 1
        if "last_canonical" in views:
            codes[last_canonical_mask(routing)] = 2
    member = np.array([[1, 1, 1], [0, 1, 1], [0, 0, 1]], dtype=np.int64)[[VIEWS.index(v) for v in views]]
    return (
        xr.DataArray(codes, dims="token"),
        xr.DataArray(member, dims=("view", "view_class"), coords={"view": np.asarray(views, dtype=object)}),
    )


def over_slots(x: xr.DataArray, how: str = "sum", dim: str = "k") -> xr.DataArray:
    """``x.sum(dim)`` / ``x.any(dim)`` / ``x.all(dim)`` over the few top-k slots, unrolled.

    An elementwise chain of k − 1 operations: on dask it fuses into the token
    pass that consumes it (a reduction would be separate tasks per block and a
    separate pass over the data), and numpy's reductions over a length-2 axis
    are several times slower than one elementwise add. ``sum`` propagates NaN
    (unlike xarray's default ``skipna``).
    """
    op = {"sum": lambda a, b: a + b, "any": lambda a, b: a | b, "all": lambda a, b: a & b}[how]
    out = x.isel({dim: 0}, drop=True)
    for i in range(1, x.sizes[dim]):
        out = op(out, x.isel({dim: i}, drop=True))
    return out


# ---------------------------------------------------------------------------
# Parameters: declared by each analysis' signature, validated in one place
# ---------------------------------------------------------------------------
#
# An analysis declares its parameters by its function signature only: keyword-only
# parameters with a type annotation and a default (``Analysis.params`` reads them
# back). The allowed values come, first match wins, from a
# ``typing.Annotated[T, <constraint>]`` annotation, ``Analysis.constraints``,
# then :data:`PARAM_RULES` (shared names such as ``n_boot`` and ``ci`` mean the
# same in every analysis). :func:`validate_params` checks an experiment's
# ``[analyses.params.<name>]`` table before anything runs, so a new analysis is
# validated without code of its own.


class ParamError(ValueError):
    """A parameter value is outside what its analysis declares; the message names the key."""


@dataclass(frozen=True)
class Range:
    """Numbers from ``lo`` to ``hi`` (None: unbounded), closed unless ``*_open``."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, x) -> bool:
        if self.lo is not None and (x <= self.lo if self.lo_open else x < self.lo):
            return False
        if self.hi is not None and (x >= self.hi if self.hi_open else x > self.hi):
            return False
        return True

    def __str__(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo}" if self.lo is not None else "any value"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {self.hi}"
        return f"{'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"


@dataclass(frozen=True)
class OneOf:
    """One of ``choices``."""

    choices: tuple

    def __contains__(self, x) -> bool:
        return x in self.choices

    def __str__(self) -> str:
        return "one of " + ", ".join(repr(c) for c in self.choices)


@dataclass(frozen=True)
class SubsetOf:
    """A non-empty list of distinct ``choices``."""

    choices: tuple

    def __contains__(self, xs) -> bool:
        return bool(xs) and len(set(xs)) == len(xs) and all(x in self.choices for x in xs)

    def __str__(self) -> str:
        return "distinct names among " + ", ".join(repr(c) for c in self.choices)


# Shared meanings. n_boot is capped: the replicate matrices are (n_boot, samples)
# per group, so 1e7 replicates would exhaust memory long before giving better intervals.
MAX_BOOT = 100_000
PARAM_RULES: dict[str, Any] = {
    "n_boot": Range(0, MAX_BOOT),
    "ci": Range(0, 1, lo_open=True, hi_open=True),
    "seed": Range(0, None),
    "view": OneOf(VIEWS + PHASE_VIEWS),
    "views": SubsetOf(VIEWS),
    "hist_bins": Range(1, 10_000),
    "position_bins": Range(1, 10_000),
    "max_lag": Range(1, 4096),
    "n_shuffle": Range(1, MAX_BOOT),
    "min_count": Range(1, None),
    "fdr_q": Range(0, 1, lo_open=True, hi_open=True),
    "percentile": Range(0, 100),
    "min_abs": Range(0, None),
    "dead_fraction": Range(0, 1),
    "cold_fraction": Range(0, 1),
}


@dataclass(frozen=True)
class ParamSpec:
    """One declared parameter of an analysis."""

    name: str
    type: Any  # int, float, bool, str, or a sequence type such as Sequence[str]
    default: Any
    constraint: Any = None  # Range / OneOf / SubsetOf, or None

    def describe(self) -> str:
        words = _param_type_words(self.type)
        if isinstance(self.constraint, Range) and str(self.constraint)[0] in "[(":
            return f"{words} {self.constraint}"
        words = words.removesuffix(" in")
        if isinstance(self.constraint, Range):
            return f"{words} {self.constraint}"
        return f"{words} ({self.constraint})" if self.constraint is not None else words


def _param_type_words(tp) -> str:
    import typing

    if typing.get_origin(tp) in (list, tuple, Sequence):
        inner = (typing.get_args(tp) or (Any,))[0]
        return "a list of " + {str: "strings", int: "integers", float: "numbers"}.get(inner, "values")
    return {int: "an integer in", float: "a number in", bool: "true or false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def param_specs(name: str) -> dict[str, ParamSpec]:
    """The declared parameters of analysis ``name``, keyed by parameter name.

    The parameters are ``func``'s keyword-only parameters with defaults. Type and
    constraint come from their annotations (``Annotated`` metadata first), then
    ``Analysis.constraints``, then :data:`PARAM_RULES`.
    """
    import typing

    analysis = get(name)
    try:
        hints = typing.get_type_hints(analysis.func, include_extras=True)
    except (NameError, TypeError):  # an unresolvable annotation: fall back to the defaults' types
        hints = {}
    specs = {}
    for pname, default in analysis.params.items():
        tp = hints.get(pname)
        constraint = None
        if typing.get_origin(tp) is typing.Annotated:
            tp, *meta = typing.get_args(tp)
            constraint = next((m for m in meta if isinstance(m, (Range, OneOf, SubsetOf))), None)
        if tp is None or tp is Any:
            tp = type(default) if default is not None else Any
        if constraint is None:
            constraint = analysis.constraints.get(pname, PARAM_RULES.get(pname))
        specs[pname] = ParamSpec(pname, tp, default, constraint)
    return specs


def _coerce(value, spec: ParamSpec, where: str):
    """``value`` as ``spec.type`` (int -> float widening only), or ParamError naming ``where``."""
    import numbers
    import typing

    tp = spec.type

    def bad():
        return ParamError(f"{where}: expected {spec.describe()}, got {value!r}")

    if tp is bool:
        if not isinstance(value, (bool, np.bool_)):
            raise bad()
        value = bool(value)
    elif tp is int:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
            raise bad()
        value = int(value)
    elif tp is float:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise bad()
        value = float(value)
    elif tp is str:
        if not isinstance(value, str):
            raise bad()
    elif typing.get_origin(tp) in (list, tuple, Sequence):
        inner = (typing.get_args(tp) or (Any,))[0]
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise bad()
        if inner is not Any and not all(isinstance(v, inner) and not isinstance(v, bool) for v in value):
            raise bad()
        value = list(value)
    if spec.constraint is not None and value not in spec.constraint:
        raise bad()
    return value


def validate_params(name: str, params: Mapping[str, Any], where: str | None = None) -> dict[str, Any]:
    """Check ``params`` against analysis ``name``'s declared parameters.

    Parameters
    ----------
    name : a registered analysis.
    params : parameter name -> value (an experiment's ``[analyses.params.<name>]``).
    where : prefix of the key in messages (default ``analyses.params.<name>``).

    Returns
    -------
    dict of the given parameters converted to their declared types (ints widened
    to floats where a float is declared, sequences as lists).

    Raises
    ------
    ParamError (a ValueError) naming the key: an unknown parameter, a wrong type,
    a value outside the declared range or choices.
    """
    where = where or f"analyses.params.{name}"
    if not isinstance(params, Mapping):
        raise ParamError(f"{where}: must be a table of parameters, got {type(params).__name__}")
    specs = param_specs(name)
    out = {}
    for key, value in params.items():
        if key not in specs:
            raise ParamError(f"unknown key '{where}.{key}'; expected one of: {', '.join(sorted(specs)) or '(none)'}")
        out[key] = _coerce(value, specs[key], f"{where}.{key}")
    return out
