"""usage views (all / canonical / last canonical), the activation timeline and
the bootstrap intervals of usage against brute-force references (explicit loops
over tokens and over resampled sample ids), and chance levels on uniform routing."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analyses.registry import VIEWS, last_canonical_mask
from analyses.usage import usage
from cube_helpers import punch_holes, small_cube
from storage.schema import mock_cube
from strategies import HOLE_FRACTIONS, SEEDS


@pytest.fixture(scope="module")
def ds():
    return punch_holes(small_cube(with_logits=False), seed=4)


def last_canonical_reference(ds):
    sample, canon = ds["sample"].values, ds["canonical"].values
    mask = np.zeros(len(sample), bool)
    for s in np.unique(sample):
        last = None
        for t in range(len(sample)):
            if sample[t] == s and canon[t]:
                last = t
        if last is not None:
            mask[last] = True
    return mask


def view_reference(ds, view):
    if view == "all":
        return np.ones(ds.sizes["token"], bool)
    if view == "canonical":
        return ds["canonical"].values.astype(bool)
    return last_canonical_reference(ds)


def counts_reference(ds, keep, samples=None):
    """count[c, l, domain, e] over tokens with keep[t]; ``samples`` = explicit (repeated) sample ids."""
    ids = ds["expert_ids"].values
    sample = ds["sample"].values
    domains = sorted(set(ds["domain"].values))
    C, L, T, K = ids.shape
    E = ds.attrs["num_experts"]
    out = np.zeros((C, L, len(domains), E), np.int64)
    tokens = range(T) if samples is None else [t for s in samples for t in np.flatnonzero(sample == s)]
    for t in tokens:
        if not keep[t]:
            continue
        d = domains.index(ds["domain"].values[t])
        for c in range(C):
            for layer in range(L):
                for e in ids[c, layer, t]:
                    if e >= 0:
                        out[c, layer, d, e] += 1
    return out


def test_last_canonical_mask_matches_reference(ds):
    mask = last_canonical_mask(ds)
    np.testing.assert_array_equal(mask, last_canonical_reference(ds))
    # one token per sample that has a canonical token, and it is canonical
    assert mask.sum() == len(np.unique(ds["sample"].values[ds["canonical"].values]))
    assert ds["canonical"].values[mask].all()


@pytest.mark.parametrize("view", VIEWS)
def test_views_match_reference(ds, view):
    r = usage(ds, n_boot=0)
    ref = counts_reference(ds, view_reference(ds, view))
    got = r.sel(view=view)
    np.testing.assert_array_equal(got["count"].values, ref)
    np.testing.assert_allclose(got["usage"].values, ref / ref.sum(-1, keepdims=True))
    np.testing.assert_allclose(got["usage_all"].values, ref.sum(2) / ref.sum((2, 3))[..., None])


def test_timeline_matches_reference(ds):
    r = usage(ds, views=["all"], position_bins=5, n_boot=0)
    start, end = r["position_start"].values, r["position_end"].values
    pos = ds["position"].values
    # buckets tile 0..max position
    assert start[0] == 0 and end[-1] == pos.max() + 1 and (start[1:] == end[:-1]).all() and len(start) == 5
    ids = ds["expert_ids"].values
    C, L, T, K = ids.shape
    ref = np.zeros((C, L, len(start), 8), np.int64)
    for t in range(T):
        b = [i for i in range(len(start)) if start[i] <= pos[t] < end[i]][0]
        for c in range(C):
            for layer in range(L):
                for e in ids[c, layer, t]:
                    if e >= 0:
                        ref[c, layer, b, e] += 1
    np.testing.assert_allclose(r["usage_by_position"].values, ref / ref.sum(-1, keepdims=True))
    np.testing.assert_array_equal(r["position_slots"].values, ref.sum(-1))


def test_interval_matches_brute_force_bootstrap(ds):
    n_boot, seed = 6, 5
    r = usage(ds, views=["canonical"], n_boot=n_boot, ci=0.9, seed=seed).sel(view="canonical")
    keep = view_reference(ds, "canonical")
    # replay the documented draws: per domain (sorted), n_g samples among the domain's samples
    sample = ds["sample"].values
    samples = np.unique(sample)
    sample_domain = np.array([ds["domain"].values[sample == s][0] for s in samples])
    rng = np.random.default_rng(seed)
    draws = []
    for g in np.unique(sample_domain):
        members = samples[sample_domain == g]
        draws.append(members[rng.integers(0, len(members), size=(n_boot, len(members)))])
    reps = np.stack([counts_reference(ds, keep, samples=np.concatenate([d[b] for d in draws])) for b in range(n_boot)])
    per_domain = reps / reps.sum(-1, keepdims=True)
    pooled = reps.sum(3) / reps.sum((3, 4))[..., None]
    np.testing.assert_allclose(r["usage_lo"].values, np.percentile(per_domain, 5, axis=0))
    np.testing.assert_allclose(r["usage_hi"].values, np.percentile(per_domain, 95, axis=0))
    np.testing.assert_allclose(r["usage_all_lo"].values, np.percentile(pooled, 5, axis=0))
    np.testing.assert_allclose(r["usage_all_hi"].values, np.percentile(pooled, 95, axis=0))
    assert r["usage_lo"].attrs["n_boot"] == n_boot and r["usage_lo"].attrs["units"] == r["usage"].attrs["units"]


@pytest.fixture(scope="module")
def uniform_cube():
    return mock_cube(uniform=True, n_checkpoints=2, n_layers=2, num_experts=8, top_k=2,
                     n_samples=240, seq_len=48, seed=21, with_logits=False)


def test_views_and_timeline_at_chance_on_uniform_routing(uniform_cube):
    E, k = 8, 2
    r = usage(uniform_cube, position_bins=4, n_boot=200, seed=1)

    def tol(n):  # 6 binomial standard errors
        return 6 * math.sqrt((1 / E) * (1 - 1 / E) / n)

    for view in VIEWS:
        sub = r.sel(view=view)
        n = int(sub["tokens"].sum("domain").min()) * k
        assert abs(sub["usage_all"] - 1 / E).max() < tol(n), view
    n_bin = int(r["position_slots"].min())
    assert abs(r["usage_by_position"] - 1 / E).max() < tol(n_bin)
    # the 95 % intervals cover the true 1/E in most cells (cells are correlated: a loose bound)
    for var in ("usage", "usage_all", "usage_by_position"):
        covered = float(((r[f"{var}_lo"] <= 1 / E) & (r[f"{var}_hi"] >= 1 / E)).mean())
        assert covered > 0.8, (var, covered)


@settings(max_examples=12, deadline=None)
@given(seed=SEEDS, hole_frac=HOLE_FRACTIONS, n_bins=st.integers(1, 9))
def test_views_nest_and_buckets_add_up(seed, hole_frac, n_bins):
    ds = punch_holes(mock_cube(n_checkpoints=2, n_layers=2, n_samples=7, seq_len=10, seed=seed, with_logits=False),
                     seed=seed, frac=hole_frac)
    r = usage(ds, position_bins=n_bins, n_boot=3, seed=seed)
    count = r["count"]
    # last canonical ⊂ canonical ⊂ all, cell by cell
    assert (count.sel(view="last_canonical") <= count.sel(view="canonical")).all()
    assert (count.sel(view="canonical") <= count.sel(view="all")).all()
    assert (r["tokens"].sel(view="last_canonical") <= r["tokens"].sel(view="canonical")).all()
    # at most one last-canonical token per sample
    n_samples = np.unique(ds["sample"].values).size
    assert int(r["tokens"].sel(view="last_canonical").sum("domain").max()) <= n_samples
    # position buckets partition the tokens of view 'all'
    np.testing.assert_array_equal(r["position_slots"].sum("position_bin").values,
                                  count.sel(view="all").sum(("domain", "expert")).values)
    # intervals are ordered
    for var in ("usage", "usage_all", "weighted_usage_all", "usage_by_position"):
        lo, hi = r[f"{var}_lo"].values, r[f"{var}_hi"].values
        ok = np.isfinite(lo) & np.isfinite(hi)
        assert (lo[ok] <= hi[ok] + 1e-12).all(), var


def test_view_errors(ds):
    with pytest.raises(ValueError, match="expected distinct names among"):
        usage(ds, views=["all", "whitespace"])
    with pytest.raises(ValueError, match="expected distinct names among"):
        usage(ds, views=["all", "all"])
    with pytest.raises(ValueError, match="position_bins=0"):
        usage(ds, position_bins=0)
