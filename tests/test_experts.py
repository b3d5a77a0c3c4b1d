"""analyses/experts.py: diversity closed forms, projection, clustering, drift, Mantel."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from safetensors.numpy import save_file
from scipy.stats import rankdata

from analyses import experts as X


def _checkpoint(tmp_path, router, seed=0, name="m"):
    rng = np.random.default_rng(seed)
    E, H = router.shape
    t = {"model.layers.0.mlp.gate.weight": router.astype(np.float32)}
    for e in range(E):
        for proj, shape in (("gate_proj", (8, H)), ("up_proj", (8, H)), ("down_proj", (H, 8))):
            t[f"model.layers.0.mlp.experts.{e}.{proj}.weight"] = rng.standard_normal(shape).astype(np.float32)
    d = tmp_path / name
    d.mkdir()
    save_file(t, str(d / "model.safetensors"))
    return d


def test_orthogonal_rows_diversity_one_identical_zero(tmp_path):
    emb = X.expert_embeddings(_checkpoint(tmp_path, np.eye(8, 16)), ffn_dim=16)
    s = X.similarity_structure(emb, k_values=(2,), kmeans_seeds=2)
    assert float(s.diversity.sel(embedding="router", layer=0)) == pytest.approx(1.0)
    assert X.diversity(np.ones((5, 7))) == pytest.approx(0.0)
    np.testing.assert_allclose(s.similarity.sel(embedding="router", layer=0).values, np.eye(8), atol=1e-12)
    mean, sd = X.random_diversity(8, 4096, draws=5)
    assert abs(mean - 1) < 0.01 and sd < 0.01


def test_projection_is_linear_deterministic_and_keeps_angles():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(5000), rng.standard_normal(5000)
    pa, pb = X.project(a, "up", ffn_dim=256, seed=1), X.project(b, "up", ffn_dim=256, seed=1)
    np.testing.assert_allclose(X.project(a + b, "up", ffn_dim=256, seed=1), pa + pb, rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(pa, X.project(a, "up", ffn_dim=256, seed=1))
    cos = pa @ pb / np.linalg.norm(pa) / np.linalg.norm(pb)
    assert abs(cos) < 0.25  # orthogonal-ish stays orthogonal-ish (JL)


def test_planted_groups_cluster(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((2, 32))
    router = np.repeat(centres, 4, axis=0) + 0.05 * rng.standard_normal((8, 32))
    s = X.similarity_structure(X.expert_embeddings(_checkpoint(tmp_path, router), ffn_dim=16), k_values=(2, 3),
                               kmeans_seeds=3)
    r = s.sel(embedding="router", layer=0)
    assert float(r.silhouette.sel(k=2).max()) > 0.8
    lab = r.labels.sel(k=2).values
    assert len(set(lab[:4])) == 1 and len(set(lab[4:])) == 1 and lab[0] != lab[4]
    link = r.linkage.values  # the last merge joins the two groups, far above the others
    assert link[-1, 2] > 5 * link[:-1, 2].max() and link[-1, 3] == 8


def test_drift_and_mantel(tmp_path):
    rng = np.random.default_rng(0)
    r0 = rng.standard_normal((8, 16))
    e0 = X.expert_embeddings(_checkpoint(tmp_path, r0, name="a"), ffn_dim=16)
    e1 = X.expert_embeddings(_checkpoint(tmp_path, -r0, name="b"), ffn_dim=16)
    embs = xr.concat([e0, e1], "checkpoint").assign_coords(checkpoint=["a", "b"])
    d = X.drift(embs)
    np.testing.assert_allclose(d.drift.sel(checkpoint="b").values, 0, atol=1e-12)
    np.testing.assert_allclose(d.drift.sel(checkpoint="a", embedding="router").values, 2.0)  # opposite rows
    np.testing.assert_allclose(d.drift_rel.sel(checkpoint="a", embedding="router").values, 2.0)
    s = X.cosine_matrix(rng.standard_normal((7, 5)))
    m = np.exp(s)  # a monotone function of s: ρ = 1
    rho, p = X.mantel(s, m, n_perm=199)
    iu = np.triu_indices(7, 1)
    ref = np.corrcoef(rankdata(s[iu]), rankdata(m[iu]))[0, 1]
    assert rho == pytest.approx(ref) == pytest.approx(1.0)
    assert p < 0.05
    noise = rng.standard_normal((7, 7))
    _, p_null = X.mantel(s, noise + noise.T, n_perm=199)
    assert p_null > 0.01
    sim = X.similarity_structure(embs.isel(checkpoint=0), k_values=(2,), kmeans_seeds=1).similarity
    coact = xr.DataArray(np.exp(sim.sel(embedding="router").values)[None], dims=("checkpoint", "layer", "expert", "expert_b"),
                         coords={"checkpoint": ["a"], "layer": [0]})
    res = X.mantel_against(sim.expand_dims(checkpoint=["a"]), coact, n_perm=49)
    assert res.mantel_r.sel(embedding="router").values.ravel()[0] == pytest.approx(1.0)


def test_mantel_p_equals_a_loop_of_spearmanr():
    """The vectorised permutations give the p-value of one scipy spearmanr per permutation (same RNG draws)."""
    from scipy.stats import spearmanr

    rng = np.random.default_rng(3)
    a = rng.standard_normal((9, 9))
    a = a + a.T
    b = np.round(a + 2.0 * rng.standard_normal((9, 9)), 1)  # ties: average ranks must match spearmanr's
    b = b + b.T
    rho, p = X.mantel(a, b, n_perm=99, seed=5)
    iu = np.triu_indices(9, 1)
    r_ref = spearmanr(a[iu], b[iu]).statistic
    g = np.random.default_rng(5)
    hits = 0
    for _ in range(99):
        q = g.permutation(9)
        hits += spearmanr(a[iu], b[np.ix_(q, q)][iu]).statistic >= r_ref - 1e-12
    assert rho == pytest.approx(r_ref)
    assert p == pytest.approx((1 + hits) / 100)
    assert 0 < p < 1
