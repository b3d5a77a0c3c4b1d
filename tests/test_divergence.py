"""Routing divergence by condition, against brute-force loops over token pairs (the lens: test_lens.py)."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import xarray as xr

import analyses
from analyses.divergence import expected_jaccard, mask_points, per_token_vars, token_pairs
from cube_helpers import lazy, punch_holes, small_cube
from token_pairs_helpers import pairs_bruteforce
from storage.schema import mock_cube


@pytest.fixture(scope="module")
def cube():
    return punch_holes(small_cube(n_checkpoints=2, seed=11), seed=4)


def _bruteforce(ds, c, layer):
    E, k = ds.sizes["expert"], ds.sizes["k"]
    ids = ds["expert_ids"].values[c, layer]
    out = {}
    for view, pairs in pairs_bruteforce(ds).items():
        counts = np.zeros((2, E))
        jac, inter, n = [], [], 0
        for a, b, _ in pairs:
            sa, sb = {int(x) for x in ids[a] if x >= 0}, {int(x) for x in ids[b] if x >= 0}
            for side, s in ((0, ids[a]), (1, ids[b])):
                for x in s:
                    if x >= 0:
                        counts[side, x] += 1
            if sa and sb:
                n += 1
                jac.append(len(sa & sb) / len(sa | sb))
                inter.append(len(sa & sb) / k)
        usage = counts / counts.sum(1, keepdims=True)
        out[view] = {"usage": usage, "tv": 0.5 * np.abs(usage[0] - usage[1]).sum(), "jaccard": np.mean(jac),
                     "intersection": np.mean(inter), "pairs": n}
    return out


def test_expected_jaccard_is_exact():
    for E, k in ((8, 2), (6, 3), (10, 1), (5, 5)):
        subsets = [set(s) for s in itertools.combinations(range(E), k)]
        brute = np.mean([len(a & b) / len(a | b) for a in subsets for b in subsets])
        assert expected_jaccard(E, k) == pytest.approx(brute, abs=1e-12)
    assert expected_jaccard(8, 2) == pytest.approx(5 / 28)
    shortcut = (4 / 8) / (4 - 4 / 8)  # the ratio of expectations METRICS.md warns about
    assert expected_jaccard(8, 2) - shortcut > 0.03


def test_divergence_equals_bruteforce(cube):
    res = analyses.run("divergence", cube, n_boot=0)
    for c in range(cube.sizes["checkpoint"]):
        for layer in range(cube.sizes["layer"]):
            ref = _bruteforce(cube, c, layer)
            for view, r in ref.items():
                sel = res.isel(checkpoint=c, layer=layer).sel(view=view)
                np.testing.assert_allclose(sel["usage"].sel(condition="A").values, r["usage"][0], atol=1e-12)
                np.testing.assert_allclose(sel["usage"].sel(condition="B").values, r["usage"][1], atol=1e-12)
                np.testing.assert_allclose(sel["usage_diff"].values, r["usage"][0] - r["usage"][1], atol=1e-12)
                assert float(sel["total_variation"]) == pytest.approx(r["tv"])
                assert float(sel["jaccard"]) == pytest.approx(r["jaccard"])
                assert float(sel["intersection"]) == pytest.approx(r["intersection"])
                ej = expected_jaccard(8, 2)
                assert float(sel["jaccard_corrected"]) == pytest.approx((r["jaccard"] - ej) / (1 - ej))
                assert int(sel["pairs"]) == r["pairs"]
    assert res["sample_pairs"].sel(view="last_canonical") == len(pairs_bruteforce(cube)["last_canonical"])


def test_threshold_and_intervals(cube):
    res = analyses.run("divergence", cube, percentile=90.0, min_abs=0.01, n_boot=50)
    for c in range(res.sizes["checkpoint"]):
        for view in res["view"].values:
            d = res["usage_diff"].isel(checkpoint=c).sel(view=view).values
            thr = max(np.percentile(np.abs(d), 90.0), 0.01)
            assert float(res["threshold"].isel(checkpoint=c).sel(view=view)) == pytest.approx(thr)
            kept = res["usage_diff_thresholded"].isel(checkpoint=c).sel(view=view).values
            np.testing.assert_array_equal(kept, np.where(np.abs(d) >= thr, d, 0.0))
    assert (analyses.run("divergence", cube, min_abs=1.0, n_boot=0)["usage_diff_thresholded"] == 0).all()
    for name in ("jaccard", "intersection", "total_variation"):
        v, lo, hi = (res[f"{name}{s}"].values for s in ("", "_lo", "_hi"))
        ok = np.isfinite(v) & np.isfinite(lo)
        assert ok.any() and (lo[ok] <= hi[ok]).all()
        assert ((lo[ok] <= v[ok] + 1e-9) & (v[ok] <= hi[ok] + 1e-9)).mean() > 0.9


@pytest.mark.parametrize("view", ["canonical", "last_canonical"])
def test_identical_routing_in_both_conditions(view):
    ds = small_cube(n_checkpoints=1, seed=2)
    ids = ds["expert_ids"].values
    for a, b, _ in pairs_bruteforce(ds)[view]:
        ids[:, :, b] = ids[:, :, a][:, :, ::-1]  # same set, other slot order
    res = analyses.run("divergence", ds, n_boot=0).sel(view=view)
    np.testing.assert_allclose(res["total_variation"].values, 0.0, atol=1e-12)
    np.testing.assert_allclose(res["jaccard"].values, 1.0)
    np.testing.assert_allclose(res["jaccard_corrected"].values, 1.0)
    np.testing.assert_allclose(res["intersection"].values, 1.0)
    assert (res["usage_diff_thresholded"].values == 0).all()


def test_uniform_random_routing_sits_at_chance():
    ds = mock_cube(uniform=True, n_checkpoints=1, n_layers=6, num_experts=8, top_k=2, n_samples=120, seq_len=40,
                   seed=5)
    res = analyses.run("divergence", ds, n_boot=100).sel(view="canonical")
    # ~1100 token pairs per layer: the standard error of the intersection is ~0.009, of J ~0.007
    assert np.abs(res["jaccard"].values - 5 / 28).max() < 0.03
    assert np.abs(res["intersection"].values - 2 / 8).max() < 0.035
    assert np.abs(res["jaccard_corrected"].values).max() < 0.04
    # 95 % intervals over ~60 sample pairs: most of the 6 layers' intervals hold the exact chance level
    covered = (res["jaccard_lo"].values <= 5 / 28) & (5 / 28 <= res["jaccard_hi"].values)
    assert covered.sum() >= 4
    assert (res["jaccard_hi"] - res["jaccard_lo"]).values.max() < 0.05


def test_mask_points_and_artifacts(cube, tmp_path):
    ds = cube.assign_coords(layer=[1, 5, 9])  # the model's own (non-contiguous) layer indices
    res = analyses.run("divergence", ds, n_boot=0)
    pts = mask_points(res)
    assert set(pts) == {"A_minus_B", "B_minus_A", "A"}
    last = res.isel(checkpoint=-1).sel(view="last_canonical")
    for key, values in (("A_minus_B", last["usage_diff"]), ("B_minus_A", -last["usage_diff"]),
                        ("A", last["usage"].sel(condition="A"))):
        lst = pts[key]
        assert len(lst) == 3 * 8 and {(p["layer"], p["expert"]) for p in lst} == {(l, e) for l in (1, 5, 9)
                                                                                     for e in range(8)}
        assert all(lst[i]["value"] >= lst[i + 1]["value"] for i in range(len(lst) - 1))
        for p in lst:
            assert p["value"] == pytest.approx(float(values.sel(layer=p["layer"], expert=p["expert"])))
    files = analyses.get("divergence").artifacts(res, tmp_path)
    names = sorted(p.relative_to(tmp_path).as_posix() for p in files)
    ck = str(res["checkpoint"].values[-1])
    assert f"{ck}/last_canonical_A_minus_B_points.json" in names and "usage_maps.csv" in names
    assert json.loads((tmp_path / ck / "last_canonical_A_minus_B_points.json").read_text()) == pts["A_minus_B"]
    assert len(files) == 2 * 3 + 1
    df = analyses.get("divergence").table(res)
    assert {"checkpoint", "layer", "view", "total_variation", "jaccard", "jaccard_corrected", "intersection"} <= set(df)
    assert len(df) == res.sizes["checkpoint"] * 3 * 2


def test_errors_say_what_is_missing():
    with pytest.raises(ValueError, match="name the two conditions"):
        analyses.run("divergence", mock_cube(paired=False, n_checkpoints=1))
    ds = small_cube(n_checkpoints=1)
    with pytest.raises(ValueError, match="'aligned_token' is missing"):
        analyses.run("divergence", ds.drop_vars("aligned_token"))
    with pytest.raises(ValueError, match="condition 'C' has no token"):
        analyses.run("divergence", ds, condition_a="A", condition_b="C")
    # conditions named the other way round swap the signs
    ab = analyses.run("divergence", ds, n_boot=0)
    ba = analyses.run("divergence", ds, condition_a="B", condition_b="A", n_boot=0)
    assert math.isfinite(float(ab["total_variation"].sum()))
    assert set(token_pairs(ds, "A", "B")) == {"canonical", "last_canonical"}
    np.testing.assert_allclose(ab["usage_diff"].values, -ba["usage_diff"].values)
    np.testing.assert_allclose(ab["jaccard"].values, ba["jaccard"].values)


@pytest.mark.parametrize("lazy_cube", [False, True])
def test_out_of_range_ids_on_token_pairs_are_refused(cube, lazy_cube):
    ds = cube.copy(deep=True)
    pairs = token_pairs(ds, "A", "B")
    ids = ds["expert_ids"].values
    ids[1, 2, pairs["canonical"][0][3], 0] = 8  # E = 8
    ids[0, 1, pairs["last_canonical"][1][0], 1] = -5
    ids[0, 1, pairs["canonical"][1][5], 1] = 99
    # slots of both views and both sides count; a lazy run names at least the cells of the block that fails first
    want = r"ids outside -1\.\.7 \(num_experts=8\) at checkpoint" if lazy_cube else \
        r"ids outside -1\.\.7 \(num_experts=8\) at checkpoint step0, layer 1: 2; checkpoint step100, layer 2: 1"
    with pytest.raises(ValueError, match=want):
        analyses.run("divergence", lazy(ds) if lazy_cube else ds, n_boot=5).compute()


def test_per_token_vars_broadcasts_and_matches_numpy():
    rng = np.random.default_rng(0)
    x = xr.DataArray(rng.random((2, 3, 10, 2)), dims=("checkpoint", "layer", "token", "k"))
    w = xr.DataArray(rng.random((2, 10)), dims=("checkpoint", "token"))
    m = xr.DataArray(rng.random(10) > 0.5, dims="token")

    def func(x, w, m):
        return x.sum(-1) * w[..., 0], np.where(m[..., 0], x[..., 0], 0.0)

    eager = per_token_vars(func, [x, w, m], ("s", "t"), reduce=("k",))
    lazy_res = per_token_vars(func, [x.chunk({"layer": 1, "token": 4}), w.chunk({"token": 3}), m], ("s", "t"),
                              reduce=("k",))
    assert eager["s"].dims == ("checkpoint", "layer", "token") and lazy_res["s"].chunks is not None
    np.testing.assert_allclose(eager["s"].values, (x.sum("k") * w).transpose(*eager["s"].dims).values)
    np.testing.assert_array_equal(eager["t"].values, x.isel(k=0).where(m, 0.0).values)
    xr.testing.assert_allclose(lazy_res.compute(), eager)
