"""specialization: against explicit loops over tokens, the randomisation test
against Monte-Carlo relabelling of samples, planted cells found exactly, FDR
held on null cubes, MI at its shuffled floor and vocabulary at its
independence floor on uniform routing, lazy vs in-memory, sample order."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest
import xarray as xr
from hypothesis import HealthCheck, given, settings

import analyses
from analyses.bootstrap import per_sample_sums, sample_groups
from analyses.specialization import expected_max_share, shuffled_mi, specialization
from cube_helpers import punch_holes, small_cube
from storage.schema import mock_cube
from strategies import SEEDS

FAST = {"n_boot": 0, "n_shuffle": 20}


def reference(ds, min_count):
    """Brute force: loops over tokens for usage, lift, MI and vocabulary specialization."""
    ids = ds["expert_ids"].values
    dom = ds["domain"].values.astype(str)
    sample = ds["sample"].values
    tid = ds["token_id"].values
    C, L, T, K = ids.shape
    E = ds.attrs["num_experts"]
    labels = sorted(set(dom))
    D = len(labels)
    count = np.zeros((C, L, E, D))
    top1 = np.zeros((C, L, D, E))
    vocab = {"in": np.full((C, L), np.nan), "next": np.full((C, L), np.nan)}
    for c in range(C):
        for l in range(L):
            per_type = {"in": defaultdict(lambda: np.zeros(E)), "next": defaultdict(lambda: np.zeros(E))}
            n_type = {"in": defaultdict(int), "next": defaultdict(int)}
            for t in range(T):
                d = labels.index(dom[t])
                s = [int(e) for e in ids[c, l, t] if e >= 0]
                for e in s:
                    count[c, l, e, d] += 1
                if ids[c, l, t, 0] >= 0:
                    top1[c, l, d, ids[c, l, t, 0]] += 1
                if not s:
                    continue
                keys = {"in": tid[t]}
                if t + 1 < T and sample[t + 1] == sample[t]:
                    keys["next"] = tid[t + 1]
                for view, key in keys.items():
                    n_type[view][key] += 1
                    for e in s:
                        per_type[view][key][e] += 1
            for view in ("in", "next"):
                shares = [per_type[view][i].max() / n for i, n in n_type[view].items() if n >= min_count]
                vocab[view][c, l] = np.mean(shares) if shares else np.nan
    usage = count / count.sum(2, keepdims=True)
    usage_all = count.sum(3) / count.sum((2, 3))[..., None]
    mi = np.zeros((C, L))
    for c in range(C):
        for l in range(L):
            p = top1[c, l] / top1[c, l].sum()
            pd_, pe = p.sum(1), p.sum(0)
            mi[c, l] = sum(
                p[i, j] * math.log2(p[i, j] / (pd_[i] * pe[j])) for i in range(D) for j in range(E) if p[i, j] > 0
            )
    return usage, usage_all, mi, vocab


@pytest.fixture(scope="module")
def ds():
    return punch_holes(small_cube(n_checkpoints=2, n_layers=2, n_samples=18, seq_len=24, seed=9), seed=4)


def test_matches_reference(ds):
    res = specialization(ds, min_count=3, **FAST)
    usage, usage_all, mi, vocab = reference(ds, min_count=3)
    np.testing.assert_allclose(res["usage"].values, usage)
    np.testing.assert_allclose(res["usage_all"].values, usage_all)
    np.testing.assert_allclose(res["lift"].values, usage / usage_all[..., None])
    np.testing.assert_allclose(res["ratio_to_chance"].values, usage * 8)
    np.testing.assert_allclose(res["mi"].values, mi, atol=1e-12)
    np.testing.assert_allclose(res["vocab_input"].values, vocab["in"])
    np.testing.assert_allclose(res["vocab_next"].values, vocab["next"])
    assert list(res["usage"].dims) == ["checkpoint", "layer", "expert", "domain"]
    assert (res["significant"].values == (res["q_value"].values <= 0.05)).all()
    assert "mi_lo" not in res and "lift_lo" not in res
    # score = mean of its documented components
    mi_c = np.clip((res["mi"] - res["mi_floor_mean"]) / res["domain_entropy"], 0, 1)
    v_c = np.clip((res["vocab_input"] - res["vocab_input_floor"]) / (1 - res["vocab_input_floor"]), 0, 1)
    frac = res["significant"].mean(("expert", "domain"))
    np.testing.assert_allclose(res["score"].values, ((mi_c + v_c + frac) / 3).values)


def test_randomisation_test_against_monte_carlo_relabelling():
    """The closed-form variance and normal p-values match 2000 random relabellings of samples."""
    ds = mock_cube(n_checkpoints=1, n_layers=2, num_experts=8, top_k=2, n_samples=60, seq_len=30,
                   specialization=0.5, seed=2)
    res = specialization(ds, **FAST)
    ids = ds["expert_ids"].drop_vars([c for c in ds.coords if "token" in ds[c].dims])
    per = per_sample_sums(xr.ones_like(ids, dtype=np.int32), ds, dim=("token", "k"), by={"expert": (ids, 8)}).values
    dom = sample_groups(ds).values.astype(str)
    labels = np.unique(dom)
    n_s = per.sum(-1)
    u = per.sum(2) / n_s.sum(2)[..., None]
    dev = per - u[:, :, None, :] * n_s[..., None]

    def excess(lab):
        return np.stack([dev[:, :, lab == d, :].sum(2) for d in labels], -1)  # (c, l, expert, domain)

    obs = excess(dom)
    np.testing.assert_allclose(res["excess"].values, obs, atol=1e-9)
    rng = np.random.default_rng(0)
    perm = np.stack([excess(rng.permutation(dom)) for _ in range(2000)])
    var_closed = (res["excess"].values / res["z"].values) ** 2
    ratio = perm.var(0) / var_closed
    assert np.all((ratio > 0.85) & (ratio < 1.15))
    p_mc = (1 + (np.abs(perm) >= np.abs(obs)[None] - 1e-9).sum(0)) / 2001
    p = res["p_value"].values
    moderate = p_mc > 0.005
    assert moderate.sum() > 10
    assert np.abs(p - p_mc)[moderate].max() < 0.04


def plant(ds, layer, expert, partner, domain, reverse_domain):
    """Swap ``partner`` → ``expert`` for every token of ``domain`` holding partner and not expert, and the
    reverse in ``reverse_domain``, so pooled usage stays about the same. Returns the 4 changed cells."""
    ids = ds["expert_ids"].values  # (checkpoint, layer, token, k), modified in place
    dom = ds["domain"].values
    for d, a, b in ((domain, partner, expert), (reverse_domain, expert, partner)):
        sub = ids[:, layer][:, dom == d]  # (checkpoint, tokens, k)
        has_a, has_b = (sub == a).any(-1, keepdims=True), (sub == b).any(-1, keepdims=True)
        sub = np.where((sub == a) & has_a & ~has_b, b, sub)
        ids[:, layer, dom == d] = sub
    return {(layer, expert, domain), (layer, partner, domain), (layer, partner, reverse_domain),
            (layer, expert, reverse_domain)}


def significant_cells(res, checkpoint):
    sig = res["significant"].isel(checkpoint=checkpoint)
    layer, expert, domain = np.nonzero(sig.transpose("layer", "expert", "domain").values)
    labels = sig["domain"].values
    return {(int(sig["layer"].values[a]), int(b), str(labels[c])) for a, b, c in zip(layer, expert, domain)}


def test_finds_exactly_the_planted_cells():
    ds = mock_cube(n_checkpoints=2, n_layers=2, num_experts=8, top_k=2, n_samples=60, seq_len=30, uniform=True,
                   seed=3)
    planted = plant(ds, 0, 2, 5, "code", "math") | plant(ds, 1, 6, 1, "prose", "code")
    res = specialization(ds, fdr_q=0.001, **FAST)
    for c in range(2):
        assert significant_cells(res, c) == planted
    ex = res["excess"].isel(checkpoint=0)
    assert ex.sel(layer=0, expert=2, domain="code") > 0 and ex.sel(layer=0, expert=5, domain="code") < 0
    assert res["lift"].sel(layer=1, expert=6, domain="prose").min() > 1.5


def test_null_cubes_keep_the_fdr():
    """Uniform routing: BH discoveries are all false, so FDR = P(any discovery) must stay <= q."""
    any_discovery, p_small, cells = 0, 0, 0
    for seed in range(20):
        ds = mock_cube(n_checkpoints=1, n_layers=2, num_experts=8, top_k=2, n_samples=30, seq_len=16,
                       uniform=True, seed=100 + seed)
        res = specialization(ds, n_boot=0, n_shuffle=5, min_count=1000)
        any_discovery += bool(res["significant"].any())
        p = res["p_value"].values
        p_small += int((p < 0.05).sum())
        cells += p.size
    assert any_discovery <= 2  # FDR 0.05 over 20 cubes: expected 1
    assert 0.02 < p_small / cells < 0.09  # calibrated p-values: 5 % below 0.05


def test_uniform_routing_sits_at_the_floors():
    ds = mock_cube(n_checkpoints=2, n_layers=2, num_experts=8, top_k=2, n_samples=60, seq_len=40, uniform=True,
                   seed=8)
    res = specialization(ds, n_boot=50, n_shuffle=100)
    mi, floor, p95 = res["mi"].values, res["mi_floor_mean"].values, res["mi_floor_p95"].values
    assert np.all(mi < p95 + 2 * (p95 - floor))
    assert 0.6 < mi.mean() / floor.mean() < 1.5
    assert np.all(res["mi_lo"].values <= mi) and np.all(res["mi_hi"].values >= mi)
    np.testing.assert_allclose(res["vocab_input"].values, res["vocab_input_floor"].values, atol=0.03)
    np.testing.assert_allclose(res["vocab_next"].values, res["vocab_next_floor"].values, atol=0.03)
    assert np.all(res["vocab_input_floor"].values > 2 / 8)  # the max over experts sits above k/E
    assert np.all(res["score"].values < 0.1)


def test_shuffled_mi_kernel(ds):
    """With the true labels as the 'relabelling' the kernel gives the observed MI; permuted labels give the floor."""
    res = specialization(ds, min_count=3, **FAST)
    ids = ds["expert_ids"].isel(k=0).drop_vars([c for c in ds.coords if "token" in ds[c].dims])
    per = per_sample_sums(xr.ones_like(ids, dtype=np.int32), ds, by={"expert": (ids, 8)}).values  # (c, l, S, E)
    dom = sample_groups(ds).values.astype(str)
    codes = np.searchsorted(np.unique(dom), dom)
    rng = np.random.default_rng(0)
    stacked = np.stack([codes, rng.permutation(codes)])
    mi = shuffled_mi(per, stacked, n_groups=3)
    assert mi.shape == (2, 2, 2)
    np.testing.assert_allclose(mi[..., 0], res["mi"].values, atol=1e-12)
    assert np.all(mi[..., 1] < mi[..., 0])


def test_expected_max_share_against_simulation():
    rng = np.random.default_rng(0)
    q = np.array([0.5, 0.3, 0.3, 0.2, 0.2, 0.2, 0.2, 0.1])
    n = np.array([10, 10, 25, 400])
    sims = [np.mean([rng.binomial(ni, q).max() / ni for _ in range(20000)]) for ni in n]
    assert expected_max_share(n, q) == pytest.approx(np.mean(sims), abs=0.003)
    assert expected_max_share(np.array([3]), np.array([1.0, 0.0])) == pytest.approx(1.0)
    assert np.isnan(expected_max_share(np.array([], dtype=int), q))


def test_lazy_equals_in_memory_with_sample_splitting_chunks(ds):
    mem = specialization(ds, min_count=3, n_boot=20, n_shuffle=20)
    lazy_res = specialization(ds.chunk({"checkpoint": 1, "layer": 1, "token": 29}), min_count=3, n_boot=20,
                              n_shuffle=20)
    assert all(v.chunks is not None for v in lazy_res.data_vars.values())
    xr.testing.assert_allclose(lazy_res.compute(), mem)


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(order_seed=SEEDS)
def test_sample_order_and_layer_split_do_not_matter(ds, order_seed):
    whole = specialization(ds, min_count=3, n_boot=10, n_shuffle=20)
    samples = np.random.default_rng(order_seed).permutation(np.unique(ds["sample"].values))
    idx = np.concatenate([np.flatnonzero(ds["sample"].values == s) for s in samples])
    shuffled = ds.isel(token=idx).assign_coords(token=np.arange(ds.sizes["token"]))
    xr.testing.assert_allclose(specialization(shuffled, min_count=3, n_boot=10, n_shuffle=20), whole)
    # per-layer statistics do not depend on the other layers (BH's family does, by design)
    per_layer = ["usage", "lift", "lift_lo", "lift_hi", "z", "p_value", "mi", "mi_lo", "mi_hi", "mi_floor_mean",
                 "vocab_input", "vocab_input_floor", "vocab_next"]
    parts = [specialization(ds.isel(layer=[i]), min_count=3, n_boot=10, n_shuffle=20)[per_layer] for i in (0, 1)]
    xr.testing.assert_allclose(xr.concat(parts, dim="layer", data_vars="all"), whole[per_layer])


def test_errors(ds):
    one = ds.assign_coords(domain=("token", np.full(ds.sizes["token"], "code", dtype=object)))
    with pytest.raises(ValueError, match="at least 2"):
        specialization(one, **FAST)
    mixed = ds.copy(deep=True)
    dom = mixed["domain"].values.copy()
    dom[0] = "math" if dom[0] != "math" else "code"
    mixed = mixed.assign_coords(domain=("token", dom))
    with pytest.raises(ValueError, match="not constant within sample"):
        specialization(mixed, **FAST)
    with pytest.raises(ValueError, match="fdr_q"):
        specialization(ds, fdr_q=1.5)
    bad = ds.copy(deep=True)
    bad["expert_ids"].values[0, 1, 2, 0] = 8
    with pytest.raises(ValueError, match="outside -1..7"):
        analyses.run("specialization", bad, **FAST)
