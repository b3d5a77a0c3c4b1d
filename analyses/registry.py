"""The analysis registry and the conventions every analysis follows.

An analysis is a pure function ``(routing: xr.Dataset, **params) -> xr.Dataset``
over the routing cube of :mod:`storage.schema`, registered here by name with
its figure, table and summary functions. Adding an analysis = one module that
calls :func:`register` + one import line in ``analyses/__init__.py`` + tests.

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
* Invalid expert ids (``FILL_ID`` = -1, unwritten) never count.

The helpers below the registry (``domain_codes``, ``reduce_by_domain``,
``refuse_if``, ``finalise``, ``tidy``...) are the shared building blocks that
keep those conventions in one place.
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
    figure : ``(result, out_dir, formats=("png",)) -> list[Path]``; PNG at 300 dpi.
    title, caption : what the figure shows, how to read it, the chance level.
    requires : cube variables that must be present.
    params : default keyword parameters of ``func``.
    table : ``result -> pandas.DataFrame`` (tidy), written as ``tables/<name>.csv``.
    summary : ``result -> dict`` of a few JSON-able headline numbers.
    optional : cube variables used when present (their outputs are left out
        otherwise).
    artifacts : optional ``(result, out_dir) -> list[Path]`` writing extra files
        for downstream tools (e.g. JSON mask-point lists) under ``out_dir``
        (the report passes ``tables/<name>/``) and linking them in the report.
    """

    name: str
    func: Callable[..., xr.Dataset]
    figure: FigureFunc
    title: str
    caption: str
    requires: tuple[str, ...]
    params: Mapping[str, Any]
    table: Callable[[xr.Dataset], pd.DataFrame]
    summary: Callable[[xr.Dataset], dict]
    optional: tuple[str, ...] = field(default=())
    artifacts: Callable[[xr.Dataset, Path], list[Path]] | None = field(default=None)

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


def run(name: str, routing: xr.Dataset, **params) -> xr.Dataset:
    """Run analysis ``name`` on ``routing`` with its defaults overridden by ``params``.

    Raises ValueError naming the missing cube variables or unknown parameters,
    or when the result breaks the conventions (:func:`check_result`).
    """
    analysis = get(name)
    missing = missing_requirements(name, routing)
    if missing:
        raise ValueError(
            f"analysis {name!r} needs cube variable(s) {missing}; the cube has {sorted(routing.data_vars)}"
        )
    unknown = sorted(set(params) - set(analysis.params))
    if unknown:
        raise ValueError(f"analysis {name!r}: unknown parameter(s) {unknown}; known: {sorted(analysis.params)}")
    result = analysis.func(routing, **{**analysis.params, **params})
    check_result(result, name)  # metadata only: cheap, and stops a malformed result at its source
    return result


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


def domain_codes(routing: xr.Dataset) -> tuple[xr.DataArray, np.ndarray]:
    """Integer code per token for its domain, and the sorted domain labels.

    Reads the ``domain`` coordinate (one label per token) into memory: group
    labels must be known before the graph is built (flox ``expected_groups``).

    Returns
    -------
    codes : DataArray (token,) int64, index into ``labels``
    labels : object ndarray (domain,)
    """
    if "domain" not in routing.coords:
        raise ValueError("routing cube: token coordinate 'domain' is missing")
    from .bootstrap import _memo

    raw = np.asarray(routing["domain"].values)

    def factorize():
        codes, labels = pd.factorize(pd.Series(raw).astype(str), sort=True)  # hashing, not sorting strings
        return codes.astype(np.int64), np.asarray(labels, dtype=object)

    codes, labels = _memo(raw, "domain_codes", factorize)
    return xr.DataArray(codes, dims="token"), labels


def reduce_by_domain(
    obj: xr.Dataset | xr.DataArray,
    routing: xr.Dataset,
    *,
    dim: str | tuple[str, ...],
    expert_ids: xr.DataArray | None = None,
    num_experts: int | None = None,
    func: str = "sum",
) -> xr.Dataset | xr.DataArray:
    """Grouped ``func`` of ``obj`` over ``dim`` by domain (and by expert id).

    A chunk-wise flox map-reduce: each (checkpoint, layer, token-chunk) block is
    reduced to (domain[, expert]) and the partial results are combined, so
    nothing is materialised per token.

    Parameters
    ----------
    obj : dims (..., token[, k]); token coordinates are dropped.
    dim : the dims reduced away (must include ``token``).
    expert_ids : optional (..., token, k) ids to group by as well; ids outside
        ``0..num_experts-1`` (``FILL_ID``) fall in no group and are excluded.

    Returns
    -------
    dims (..., domain[, expert]) with the domain labels as coordinate; empty
    groups hold 0 for sums.
    """
    codes, labels = domain_codes(routing)
    by = [codes.rename("_domain")]
    expected = [np.arange(len(labels))]
    if expert_ids is not None:
        if num_experts is None:
            raise ValueError("reduce_by_domain: num_experts is required with expert_ids")
        by.append(expert_ids.rename("_expert"))
        expected.append(np.arange(num_experts))
    obj = _drop_token_coords(obj)
    import flox.xarray

    out = flox.xarray.xarray_reduce(
        obj, *by, func=func, dim=dim, expected_groups=tuple(expected), fill_value=0
    )
    out = out.rename({"_domain": "domain"}).assign_coords(domain=("domain", labels))
    if expert_ids is not None:
        out = out.rename({"_expert": "expert"}).assign_coords(
            expert=("expert", np.arange(num_experts, dtype=np.int32))
        )
    # group dims last, whatever order flox returns them in
    return out.transpose(..., *(["domain", "expert"] if expert_ids is not None else ["domain"]))


def _drop_token_coords(obj):
    drop = [c for c in obj.coords if "token" in obj[c].dims]
    return obj.drop_vars(drop)


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
) -> xr.Dataset:
    """Attach coordinates and attrs every result carries.

    ``step`` (numpy, on ``checkpoint``), the provenance of the cube
    (num_experts, top_k, inputs_hash, source, model_family, router_semantics)
    and the analysis' own ``definition``/``normalisation``/``chance``/``params``.
    """
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


def describe(var: xr.DataArray, long_name: str, units: str, description: str, **extra) -> xr.DataArray:
    """``var`` with the variable attrs of the conventions (and any ``extra`` such as chance, nan_where)."""
    var = var.copy()
    var.attrs = {"long_name": long_name, "units": units, "description": description, **extra}
    return var


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
    raise ValueError(f"unknown token view {view!r}; expected one of {VIEWS}")


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
