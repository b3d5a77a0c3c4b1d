"""Composite, multimodal and encoder-decoder MoE checkpoints load from a directory.

A tiny random model of each family is saved with ``save_pretrained``; loading
the directory through ``capture.load`` must give the class its config's
``architectures`` names, and capturing the checkpoint must equal capturing the
in-memory model it was saved from (same ids, same weights).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import transformers

from capture.families import tiny_model
from capture.load import describe_checkpoint, language_model, load_model
from capture.run import capture_checkpoint, capture_model

from capture_helpers import ListSink, seeded_tokens  # noqa: E402

transformers.logging.set_verbosity_error()

COMPOSITE = ["qwen3_vl_moe", "qwen3_omni_moe", "glm4v_moe", "mistral4", "switch_transformers"]


def _tokens(lengths=(4, 7, 2)):
    return seeded_tokens(lengths, 1)



@pytest.mark.parametrize("family", COMPOSITE)
def test_composite_checkpoint_loads_and_captures_like_the_model(family, tmp_path):
    model = tiny_model(family)
    model.save_pretrained(tmp_path)
    arch = model.config.architectures or [type(model).__name__]
    assert arch[0] == type(model).__name__

    loaded = load_model(tmp_path)
    assert type(loaded).__name__ == arch[0]
    meta = describe_checkpoint(tmp_path)
    assert meta.family == model.config.model_type

    tokens = _tokens()
    ref_sink, sink = ListSink(), ListSink()
    ref_info = capture_model(model, tokens, ref_sink, keep_nll=False, progress=False, batch_size=2)
    info = capture_checkpoint(tmp_path, tokens, sink, keep_nll=False, progress=False, batch_size=2)
    assert info.moe_layers == ref_info.moe_layers == meta.moe_layers
    assert info.router_semantics == ref_info.router_semantics == meta.router_semantics
    got, ref = sink.result(), ref_sink.result()
    np.testing.assert_array_equal(got["expert_ids"], ref["expert_ids"])
    np.testing.assert_allclose(got["expert_weights"], ref["expert_weights"], rtol=1e-6, atol=1e-7)


def test_language_model_is_the_text_stack():
    omni = tiny_model("qwen3_omni_moe")
    assert language_model(omni) is omni.thinker  # the talker (speech) MoE is not captured
    switch = tiny_model("switch_transformers")
    assert language_model(switch) is switch.get_encoder()
    vl = tiny_model("qwen3_vl_moe")
    assert language_model(vl) is vl


def test_encoder_decoder_nll_is_nan_and_lens_is_refused(tmp_path):
    model = tiny_model("switch_transformers")
    sink = ListSink()
    capture_model(model, _tokens(), sink, keep_nll=True, progress=False)
    assert np.isnan(sink.result()["nll"]).all()  # an encoder predicts no next token
    with pytest.raises(ValueError, match="encoder-decoder.*encoder only"):
        capture_model(model, _tokens(), ListSink(), keep_lens=True, progress=False, where="switch")


def test_unknown_architecture_name_falls_back_to_causal_lm(tmp_path):
    model = tiny_model("mixtral")
    model.config.architectures = ["NoSuchClassForCausalLM"]
    model.save_pretrained(tmp_path)
    assert type(load_model(tmp_path)).__name__ == "MixtralForCausalLM"
    with torch.no_grad():
        assert describe_checkpoint(tmp_path).moe_layers == [0, 1]
