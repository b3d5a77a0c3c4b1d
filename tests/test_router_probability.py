"""router_probability against a token-by-token brute force, lazy = eager, chance level, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

import analyses
from storage.schema import mock_cube


def brute_force(ds):
    """Per (checkpoint, layer): loop over tokens with plain numpy, no xarray."""
    ids, logits = ds["expert_ids"].values, ds["router_logits"].values.astype(np.float64)
    C, L, T, _ = ids.shape
    E = logits.shape[-1]
    prob = np.full((C, L, E), np.nan)
    usage = np.full((C, L, E), np.nan)
    for c in range(C):
        for layer in range(L):
            psum, n, count = np.zeros(E), 0, np.zeros(E)
            for t in range(T):
                valid = [e for e in ids[c, layer, t] if e >= 0]
                if not valid:
                    continue
                z = np.exp(logits[c, layer, t] - logits[c, layer, t].max())
                psum += z / z.sum()
                n += 1
                for e in valid:
                    count[e] += 1
            if n:
                prob[c, layer], usage[c, layer] = psum / n, count / count.sum()
    return prob, usage


@pytest.fixture(scope="module")
def cube():
    ds = mock_cube(n_checkpoints=2, n_layers=2, num_experts=6, top_k=2, n_samples=8, seq_len=12, seed=4,
                   with_lens=False)
    ids = ds["expert_ids"].values
    ids[0, 1, :5, :] = -1  # unwritten tokens leave the mean
    ids[1, 0, 7, 1] = -1  # one unwritten slot of a written token
    return ds


def test_matches_brute_force_and_lazy(cube):
    result = analyses.run("router_probability", cube)
    prob, usage = brute_force(cube)
    np.testing.assert_allclose(result["mean_probability"].values, prob, rtol=1e-12)
    np.testing.assert_allclose(result["usage"].values, usage, rtol=1e-12)
    np.testing.assert_allclose(result["ratio"].values, usage / prob, rtol=1e-12)
    np.testing.assert_allclose(result["mean_probability"].sum("expert"), 1.0, rtol=1e-12)
    lazy = analyses.run("router_probability", cube.chunk({"token": 17}))
    assert lazy["usage"].chunks is not None  # lazy in, lazy out
    xr.testing.assert_allclose(lazy.compute(), result, rtol=1e-12)
    assert result["usage"].attrs["long_name"] == "expert usage"  # declared in OUTPUTS, stamped by finalise
    assert result.attrs["chance"] == pytest.approx(1 / 6)


def test_uniform_routing_sits_at_chance():
    ds = mock_cube(n_checkpoints=1, n_layers=1, num_experts=4, top_k=1, n_samples=200, seq_len=20, uniform=True,
                   seed=1, with_lens=False)
    ds["router_logits"].values[:] = 0.0  # a router with no preference: probability exactly 1/E
    result = analyses.run("router_probability", ds)
    np.testing.assert_allclose(result["mean_probability"].values, 0.25, rtol=1e-12)
    np.testing.assert_allclose(result["usage"].values, 0.25, atol=0.02)


def test_refusals(cube):
    assert "router_logits" in analyses.registry.skip_reason("router_probability", cube.drop_vars("router_logits"))
    bad = cube.copy(deep=True)
    bad["expert_ids"].values[0, 0, 3, 0] = 6
    with pytest.raises(ValueError, match=r"outside -1\.\.5"):
        analyses.run("router_probability", bad)
