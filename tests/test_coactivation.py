"""coactivation: against explicit loops over tokens, at chance (k−1)/(E−1) on
uniform routing, lazy vs in-memory, clustering of planted expert groups."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import analyses
from analyses.coactivation import cluster_order, coactivation, coactivation_chance
from cube_helpers import punch_holes, small_cube
from storage.schema import mock_cube


def reference(ds):
    """Brute force: every ordered pair of every token's set."""
    ids = ds["expert_ids"].values
    C, L, T, K = ids.shape
    E = ds.attrs["num_experts"]
    both = np.zeros((C, L, E, E), np.int64)
    active = np.zeros((C, L, E), np.int64)
    for c in range(C):
        for l in range(L):
            for t in range(T):
                s = [int(e) for e in ids[c, l, t] if e >= 0]
                for a in s:
                    active[c, l, a] += 1
                    for b in s:
                        if a != b:
                            both[c, l, a, b] += 1
    coact = both / np.where(active > 0, active, np.nan)[..., None]
    idx = np.arange(E)
    coact[..., idx, idx] = np.nan
    return both, active, coact


def partner_tv_reference(both, active):
    E = both.shape[-1]
    out = np.full(both.shape[:2], np.nan)
    for c in range(both.shape[0]):
        for l in range(both.shape[1]):
            num = den = 0.0
            for a in range(E):
                row = [both[c, l, a, b] for b in range(E) if b != a]
                if sum(row) == 0:
                    continue
                tv = 0.5 * sum(abs(x / sum(row) - 1 / (E - 1)) for x in row)
                num += active[c, l, a] * tv
                den += active[c, l, a]
            out[c, l] = num / den if den else np.nan
    return out


@pytest.fixture(scope="module")
def ds():
    return punch_holes(small_cube(n_checkpoints=2, n_layers=3, top_k=3, n_samples=10, seed=7), seed=3)


def test_matches_reference(ds):
    res = coactivation(ds, n_boot=0)
    both, active, coact = reference(ds)
    np.testing.assert_allclose(res["coactivation"].values, coact)
    np.testing.assert_array_equal(res["active_count"].values, active)
    idx = np.arange(8)
    np.testing.assert_array_equal(res["pair_count"].values[..., idx, idx], active)
    off = ~np.eye(8, dtype=bool)
    np.testing.assert_array_equal(res["pair_count"].values[..., off], both[..., off])
    np.testing.assert_allclose(res["coactivation_ratio"].values, coact / (2 / 7))
    np.testing.assert_allclose(res["partner_tv"].values, partner_tv_reference(both, active))
    # every token holding a holds k−1 = 2 others (punch_holes removes whole tokens)
    np.testing.assert_allclose(np.nansum(res["coactivation"].values, axis=-1)[active > 0], 2.0)
    assert "coactivation_lo" not in res


def test_chance_on_uniform_routing():
    E, k = 8, 3
    ds = mock_cube(n_checkpoints=1, n_layers=2, num_experts=E, top_k=k, n_samples=40, seq_len=40, uniform=True,
                   seed=5)
    res = coactivation(ds, n_boot=200)
    chance = coactivation_chance(E, k)
    assert chance == pytest.approx(2 / 7)
    c = res["coactivation"].values
    off = ~np.eye(E, dtype=bool)
    n = res["active_count"].values[..., :, None]
    se = np.sqrt(chance * (1 - chance) / n)
    assert np.all((np.abs(c - chance) < 4.5 * se)[..., off])
    assert abs(np.nanmean(c) - chance) < 0.01
    assert np.all(res["partner_tv"].values < 0.06)  # only the finite-sample bias is left
    lo, hi = res["coactivation_lo"].values, res["coactivation_hi"].values
    assert np.all((lo <= c + 1e-12)[..., off]) and np.all((hi >= c - 1e-12)[..., off])
    inside = ((lo <= chance) & (chance <= hi))[..., off]
    assert inside.mean() > 0.85  # nominal 95 % intervals around the true value


def test_lazy_equals_in_memory_with_sample_splitting_chunks(ds):
    mem = coactivation(ds, n_boot=20)
    for chunk in (11, 37):
        lazy_res = coactivation(ds.chunk({"checkpoint": 1, "layer": 1, "token": chunk}), n_boot=20)
        assert all(v.chunks is not None for v in lazy_res.data_vars.values())
        xr.testing.assert_allclose(lazy_res.compute(), mem)


def test_planted_groups_are_clustered():
    """Tokens pick both experts inside {0,1,2,3} or inside {4,5,6,7}: the top split separates the groups."""
    ds = mock_cube(n_checkpoints=1, n_layers=1, num_experts=8, top_k=2, n_samples=60, seq_len=30, uniform=True,
                   seed=1)
    rng = np.random.default_rng(0)
    T = ds.sizes["token"]
    group = rng.integers(0, 2, T)
    pairs = np.array([rng.choice(4, 2, replace=False) for _ in range(T)]) + 4 * group[:, None]
    ds["expert_ids"].values[0, 0] = pairs
    res = coactivation(ds, n_boot=0)
    c = res["coactivation"].isel(checkpoint=0, layer=0).values
    assert np.all(c[:4, 4:] == 0) and np.all(c[4:, :4] == 0)
    np.testing.assert_allclose(c[:4, :4][~np.eye(4, dtype=bool)], 1 / 3, atol=0.08)
    order, Z = cluster_order(c)
    assert sorted(order[:4]) in ([0, 1, 2, 3], [4, 5, 6, 7])
    assert Z[-1, 2] == pytest.approx(1.0)  # the two groups never meet: distance 1 − 0
    assert res["partner_tv"].item() == pytest.approx(0.5 * (3 * (1 / 3 - 1 / 7) + 4 / 7), abs=0.05)


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(split=st.integers(1, 2), order_seed=st.integers(0, 1000))
def test_layer_split_and_sample_order_do_not_matter(ds, split, order_seed):
    whole = coactivation(ds, n_boot=10)
    parts = [coactivation(ds.isel(layer=slice(0, split)), n_boot=10),
             coactivation(ds.isel(layer=slice(split, None)), n_boot=10)]
    xr.testing.assert_allclose(xr.concat(parts, dim="layer", data_vars="all"), whole)
    samples = np.random.default_rng(order_seed).permutation(np.unique(ds["sample"].values))
    idx = np.concatenate([np.flatnonzero(ds["sample"].values == s) for s in samples])
    shuffled = ds.isel(token=idx).assign_coords(token=np.arange(ds.sizes["token"]))
    xr.testing.assert_allclose(coactivation(shuffled, n_boot=10), whole)


def test_errors(ds):
    one = mock_cube(n_checkpoints=1, n_layers=1, top_k=1, n_samples=3, seed=0)
    with pytest.raises(ValueError, match="top_k >= 2"):
        coactivation(one)
    bad = ds.copy(deep=True)
    bad["expert_ids"].values[1, 2, 5, 1] = 9
    with pytest.raises(ValueError, match="outside -1..7"):
        analyses.run("coactivation", bad, n_boot=0)


def test_pair_codes_against_brute_force():
    """Packed codes of every slot pair: duplicates, -1 and out-of-range ids fall in no pair bin."""
    from analyses.coactivation import _pair_codes

    rng = np.random.default_rng(4)
    for E, k, dtype in [(8, 3, np.int16), (5, 2, np.int64), (6, 4, np.int8)]:
        ids = rng.integers(-3, E + 3, (2, 30, k)).astype(dtype)
        ids[0, :4] = rng.integers(0, 2, (4, k))  # repeated ids in one token
        keep = rng.random(30) < 0.8
        expected = np.full((2, 30, k * (k + 1) // 2), -1)
        for c, t in np.ndindex(2, 30):
            if not keep[t]:
                continue
            for p, (i, j) in enumerate(zip(*np.triu_indices(k))):
                a, b = int(ids[c, t, i]), int(ids[c, t, j])
                if i == j:
                    if 0 <= a < E:
                        expected[c, t, p] = a * E - a * (a - 1) // 2
                elif 0 <= a < E and 0 <= b < E and a != b:
                    lo, hi = min(a, b), max(a, b)
                    expected[c, t, p] = lo * E - lo * (lo - 1) // 2 + hi - lo
        np.testing.assert_array_equal(_pair_codes(ids, keep, num_experts=E), expected)


def test_repeated_ids_and_odd_chunks_match_reference(ds):
    """A token holding one expert in two slots counts like the ordered-pair reference, on any chunking."""
    dup = ds.copy(deep=True)
    dup["expert_ids"].values[:, :, :6, 1] = dup["expert_ids"].values[:, :, :6, 0]
    both, active, coact = reference(dup)
    res = coactivation(dup, n_boot=0)
    np.testing.assert_array_equal(res["active_count"].values, active)
    off = ~np.eye(8, dtype=bool)
    np.testing.assert_array_equal(res["pair_count"].values[..., off], both[..., off])
    np.testing.assert_allclose(res["coactivation"].values, coact)
    mem = coactivation(ds, canonical_only=True, n_boot=15)
    lazy_res = coactivation(ds.chunk({"checkpoint": 2, "layer": 3, "token": 13, "k": 1}), canonical_only=True,
                            n_boot=15)
    xr.testing.assert_allclose(lazy_res.compute(), mem)
