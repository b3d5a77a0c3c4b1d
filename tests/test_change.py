"""change: the per-token kernel against the xarray formulas, any chunking gives
the in-memory result, and drift stays a cosine on large counts."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

import analyses.change as change_mod
from analyses.change import _token_counts, change, cosine, set_intersection
from cube_helpers import punch_holes, small_cube
from storage.schema import FILL_ID


@pytest.fixture(scope="module")
def ds():
    return punch_holes(small_cube(n_checkpoints=3, n_layers=2, top_k=3, n_samples=8, seed=5), seed=2)


def test_token_kernel_matches_the_formulas():
    """Duplicates, -1 slots and a view mask, against the (slot, slot) pair definitions."""
    rng = np.random.default_rng(0)
    E, C, L, T, K = 5, 3, 2, 40, 3
    raw = rng.integers(-1, E, (C, L, T, K)).astype(np.int16)  # ids outside -1..E-1 are refused before (checked_cube)
    raw[:, :, :5] = rng.integers(0, 2, (C, L, 5, K))  # repeated ids in one token
    mask = rng.random(T) < 0.7
    out = _token_counts(raw, mask)  # (C, L, quantity, T)
    got = {name: out[:, :, i] for i, name in enumerate(change_mod._QUANTITIES)}

    x = xr.DataArray(raw, dims=("checkpoint", "layer", "token", "k"))
    ids = x.where(xr.DataArray(mask, dims="token"), FILL_ID)
    valid = ids >= 0
    final = ids.isel(checkpoint=-1, drop=True)
    prev = ids.shift(checkpoint=1, fill_value=FILL_ID)
    expected = {
        "inter_final": set_intersection(ids, final),
        "inter_prev": set_intersection(ids, prev),
        "pos_final": ((ids == final) & valid).sum("k"),
        "pos_prev": ((ids == prev) & valid).sum("k"),
        "tokens": valid.any("k"),
        "mismatch": (valid != valid.isel(checkpoint=-1)).sum("k"),
    }
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value.transpose("checkpoint", "layer", "token").values,
                                      err_msg=name)


@pytest.mark.parametrize("view", ["all", "canonical"])
@pytest.mark.parametrize(
    "chunks, block_elements",
    [
        ({"checkpoint": 1, "layer": 1, "token": 37}, None),
        ({"checkpoint": 2, "layer": 2, "token": 11, "k": 1}, None),
        ({"checkpoint": 1, "layer": 1, "token": 50}, 30),  # token chunks split to bound the kernel's block
    ],
)
def test_any_chunking_gives_the_in_memory_result(ds, view, chunks, block_elements, monkeypatch):
    mem = change(ds, view=view, n_boot=15, seed=1)
    if block_elements is not None:
        monkeypatch.setattr(change_mod, "_BLOCK_ELEMENTS", block_elements)
    lazy_res = change(ds.chunk(chunks), view=view, n_boot=15, seed=1)
    assert all(v.chunks is not None for v in lazy_res.data_vars.values())
    xr.testing.assert_allclose(lazy_res.compute(), mem)


def test_drift_cosine_does_not_overflow_on_large_counts():
    """Σa²·Σb² of slot counts passes 2^63 on a large cube: the cosine must still be computed in float."""
    a = xr.DataArray(np.full(32, 200_000, dtype=np.int64), dims="expert")
    assert float(cosine(a, a)) == pytest.approx(1.0)
    b = a.copy(data=np.arange(32, dtype=np.int64) * 100_000)
    av, bv = a.values.astype(float), b.values.astype(float)
    assert float(cosine(a, b)) == pytest.approx(av @ bv / np.sqrt((av @ av) * (bv @ bv)))
