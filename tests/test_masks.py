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


def test_calibration_norms(tmp_path):
    """q_proj norms equal the layer-normed hidden states; experts' per-expert norms² sum to top_k × all tokens'."""
    import transformers

    from capture.calibrate import input_norms
    from capture.families import tiny_model

    transformers.logging.set_verbosity_error()
    model = tiny_model("mixtral", seed=1)
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
