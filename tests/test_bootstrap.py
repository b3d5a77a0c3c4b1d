"""The sample-level bootstrap against a brute-force bootstrap (explicit loops
over resampled sample ids with the same RNG draws), its coverage on synthetic
data, and laziness."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st

from analyses import bootstrap as bs
from analyses.registry import routed_ids
from cube_helpers import forbid_cube_compute, lazy, punch_holes, small_cube
from strategies import SEEDS


@pytest.fixture(scope="module")
def ds():
    return punch_holes(small_cube(with_logits=False), seed=2)


def _counts(ds, ids):
    return bs.per_sample_sums(
        xr.ones_like(ids, dtype=np.int64), ds, dim=("token", "k"), by={"expert": (ids, ds.attrs["num_experts"])}
    )


def brute_force_usage(ds, n_boot, seed):
    """Replicates of per-domain slot counts by looping over explicitly drawn sample ids."""
    ids = ds["expert_ids"].values
    sample = ds["sample"].values
    domain = ds["domain"].values.astype(str)
    samples = np.unique(sample)
    sample_domain = np.array([domain[sample == s][0] for s in samples])
    labels = np.unique(sample_domain)
    rng = np.random.default_rng(seed)
    draws = {}
    for g in labels:  # the documented draw order: strata in sorted label order
        members = samples[sample_domain == g]
        draws[g] = members[rng.integers(0, len(members), size=(n_boot, len(members)))]
    C, L, _, _ = ids.shape
    E = ds.attrs["num_experts"]
    out = np.zeros((n_boot, C, L, E, len(labels)), np.int64)
    for b in range(n_boot):
        for gi, g in enumerate(labels):
            for s in draws[g][b]:
                for t in np.flatnonzero(sample == s):
                    for c in range(C):
                        for layer in range(L):
                            for e in ids[c, layer, t]:
                                if e >= 0:
                                    out[b, c, layer, e, gi] += 1
    return out, labels


def test_resample_matches_brute_force(ds):
    n_boot, seed = 7, 3
    ids = routed_ids(ds)
    ps = _counts(ds, ids)
    groups = bs.sample_groups(ds, "domain")
    w = bs.bootstrap_weights(ps.sizes["sample"], n_boot, seed, strata=groups)
    assert (w.sum(1) == ps.sizes["sample"]).all()
    reps = bs.resample(ps, w, groups=groups)
    ref, labels = brute_force_usage(ds, n_boot, seed)
    assert reps.dims == ("checkpoint", "layer", "boot", "expert", "domain")
    assert list(reps["domain"].values) == list(labels)
    np.testing.assert_array_equal(reps.transpose("boot", ...).values, ref)

    # ratio interval = percentiles of the brute-force ratio replicates
    lo, hi = bs.ratio_interval(ps, ps.sum("expert"), w, groups=groups, ci=0.8)
    ratio = ref / ref.sum(3, keepdims=True)
    np.testing.assert_allclose(lo.transpose("checkpoint", "layer", "expert", "domain").values,
                               np.percentile(ratio, 10, axis=0))
    np.testing.assert_allclose(hi.transpose("checkpoint", "layer", "expert", "domain").values,
                               np.percentile(ratio, 90, axis=0))


def test_group_sums_and_unstratified_weights(ds):
    ids = routed_ids(ds)
    ps = _counts(ds, ids)
    # the plain sums are the token-level counts
    whole = (ds["expert_ids"].values[..., None] == np.arange(8)).sum((2, 3))  # -1 matches no expert
    np.testing.assert_array_equal(bs.group_sums(ps).values, whole)
    per_dom = bs.group_sums(ps, bs.sample_groups(ds))
    np.testing.assert_array_equal(per_dom.sum("domain").values, whole)
    # without strata: the single documented draw
    w = bs.bootstrap_weights(5, 4, seed=9)
    draws = np.random.default_rng(9).integers(0, 5, size=(4, 5))
    np.testing.assert_array_equal(w, np.stack([np.bincount(d, minlength=5) for d in draws]))


def test_lazy_resample_equals_in_memory(ds):
    lz = lazy(ds)
    with forbid_cube_compute():
        ids = routed_ids(lz)
        ps = _counts(lz, ids)
        groups = bs.sample_groups(lz)
        w = bs.bootstrap_weights(ps.sizes["sample"], 20, 1, strata=groups)
        lo, hi = bs.ratio_interval(ps, ps.sum("expert"), w, groups=groups)
    assert lo.chunks is not None
    ps0 = _counts(ds, routed_ids(ds))
    lo0, hi0 = bs.ratio_interval(ps0, ps0.sum("expert"), w, groups=bs.sample_groups(ds))
    xr.testing.assert_allclose(lo.compute(), lo0)
    xr.testing.assert_allclose(hi.compute(), hi0)


def test_coverage_of_a_ratio_of_sums():
    """95 % intervals of a ratio estimator cover the population ratio about 95 % of the time."""
    rng = np.random.default_rng(0)
    trials, S = 300, 40
    # per sample: a token count and a sum of a token-level quantity with sample-level noise
    n = rng.integers(5, 30, size=(trials, S))
    mu = 0.3 + 0.1 * rng.standard_normal((trials, S))
    num = xr.DataArray(n * mu, dims=("trial", "sample"), coords={"sample": np.arange(S)})
    den = xr.DataArray(n.astype(float), dims=("trial", "sample"), coords={"sample": np.arange(S)})
    w = bs.bootstrap_weights(S, 400, seed=1)
    lo, hi = bs.ratio_interval(num, den, w, ci=0.95)
    covered = float(((lo <= 0.3) & (hi >= 0.3)).mean())
    assert 0.88 <= covered <= 0.99, covered
    # narrower level, fewer covered
    lo80, hi80 = bs.ratio_interval(num, den, w, ci=0.8)
    assert float(((lo80 <= 0.3) & (hi80 >= 0.3)).mean()) < covered


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    n_boot=st.integers(1, 6),
    seed=st.integers(0, 1000),
)
def test_stratified_weights_keep_each_stratum_size(sizes, n_boot, seed):
    strata = np.repeat([f"g{i}" for i in range(len(sizes))], sizes)
    rng = np.random.default_rng(seed)
    strata = strata[rng.permutation(len(strata))]
    w = bs.bootstrap_weights(len(strata), n_boot, seed, strata=strata)
    assert w.shape == (n_boot, len(strata)) and (w >= 0).all()
    for g, n_g in zip(*np.unique(strata, return_counts=True)):
        assert (w[:, strata == g].sum(1) == n_g).all()
    # resampling constant per-sample values gives the value times the stratum size
    ps = xr.DataArray(np.ones(len(strata)), dims="sample")
    reps = bs.resample(ps, w, groups=xr.DataArray(strata, dims="sample", name="g"))
    np.testing.assert_array_equal(reps.values, np.broadcast_to(np.unique(strata, return_counts=True)[1], (n_boot, len(sizes))))


def test_errors(ds):
    with pytest.raises(ValueError, match="n_boot=0"):
        bs.bootstrap_weights(3, 0)
    with pytest.raises(ValueError, match="strictly between"):
        bs.interval(xr.DataArray(np.ones(3), dims="boot"), ci=1.0)
    with pytest.raises(ValueError, match="weights cover 2 samples"):
        bs.resample(xr.DataArray(np.ones(3), dims="sample"), np.ones((1, 2)))
    bad = ds.assign_coords(domain=("token", np.where(np.arange(ds.sizes["token"]) == 1, "zzz", ds["domain"].values)))
    with pytest.raises(ValueError, match="'domain' is not constant within sample"):
        bs.sample_groups(bad)


@settings(max_examples=30, deadline=None)
@given(seed=SEEDS, q=st.sampled_from([0.0, 0.025, 0.1, 0.5, 0.975, 1.0]),
       nan_frac=st.sampled_from([0.0, 0.3, 1.0]))
def test_vectorised_quantile_equals_numpy(seed, q, nan_frac):
    import warnings

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4, 3, 17))
    x[rng.random(x.shape) < nan_frac] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy warns on all-NaN cells
        ref = np.nanquantile(x, q, axis=-1)
    np.testing.assert_allclose(bs._nanquantile(x, q), ref, equal_nan=True)
