"""Every MoE family of the installed transformers: an exact capture, or a refusal by name.

The families are enumerated from ``transformers.models`` (``capture.families``),
not listed here. For each, a tiny random model (2 layers, 8 experts, hidden 32)
is captured with ``capture_model`` in ragged batches, and the reference is taken
another way: forward pre-hooks on the ``experts`` modules record what the experts
actually receive while the model runs one sample at a time, unpadded. The
captured ids and weights must equal it. Families whose routing the capture
cannot describe must be refused up front with an error naming the router class
and the reason.
"""

from __future__ import annotations

import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import transformers

from capture.families import moe_families, tiny_model
from capture.load import language_model
from capture.run import capture_model

from capture_helpers import ListSink, seeded_tokens  # noqa: E402

transformers.logging.set_verbosity_error()

LENGTHS = [5, 8, 3]

# Refused by name: family -> what the error must say (router class and why).
REFUSED = {
    "doge": r"DogeCDMoE.*not supported.*product-key",
    "jetmoe": r"JetMoeTopKGating.*not supported.*sorted expert batches",
    "zaya": r"ZayaRouter.*not supported.*recurrent router state",
    "nllb_moe": r"NllbMoeTop2Router.*not supported.*only experts 0 and 1 ever run",
    "ernie4_5_vl_moe": r"Ernie4_5_VLMoeMoeBlock.*not supported.*whole multimodal MoE block",
}

FAMILIES = moe_families()


def _tokens(seed=0):
    return seeded_tokens(LENGTHS, seed)



def _first_index(name: str) -> int:
    return int(re.search(r"\.(\d+)\.", "." + name + ".").group(1))


def _run_samples(model, tokens):
    ids, sample = tokens["token_id"].values, tokens["sample"].values
    with torch.no_grad():
        for s in np.unique(sample):
            model(input_ids=torch.as_tensor(ids[sample == s][None], dtype=torch.long), use_cache=False)


def _reference(model, tokens):
    """{layer: (ids, weights)} the experts modules received, slots sorted by weight; one sample at a time.

    Switch Transformers' experts get a one-hot dispatch mask and the top-1
    probability: a token with an all-zero row was dropped by capacity and
    received nothing (weight 0). LongcatFlash's experts get the slots of its
    zero-computation experts rewritten to a real id with weight 0: those slots
    are returned as they arrive and checked separately.
    """
    runner = language_model(model)
    seen, handles = {}, []
    for name, mod in runner.named_modules():
        if not name.endswith(".experts"):
            continue

        def hook(module, args, kwargs, layer=_first_index(name)):
            vals = list(args[1:3])
            for key in ("top_k_index", "top_k_weights")[len(vals):]:
                vals.append(kwargs[key])
            idx, w = vals
            if idx.dim() == 3:  # Switch: (n, 1, E) one-hot dispatch
                sent = idx.sum(-1) > 0
                idx, w = idx.argmax(-1), w * sent
            seen.setdefault(layer, []).append((idx.reshape(-1, idx.shape[-1]).clone(),
                                               w.reshape(-1, w.shape[-1]).float().clone()))

        handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        _run_samples(runner, tokens)
    finally:
        for h in handles:
            h.remove()
    return {layer: (torch.cat([c[0] for c in calls]), torch.cat([c[1] for c in calls]))
            for layer, calls in seen.items()}


def _sorted(ids, w):
    w, order = torch.sort(w, dim=-1, descending=True, stable=True)
    return torch.gather(ids, -1, order).numpy(), w.numpy()


def _llama4_reference(model, tokens, top_k):
    """Llama-4 scales the experts' input and calls no experts(index, weights): recompute its rule
    (top-k of the raw logits, sigmoid) from the router's own input."""
    seen, handles = {}, []
    for name, mod in model.named_modules():
        if name.endswith("feed_forward.router"):
            handles.append(mod.register_forward_pre_hook(
                lambda m, a, layer=_first_index(name): seen.setdefault(layer, []).append(
                    torch.nn.functional.linear(a[0], m.weight).reshape(-1, m.weight.shape[0]))))
    try:
        _run_samples(model, tokens)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for layer, calls in seen.items():
        top, idx = torch.topk(torch.cat(calls), top_k, dim=-1)
        out[layer] = (idx, torch.sigmoid(top))
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_capture_is_exact_or_refused_by_name(family):
    model = tiny_model(family)
    tokens = _tokens()
    sink = ListSink()
    if family in REFUSED:
        with pytest.raises(ValueError, match=REFUSED[family]) as e:
            capture_model(model, tokens, sink, keep_nll=False, progress=False, batch_size=2, where=family)
        assert str(e.value).startswith(family + ":")
        assert not sink.parts
        return
    info = capture_model(model, tokens, sink, keep_nll=False, progress=False, batch_size=2, where=family)
    got = sink.result()
    n = tokens.sizes["token"]
    assert got["expert_ids"].shape == (len(info.moe_layers), n, info.top_k)
    if family == "llama4":
        ref = _llama4_reference(model, tokens, info.top_k)
    else:
        ref = _reference(model, tokens)
    # Every MoE layer the model runs is captured, none is invented.
    assert sorted(ref) == info.moe_layers, f"experts ran in layers {sorted(ref)}, captured {info.moe_layers}"
    for i, layer in enumerate(info.moe_layers):
        r_ids, r_w = ref[layer]
        if info.zero_experts:
            # LongcatFlash: slots on a zero-computation expert reach the experts module with weight 0
            # under a rewritten id; everything else must be what the experts received.
            real = info.num_experts - info.zero_experts
            c_ids = torch.as_tensor(got["expert_ids"][i].astype(np.int64))
            c_w = torch.as_tensor(got["expert_weights"][i])
            ident = c_ids >= real
            assert ident.any(), "the tiny model never picked an identity expert: the check would be vacuous"
            e_ids, e_w = _sorted(torch.where(ident, -1, c_ids), torch.where(ident, 0.0, c_w))
            x_ids, x_w = _sorted(torch.where(r_w == 0, -1, r_ids), r_w)
            np.testing.assert_allclose(e_w, x_w, rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(np.where(e_w > 0, e_ids, -1), np.where(x_w > 0, x_ids, -1))
            continue
        x_ids, x_w = _sorted(r_ids, r_w)
        if info.capacity is not None:
            # A slot dropped by capacity reaches no expert: its weight must be 0 and its id (the router's
            # choice, checked in test_routers against the capacity rule) has no counterpart here.
            ran = x_w > 0
            np.testing.assert_array_equal(got["capacity_dropped"][i] == 1, ~ran)
            x_ids = np.where(ran, x_ids, got["expert_ids"][i])
        np.testing.assert_array_equal(got["expert_ids"][i], x_ids)
        np.testing.assert_allclose(got["expert_weights"][i], x_w, rtol=1e-5, atol=1e-6)
    # The weight self-test ran and agrees with what the semantics claim.
    assert info.weight_sum_min is not None and info.weight_sum_min <= info.weight_sum_max
    assert "SELF-TEST CONTRADICTS" not in info.router_semantics
    if info.capacity is not None:
        assert got["capacity_dropped"].shape == got["expert_ids"].shape
        np.testing.assert_array_equal(got["capacity_dropped"] == 1, got["expert_weights"] == 0)


def test_enumeration_finds_every_router_logits_module():
    # Independent of the enumerator: the modelling sources that define a router_logits recorder.
    import transformers.models as tm

    root = os.path.dirname(tm.__file__)
    declared = set()
    for fam in os.listdir(root):
        path = os.path.join(root, fam, f"modeling_{fam}.py")
        if os.path.isfile(path) and re.search(r"[\"']router_logits[\"']\s*:", open(path, encoding="utf-8").read()):
            declared.add(fam)
    assert set(FAMILIES) == declared
    assert {"mixtral", "deepseek_v4", "switch_transformers", "longcat_flash", "qwen3_vl_moe"} <= set(FAMILIES)
