"""temporal: against explicit loops over token pairs, at chance on uniform routing,
independent of dask chunking (chunks that split samples and chunks shorter than
the largest lag) and of the order of samples; pairs never cross samples."""

from __future__ import annotations

import math

import numpy as np
import pytest
import xarray as xr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import analyses
from analyses import temporal as temporal_module
from analyses.temporal import pair_stats, set_repeat_chance, temporal
from cube_helpers import punch_holes, small_cube
from storage.schema import FILL_ID, mock_cube
from strategies import SEEDS

M = 3


def reference(ds, max_lag=M):
    """Brute force: a Python loop over every token pair (t, t+m)."""
    ids = ds["expert_ids"].values
    sample = ds["sample"].values
    C, L, T, K = ids.shape
    E = ds.attrs["num_experts"]
    top1_rep = np.full((C, L), np.nan)
    set_rep = np.full((C, L), np.nan)
    trans = np.zeros((C, L, E, E), np.int64)
    auto = np.full((C, L, max_lag, E), np.nan)
    for c in range(C):
        for l in range(L):
            sets = [set(int(e) for e in ids[c, l, t] if e >= 0) for t in range(T)]
            n1 = r1 = ns = rs = 0
            for t in range(T - 1):
                if sample[t] != sample[t + 1]:
                    continue
                a, b = ids[c, l, t, 0], ids[c, l, t + 1, 0]
                if a >= 0 and b >= 0:
                    n1 += 1
                    r1 += a == b
                    trans[c, l, a, b] += 1
                if sets[t] and sets[t + 1]:
                    ns += 1
                    rs += bool(sets[t] & sets[t + 1])
            top1_rep[c, l] = r1 / n1 if n1 else np.nan
            set_rep[c, l] = rs / ns if ns else np.nan
            for m in range(1, max_lag + 1):
                xs, ys = [], []
                for t in range(T - m):
                    if sample[t] == sample[t + m] and sets[t] and sets[t + m]:
                        xs.append([e in sets[t] for e in range(E)])
                        ys.append([e in sets[t + m] for e in range(E)])
                xs, ys = np.array(xs, float), np.array(ys, float)
                for e in range(E):
                    if len(xs) and xs[:, e].std() > 0 and ys[:, e].std() > 0:
                        auto[c, l, m - 1, e] = np.corrcoef(xs[:, e], ys[:, e])[0, 1]
    return top1_rep, set_rep, trans, auto


@pytest.fixture(scope="module")
def ds():
    return punch_holes(small_cube(n_checkpoints=2, n_layers=3, n_samples=10, seed=11), seed=2)


def test_matches_reference(ds):
    res = temporal(ds, max_lag=M, n_boot=0)
    top1, sets, trans, auto = reference(ds)
    np.testing.assert_allclose(res["top1_repeat"].values, top1)
    np.testing.assert_allclose(res["set_repeat"].values, sets)
    np.testing.assert_array_equal(res["transition_count"].values, trans)
    rows = trans.sum(-1, keepdims=True)
    np.testing.assert_allclose(res["transition"].values, np.where(rows > 0, trans / np.maximum(rows, 1), np.nan))
    np.testing.assert_allclose(res["autocorrelation"].values, auto, atol=1e-12)
    np.testing.assert_allclose(res["autocorrelation_mean"].values, np.nanmean(auto, axis=-1))
    assert "top1_repeat_lo" not in res
    # the independence baseline is Σ f_e f'_e of the pairs' own margins
    f = trans.sum(-1) / trans.sum((-1, -2))[..., None]
    g = trans.sum(-2) / trans.sum((-1, -2))[..., None]
    np.testing.assert_allclose(res["top1_repeat_independent"].values, (f * g).sum(-1))


def test_pairs_never_cross_samples():
    """Boundary tokens route identically, tokens inside a sample never repeat: every rate is 0."""
    ds = mock_cube(n_checkpoints=1, n_layers=1, num_experts=8, top_k=2, n_samples=6, seq_len=4, ragged=False)
    ids = ds["expert_ids"].values
    T = ids.shape[2]
    for t in range(T):  # position p of every sample: experts {2p, 2p+1}, so neighbours inside a sample share none
        p = int(ds["position"].values[t])
        ids[0, 0, t] = [2 * p, 2 * p + 1]
    # last token of a sample (p=3: {6,7}) and first of the next (p=0: {0,1}) differ; make them equal instead
    first = np.flatnonzero(ds["position"].values == 0)
    ids[0, 0, first] = [6, 7]
    # ...and make in-sample neighbours of the first token differ from it again
    res = temporal(ds, max_lag=2, n_boot=0)
    # pairs inside samples: (6,7)->(2,3)->(4,5)->(6,7) none repeat; boundary pairs would all repeat
    assert res["top1_repeat"].item() == 0.0
    assert res["set_repeat"].item() == 0.0
    assert res["top1_pairs"].item() == 6 * 3
    assert res["transition_count"].sel(expert=6, expert_next=6).item() == 0
    # lag 2 inside a sample: (6,7)->(4,5), (2,3)->(6,7): expert 6 never follows itself
    assert res["autocorrelation"].sel(lag=2, expert=6).item() == pytest.approx(-1.0)


def test_chance_on_uniform_routing():
    ds = mock_cube(n_checkpoints=1, n_layers=2, num_experts=8, top_k=2, n_samples=60, seq_len=40, uniform=True,
                   seed=4)
    res = temporal(ds, max_lag=3, n_boot=50)
    E, k = 8, 2
    n = res["top1_pairs"].values
    p1, ps = 1 / E, set_repeat_chance(E, k)
    assert ps == pytest.approx(1 - math.comb(6, 2) / math.comb(8, 2))
    assert np.all(np.abs(res["top1_repeat"].values - p1) < 4 * np.sqrt(p1 * (1 - p1) / n))
    assert np.all(np.abs(res["set_repeat"].values - ps) < 4 * np.sqrt(ps * (1 - ps) / n))
    # Pearson r of independent indicators: sd ≈ 1/sqrt(pairs); the mean over 8 experts is tighter still
    assert np.all(np.abs(res["autocorrelation"].values) < 4.5 / np.sqrt(n.min()))
    assert np.all(res["top1_repeat_lo"].values <= res["top1_repeat"].values)
    assert np.all(res["top1_repeat_hi"].values >= res["top1_repeat"].values)
    am = res["autocorrelation_mean"]
    assert np.all((res["autocorrelation_mean_lo"] <= am) & (am <= res["autocorrelation_mean_hi"]))
    assert np.all(np.abs(am.values) < 4 / np.sqrt(8 * n.min()))


@pytest.mark.parametrize("chunk", [2, 7, 37])
def test_chunking_does_not_change_results(ds, chunk):
    """Token chunks that split samples, including chunks shorter than max_lag."""
    mem = temporal(ds, max_lag=M, n_boot=20)
    lazy_ds = ds.chunk({"checkpoint": 1, "layer": 1, "token": chunk})
    lazy_res = temporal(lazy_ds, max_lag=M, n_boot=20)
    assert all(v.chunks is not None for v in lazy_res.data_vars.values())
    xr.testing.assert_allclose(lazy_res.compute(), mem)


@pytest.mark.parametrize("tail", [1, M - 1])
def test_last_chunk_shorter_than_max_lag(ds, tail):
    """The block before a short last chunk sees the end of the tokens in its look-ahead; it must not count
    the pairs that start there (they belong to the last block)."""
    T = ds.sizes["token"]
    mem = temporal(ds, max_lag=M, n_boot=5)
    chunks = (T - tail - 40, 40, tail)
    lazy_res = temporal(ds.chunk({"token": chunks}), max_lag=M, n_boot=5)
    xr.testing.assert_identical(lazy_res.compute(), mem)


def test_kernel_look_ahead_split_equals_whole(ds):
    """pair_stats on two blocks with look-ahead adds up to pair_stats on the whole sequence."""
    ids = ds["expert_ids"].values
    s = np.unique(ds["sample"].values, return_inverse=True)[1]
    E, S, T = 8, int(s.max()) + 1, ids.shape[2]
    whole = pair_stats(ids, s, T, E=E, S=S, M=M)
    cut = 45
    left = pair_stats(ids[:, :, : cut + M], s[: cut + M], cut, E=E, S=S, M=M)
    right = pair_stats(ids[:, :, cut:], s[cut:], T - cut, E=E, S=S, M=M)
    np.testing.assert_array_equal(left + right, whole)


@pytest.mark.parametrize("piece", [1, 12, 30, 384])
def test_kernel_pieces_equal_whole(ds, monkeypatch, piece):
    """The kernel's cache-sized pieces (each with its own look-ahead, here of 1, 2, 5 and 64 tokens for 6
    (checkpoint, layer) rows) add up to one pass over the block."""
    ids = ds["expert_ids"].values
    s = np.unique(ds["sample"].values, return_inverse=True)[1]
    E, S, T = 8, int(s.max()) + 1, ids.shape[2]
    whole = pair_stats(ids, s, T, E=E, S=S, M=M)
    monkeypatch.setattr(temporal_module, "PIECE", piece)
    np.testing.assert_array_equal(pair_stats(ids, s, T, E=E, S=S, M=M), whole)
    np.testing.assert_array_equal(pair_stats(ids[:, :, :50], s[:50], 45, E=E, S=S, M=M),
                                  pair_stats(ids[:, :, :48], s[:48], 45, E=E, S=S, M=M))


@pytest.mark.parametrize("scale", [1, 2**20])
def test_replicates_match_integer_resampling(ds, scale):
    """The one-product bootstrap (float32 while its integer sums are exact, else float64) equals resampling
    the per-sample sums in int64 and taking the ratios and Pearson r of each replicate."""
    from analyses.bootstrap import bootstrap_weights

    ids = ds["expert_ids"].values
    s = np.unique(ds["sample"].values, return_inverse=True)[1]
    E, S, T = 8, int(s.max()) + 1, ids.shape[2]
    packed = pair_stats(ids, s, T, E=E, S=S, M=M)
    weights = bootstrap_weights(S, 13, seed=5) * scale
    got = temporal_module._replicates(packed, weights.astype(np.float64), E=E, S=S, M=M)  # (C, L, 2 + M, B)
    x = temporal_module._unpack(packed, E, S, M)["per_sample"]
    reps = np.einsum("bs,clsr->clrb", weights, x).astype(np.float64)  # int64 sums, then float
    cols = temporal_module._columns(E, M)
    with np.errstate(invalid="ignore", divide="ignore"):
        np.testing.assert_array_equal(got[:, :, 0], reps[:, :, 1] / np.where(reps[:, :, 0] != 0, reps[:, :, 0], np.nan))
        np.testing.assert_array_equal(got[:, :, 1], reps[:, :, 3] / np.where(reps[:, :, 2] != 0, reps[:, :, 2], np.nan))
        n = reps[:, :, cols["n"]][:, :, :, None]
        sx, sy, sxy = (reps[:, :, cols[v]].reshape(*reps.shape[:2], M, E, -1) for v in ("sx", "sy", "sxy"))
        r = (n * sxy - sx * sy) / np.sqrt(np.where((v := (n * sx - sx**2) * (n * sy - sy**2)) > 0, v, np.nan))
        np.testing.assert_allclose(got[:, :, 2:], np.nanmean(r, axis=-2), rtol=1e-12)


def _reorder_samples(ds, order_seed):
    samples = np.unique(ds["sample"].values)
    order = np.random.default_rng(order_seed).permutation(samples)
    idx = np.concatenate([np.flatnonzero(ds["sample"].values == s) for s in order])
    return ds.isel(token=idx).assign_coords(token=np.arange(ds.sizes["token"]))


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(order_seed=SEEDS, layer_split=st.integers(1, 2))
def test_sample_order_and_layer_split_do_not_matter(ds, order_seed, layer_split):
    whole = temporal(ds, max_lag=M, n_boot=10)
    shuffled = temporal(_reorder_samples(ds, order_seed), max_lag=M, n_boot=10)
    xr.testing.assert_allclose(shuffled, whole)
    parts = [temporal(ds.isel(layer=slice(0, layer_split)), max_lag=M, n_boot=10),
             temporal(ds.isel(layer=slice(layer_split, None)), max_lag=M, n_boot=10)]
    xr.testing.assert_allclose(xr.concat(parts, dim="layer", data_vars="all"), whole)


def test_errors(ds):
    with pytest.raises(ValueError, match="max_lag"):
        temporal(ds, max_lag=0)
    bad = ds.copy(deep=True)
    bad["expert_ids"].values[0, 0, 3, 0] = 8
    with pytest.raises(ValueError, match="outside -1..7"):
        analyses.run("temporal", bad, n_boot=0)
    with pytest.raises(ValueError, match="outside -1..7"):
        analyses.run("temporal", bad.chunk({"token": 50}), n_boot=0).compute()
    unwritten = ds.copy(deep=True)
    unwritten["expert_ids"].values[:] = FILL_ID
    res = temporal(unwritten, n_boot=0)
    assert np.isnan(res["top1_repeat"].values).all() and (res["top1_pairs"].values == 0).all()
