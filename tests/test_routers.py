"""Family-specific routing: hash routing, identity experts, capacity drops, semantics self-test.

Tiny random models from ``capture.families``; every reference is computed
without the capture code (the hash table, the capacity rule replayed in
position order, the experts modules that actually ran).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import transformers
import xarray as xr

from capture import routers
from capture.capacity import drop_accounting
from capture.families import tiny_config, tiny_model
from capture.load import describe_model
from capture.routers import find_routers
from capture.run import capture_model

from capture_helpers import ListSink, seeded_tokens  # noqa: E402

transformers.logging.set_verbosity_error()

LENGTHS = [5, 8, 3, 8]


def _tokens(lengths=LENGTHS, seed=0):
    return seeded_tokens(lengths, seed)



def _capture(model, tokens=None, **kw):
    sink = ListSink()
    info = capture_model(model, _tokens() if tokens is None else tokens, sink, progress=False, **kw)
    return info, sink.result()


# --------------------------------------------------------------------------- DeepSeek-V4 hash routing

def _deepseek_v4(mlp_layer_types=None):
    from capture import families

    over = dict(families.OVERRIDES.get("deepseek_v4", {}))
    if mlp_layer_types is not None:
        over["mlp_layer_types"] = mlp_layer_types
    config = families._tiny(families._config_class("deepseek_v4"), over)
    torch.manual_seed(0)
    model = families._model_class("deepseek_v4", config)(config).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("tid2eid"):
                # a random table without repeats within a row (the real tables have none)
                buf.copy_(torch.stack([torch.randperm(8, generator=g)[: buf.shape[1]] for _ in range(buf.shape[0])]))
    return model


def test_deepseek_v4_hash_layers_are_captured_from_the_hash_table():
    model = _deepseek_v4()  # default schedule: the first 3 layers hash-routed, so both tiny layers are
    sites = find_routers(model)
    assert [s.class_name for s in sites] == ["DeepseekV4HashRouter"] * 2 and [s.layer for s in sites] == [0, 1]
    tokens = _tokens()
    info, got = _capture(model, tokens, batch_size=3)
    table = {layer: model.model.layers[layer].mlp.gate.tid2eid.numpy() for layer in (0, 1)}
    tid = tokens["token_id"].values
    for i, layer in enumerate(info.moe_layers):
        # the ids are the table's row for the token, whatever the slot order
        np.testing.assert_array_equal(np.sort(got["expert_ids"][i], axis=-1), np.sort(table[layer][tid], axis=-1))


def test_deepseek_v4_mixed_schedule_captures_both_router_kinds():
    model = _deepseek_v4(["hash_moe", "moe"])
    assert [s.class_name for s in find_routers(model)] == ["DeepseekV4HashRouter", "DeepseekV4TopKRouter"]


def test_moe_block_without_a_readable_router_is_refused(monkeypatch):
    monkeypatch.setattr(routers, "UNDECLARED_ROUTERS", {})
    # every layer hash-routed: nothing declared, so nothing at all would be captured
    with pytest.raises(ValueError, match=r"ds-v4: MoE blocks hold experts but none has a router.*model\.layers\.0\.mlp"):
        find_routers(_deepseek_v4(), where="ds-v4")
    # one hash layer among routed ones: the capture would miss layer 0 -> the tripwire stops it
    model = _deepseek_v4(["hash_moe", "moe"])
    assert [s.layer for s in find_routers(model)] == [1]
    sink = ListSink()
    with pytest.raises(RuntimeError, match=r"MoE block 'model\.layers\.0\.mlp' \(DeepseekV4SparseMoeBlock\) ran"):
        capture_model(model, _tokens(), sink, keep_nll=False, progress=False)
    assert not sink.parts


# --------------------------------------------------------------------------- LongcatFlash identity experts

def test_longcat_zero_computation_experts_are_recorded_as_such():
    model = tiny_model("longcat_flash")
    info, got = _capture(model, keep_logits=True, keep_nll=False)
    cfg = model.config
    E, Z = cfg.n_routed_experts, cfg.zero_expert_num
    assert (info.num_experts, info.zero_experts) == (E + Z, Z)
    assert got["router_logits"].shape[-1] == E + Z  # the router scores identity experts too
    ids = got["expert_ids"]
    assert (ids >= E).any() and (ids < E).any() and ids.max() < E + Z
    assert info.attrs()["zero_experts"] == Z
    assert f"experts {E}..{E + Z - 1} are {Z} zero-computation" in info.router_semantics


# --------------------------------------------------------------------------- semantics and the self-test

def test_qwen3_vl_moe_and_qwen3_5_moe_renormalise_without_norm_topk_prob():
    for family in ("qwen3_vl_moe", "qwen3_5_moe"):
        model = tiny_model(family)
        assert not hasattr(model.config.text_config, "norm_topk_prob")
        info, got = _capture(model, keep_nll=False)
        assert info.renormalised_claim is True and "renormalised to sum 1 (always" in info.router_semantics
        sums = got["expert_weights"].sum(-1)
        np.testing.assert_allclose(sums, 1.0, atol=1e-6)
        attrs = info.attrs()
        assert attrs["renormalised_observed"] == 1
        assert abs(attrs["weight_sum_min"] - 1) < 1e-6 and abs(attrs["weight_sum_max"] - 1) < 1e-6


def test_self_test_flags_a_contradicted_claim():
    model = tiny_model("olmoe")  # norm_topk_prob=False: top-2 of a full softmax, sums < 1 and varying
    info, got = _capture(model, keep_nll=False)
    assert info.renormalised_claim is False and info.attrs()["renormalised_observed"] == 0
    assert got["expert_weights"].sum(-1).max() < 1
    # Make the routers renormalise behind the config's back: the self-test must catch it.
    for m in model.modules():
        if type(m).__name__ == "OlmoeTopKRouter":
            m.norm_topk_prob = True
    with pytest.warns(UserWarning, match="claim not renormalised weights but the capture observed"):
        info, _ = _capture(model, keep_nll=False, where="olmoe-patched")
    assert "SELF-TEST CONTRADICTS THIS" in info.router_semantics and info.attrs()["renormalised_observed"] == 1


@pytest.mark.parametrize("family", ["beam", "laguna", "step3p7"])
def test_scaling_after_the_experts_is_told_apart_from_scaling_in_the_weights(family):
    info = describe_model(tiny_model(family))
    assert info.post_expert_scale in (2.0, 2.5)
    assert info.attrs()["post_expert_scale"] == info.post_expert_scale
    assert "AFTER the experts" in info.router_semantics


def test_deepseek_v3_scaling_is_inside_the_weights():
    model = tiny_model("deepseek_v3")
    info, got = _capture(model, keep_nll=False)
    factor = model.config.routed_scaling_factor
    assert info.post_expert_scale is None and "post_expert_scale" not in info.attrs()
    # norm_topk_prob=True: each token's weights sum to the factor, which the attrs show
    np.testing.assert_allclose(got["expert_weights"].sum(-1), factor, rtol=1e-5)
    assert abs(info.attrs()["weight_sum_max"] - factor) < 1e-4 and info.attrs()["renormalised_observed"] == 1


# --------------------------------------------------------------------------- capacity (Switch Transformers)

def test_switch_capacity_drops_follow_the_position_order_rule():
    model = tiny_model("switch_transformers")
    capacity = model.config.expert_capacity
    # 20 tokens over 8 experts of capacity 2: at least 4 drops in that sample, whatever the router does
    tokens = _tokens([5, 8, 3, 20])
    info, got = _capture(model, tokens, keep_logits=True, batch_size=3)
    assert info.moe_layers == [0, 1] and info.top_k == 1 and info.capacity["expert_capacity"] == capacity
    assert info.capacity["stack"] == "encoder" and "not captured" in info.capacity["decoder"]
    dropped = got["capacity_dropped"][..., 0]
    assert dropped.any(), "no drop in the tiny model: the check would be vacuous"
    # Replay the rule from the captured choices: within a sample, the (capacity+1)-th and later tokens
    # choosing an expert are dropped.
    sample = tokens["sample"].values
    for i in range(len(info.moe_layers)):
        chosen = got["expert_ids"][i, :, 0]
        expect = np.zeros_like(dropped[i])
        for s in np.unique(sample):
            idx = np.flatnonzero(sample == s)
            for e in np.unique(chosen[idx]):
                hit = idx[chosen[idx] == e]
                expect[hit[capacity:]] = 1
        np.testing.assert_array_equal(dropped[i], expect)
        # the choice is the router's argmax; a dropped token's expert received weight 0
        np.testing.assert_array_equal(chosen, got["router_logits"][i].astype(np.float32).argmax(-1))
        assert (got["expert_weights"][i, :, 0][dropped[i] == 1] == 0).all()
        assert (got["expert_weights"][i, :, 0][dropped[i] == 0] > 0).all()

    # accounting by position and layer
    cube = xr.Dataset(
        {"capacity_dropped": (("checkpoint", "layer", "token", "k"), got["capacity_dropped"][None]),
         "expert_ids": (("checkpoint", "layer", "token", "k"), got["expert_ids"][None])},
        coords={"checkpoint": ["c0"], "layer": info.moe_layers, "expert": np.arange(info.num_experts),
                "position": ("token", tokens["position"].values)})
    acc = drop_accounting(cube)
    pos = tokens["position"].values
    for i in range(2):
        np.testing.assert_array_equal(acc.dropped_by_position.values[0, i],
                                      np.bincount(pos, weights=dropped[i], minlength=pos.max() + 1))
        assert acc.dropped_by_expert.values[0, i].sum() == dropped[i].sum()
        assert acc.drop_rate.values[0, i] == pytest.approx(dropped[i].mean())
    # no token can be dropped before `capacity` earlier tokens of its sample took the expert
    assert acc.dropped_by_position.values[0, :, :capacity].sum() == 0


def test_drop_accounting_refuses_a_cube_without_drops():
    with pytest.raises(ValueError, match="no 'capacity_dropped'"):
        drop_accounting(xr.Dataset({"expert_ids": (("token",), np.zeros(3))}))


def test_nllb_moe_refusal_reason_holds():
    # The refusal says only experts 0 and 1 ever run; check it on the model itself.
    model = tiny_model("nllb_moe")
    ran = set()
    handles = [m.register_forward_pre_hook(lambda mod, a, name=name: ran.add(name.rsplit(".", 1)[-1]))
               for name, m in model.named_modules() if name.rsplit(".", 1)[-1].startswith("expert_")]
    ids = torch.as_tensor(_tokens([8])["token_id"].values[None], dtype=torch.long)
    with torch.no_grad():
        model(input_ids=ids, decoder_input_ids=ids)
    for h in handles:
        h.remove()
    assert ran and ran <= {"expert_0", "expert_1"}
    with pytest.raises(ValueError, match="NllbMoeTop2Router.*not supported"):
        describe_model(model, where="nllb")


def test_tiny_configs_are_small():
    cfg = tiny_config("mixtral")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_local_experts, cfg.vocab_size) == (32, 2, 8, 100)
