"""storage/weights.py: streamed expert tensors equal the model's own parameters; memory stays bounded."""

from __future__ import annotations

import os
import tracemalloc

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_np
from safetensors.torch import save_file

from storage.weights import iter_expert_tensors, iter_linear_weights, read_tensor, tensor_names

FAMILIES = ["mixtral", "olmoe", "qwen3_moe"]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    import transformers

    from capture.families import tiny_model

    transformers.logging.set_verbosity_error()
    out = {}
    for fam in FAMILIES:
        model = tiny_model(fam, seed=3)
        d = tmp_path_factory.mktemp(fam)
        model.save_pretrained(d, safe_serialization=True)
        out[fam] = (d, model)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_expert_tensors_equal_model_parameters(tiny_dirs, family):
    d, model = tiny_dirs[family]
    seen = {(t.layer, t.expert, t.kind): t.array for t in iter_expert_tensors(d)}
    for layer, block in enumerate(model.model.layers):
        moe = block.mlp
        np.testing.assert_array_equal(seen[(layer, -1, "router")], moe.gate.weight.detach().numpy())
        gu, down = moe.experts.gate_up_proj.detach().numpy(), moe.experts.down_proj.detach().numpy()
        half = gu.shape[1] // 2
        for e in range(gu.shape[0]):
            np.testing.assert_array_equal(seen[(layer, e, "gate")], gu[e, :half])
            np.testing.assert_array_equal(seen[(layer, e, "up")], gu[e, half:])
            np.testing.assert_array_equal(seen[(layer, e, "down")], down[e])
    assert len(seen) == len(model.model.layers) * (1 + 3 * gu.shape[0])


def test_fused_layout_reads_like_split(tiny_dirs, tmp_path):
    d, model = tiny_dirs["mixtral"]
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    fused = {(t.layer, t.expert, t.kind): t.array for t in iter_expert_tensors(tmp_path / "model.safetensors", "mixtral")}
    split = {(t.layer, t.expert, t.kind): t.array for t in iter_expert_tensors(d)}
    assert fused.keys() == split.keys()
    for k in split:
        np.testing.assert_array_equal(fused[k], split[k])


def test_linear_weights_and_bf16(tmp_path):
    w = torch.randn(4, 6).to(torch.bfloat16)
    save_file({"model.layers.2.self_attn.q_proj.weight": w, "model.layers.3.self_attn.q_proj.weight": w * 2},
              tmp_path / "m.safetensors")
    got = list(iter_linear_weights(tmp_path, "self_attn.q_proj", layers={3}))
    assert [(layer, name) for layer, name, _ in got] == [(3, "model.layers.3.self_attn.q_proj.weight")]
    np.testing.assert_array_equal(got[0][2], (w * 2).float().numpy())
    assert read_tensor(tmp_path, "model.layers.2.self_attn.q_proj.weight").dtype == np.float32
    assert tensor_names(tmp_path)["model.layers.2.self_attn.q_proj.weight"][1] == (4, 6)
    with pytest.raises(KeyError, match="no tensor"):
        read_tensor(tmp_path, "nope")


def test_streaming_never_holds_the_checkpoint(tmp_path):
    """A many-tensor checkpoint (3 shards, 48 MB) is embedded with a traced peak of a few tensors only."""
    from analyses.experts import expert_embeddings

    rng = np.random.default_rng(0)
    E, I, H = 32, 128, 128  # one expert tensor: 64 KiB
    total = 0
    for shard in range(3):
        tensors = {f"model.layers.{shard}.mlp.gate.weight": rng.standard_normal((E, H), dtype=np.float32)}
        for e in range(E):
            for proj, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
                tensors[f"model.layers.{shard}.mlp.experts.{e}.{proj}.weight"] = rng.standard_normal(shape, dtype=np.float32)
        total += sum(t.nbytes for t in tensors.values())
        save_np(tensors, str(tmp_path / f"model-0000{shard}.safetensors"))
        del tensors
    one = I * H * 4
    expert_embeddings(tmp_path, ffn_dim=32)  # warm caches (projection matrices) outside the trace
    tracemalloc.start()
    try:
        emb = expert_embeddings(tmp_path, ffn_dim=32)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert emb.sizes == {"layer": 3, "expert": E, "hidden": H, "ffn_dim": 32, "proj": 3}
    # one shard is total / 3: a peak under total / 20 holds far less than any shard (the exact
    # figure depends on allocator and library versions, 0.47-0.62 MB seen for 18.9 MB in all)
    assert total > 20 * peak, (total, peak)
    assert peak < 12 * one, (peak, one)
