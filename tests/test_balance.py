"""balance against brute-force numpy references, its ideal and chance values on
uniform routing, a collapsed router, and invariance to relabelling experts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings

import analyses
from analyses.balance import balance
from cube_helpers import forbid_cube_compute, lazy, punch_holes, small_cube
from storage.schema import FILL_ID, mock_cube
from strategies import SEEDS


@pytest.fixture(scope="module")
def ds():
    return punch_holes(small_cube(), seed=6)


def balance_reference(ds, sigmoid=False, dead=0.01, cold=0.25):
    ids = ds["expert_ids"].values
    logits = ds["router_logits"].values.astype(np.float64) if "router_logits" in ds else None
    C, L, T, K = ids.shape
    E = ds.attrs["num_experts"]
    out = {m: np.full((C, L), np.nan) for m in ("cv", "balance", "lb_loss", "cv_chance")}
    out["dead"] = np.zeros((C, L, E), bool)
    out["cold"] = np.zeros((C, L, E), bool)
    for c in range(C):
        for layer in range(L):
            count = np.zeros(E)
            n_tok = 0
            top1 = np.zeros(E)
            psum = np.zeros(E)
            n_lb = 0
            for t in range(T):
                row = [e for e in ids[c, layer, t] if e >= 0]
                for e in row:
                    count[e] += 1
                n_tok += bool(row)
                if logits is not None and ids[c, layer, t, 0] >= 0 and np.isfinite(logits[c, layer, t]).all():
                    x = logits[c, layer, t]
                    if sigmoid:
                        p = 1 / (1 + np.exp(-x))
                    else:
                        p = np.exp(x - x.max())
                    p = p / p.sum()
                    psum += p
                    top1[ids[c, layer, t, 0]] += 1
                    n_lb += 1
            u = count / count.sum()
            mean = sum(u) / E
            std = math.sqrt(sum((x - mean) ** 2 for x in u) / E)
            out["cv"][c, layer] = std / mean
            out["balance"][c, layer] = 1 / (1 + std / mean)
            out["cv_chance"][c, layer] = math.sqrt((E - K) / (K * n_tok))
            out["dead"][c, layer] = u < dead / E
            out["cold"][c, layer] = u < cold / E
            if logits is not None:
                out["lb_loss"][c, layer] = E * sum((top1[e] / n_lb) * (psum[e] / n_lb) for e in range(E))
    return out


@pytest.mark.parametrize("sigmoid", [False, True])
def test_balance_matches_reference(ds, sigmoid):
    d = ds.copy()
    if sigmoid:
        d.attrs["router_semantics"] = "sigmoid scores, top-k, renormalised"
    r = balance(d, n_boot=0)
    ref = balance_reference(d, sigmoid=sigmoid)
    for m in ("cv", "balance", "cv_chance"):
        np.testing.assert_allclose(r[m].values, ref[m], rtol=1e-10, err_msg=m)
    np.testing.assert_allclose(r["lb_loss"].values, ref["lb_loss"], rtol=2e-6)
    np.testing.assert_array_equal(r["dead"].values, ref["dead"])
    np.testing.assert_array_equal(r["cold"].values, ref["cold"])
    np.testing.assert_array_equal(r["dead_count"].values, ref["dead"].sum(-1))
    np.testing.assert_array_equal(r["cold_count"].values, ref["cold"].sum(-1))
    assert r["dead"].dtype == bool and "cv_lo" not in r


def test_lb_loss_left_out_without_logits(ds):
    r = balance(ds.drop_vars("router_logits"), n_boot=5)
    assert "lb_loss" not in r and "lb_loss_lo" not in r and "cv_lo" in r


def test_lazy_equals_in_memory(ds):
    with forbid_cube_compute():
        lr = balance(lazy(ds), n_boot=20)
    xr.testing.assert_allclose(lr.compute(), balance(ds, n_boot=20))


@pytest.fixture(scope="module")
def uniform_cube():
    return mock_cube(uniform=True, n_checkpoints=3, n_layers=4, num_experts=8, top_k=2,
                     n_samples=200, seq_len=40, seed=13)


def test_ideal_and_chance_on_uniform_routing(uniform_cube):
    r = balance(uniform_cube, n_boot=100)
    # E[CV²] = (E − k)/(k·N): over 12 cells the mean ratio is within a few standard errors of 1
    ratio = float(((r["cv"] / r["cv_chance"]) ** 2).mean())
    assert 0.5 < ratio < 1.5, ratio
    assert float(r["cv"].max()) < 4 * float(r["cv_chance"].max())
    assert float(r["balance"].min()) > 0.9
    # f and P both ≈ 1/E: LB loss ≈ 1 (product of two noisy shares, a few % at this size)
    assert abs(r["lb_loss"] - 1).max() < 0.05
    assert int(r["dead_count"].sum()) == 0 and int(r["cold_count"].sum()) == 0
    assert (r["cv_lo"] <= r["cv"]).mean() > 0.5 and (r["lb_loss_lo"] <= r["lb_loss_hi"]).all()
    assert "perfect balance: CV 0, balance 1, LB loss 1" in r.attrs["chance"]


def test_collapsed_router():
    ds = small_cube(n_checkpoints=1, n_layers=1)
    E = ds.attrs["num_experts"]
    ids = ds["expert_ids"].values
    ids[..., 0], ids[..., 1] = 0, 1  # every token goes to experts 0 and 1
    logits = np.full(ds["router_logits"].shape, -20.0, np.float16)
    logits[..., 0] = 20.0
    ds["router_logits"].values[...] = logits
    r = balance(ds, n_boot=10)
    assert r["dead_count"].item() == E - 2 and r["cold_count"].item() == E - 2
    assert r["dead"].values[0, 0].tolist() == [False, False] + [True] * (E - 2)
    # usage (1/2, 1/2, 0, ...): CV = sqrt(E/2 − 1)
    np.testing.assert_allclose(r["cv"].values, math.sqrt(E / 2 - 1))
    # f = P = one-hot on expert 0: LB loss = E, its maximum
    np.testing.assert_allclose(r["lb_loss"].values, E, rtol=1e-6)


@settings(max_examples=12, deadline=None)
@given(seed=SEEDS, perm_seed=SEEDS)
def test_invariant_to_relabelling_experts(seed, perm_seed):
    ds = punch_holes(mock_cube(n_checkpoints=2, n_layers=2, n_samples=6, seq_len=12, seed=seed), seed=seed)
    E = ds.attrs["num_experts"]
    perm = np.random.default_rng(perm_seed).permutation(E)
    relabelled = ds.copy(deep=True)
    ids = ds["expert_ids"].values
    relabelled["expert_ids"].values[...] = np.where(ids >= 0, perm[np.maximum(ids, 0)], FILL_ID)
    inv = np.argsort(perm)
    relabelled["router_logits"].values[...] = ds["router_logits"].values[..., inv]  # logit of e moves to perm[e]
    a, b = balance(ds, n_boot=4, seed=seed), balance(relabelled, n_boot=4, seed=seed)
    for m in ("cv", "balance", "lb_loss", "cv_lo", "cv_hi", "lb_loss_lo", "lb_loss_hi"):
        # float32 softmax summed in another order: ~1e-8 relative
        np.testing.assert_allclose(a[m].values, b[m].values, rtol=1e-6, err_msg=m)
    np.testing.assert_array_equal(a["dead_count"].values, b["dead_count"].values)
    np.testing.assert_array_equal(a["usage"].values, b["usage"].values[..., perm])


def test_errors_and_registry(ds):
    with pytest.raises(ValueError, match="expected 0 <= dead <= cold"):
        balance(ds, dead_fraction=0.5, cold_fraction=0.25)
    with pytest.raises(ValueError, match="unknown token view"):
        balance(ds, view="nope")
    assert "balance" in analyses.REGISTRY
    bad = ds.copy(deep=True)
    bad["expert_ids"].values[0, 0, 0, 0] = 9
    with pytest.raises(ValueError, match=r"outside -1\.\.7"):
        analyses.run("balance", bad)
