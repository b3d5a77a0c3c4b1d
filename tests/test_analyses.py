"""usage, confidence and change against brute-force references (explicit loops
over tokens), at chance level on uniform routing, lazy vs in-memory, and the
registry's error paths."""

from __future__ import annotations

import math

import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st

import analyses
from analyses import plotting
from analyses.change import change
from analyses.confidence import confidence, token_entropy
from analyses.registry import last_canonical_mask
from analyses.usage import usage
from cube_helpers import forbid_cube_compute, lazy, punch_holes, small_cube
from storage.schema import FILL_ID, mock_cube

# --------------------------------------------------------------------------- references


def usage_reference(ds, canonical_only=False):
    ids = ds["expert_ids"].values
    w = ds["expert_weights"].values.astype(np.float64)
    domains = sorted(set(ds["domain"].values))
    canon = ds["canonical"].values
    C, L, T, K = ids.shape
    E = ds.attrs["num_experts"]
    D = len(domains)
    count = np.zeros((C, L, D, E), np.int64)
    wsum = np.zeros((C, L, D, E))
    tokens = np.zeros((C, L, D), np.int64)
    for c in range(C):
        for l in range(L):
            for t in range(T):
                if canonical_only and not canon[t]:
                    continue
                d = domains.index(ds["domain"].values[t])
                any_valid = False
                for s in range(K):
                    e = ids[c, l, t, s]
                    if e >= 0:
                        any_valid = True
                        count[c, l, d, e] += 1
                        wsum[c, l, d, e] += w[c, l, t, s]
                tokens[c, l, d] += any_valid
    return count, wsum, tokens


def confidence_reference(ds):
    ids = ds["expert_ids"].values
    w = ds["expert_weights"].values
    logits = ds["router_logits"].values if "router_logits" in ds else None
    domains = sorted(set(ds["domain"].values))
    C, L, T, K = ids.shape
    E = ds.attrs["num_experts"]
    vals = {m: np.full((C, L, len(domains) + 1), np.nan) for m in ("entropy", "topk_entropy", "margin")}
    for c in range(C):
        for l in range(L):
            acc = {m: [[] for _ in range(len(domains))] for m in vals}
            for t in range(T):
                if not (ids[c, l, t] >= 0).any():
                    continue
                d = domains.index(ds["domain"].values[t])
                if logits is not None:
                    x = logits[c, l, t].astype(np.float32)
                    p = np.exp(x - x.max())
                    p /= p.sum()
                    acc["entropy"][d].append(-sum(pi * math.log(pi) for pi in p if pi > 0) / math.log(E))
                q = w[c, l, t].astype(np.float64)
                q = q / q.sum()
                acc["topk_entropy"][d].append(-sum(qi * math.log(qi) for qi in q if qi > 0) / math.log(K))
                acc["margin"][d].append(float(w[c, l, t, 0]) - float(w[c, l, t, 1]))
            for m in vals:
                for d in range(len(domains)):
                    if acc[m][d]:
                        vals[m][c, l, d] = np.mean(acc[m][d])
                pooled = sum(acc[m], [])
                if pooled:
                    vals[m][c, l, -1] = np.mean(pooled)
    return vals


def change_reference(ds):
    order = np.argsort(ds["step"].values, kind="stable")
    ids = ds["expert_ids"].values[order]
    C, L, T, K = ids.shape
    out = {m: np.full((C, L), np.nan) for m in ("saturation", "overlap_prev", "pos_final", "pos_prev")}
    for c in range(C):
        for l in range(L):
            inter_f = inter_p = pos_f = pos_p = slots = 0
            for t in range(T):
                cur = [e for e in ids[c, l, t] if e >= 0]
                slots += len(cur)
                inter_f += len(set(cur) & {e for e in ids[-1, l, t] if e >= 0})
                pos_f += sum(1 for s in range(K) if ids[c, l, t, s] >= 0 and ids[c, l, t, s] == ids[-1, l, t, s])
                if c > 0:
                    inter_p += len(set(cur) & {e for e in ids[c - 1, l, t] if e >= 0})
                    pos_p += sum(
                        1 for s in range(K) if ids[c, l, t, s] >= 0 and ids[c, l, t, s] == ids[c - 1, l, t, s]
                    )
            out["saturation"][c, l] = inter_f / slots
            out["pos_final"][c, l] = pos_f / slots
            if c > 0:
                out["overlap_prev"][c, l] = inter_p / slots
                out["pos_prev"][c, l] = pos_p / slots
    return out, order


# --------------------------------------------------------------------------- against references


def test_usage_matches_reference(cube):
    r = usage(cube, n_boot=0).sel(view="all")
    count, wsum, tokens = usage_reference(cube)
    np.testing.assert_array_equal(r["count"].values, count)
    np.testing.assert_array_equal(r["tokens"].values, tokens)
    np.testing.assert_allclose(r["usage"].values, count / count.sum(-1, keepdims=True))
    np.testing.assert_allclose(r["usage_all"].values, count.sum(2) / count.sum((2, 3))[..., None])
    np.testing.assert_allclose(r["weighted_usage"].values, wsum / wsum.sum(-1, keepdims=True), rtol=1e-6)
    np.testing.assert_allclose(
        r["weighted_usage_all"].values, wsum.sum(2) / wsum.sum((2, 3))[..., None], rtol=1e-6
    )
    assert list(r["domain"].values) == sorted(set(cube["domain"].values))
    # every valid slot counted once, -1 never
    assert int(r["count"].sum()) == int((cube["expert_ids"].values >= 0).sum())


def test_usage_canonical_view_matches_reference(cube):
    r = usage(cube, views=["all", "canonical"], n_boot=0)
    count, _, tokens = usage_reference(cube, canonical_only=True)
    np.testing.assert_array_equal(r["count"].sel(view="canonical").values, count)
    np.testing.assert_array_equal(r["tokens"].sel(view="canonical").values, tokens)
    assert r["count"].sel(view="canonical").sum() < r["count"].sel(view="all").sum()


def test_usage_without_weights(cube):
    r = usage(cube.drop_vars("expert_weights"))
    assert "weighted_usage" not in r and "weighted_usage_lo" not in r and "usage_lo" in r


@pytest.mark.parametrize("with_logits", [True, False])
def test_confidence_matches_reference(cube, with_logits):
    ds = cube if with_logits else cube.drop_vars("router_logits")
    r = confidence(ds)
    ref = confidence_reference(ds)
    assert ("entropy" in r) == with_logits
    for m in ("entropy", "topk_entropy", "margin") if with_logits else ("topk_entropy", "margin"):
        np.testing.assert_allclose(r[m].values, ref[m][..., :-1], rtol=2e-5, atol=1e-6, err_msg=m)
        np.testing.assert_allclose(r[f"{m}_all"].values, ref[m][..., -1], rtol=2e-5, atol=1e-6, err_msg=m)
    assert r["tokens"].sum() == int((cube["expert_ids"].values >= 0).any(-1).sum())


def test_token_entropy_sigmoid_and_masked_experts():
    x = np.array([[0.0, 1.0, -np.inf, 2.0], [np.nan, 0.0, 0.0, 0.0]], np.float32)
    da = xr.DataArray(x, dims=("token", "expert"))
    h = token_entropy(da).values
    p = np.exp(x[0, [0, 1, 3]]) / np.exp(x[0, [0, 1, 3]]).sum()
    np.testing.assert_allclose(h[0], -(p * np.log(p)).sum(), rtol=1e-6)
    assert np.isnan(h[1])  # unwritten logits
    x2 = np.array([[0.0, 1.0, 0.0, 2.0]], np.float32)
    hs = token_entropy(xr.DataArray(x2, dims=("token", "expert")), sigmoid=True)
    s = 1 / (1 + np.exp(-x2[0].astype(np.float64)))
    q = s / s.sum()
    np.testing.assert_allclose(hs.values[0], -(q * np.log(q)).sum(), rtol=1e-6)


def test_change_matches_reference_with_unsorted_checkpoints(cube):
    shuffled = cube.isel(checkpoint=[2, 0, 1])
    r = change(shuffled)
    ref, order = change_reference(shuffled)
    assert list(r["step"].values) == sorted(shuffled["step"].values)
    np.testing.assert_allclose(r["saturation"].values, ref["saturation"])
    np.testing.assert_allclose(r["overlap_prev"].values, ref["overlap_prev"])
    np.testing.assert_allclose(r["switch_fraction"].values, 1 - ref["overlap_prev"])
    np.testing.assert_allclose(r["position_match_final"].values, ref["pos_final"])
    np.testing.assert_allclose(r["position_match_prev"].values, ref["pos_prev"])
    assert np.isnan(r["overlap_prev"].isel(checkpoint=0)).all()
    np.testing.assert_allclose(r["saturation"].isel(checkpoint=-1).values, 1.0)


def test_change_set_overlap_ignores_order_position_match_does_not(cube):
    # the same expert sets with the slot order reversed at the final checkpoint
    ds = cube.copy(deep=True)
    ds["expert_ids"].values[-1] = ds["expert_ids"].values[-1][..., ::-1]
    ds["expert_ids"].values[-2] = cube["expert_ids"].values[-1]
    r = change(ds)
    np.testing.assert_allclose(r["overlap_prev"].isel(checkpoint=-1).values, 1.0)
    assert (r["position_match_prev"].isel(checkpoint=-1).values < 0.1).all()


# --------------------------------------------------------------------------- chance levels


@pytest.fixture(scope="module")
def uniform_cube():
    return mock_cube(uniform=True, n_checkpoints=3, n_layers=2, num_experts=8, top_k=2,
                     n_samples=360, seq_len=64, seed=11)


def _tolerance(p, n):
    # 6 binomial standard errors: a real bias of this size is a bug, noise is not
    return 6 * math.sqrt(p * (1 - p) / n)


def test_usage_at_chance_on_uniform_routing(uniform_cube):
    r = usage(uniform_cube, views=["all"], n_boot=0).sel(view="all")
    E, k = 8, 2
    n_min = int(r["tokens"].min()) * k
    assert abs(r["usage"] - 1 / E).max() < _tolerance(1 / E, n_min)
    assert abs(r["usage_all"] - 1 / E).max() < _tolerance(1 / E, n_min * 3)
    assert float(r.attrs["chance"]) == pytest.approx(1 / E)


def test_change_at_chance_on_uniform_routing(uniform_cube):
    r = change(uniform_cube)
    E, k = 8, 2
    n = int(r["tokens"].min()) * k
    non_final = r.isel(checkpoint=slice(0, -1))
    assert abs(non_final["saturation"] - k / E).max() < _tolerance(k / E, n)
    assert abs(r["overlap_prev"].isel(checkpoint=slice(1, None)) - k / E).max() < _tolerance(k / E, n)
    assert abs(non_final["position_match_final"] - 1 / E).max() < _tolerance(1 / E, n)
    assert abs(r["position_match_prev"].isel(checkpoint=slice(1, None)) - 1 / E).max() < _tolerance(1 / E, n)
    assert r["saturation"].attrs["chance"] == pytest.approx(k / E)


# --------------------------------------------------------------------------- lazy input


@pytest.mark.parametrize("func", [usage, confidence, change], ids=lambda f: f.__name__)
def test_chunked_input_gives_the_in_memory_result(cube, lazy_cube, func):
    with forbid_cube_compute():
        lazy_result = func(lazy_cube)
    assert all(v.chunks is not None for v in lazy_result.data_vars.values())
    xr.testing.assert_allclose(func(cube), lazy_result.compute())


def test_forbid_cube_compute_catches_a_compute(lazy_cube):
    with pytest.raises(AssertionError, match="cube variable was computed"):
        with forbid_cube_compute():
            lazy_cube["expert_ids"].sum().compute()


# --------------------------------------------------------------------------- properties


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n_layers=st.integers(2, 4),
    n_checkpoints=st.integers(2, 3),
    cut=st.integers(1, 3),
    hole_frac=st.sampled_from([0.0, 0.2]),
)
def test_split_then_combine_equals_whole(seed, n_layers, n_checkpoints, cut, hole_frac):
    ds = punch_holes(
        mock_cube(n_checkpoints=n_checkpoints, n_layers=n_layers, n_samples=6, seq_len=12, seed=seed,
                  with_logits=False),
        seed=seed, frac=hole_frac,
    )
    def counts(d):
        return usage(d, views=["all"], n_boot=0)

    whole = counts(ds)
    cut = min(cut, n_layers - 1)
    by_layer = xr.concat([counts(ds.isel(layer=slice(0, cut))), counts(ds.isel(layer=slice(cut, None)))], "layer")
    by_ckpt = xr.concat([counts(ds.isel(checkpoint=[c])) for c in range(n_checkpoints)], "checkpoint")
    for part in (by_layer, by_ckpt):
        np.testing.assert_array_equal(part["count"].values, whole["count"].values)
        np.testing.assert_array_equal(part["tokens"].values, whole["tokens"].values)
    # slots add up: Σ_e count = valid slots of the group
    valid = (ds["expert_ids"] >= 0).sum("k")
    per_layer = valid.sum("token").values
    np.testing.assert_array_equal(whole["count"].sel(view="all").sum(("domain", "expert")).values, per_layer)
    # the same bootstrap draws (they depend on the samples only), so the intervals split too
    ch_whole = change(ds, n_boot=20)
    ch_split = xr.concat([change(ds.isel(layer=[i]), n_boot=20) for i in range(n_layers)], "layer")
    xr.testing.assert_allclose(ch_split, ch_whole)


# --------------------------------------------------------------------------- invalid ids and errors


def test_unwritten_ids_never_count_as_expert_zero():
    ds = small_cube(with_logits=False)
    ds["expert_ids"].values[1, 2] = FILL_ID  # a whole (checkpoint, layer) chunk unwritten
    ds["expert_weights"].values[1, 2] = np.nan
    r = usage(ds)
    assert int(r["count"].isel(checkpoint=1, layer=2).sum()) == 0
    assert int(r["tokens"].isel(checkpoint=1, layer=2).sum()) == 0
    assert np.isnan(r["usage"].isel(checkpoint=1, layer=2)).all()
    assert np.isfinite(r["usage"].isel(checkpoint=0)).all()
    c = confidence(ds)
    assert np.isnan(c["margin_all"].isel(checkpoint=1, layer=2))
    assert np.isfinite(c["margin_all"].isel(checkpoint=0)).all()


def test_change_needs_two_checkpoints(cube):
    with pytest.raises(ValueError, match="at least 2"):
        change(cube.isel(checkpoint=[0]))


def test_change_refuses_differing_unwritten_pattern(cube):
    ds = cube.copy(deep=True)
    ds["expert_ids"].values[0, 1, 5, :] = FILL_ID  # written at the other checkpoints
    with pytest.raises(ValueError, match=r"identical inputs.*checkpoint step0, layer 1: 2"):
        change(ds)
    result = change(lazy(ds))  # lazy: the graph builds, computing refuses
    with pytest.raises(ValueError, match="identical inputs"):
        result["saturation"].compute()


def test_out_of_range_ids_are_refused(cube):
    ds = cube.copy(deep=True)
    ds["expert_ids"].values[2, 0, 3, 1] = 8
    # checked once where an analysis opens the cube (registry.checked_cube), for every analysis
    with pytest.raises(ValueError, match=r"outside -1\.\.7.*checkpoint step200, layer 0"):
        analyses.run("usage", ds)
    with pytest.raises(ValueError, match=r"outside -1\.\.7"):
        analyses.run("usage", lazy(ds))["usage_all"].compute()


def test_registry_errors(cube):
    with pytest.raises(KeyError, match="known: .*usage"):
        analyses.get("no_such_analysis")
    assert analyses.missing_requirements("confidence", cube.drop_vars("expert_weights")) == ["expert_weights"]
    assert analyses.missing_requirements("usage", cube.drop_vars("router_logits")) == []
    with pytest.raises(ValueError, match="needs cube variable.*expert_weights"):
        analyses.run("confidence", cube.drop_vars("expert_weights"))
    with pytest.raises(ValueError, match="unknown parameter.*bins"):
        analyses.run("usage", cube, bins=3)
    with pytest.raises(ValueError, match="already registered"):
        analyses.register(analyses.get("usage"))
    bad = xr.Dataset({"x": ("token", [1.0])}, attrs={"analysis": "x"})
    with pytest.raises(ValueError, match="dims \\['token'\\].*lacks attribute 'long_name'"):
        analyses.check_result(bad, "x")


def test_savefig_formats(tmp_path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    paths = plotting.savefig(fig, tmp_path / "sub", "a/b", ("png", "pdf", "svg"))
    assert [p.suffix for p in paths] == [".png", ".pdf", ".svg"]
    assert all(p.stat().st_size > 0 and p.parent == tmp_path / "sub" for p in paths)
    fig, _ = plt.subplots()
    with pytest.raises(ValueError, match="expected some of"):
        plotting.savefig(fig, tmp_path, "x", ("jpg",))


# --------------------------------------------------------------------------- issue 3: confidence and change extensions


def _entropy_np(p):
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def test_confidence_extensions_match_reference(cube):
    r = confidence(cube, hist_bins=7, n_boot=0)
    count, _, _ = usage_reference(cube)  # (C, L, D, E) slot counts
    C, L, D, E = count.shape
    ids, dom, logits = cube["expert_ids"].values, cube["domain"].values, cube["router_logits"].values.astype(np.float32)
    domains = sorted(set(dom))
    T, K = ids.shape[2:]
    for c in range(C):
        for layer in range(L):
            # marginal entropy: entropy of the usage distribution itself
            for d in range(D):
                u = count[c, layer, d] / count[c, layer, d].sum()
                assert r["marginal_entropy"].values[c, layer, d] == pytest.approx(_entropy_np(u) / math.log(E))
            u = count[c, layer].sum(0) / count[c, layer].sum()
            assert r["marginal_entropy_all"].values[c, layer] == pytest.approx(_entropy_np(u) / math.log(E))
            # boundary: k-th minus (k+1)-th largest logit, over tokens with a valid slot and written logits
            gaps = {d: [] for d in domains}
            ents = []
            for t in range(T):
                if not (ids[c, layer, t] >= 0).any() or np.isnan(logits[c, layer, t]).any():
                    continue
                s = sorted(logits[c, layer, t].tolist(), reverse=True)
                gaps[dom[t]].append(s[K - 1] - s[K])
                x = logits[c, layer, t]
                p = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
                ents.append(_entropy_np(p.astype(np.float64)) / math.log(E))
            for d, name in enumerate(domains):
                assert r["boundary"].values[c, layer, d] == pytest.approx(np.mean(gaps[name]), rel=1e-5)
            assert r["boundary_all"].values[c, layer] == pytest.approx(np.mean(sum(gaps.values(), [])), rel=1e-5)
            # histogram of the normalised per-token entropy over 7 bins of [0, 1]
            hist, _ = np.histogram(ents, bins=np.linspace(0, 1, 8))
            np.testing.assert_allclose(r["entropy_hist"].values[c, layer], hist / hist.sum(), atol=1e-12)
    np.testing.assert_allclose(r["bin_start"].values, np.linspace(0, 1, 8)[:-1])
    assert (r["boundary_all"] > 0).all()  # mock routers select the top-k logits
    assert "not a per-token entropy" in r["marginal_entropy"].attrs["description"]


def test_confidence_intervals_bracket_and_views(cube):
    r = confidence(cube, n_boot=50, seed=2)
    for m in ("entropy", "topk_entropy", "margin", "boundary", "marginal_entropy"):
        for name in (m, f"{m}_all"):
            lo, hi = r[f"{name}_lo"].values, r[f"{name}_hi"].values
            assert (lo <= hi + 1e-12).all(), name
            # the mean of a ratio estimate lies inside its interval for nearly every cell
            assert ((lo <= r[name].values + 1e-9) & (r[name].values <= hi + 1e-9)).mean() > 0.8, name
    last = confidence(cube, view="last_canonical", n_boot=0)
    mask = last_canonical_mask(cube)
    expected = ((cube["expert_ids"].values >= 0).any(-1) & mask).sum(-1)
    np.testing.assert_array_equal(last["tokens"].sum("domain").values, expected)


def test_marginal_entropy_and_drift_at_chance_on_uniform_routing(uniform_cube):
    c = confidence(uniform_cube, n_boot=0)
    # finite N: E[H] ≈ ln E − (E−1)/(2·k·N); within 1 % of 1 at this size
    assert float(c["marginal_entropy_all"].min()) > 0.99
    assert c["marginal_entropy_all"].attrs["chance"] == 1.0
    ch = change(uniform_cube, n_boot=0)
    assert float(ch["drift_final"].min()) > 0.98 and float(ch["drift_prev"].isel(checkpoint=slice(1, None)).min()) > 0.98


def test_drift_matches_reference(cube):
    shuffled = cube.isel(checkpoint=[1, 2, 0])
    r = change(shuffled, n_boot=0)
    order = np.argsort(shuffled["step"].values)
    count = usage_reference(shuffled)[0].sum(2)[order]  # (C, L, E), sorted by step
    C, L, _ = count.shape
    for c in range(C):
        for layer in range(L):
            a, f = count[c, layer], count[-1, layer]
            assert r["drift_final"].values[c, layer] == pytest.approx(a @ f / np.sqrt((a @ a) * (f @ f)))
            if c:
                b = count[c - 1, layer]
                assert r["drift_prev"].values[c, layer] == pytest.approx(a @ b / np.sqrt((a @ a) * (b @ b)))
    assert np.isnan(r["drift_prev"].isel(checkpoint=0)).all()


def test_change_intervals_are_paired_and_bracket(cube):
    r = change(cube, n_boot=60, seed=3)
    for m in ("saturation", "overlap_prev", "position_match_final", "drift_final"):
        lo, hi = r[f"{m}_lo"].values, r[f"{m}_hi"].values
        ok = np.isfinite(lo)
        assert (lo[ok] <= hi[ok] + 1e-12).all(), m
    # at the final checkpoint every replicate compares it with itself: a zero-width interval at 1
    np.testing.assert_allclose(r["saturation_lo"].isel(checkpoint=-1).values, 1.0)
    np.testing.assert_allclose(r["drift_final_hi"].isel(checkpoint=-1).values, 1.0)


def test_change_refuses_incomplete_checkpoint(cube):
    ds = cube.copy(deep=True)
    ds["complete"].values[1] = 0
    with pytest.raises(ValueError, match=r"identical inputs.*not completely captured.*checkpoint step100"):
        change(ds)
    result = change(lazy(ds))  # lazy: the graph builds, computing refuses
    with pytest.raises(ValueError, match="not completely captured"):
        result["drift_final"].compute()
