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
    from . import get, missing_requirements

    ds = cubes.open_routing(routing_path, complete_only=True)
    if checkpoints is not None:
        have = set(map(str, ds.checkpoint.values))
        absent = [c for c in checkpoints if c not in have]
        if absent:
            raise cubes.CubeError(f"{routing_path}: checkpoints {absent} are not completely captured")
        ds = ds.sel(checkpoint=[c for c in map(str, ds.checkpoint.values) if c in set(checkpoints)])
    missing = missing_requirements(name, ds)
    if missing:
        raise ValueError(f"{routing_path}: analysis {name!r} needs variables {missing}, which the cube does not have")
    result = get(name).func(ds, **params)
    if client is not None:
        return client.compute(result).result()
    return result.compute()
