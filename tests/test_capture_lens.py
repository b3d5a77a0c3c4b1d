"""The logit lens computed during capture, against references computed without capture/lens.py.

References: ``output_hidden_states=True`` gives every decoder layer's output
(the last one already normalised by transformers), read out here with the
model's own final norm and LM head; the model's NLL; and scipy's
Jensen-Shannon distance on the two read-out distributions.
"""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import transformers
from scipy.spatial.distance import jensenshannon
from transformers import AutoModelForCausalLM, Gemma4TextConfig, MixtralConfig, Qwen3MoeConfig

from capture import lens as lens_mod
from capture.lens import find_lens_head, record_lens, target_logprob
from capture.run import MemorySink, capture_model, lens_partners, pair_batches, sample_spans
from storage.schema import token_table

transformers.logging.set_verbosity_error()

VOCAB = 100
COMMON = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
              max_position_embeddings=64)


def _model(family: str):
    cfg = {
        "mixtral": MixtralConfig(intermediate_size=64, num_hidden_layers=3, num_local_experts=8,
                                 num_experts_per_tok=2, **COMMON),
        # MoE layers [1, 3] out of 4: the lens covers MoE layers only
        "qwen3_moe": Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=4, head_dim=8,
                                    num_experts=8, num_experts_per_tok=2, decoder_sparse_step=2, **COMMON),
        # final_logit_softcapping: the lens must apply it as the model does
        "gemma4": Gemma4TextConfig(intermediate_size=64, num_hidden_layers=2, head_dim=8, enable_moe_block=True,
                                   num_experts=4, top_k_experts=2, moe_intermediate_size=16,
                                   hidden_size_per_layer_input=0, layer_types=["full_attention"] * 2,
                                   final_logit_softcapping=3.0, **COMMON),
    }[family]
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # CI machines are small and shared: extra OpenMP threads only contend (and slow tiny models 100-fold).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def models():
    return {f: _model(f) for f in ("mixtral", "qwen3_moe", "gemma4")}


def _paired_tokens(layout="adjacent", seed=0):
    """Three pairs of samples: B = A with a different first content token and one extra token in front."""
    rng = np.random.default_rng(seed)
    samples, cond, pair, aligned_rel = [], [], [], []
    for i, n in enumerate((7, 12, 5)):
        a = rng.integers(3, VOCAB, size=n)
        b = np.r_[a[0], rng.integers(3, VOCAB), a[1:]]  # an extra token at position 1 of B
        samples += [a, b]
        cond += ["A", "B"]
        pair += [f"p{i}"] * 2
    if layout == "split":  # all A samples first, then all B samples
        order = [0, 2, 4, 1, 3, 5]
        samples, cond, pair = [samples[i] for i in order], [cond[i] for i in order], [pair[i] for i in order]
    lengths = [len(s) for s in samples]
    starts = np.r_[0, np.cumsum(lengths)[:-1]]
    T = int(sum(lengths))
    aligned = np.full(T, -1)
    for p in sorted(set(pair)):
        ia, ib = (pair.index(p), len(pair) - 1 - pair[::-1].index(p))
        if cond[ia] != "A":
            ia, ib = ib, ia
        for pos in range(1, lengths[ia]):  # A position pos <-> B position pos + 1
            aligned[starts[ia] + pos], aligned[starts[ib] + pos + 1] = starts[ib] + pos + 1, starts[ia] + pos
    sample = np.repeat(np.arange(len(samples)), lengths)
    return token_table(sample=sample, position=np.concatenate([np.arange(n) for n in lengths]),
                       token_id=np.concatenate(samples), condition=np.repeat(cond, lengths),
                       pair=np.repeat(pair, lengths), aligned_token=aligned, canonical=aligned >= 0)


def _reference(model, tokens):
    """Per sample, alone: log-softmax of the read-out of every decoder layer's output, (layers, S, V) float64."""
    head = find_lens_head(model)
    out = []
    with torch.no_grad():
        for a, z in sample_spans(tokens):
            ids = torch.as_tensor(tokens["token_id"].values[a:z][None], dtype=torch.long)
            hs = model(ids, output_hidden_states=True).hidden_states
            per_layer = []
            for i, h in enumerate(hs[1:]):
                # transformers hands back the last hidden state normalised already
                x = h[0] if i == len(hs) - 2 else head.norm(h[0])
                z_ = head.lm_head(x).double()
                if head.softcap:
                    z_ = torch.tanh(z_ / head.softcap) * head.softcap
                per_layer.append(torch.log_softmax(z_, -1))
            out.append(torch.stack(per_layer).numpy())
    return out


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gemma4"])
def test_lens_equals_the_readout_of_every_layer_and_the_model_nll_at_the_last(models, family):
    model = models[family]
    tokens = _paired_tokens()
    sink = MemorySink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the built-in last-layer check must stay quiet
        info = capture_model(model, tokens, sink, keep_lens=True, batch_size=4, progress=False)
    lp, nll = sink.get("lens_logprob"), sink.get("nll")
    assert lp.shape == (len(info.moe_layers), tokens.sizes["token"]) and lp.dtype == np.float32
    ref = _reference(model, tokens)
    ids = tokens["token_id"].values
    for s, (a, z) in enumerate(sample_spans(tokens)):
        for j, layer in enumerate(info.moe_layers):
            want = [ref[s][layer, p, ids[a + p + 1]] for p in range(z - a - 1)] + [np.nan]
            np.testing.assert_allclose(lp[j, a:z], want, rtol=1e-4, atol=1e-4)
    last = model.config.num_hidden_layers - 1
    assert info.moe_layers[-1] == last
    # the lens at the last layer is the model's own next-token log-probability
    np.testing.assert_allclose(lp[-1], -nll, rtol=1e-5, atol=1e-5)
    assert family != "qwen3_moe" or info.moe_layers == [1, 3]


def test_js_equals_scipy_and_does_not_depend_on_layout_or_batching(models):
    model = models["mixtral"]
    results = {}
    for layout, bs in (("adjacent", 4), ("split", 1), ("split", 3)):
        tokens = _paired_tokens(layout)
        sink = MemorySink()
        capture_model(model, tokens, sink, keep_lens=True, keep_js=True, batch_size=bs, progress=False)
        # samples still reach the sink in token order, whole and consecutive
        assert sum(p["nll"].shape[0] for p in sink.parts) == tokens.sizes["token"]
        plain = MemorySink()
        capture_model(model, tokens, plain, keep_lens=True, batch_size=2, progress=False)
        np.testing.assert_array_equal(sink.get("expert_ids"), plain.get("expert_ids"))
        np.testing.assert_allclose(sink.get("lens_logprob"), plain.get("lens_logprob"), atol=1e-5)
        results[(layout, bs)] = (tokens, sink.get("lens_js"))

    tokens, js = results[("adjacent", 4)]
    ref = _reference(model, tokens)
    spans = sample_spans(tokens)
    owner = np.repeat(np.arange(len(spans)), spans[:, 1] - spans[:, 0])
    partner = lens_partners(tokens)
    assert (partner >= 0).sum() > 0
    for t in range(tokens.sizes["token"]):
        q = partner[t]
        if q < 0:
            assert np.isnan(js[:, t]).all()
            continue
        for j in range(js.shape[0]):
            pa = np.exp(ref[owner[t]][j, t - spans[owner[t], 0]])
            pb = np.exp(ref[owner[q]][j, q - spans[owner[q], 0]])
            assert js[j, t] == pytest.approx(jensenshannon(pa, pb) ** 2, abs=1e-5)
            assert js[j, t] == js[j, q]
    # the same values whatever the order of samples and the batch size
    by_pair = {}
    for key, (tok, v) in results.items():
        pos = tok["position"].values
        pair, cond = tok["pair"].values, tok["condition"].values
        by_pair[key] = {(pair[t], cond[t], pos[t]): v[:, t] for t in range(v.shape[1])}
    base = by_pair[("adjacent", 4)]
    for key, d in by_pair.items():
        for k, v in d.items():
            np.testing.assert_allclose(v, base[k], atol=1e-5, err_msg=str(key))


def test_pair_batches_keep_pairs_together():
    tokens = _paired_tokens("split")
    spans = sample_spans(tokens)
    groups = pair_batches(spans, lens_partners(tokens), 1)
    assert [g.tolist() for g in groups] == [[0, 3], [1, 4], [2, 5]]
    assert [g.tolist() for g in pair_batches(spans, lens_partners(tokens), 4)] == [[0, 3, 1, 4], [2, 5]]


def test_chunking_does_not_change_the_lens(models):
    model = models["mixtral"]
    head = find_lens_head(model)
    h = torch.randn(37, 32)
    t = torch.randint(0, VOCAB, (37,))
    with torch.no_grad():
        big = target_logprob(head, h, t)
        small = target_logprob(head, h, t, chunk_elems=VOCAB * 3)  # 3 rows at a time
        js_big = lens_mod.js_divergence(head, h[:18], h[18:36])
        js_small = lens_mod.js_divergence(head, h[:18], h[18:36], chunk_elems=VOCAB * 2)
    torch.testing.assert_close(big, small)
    torch.testing.assert_close(js_big, js_small)
    assert (js_big >= 0).all() and (js_big <= np.log(2) + 1e-6).all()


def test_a_wrong_readout_is_reported(models, monkeypatch):
    model = models["mixtral"]
    real = find_lens_head(model)
    # a lens without the final norm no longer reproduces the model's logits
    monkeypatch.setattr(lens_mod, "find_lens_head", lambda m, where="model": lens_mod.LensHead(None, real.lm_head))
    with pytest.warns(UserWarning, match="differs from the model's own NLL"):
        capture_model(model, _paired_tokens(), MemorySink(), keep_lens=True, progress=False)


def test_hooks_removed_and_clear_errors(models):
    model = models["mixtral"]

    def count():
        return sum(len(m._forward_hooks) for m in model.modules())

    before = count()
    with pytest.raises(RuntimeError, match="boom"):
        with record_lens(model, [0, 1]):
            assert count() == before + 2
            raise RuntimeError("boom")
    assert count() == before
    with pytest.raises(ValueError, match=r"layers \[7\] are not decoder layers"):
        with record_lens(model, [7]):
            pass
    plain = _paired_tokens().drop_vars("aligned_token")
    with pytest.raises(ValueError, match="'aligned_token' is missing"):
        capture_model(model, plain, MemorySink(), keep_js=True, progress=False)
    with pytest.raises(ValueError, match="no output embedding"):
        find_lens_head(torch.nn.Linear(2, 2))
