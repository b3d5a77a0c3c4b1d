"""analyses/masks.py: packed Hamming vs brute force, metrics vs recomputation, Wanda vs the paper, planted blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from analyses import masks as M


@settings(max_examples=40, deadline=None)
@given(st.tuples(st.integers(2, 12), st.integers(1, 150)).flatmap(lambda shape: arrays(bool, shape)))
def test_popcount_hamming_equals_brute_force(mask):
    packed = M.pack_rows(mask)
    brute = (mask[:, None, :] != mask[None, :, :]).sum(-1)
    np.testing.assert_array_equal(M.hamming_matrix(packed), brute)
    np.testing.assert_array_equal(M.hamming_to_row(packed, 1), brute[1])
    np.testing.assert_array_equal(M.unpack_rows(packed, mask.shape[1]), mask)
    idx, d = M.top_similar(packed, 0, 5)
    others = [i for i in range(len(mask)) if i != 0]
    ref = sorted(others, key=lambda i: (brute[0, i], i))[: min(5, len(mask) - 1)]
    assert list(idx) == ref and list(d) == [brute[0, i] for i in ref]


def test_cluster_metrics_equal_recomputation():
    rng = np.random.default_rng(1)
    x = (rng.random((40, 30)) < 0.4).astype(float)
    labels, centers = M.kmeans_rows(x, 4, seed=0)
    got = M.cluster_metrics(x, labels, centers, 4)
    # independent: loops, centres recomputed as member means
    cen = np.array([x[labels == c].mean(0) for c in range(4)])
    np.testing.assert_allclose(cen, centers, atol=1e-9)
    within = np.mean([np.sqrt(((x[i] - cen[labels[i]]) ** 2).sum()) for i in range(len(x))])
    between = np.mean([np.sqrt(((cen[a] - cen[b]) ** 2).sum()) for a in range(4) for b in range(a + 1, 4)])
    same, diff = [], []
    for i in range(len(x)):
        for j in range(len(x)):
            if i != j:
                (same if labels[i] == labels[j] else diff).append(np.abs(x[i] - x[j]).sum())
    assert got["within"] == pytest.approx(within)
    assert got["between"] == pytest.approx(between)
    assert got["separation_ratio"] == pytest.approx(between / within)
    assert got["hamming_ratio"] == pytest.approx(np.mean(diff) / np.mean(same))
    assert got["inertia"] == pytest.approx(sum(((x[i] - cen[labels[i]]) ** 2).sum() for i in range(len(x))))
    assert got["size_std"] == pytest.approx(np.std([np.sum(labels == c) for c in range(4)]))


def test_wanda_equals_paper_definition():
    """prune_wanda of Sun et al.'s code: W_metric = |W|·sqrt(scaler_row); sort per row; prune the first s·cols."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(6, 10, generator=g)
    X = torch.randn(50, 10, generator=g)  # calibration inputs (tokens × in features)
    scaler_row = (X**2).sum(0)  # their running norm²
    metric = W.abs() * torch.sqrt(scaler_row.reshape(1, -1))
    W_mask = torch.zeros_like(metric, dtype=torch.bool)
    idx = torch.sort(metric, dim=-1, stable=True)[1][:, : int(W.shape[1] * 0.5)]
    W_mask.scatter_(1, idx, True)  # True = pruned in their code
    got = M.wanda_mask(W.numpy(), torch.linalg.vector_norm(X, dim=0).numpy(), 0.5)
    np.testing.assert_array_equal(got, ~W_mask.numpy())


def test_magnitude_mask():
    w = np.random.default_rng(2).standard_normal((7, 9))
    keep = M.magnitude_mask(w, 0.3)
    assert (~keep).sum() == int(0.3 * w.size)
    assert np.abs(w[~keep]).max() <= np.abs(w[keep]).min()
    with pytest.raises(ValueError, match="sparsity"):
        M.magnitude_mask(w, 1.0)


def test_planted_blocks_separate_random_does_not():
    rng = np.random.default_rng(0)
    proto = rng.random((4, 192)) < 0.5
    planted = np.repeat(proto, 40, axis=0) ^ (rng.random((160, 192)) < 0.05)
    r = M.cluster_rows(M.pack_rows(planted), 192, n=64, k_values=(4,), seeds=2)
    assert float(r.separation_ratio.min()) > 2 and float(r.hamming_ratio.min()) > 2
    noise = rng.random((160, 192)) < 0.5
    r = M.cluster_rows(M.pack_rows(noise), 192, n=64, k_values=(4,), seeds=2)
    assert float(r.separation_ratio.max()) < 0.5  # ≈ sqrt(2k/n) = 0.35 plus k-means' own fit
    np.testing.assert_allclose(r.hamming_ratio.values, 1.0, atol=0.1)
    assert M.verdict(2.5) == "excellent" and M.verdict(0.3) == "poor" and M.verdict(0.7) == "moderate"
    table = M.comparative_table(r.expand_dims(method=["m"], component=["c"], layer=[0]))
    assert list(table["verdict"]) == ["poor"]


def test_load_mask_formats(tmp_path):
    from safetensors.numpy import save_file

    m = np.random.default_rng(3).random((4, 5)) < 0.5
    np.save(tmp_path / "m.npy", m)
    save_file({"mask": m.astype(np.uint8)}, str(tmp_path / "m.safetensors"))
    torch.save({"mask": torch.from_numpy(m)}, tmp_path / "m.pt")
    for name in ("m.npy", "m.safetensors", "m.pt"):
        np.testing.assert_array_equal(M.load_mask(tmp_path / name), m)
    torch.save({"mask": object()}, tmp_path / "evil.pt")
    with pytest.raises(Exception):
        M.load_mask(tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="2-D"):
        np.save(tmp_path / "v.npy", m[0])
        M.load_mask(tmp_path / "v.npy")


@pytest.fixture(scope="module")
def mixtral():
    """One tiny random Mixtral for the calibration tests of this module."""
    import transformers

    from capture.families import tiny_model

    transformers.logging.set_verbosity_error()
    return tiny_model("mixtral", seed=1)


def test_calibration_norms(mixtral):
    """q_proj norms equal the layer-normed hidden states; experts' per-expert norms² sum to top_k × all tokens'."""
    from capture.calibrate import input_norms

    model = mixtral
    ids = [np.arange(3, 20), np.arange(5, 30)]
    got = input_norms(model, ids, ["self_attn.q_proj", "experts.gate_proj"], layers=[1])
    sq_attn, sq_moe = 0.0, 0.0
    block = model.model.layers[1]
    seen = {}
    h = block.post_attention_layernorm.register_forward_hook(lambda m, a, o: seen.__setitem__("x", o))
    with torch.no_grad():
        for s in ids:
            out = model(input_ids=torch.as_tensor(s[None]), output_hidden_states=True, use_cache=False)
            sq_attn = sq_attn + (block.input_layernorm(out.hidden_states[1])[0].double() ** 2).sum(0)
            sq_moe = sq_moe + (seen["x"][0].double() ** 2).sum(0)
    h.remove()
    np.testing.assert_allclose(got[("self_attn.q_proj", 1)], np.sqrt(sq_attn.numpy()), rtol=1e-5)
    np.testing.assert_allclose((got[("experts.gate_proj", 1)] ** 2).sum(0), 2 * sq_moe.numpy(), rtol=1e-5)
    with pytest.raises(ValueError, match="no module matches"):
        input_norms(model, ids, ["self_attn.nope"])
    from capture.calibrate import input_grams

    grams = input_grams(model, ids, ["self_attn.q_proj", "experts.down_proj"], layers=[1])
    g = grams[("self_attn.q_proj", 1)]
    np.testing.assert_allclose(np.diag(g), got[("self_attn.q_proj", 1)] ** 2, rtol=1e-6)
    np.testing.assert_allclose(g, g.T)
    assert np.linalg.eigvalsh(g).min() > -1e-6 * np.abs(g).max()  # XᵀX is positive semi-definite
    down = grams[("experts.down_proj", 1)]
    assert down.shape == (8, model.config.intermediate_size, model.config.intermediate_size)
    np.testing.assert_allclose(np.sqrt(np.diagonal(down, axis1=1, axis2=2)),
                               input_norms(model, ids, ["experts.down_proj"], layers=[1])[("experts.down_proj", 1)],
                               rtol=1e-6)


def _sparsegpt_direct(W, H, sparsity, blocksize, percdamp=0.01):
    """SparseGPT written with the OBS formulas and explicit inverses of the remaining columns' Hessian.

    For column j, F = j … cols − 1 and G = (H_FF)⁻¹: saliency w_j² / G_00 (chosen per block on the weights at
    the block's start), and for a pruned w_j the update δ_F = −(w_j / G_00) · G_0,: (the paper's eq. 3/4).
    """
    W, H = W.astype(np.float64).copy(), H.astype(np.float64).copy()
    cols = W.shape[1]
    H += percdamp * np.mean(np.diag(H)) * np.eye(cols)
    pruned = np.zeros(W.shape, dtype=bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        g00 = np.array([np.linalg.inv(H[j:, j:])[0, 0] for j in range(i1, i2)])
        score = W[:, i1:i2] ** 2 / g00
        n = int(score.size * sparsity)
        flat = np.zeros(score.size, dtype=bool)
        flat[np.argsort(score.ravel(), kind="stable")[:n]] = True
        pruned[:, i1:i2] = flat.reshape(score.shape)
        for j in range(i1, i2):
            G = np.linalg.inv(H[j:, j:])
            for r in np.flatnonzero(pruned[:, j]):
                W[r, j:] -= W[r, j] / G[0, 0] * G[0]
    return ~pruned, W


@pytest.mark.parametrize("blocksize", [4, 128])
def test_sparsegpt_equals_direct_obs_formula(blocksize):
    rng = np.random.default_rng(7)
    W = rng.standard_normal((6, 10))
    X = rng.standard_normal((40, 10)) @ rng.standard_normal((10, 10))  # correlated inputs: updates matter
    H = X.T @ X
    keep, Wq = M.sparsegpt_prune(W, H, 0.5, blocksize=blocksize)
    keep_ref, W_ref = _sparsegpt_direct(W, H, 0.5, blocksize)
    np.testing.assert_array_equal(keep, keep_ref)
    np.testing.assert_allclose(Wq, W_ref, atol=1e-10)
    assert (~keep).sum() == 30 if blocksize == 128 else (~keep).sum() == 3 * 2 * 4 + int(0.5 * 12)
    np.testing.assert_array_equal(Wq[~keep], 0.0)
    # the updates reconstruct the layer's output better than the same mask without them
    assert np.linalg.norm(X @ (W - Wq).T) < np.linalg.norm(X @ (W - W * keep).T)
    # uncorrelated, equally scaled inputs (H = c·I): no update reaches another column; per block, magnitude pruning
    keep_i, Wq_i = M.sparsegpt_prune(W, 3.0 * np.eye(10), 0.5, blocksize=blocksize)
    np.testing.assert_allclose(Wq_i, W * keep_i)
    if blocksize == 128:
        np.testing.assert_array_equal(keep_i, M.magnitude_mask(W, 0.5))
    with pytest.raises(ValueError, match="Hessian"):
        M.sparsegpt_prune(W, np.eye(9), 0.5)


def test_stage_numerics_on_a_tiny_checkpoint_and_user_masks(mixtral, tmp_path):
    """What the Masks stage computes: every method per component (experts pruned expert by expert), bit-packed
    storage that round-trips, and user masks (.npy, .safetensors, .pt) clustered alongside; a planted user mask
    is found (excellent), the table and JSON summary carry every matrix."""
    import json

    from safetensors.numpy import save_file

    from capture.calibrate import input_grams

    model = mixtral
    model.save_pretrained(tmp_path / "ck")
    ids = [np.arange(3, 40), np.arange(7, 30)]
    comps = ["self_attn.q_proj", "experts.down_proj"]
    weights = {(c, 1): M.component_matrix(tmp_path / "ck", c, 1) for c in comps}
    grams = input_grams(model, ids, comps, layers=[1])
    norms = {k: np.sqrt(np.diagonal(g, axis1=-2, axis2=-1)) for k, g in grams.items()}
    mats = M.compute_masks(weights, M.METHODS, 0.5, norms=norms, grams=grams)
    w, row_expert = weights[("experts.down_proj", 1)]
    for e in range(8):  # each expert is its own matrix, calibrated on its own tokens
        rows = row_expert == e
        np.testing.assert_array_equal(mats[("magnitude", "experts.down_proj", 1)][0][rows],
                                      M.magnitude_mask(w[rows], 0.5))
        np.testing.assert_array_equal(mats[("wanda", "experts.down_proj", 1)][0][rows],
                                      M.wanda_mask(w[rows], norms[("experts.down_proj", 1)][e], 0.5))
        np.testing.assert_array_equal(mats[("sparsegpt", "experts.down_proj", 1)][0][rows],
                                      M.sparsegpt_mask(w[rows], grams[("experts.down_proj", 1)][e], 0.5))
    for (method, c, layer), (keep, _) in mats.items():
        assert keep.mean() == pytest.approx(0.5, abs=1 / keep.shape[1])
    rng = np.random.default_rng(0)
    planted = np.repeat(rng.random((4, 96)) < 0.5, 24, axis=0) ^ (rng.random((96, 96)) < 0.03)
    np.save(tmp_path / "u.npy", planted)
    save_file({"a": planted.astype(np.uint8), "b": planted[:3].astype(np.uint8)}, str(tmp_path / "u.safetensors"))
    torch.save(torch.from_numpy(planted), tmp_path / "u.pt")
    for i, (name, key) in enumerate((("u.npy", None), ("u.safetensors", "a"), ("u.pt", None))):
        mats[("user", f"user{i}", 0)] = (M.load_mask(tmp_path / name, key), None)
    ds = M.masks_dataset(mats, {"sparsity": 0.5})
    for (method, c, layer), (keep, _) in mats.items():
        v = ds[M.mask_variable(method, c, layer)]
        np.testing.assert_array_equal(M.unpack_rows(v.values, v.attrs["cols"]), keep)
    keys = list(mats)
    res = M.combine_clusters(keys, [M.cluster_rows(M.pack_rows(mats[k][0]), mats[k][0].shape[1], n=32, k_values=(4,),
                                                   seeds=2) for k in keys], {"n": 32})
    table = M.comparative_table(res)
    assert len(table) == len(keys)
    assert set(table[table.method == "user"].verdict) == {"excellent"}
    summary = json.loads(json.dumps(M.json_summary(res)))
    assert len(summary["matrices"]) == len(keys)
    assert summary["matrices"][0]["aggregated"]["k_4"]["verdict"] in ("excellent", "good", "moderate", "poor")
