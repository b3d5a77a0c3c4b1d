"""Run one registered analysis over the routing cube on the Dask cluster."""

from __future__ import annotations

import xarray as xr

from storage import cube as cubes


def compute_analysis(routing_path, name: str, params: dict, *, checkpoints=None, client=None) -> xr.Dataset:
    """Open the cube lazily, build the analysis graph, compute it in one go.

    Only checkpoints whose capture completed are used (sorted by step); with
    ``checkpoints`` given, all of them must be complete, so a result never
    silently covers fewer checkpoints than the experiment names.

    Returns an in-memory Dataset (dims as documented by the analysis).
    """
    from .registry import run, skip_reason

    ds = cubes.open_routing(routing_path, complete_only=True)
    if checkpoints is not None:
        have = set(map(str, ds.checkpoint.values))
        absent = [c for c in checkpoints if c not in have]
        if absent:
            raise cubes.CubeError(f"{routing_path}: checkpoints {absent} are not completely captured")
        ds = ds.sel(checkpoint=[c for c in map(str, ds.checkpoint.values) if c in set(checkpoints)])
    reason = skip_reason(name, ds)
    if reason:
        raise ValueError(f"{routing_path}: analysis {name!r} cannot run: {reason}")
    result = run(name, ds, **params)  # checks the cube's ids (registry.checked_cube) and the result's metadata
    try:
        return _compute(result, client)
    except (ValueError, cubes.CubeError):
        raise  # the analyses' own refusals already name what is wrong
    except Exception as exc:  # codec / IO errors from a damaged chunk surface only now
        raise cubes.CubeError(f"{routing_path}: reading the routing cube failed during {name!r}: {exc}") from exc


def _compute(result: xr.Dataset, client) -> xr.Dataset:
    """Compute every lazy variable of ``result`` in one graph.

    The variables' dask arrays are computed as a list and put back, rather than
    handing the Dataset itself to ``client.compute``: distributed loses shared
    intermediates ("lost dependencies") when one output variable is derived
    from another through the Dataset collection.
    """
    import dask
    import dask.array as da

    lazy = {k: v for k, v in result.variables.items() if isinstance(v.data, da.Array)}
    if not lazy:
        return result
    arrays = [v.data for v in lazy.values()]
    values = client.compute(arrays, sync=True) if client is not None else dask.compute(*arrays)
    out = result.copy(deep=False)
    for name, value in zip(lazy, values):
        out.variables[name].data = value
    return out
