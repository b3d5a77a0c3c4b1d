"""The logit lens by condition (analyses/lens.py) against brute-force loops over token pairs.

The lens computed during capture (capture/lens.py) is tested in test_capture_lens.py.
"""

from __future__ import annotations

import numpy as np
import pytest

import analyses
from cube_helpers import punch_holes, small_cube
from storage.schema import mock_cube
from token_pairs_helpers import pairs_bruteforce


@pytest.fixture(scope="module")
def cube():
    return punch_holes(small_cube(n_checkpoints=2, seed=11), seed=4)


def _lens_bruteforce(ds, c, layer):
    lp = ds["lens_logprob"].values[c, layer].astype(np.float64)
    js, nll = ds["lens_js"].values[c, layer].astype(np.float64), ds["nll"].values[c]
    pos, aligned = ds["position"].values, ds["aligned_token"].values
    out = {}
    for view, pairs in pairs_bruteforce(ds).items():
        a_vals, b_vals, js_vals = [], [], []
        for a, b, _ in pairs:
            if pos[a] == 0 or pos[b] == 0 or np.isnan(lp[a - 1]) or np.isnan(lp[b - 1]):
                continue
            a_vals.append(-lp[a - 1])
            b_vals.append(-lp[b - 1])
            if aligned[a] == b and not np.isnan(js[a - 1]):
                js_vals.append(js[a - 1])
        out[view] = (np.mean(a_vals), np.mean(b_vals), np.mean(np.subtract(a_vals, b_vals)),
                     np.mean(js_vals) if js_vals else np.nan, len(a_vals))
    return out


def test_lens_by_condition_equals_bruteforce(cube):
    res = analyses.run("lens", cube, n_boot=30)
    for c in range(cube.sizes["checkpoint"]):
        for layer in range(cube.sizes["layer"]):
            for view, (na, nb, d, js, n) in _lens_bruteforce(cube, c, layer).items():
                sel = res.isel(checkpoint=c, layer=layer).sel(view=view)
                assert float(sel["lens_nll"].sel(condition="A")) == pytest.approx(na)
                assert float(sel["lens_nll"].sel(condition="B")) == pytest.approx(nb)
                assert float(sel["lens_nll_diff"]) == pytest.approx(d)
                assert int(sel["targets"]) == n
                if np.isfinite(js):
                    assert float(sel["js"]) == pytest.approx(js)
    # the mock's lens at the last layer is −nll: the model NLL the analysis reports on the same targets
    last = res.isel(layer=-1)
    np.testing.assert_allclose(last["lens_nll"].values, last["model_nll"].values, rtol=1e-6)
    df = analyses.get("lens").table(res)
    assert {"lens_nll_A", "lens_nll_B", "lens_nll_diff", "js", "model_nll_A"} <= set(df)


def test_lens_without_js_and_nll(cube):
    res = analyses.run("lens", cube.drop_vars(["lens_js", "nll"]), n_boot=20)
    assert "js" not in res and "model_nll" not in res and "js_lo" not in res
    for c in range(cube.sizes["checkpoint"]):
        for layer in range(cube.sizes["layer"]):
            for view, (na, nb, d, _, n) in _lens_bruteforce(cube, c, layer).items():
                sel = res.isel(checkpoint=c, layer=layer).sel(view=view)
                assert float(sel["lens_nll"].sel(condition="A")) == pytest.approx(na)
                assert float(sel["lens_nll_diff"]) == pytest.approx(d)
                assert int(sel["targets"]) == n


def test_lens_needs_the_lens_variables():
    with pytest.raises(ValueError, match="needs cube variable"):
        analyses.run("lens", mock_cube(with_lens=False, n_checkpoints=1))
