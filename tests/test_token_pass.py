"""The token pass (analyses.token_pass): per-sample sums against loops over tokens,
the Samples object against the routing cube it replaces, and lazy against in-memory input."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st

from analyses import token_pass as tp
from cube_helpers import lazy, punch_holes, small_cube
from strategies import SEEDS


@pytest.fixture(scope="module")
def ds():
    return punch_holes(small_cube(with_logits=False), seed=2)


def brute_force_sums(values, sample_codes, n_samples, groups=None, n_groups=1):
    """(lead..., sample, group) sums by a loop over tokens; values (lead, token, k), groups like values."""
    lead, T, K = values.shape[0], values.shape[1], values.shape[2]
    out = np.zeros((lead, n_samples, n_groups))
    for r in range(lead):
        for t in range(T):
            for j in range(K):
                g = 0 if groups is None else groups[r, t, j]
                if 0 <= g < n_groups:
                    out[r, sample_codes[t], g] += values[r, t, j]
    return out


def test_samples_of_the_cube(ds):
    samples = tp.Samples.of(ds)
    raw = ds["sample"].values
    np.testing.assert_array_equal(samples.labels, np.unique(raw))
    np.testing.assert_array_equal(samples.labels[samples.codes], raw)
    assert samples.n == len(np.unique(raw)) and samples.n_tokens == ds.sizes["token"]
    with pytest.raises(ValueError):
        samples.codes[0] = 1  # read-only: one object is shared by every pass of an analysis


def test_samples_object_gives_the_cube_result(ds):
    """Passing the Samples equals passing the routing cube (the compatibility path)."""
    ids, E = ds["expert_ids"], ds.attrs["num_experts"]
    ones = xr.ones_like(ids, dtype=np.int64)
    samples = tp.Samples.of(ds)
    ref = tp.per_sample_sums(ones, ds, dim=("token", "k"), by={"expert": (ids, E)})
    got = tp.per_sample_sums(ones, samples, dim=("token", "k"), by={"expert": (ids, E)})
    xr.testing.assert_identical(got, ref)
    xr.testing.assert_identical(tp.sample_groups(ds, "domain", samples), tp.sample_groups(ds, "domain"))


@settings(max_examples=25, deadline=None)
@given(seed=SEEDS, n_units=st.integers(1, 9), sorted_units=st.booleans(),
       lazy_input=st.booleans())
def test_per_sample_sums_matches_a_loop(seed, n_units, sorted_units, lazy_input):
    """Units from codes (some never used), grouped by a per-slot code with out-of-range values excluded."""
    rng = np.random.default_rng(seed)
    T, K, n_groups = 53, 2, 3
    codes = rng.integers(0, n_units, T)
    codes = np.sort(codes) if sorted_units else codes
    values = rng.integers(-5, 6, (2, T, K))
    groups = rng.integers(-1, n_groups + 1, (2, T, K))
    data = xr.DataArray(values, dims=("layer", "token", "k"))
    grp = xr.DataArray(groups, dims=("layer", "token", "k"))
    if lazy_input:
        data, grp = data.chunk({"token": 11}), grp.chunk({"token": 11})
    got = tp.per_sample_sums(data, tp.Samples.from_codes(codes, n_units), dim=("token", "k"),
                             by={"g": (grp, n_groups)})
    assert got.dims == ("layer", "sample", "g") and got.dtype == np.int64
    np.testing.assert_array_equal(got.values, brute_force_sums(values, codes, n_units, groups, n_groups))
    np.testing.assert_array_equal(got["sample"].values, np.arange(n_units))


def test_samples_refuses_bad_codes(ds):
    with pytest.raises(ValueError, match="codes must lie in 0..2"):
        tp.Samples.from_codes(np.array([0, 3]), 3)
    with pytest.raises(ValueError, match="token coordinate 'sample' is missing"):
        tp.Samples.of(ds.drop_vars("sample"))


@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("dtype", [np.int32, np.float32, bool])
def test_sums_kernel_matches_brute_force(contiguous, dtype):
    """The per-block kernel (segment sums for contiguous samples, bincount otherwise) against a loop."""
    rng = np.random.default_rng(3)
    T, K = 301, 2
    sample = np.sort(rng.integers(5, 40, T)) if contiguous else rng.integers(5, 40, T)
    values = rng.normal(size=(3, T, K)) * 10
    values = (values > 0) if dtype is bool else values.astype(dtype)
    kind = "f" if dtype is np.float32 else "i"
    out = tp._sums_kernel(values, sample, n_vars=1, n_full=0, ns=(), lead_ndim=1, tok_axis=1, kinds=(kind,))
    lo = sample.min()
    ref = np.zeros((3, sample.max() - lo + 1))
    for t in range(T):
        ref[:, sample[t] - lo] += values[:, t, :].astype(np.float64).sum(-1)
    np.testing.assert_allclose(out[0], ref, rtol=1e-6 if kind == "f" else 0)
    assert out.dtype == (np.float64 if kind == "f" else np.int64)


def test_per_sample_sums_mixed_memory_and_lazy_inputs(ds):
    """In-memory data with lazy groupers (and a lazy token-level grouper) give the in-memory sums."""
    lz = lazy(ds)
    E = ds.attrs["num_experts"]
    pos = xr.DataArray(np.asarray(ds["position"].values) % 3, dims="token")
    ones = xr.ones_like(ds["expert_ids"], dtype=np.int64)
    ref = tp.per_sample_sums(ones, ds, dim=("token", "k"), by={"pos": (pos, 3), "expert": (ds["expert_ids"], E)})
    got = tp.per_sample_sums(
        ones, lz, dim=("token", "k"), by={"pos": (pos.chunk({"token": 37}), 3), "expert": (lz["expert_ids"], E)}
    )
    assert got.chunks is not None
    xr.testing.assert_equal(got.compute(), ref)
