"""Test helpers for analyses: small seeded cubes, lazy copies of them, and a guard that
fails when a cube variable is computed where only a graph should be built.

Import these (``from cube_helpers import small_cube``); the fixtures built on them
live in conftest.py."""

from __future__ import annotations

import contextlib

import numpy as np

from storage.schema import FILL_ID, mock_cube

LAZY_CHUNKS = {"checkpoint": 1, "layer": 1, "token": 37}


def small_cube(**kw):
    """A small ragged mock cube (3 checkpoints, 3 layers, 3 domains, E=8, k=2)."""
    args = dict(n_checkpoints=3, n_layers=3, num_experts=8, top_k=2, n_samples=15, seq_len=20, seed=3)
    args.update(kw)
    return mock_cube(**args)


def punch_holes(ds, *, seed: int = 0, frac: float = 0.1):
    """Mark a random set of (layer, token) cells unwritten in every checkpoint.

    The -1 pattern stays identical across checkpoints (what ``change`` needs);
    weights and logits of those cells become NaN, as in an unwritten chunk.
    """
    ds = ds.copy(deep=True)
    rng = np.random.default_rng(seed)
    hole = rng.random((ds.sizes["layer"], ds.sizes["token"])) < frac
    ds["expert_ids"].values[:, hole, :] = FILL_ID
    ds["expert_weights"].values[:, hole, :] = np.nan
    if "router_logits" in ds:
        ds["router_logits"].values[:, hole, :] = np.nan
    return ds


class _Watched:
    """A read-only array source (like a Zarr array) that refuses reads while forbidden."""

    forbidden = False

    def __init__(self, values: np.ndarray):
        self.values = values
        self.shape, self.dtype, self.ndim = values.shape, values.dtype, values.ndim

    def __getitem__(self, key):
        if _Watched.forbidden:
            raise AssertionError("a cube variable was computed while building the graph")
        return self.values[key]


def lazy(ds):
    """The cube as ``xr.open_zarr`` gives it: dask, one checkpoint × one layer × a token chunk.

    Data variables read through :class:`_Watched`, so :func:`forbid_cube_compute`
    can tell when one is read.
    """
    import dask.array as da

    out = ds.chunk(LAZY_CHUNKS)  # token coordinates become dask too, as with open_zarr
    for name, var in ds.data_vars.items():
        chunks = tuple(LAZY_CHUNKS.get(d, var.sizes[d]) for d in var.dims)
        data = da.from_array(_Watched(var.values), chunks=chunks, name=f"cube-{name}-{id(ds)}")
        out[name] = (var.dims, data, var.attrs)
    return out


@contextlib.contextmanager
def forbid_cube_compute():
    """Fail if anything computed inside the block reads a data variable of a :func:`lazy` cube.

    Token coordinates may be read (group labels); cube variables may not.
    """
    _Watched.forbidden = True
    try:
        yield
    finally:
        _Watched.forbidden = False
