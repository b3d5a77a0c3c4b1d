"""Capture against independent references on tiny random MoE models.

Every model is built from a transformers config class, saved with
``save_pretrained`` and reloaded through ``capture.load``. References are
computed here without the capture code: forward pre-hooks on the experts
modules (what the experts received), ``output_router_logits=True`` and a
brute-force cross-entropy.
"""

from __future__ import annotations

import os
import re
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    DbrxConfig,
    DeepseekV3Config,
    Gemma4TextConfig,
    GptOssConfig,
    Llama4TextConfig,
    LlamaConfig,
    MixtralConfig,
    OlmoeConfig,
    Qwen3MoeConfig,
)

from capture.hooks import record_routing
from capture.load import describe_checkpoint, load_model
from capture.routers import RouterSite, decode_router_output, find_routers
from capture.run import capture_checkpoint, capture_model
from capture_helpers import ListSink, seeded_tokens
from storage.schema import token_table

transformers.logging.set_verbosity_error()

VOCAB = 100
LENGTHS = [5, 9, 1, 12, 3, 7]


def _configs():
    common = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                  max_position_embeddings=64)
    return {
        "mixtral": MixtralConfig(intermediate_size=64, num_hidden_layers=2, num_local_experts=8,
                                 num_experts_per_tok=2, **common),
        "olmoe": OlmoeConfig(intermediate_size=64, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2,
                             **common),
        # layers 1, 3, 5 are sparse by decoder_sparse_step; 3 is forced dense -> MoE layers [1, 5]
        "qwen3_moe": Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=6, head_dim=8,
                                    num_experts=8, num_experts_per_tok=2, decoder_sparse_step=2, mlp_only_layers=[3],
                                    norm_topk_prob=True, **common),
        "deepseek_v3": DeepseekV3Config(
            hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
            first_k_dense_replace=1, vocab_size=VOCAB, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
            qk_nope_head_dim=8, v_head_dim=8, n_shared_experts=1, max_position_embeddings=64),
        "dbrx": DbrxConfig(d_model=32, n_heads=4, n_layers=2, vocab_size=VOCAB, max_seq_len=64,
                           attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
                           ffn_config=dict(ffn_hidden_size=64, moe_num_experts=8, moe_top_k=2)),
        "gpt_oss": GptOssConfig(intermediate_size=32, num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2,
                                head_dim=8, layer_types=["full_attention"] * 2, **common),
        # router returns probabilities, weights x per_expert_scale
        "gemma4": Gemma4TextConfig(intermediate_size=64, num_hidden_layers=2, head_dim=8, enable_moe_block=True,
                                   num_experts=4, top_k_experts=2, moe_intermediate_size=16,
                                   hidden_size_per_layer_input=0, layer_types=["full_attention"] * 2, **common),
        # router returns dense sigmoid scores (n, E) and the logits
        "llama4": Llama4TextConfig(intermediate_size=64, intermediate_size_mlp=64, num_hidden_layers=2, head_dim=8,
                                   num_local_experts=4, num_experts_per_tok=1, **common),
        "llama": LlamaConfig(intermediate_size=64, num_hidden_layers=2, **common),
    }


def _build(config, path, seed=0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                # A large selection bias: selected experts then differ from the top-k of the logits.
                buf.copy_(torch.randn_like(buf) * 2.0)
        # Random init gives near-uniform routers; sharpen them so slots have distinct weights.
        for name, p in model.named_parameters():
            if re.search(r"(gate|router)(\.layer|\.proj)?\.weight$", name):
                p.mul_(20.0)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return {name: _build(cfg, root / name) for name, cfg in _configs().items()}


def _tokens(lengths=LENGTHS, seed=0):
    return seeded_tokens(lengths, seed, low=0, high=VOCAB)


def _capture(path, tokens=None, **kw):
    sink = ListSink()
    info = capture_checkpoint(path, _tokens() if tokens is None else tokens, sink, progress=False, **kw)
    return info, sink.result()


def _samples(tokens):
    ids = tokens["token_id"].values
    sample = tokens["sample"].values
    return [ids[sample == s] for s in np.unique(sample)]


def _reference_expert_inputs(path, tokens):
    """Per layer: (ids, weights) the experts modules received, one sample at a time."""
    model = AutoModelForCausalLM.from_pretrained(path)
    model.eval()
    seen, handles = {}, []
    for name, mod in model.named_modules():
        if name.endswith(".experts"):
            layer = int(re.search(r"\.(\d+)\.", name).group(1))

            def hook(module, args, layer=layer):
                assert len(args) >= 3, "expected experts(hidden_states, index, weights)"
                seen.setdefault(layer, []).append((args[1].clone(), args[2].float().clone()))

            handles.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for ids in _samples(tokens):
                model(torch.as_tensor(ids[None], dtype=torch.long))
    finally:
        for h in handles:
            h.remove()
    out = {}
    for layer, calls in seen.items():
        ids = torch.cat([c[0] for c in calls]).reshape(-1, calls[0][0].shape[-1])
        w = torch.cat([c[1] for c in calls]).reshape(ids.shape)
        w, order = torch.sort(w, dim=-1, descending=True, stable=True)
        out[layer] = (torch.gather(ids, -1, order).numpy(), w.numpy())
    return out


@pytest.mark.parametrize("family", ["mixtral", "olmoe", "qwen3_moe", "deepseek_v3", "dbrx", "gpt_oss", "gemma4"])
def test_ids_and_weights_equal_what_the_experts_received(ckpts, family):
    tokens = _tokens()
    info, got = _capture(ckpts[family], tokens, batch_size=4)
    ref = _reference_expert_inputs(ckpts[family], tokens)
    assert sorted(ref) == info.moe_layers
    n = tokens.sizes["token"]
    assert got["expert_ids"].shape == (len(info.moe_layers), n, info.top_k)
    assert got["expert_ids"].dtype == np.int16 and got["expert_weights"].dtype == np.float32
    for i, layer in enumerate(info.moe_layers):
        np.testing.assert_array_equal(got["expert_ids"][i], ref[layer][0])
        np.testing.assert_allclose(got["expert_weights"][i], ref[layer][1], rtol=1e-5, atol=1e-6)
    # slots sorted, top-1 first
    assert (np.diff(got["expert_weights"], axis=-1) <= 0).all()


def test_llama4_dense_sigmoid_scores(ckpts):
    # Llama-4 scales the experts' input by sigmoid(logit) of the top-k logits; no
    # experts module sees (ids, weights), so the reference recomputes the router's
    # (unbiased, ungrouped) rule from the router's own input.
    tokens = _tokens()
    info, got = _capture(ckpts["llama4"], tokens, keep_logits=True, batch_size=4)
    assert info.moe_layers == [0, 1] and info.top_k == 1 and info.shared_experts == 1
    model = AutoModelForCausalLM.from_pretrained(ckpts["llama4"]).eval()
    seen, handles = {}, []
    for name, mod in model.named_modules():
        if name.endswith("feed_forward.router"):
            layer = int(re.search(r"\.(\d+)\.", name).group(1))
            handles.append(mod.register_forward_pre_hook(
                lambda m, a, layer=layer: seen.setdefault(layer, []).append(torch.nn.functional.linear(a[0], m.weight))))
    with torch.no_grad():
        for s in _samples(tokens):
            model(torch.as_tensor(s[None], dtype=torch.long))
    for h in handles:
        h.remove()
    for i, layer in enumerate(info.moe_layers):
        logits = torch.cat([x.reshape(-1, 4) for x in seen[layer]])
        top, idx = torch.topk(logits, 1, dim=-1)
        np.testing.assert_array_equal(got["expert_ids"][i], idx.numpy())
        np.testing.assert_allclose(got["expert_weights"][i], torch.sigmoid(top).numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got["router_logits"][i].astype(np.float32), logits.numpy(), rtol=2e-3, atol=2e-3)


def test_deepseek_selection_is_read_not_recomputed(ckpts):
    # With a large e_score_correction_bias and group limits, the top-k of the
    # logits is not what the model picks; the capture must follow the model.
    info, got = _capture(ckpts["deepseek_v3"], keep_logits=True)
    naive = np.sort(np.argsort(-got["router_logits"].astype(np.float32), axis=-1)[..., : info.top_k], axis=-1)
    assert (np.sort(got["expert_ids"], axis=-1) != naive).any(axis=-1).mean() > 0.2
    assert "e_score_correction_bias" in info.router_semantics and "sigmoid" in info.router_semantics
    assert info.shared_experts == 1 and info.moe_layers == [1, 2]


@pytest.mark.parametrize("family", ["mixtral", "olmoe"])
def test_logits_equal_output_router_logits(ckpts, family):
    tokens = _tokens()
    info, got = _capture(ckpts[family], tokens, keep_logits=True, batch_size=len(LENGTHS))
    model = AutoModelForCausalLM.from_pretrained(ckpts[family]).eval()
    samples = _samples(tokens)
    S = max(map(len, samples))
    ids = torch.zeros(len(samples), S, dtype=torch.long)
    mask = torch.zeros(len(samples), S, dtype=torch.long)
    for b, s in enumerate(samples):
        ids[b, : len(s)] = torch.as_tensor(s)
        mask[b, : len(s)] = 1
    with torch.no_grad():
        rl = model(input_ids=ids, attention_mask=mask, output_router_logits=True).router_logits
    assert len(rl) == len(info.moe_layers)
    keep = mask.reshape(-1).bool()
    assert got["router_logits"].dtype == np.float16
    for i in range(len(rl)):
        np.testing.assert_allclose(got["router_logits"][i].astype(np.float32), rl[i][keep].float().numpy(),
                                   rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_nll_equals_bruteforce_cross_entropy(ckpts, family):
    tokens = _tokens()
    _, got = _capture(ckpts[family], tokens, batch_size=4)
    model = AutoModelForCausalLM.from_pretrained(ckpts[family]).eval()
    ref = []
    with torch.no_grad():
        for s in _samples(tokens):
            logits = model(torch.as_tensor(s[None], dtype=torch.long)).logits[0].double()
            for p in range(len(s)):
                if p + 1 < len(s):
                    ref.append(float(torch.nn.functional.cross_entropy(logits[p], torch.tensor(int(s[p + 1])))))
                else:
                    ref.append(np.nan)
    ref = np.asarray(ref)
    assert got["nll"].dtype == np.float32 and got["nll"].shape == ref.shape
    np.testing.assert_array_equal(np.isnan(got["nll"]), np.isnan(ref))
    np.testing.assert_allclose(got["nll"], ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_ragged_batch_equals_one_sample_at_a_time(ckpts, family):
    tokens = _tokens()
    _, alone = _capture(ckpts[family], tokens, keep_logits=True, batch_size=1)
    sink = ListSink()
    capture_checkpoint(ckpts[family], tokens, sink, keep_logits=True, batch_size=4, progress=False)
    # the sink sees consecutive whole samples: 4 + 2 samples
    assert [p["nll"].shape[0] for p in sink.parts] == [sum(LENGTHS[:4]), sum(LENGTHS[4:])]
    batched = sink.result()
    np.testing.assert_array_equal(batched["expert_ids"], alone["expert_ids"])
    for k in ("expert_weights", "router_logits", "nll"):
        np.testing.assert_allclose(batched[k].astype(np.float32), alone[k].astype(np.float32), rtol=1e-4, atol=1e-4)


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_removed_after_success_and_exception(ckpts):
    model = load_model(ckpts["dbrx"])  # dbrx: router hooks + experts pre-hooks
    with torch.inference_mode():
        model(torch.zeros(1, 3, dtype=torch.long))  # transformers installs its own recorders on first call
    before = _hook_count(model)
    with record_routing(model) as rec:
        assert _hook_count(model) == before + 2 * len(rec.sites) > before
        with torch.inference_mode():
            model(torch.zeros(1, 3, dtype=torch.long))
        assert set(rec.pop()) == {0, 1}
    assert _hook_count(model) == before

    with pytest.raises(RuntimeError, match="boom"):
        with record_routing(model):
            assert _hook_count(model) > before
            raise RuntimeError("boom")
    assert _hook_count(model) == before

    class FailingSink:
        def append(self, **arrays):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        capture_model(model, _tokens(), FailingSink(), progress=False)
    assert _hook_count(model) == before


def test_dense_model_is_refused(ckpts):
    path = ckpts["llama"]
    with pytest.raises(ValueError, match="no MoE router") as e:
        describe_checkpoint(path)
    assert str(path) in str(e.value)
    with pytest.raises(ValueError, match="no MoE router"):
        capture_checkpoint(path, _tokens(), ListSink(), progress=False)


def test_describe_checkpoint(ckpts, tmp_path):
    m = describe_checkpoint(ckpts["mixtral"])
    assert (m.family, m.moe_layers, m.num_experts, m.top_k, m.shared_experts) == ("mixtral", [0, 1], 8, 2, 0)
    assert m.vocab_size == VOCAB and m.dtype == "float32"
    assert "softmax" in m.router_semantics and "renormalised" in m.router_semantics
    o = describe_checkpoint(ckpts["olmoe"])
    assert (o.family, o.moe_layers, o.num_experts, o.top_k) == ("olmoe", [0, 1], 8, 2)
    assert "not renormalised" in o.router_semantics  # OLMoE default norm_topk_prob=False
    q = describe_checkpoint(ckpts["qwen3_moe"])
    assert (q.family, q.moe_layers, q.num_experts, q.top_k) == ("qwen3_moe", [1, 5], 8, 2)
    assert "norm_topk_prob=True" in q.router_semantics
    # config only: no weights needed
    only_cfg = tmp_path / "cfg_only"
    only_cfg.mkdir()
    shutil.copy(ckpts["qwen3_moe"] / "config.json", only_cfg)
    assert describe_checkpoint(only_cfg) == q


def test_capture_layer_axis_follows_real_layer_indices(ckpts):
    info, got = _capture(ckpts["qwen3_moe"], keep_logits=True)
    assert info.moe_layers == [1, 5]
    assert got["expert_ids"].shape[0] == 2 and got["router_logits"].shape[0] == 2
    assert got["router_logits"].shape[2] == 8
    assert set(_capture(ckpts["qwen3_moe"], keep_nll=False)[1]) == {"expert_ids", "expert_weights"}


def test_load_errors_name_the_dir_or_file(ckpts, tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_model(missing)
    no_cfg = tmp_path / "no_cfg"
    no_cfg.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        describe_checkpoint(no_cfg)

    trunc = tmp_path / "trunc"
    shutil.copytree(ckpts["mixtral"], trunc)
    f = trunc / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors.*truncated"):
        load_model(trunc)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(ckpts["mixtral"] / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="pickle"):
        load_model(pickled)

    # weights of another architecture: loading would silently randomise the router
    wrong = tmp_path / "wrong"
    shutil.copytree(ckpts["mixtral"], wrong)
    shutil.copy(ckpts["olmoe"] / "model.safetensors", wrong / "model.safetensors")
    with pytest.raises(ValueError, match="lack"):
        load_model(wrong)


def test_token_table_errors(ckpts):
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        capture_checkpoint(ckpts["mixtral"], _tokens([3, 65]), ListSink(), progress=False)
    bad = _tokens([3, 4])
    bad = bad.assign_coords(token_id=("token", np.where(np.arange(7) == 5, VOCAB, bad["token_id"].values)))
    with pytest.raises(ValueError, match="token 5 has token_id 100"):
        capture_checkpoint(ckpts["mixtral"], bad, ListSink(), progress=False)
    split = token_table(sample=np.array([0, 0, 1, 0]), position=np.array([0, 1, 0, 0]), token_id=np.zeros(4))
    with pytest.raises(ValueError, match="not contiguous"):
        capture_checkpoint(ckpts["mixtral"], split, ListSink(), progress=False)


def test_unknown_router_return_is_a_clear_error(ckpts):
    model = load_model(ckpts["mixtral"])
    site = find_routers(model)[0]
    with pytest.raises(ValueError, match=r"MixtralTopKRouter.*expected a tuple"):
        decode_router_output(site, torch.zeros(4, 8))
    fake = RouterSite("x", site.module, 0, "triple", 0, 8, 2)
    with pytest.raises(ValueError, match="shapes disagree"):
        decode_router_output(fake, (torch.zeros(4, 8), torch.zeros(4, 8), torch.zeros(4, 2, dtype=torch.long)))
