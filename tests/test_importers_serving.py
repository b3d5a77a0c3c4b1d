"""Serving responses with routed experts (format ``serving_json``; FORMATS.md items 4 and 10).

Responses are written here in the shapes the servers return: SGLang's
OpenAI-compatible chat completions with ``choices[].sgl_ext.routed_experts``
(base64 int32, logical [tokens, layers, top_k], positions
``[routed_experts_start_len, seqlen - 1)``), vLLM's HTTP responses with
``choices[].routed_experts`` as nested lists, and SGLang's ``/generate``
``meta_info.routed_experts``. The reference is the routing each response was
encoded from, with positions and phases counted from ``usage`` by hand.
"""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from storage import cube as cubes
from storage.importers import TraceError, import_trace

E, K, L = 16, 2, 3


def _routing(rng, n):
    return np.argsort(rng.random((n, L, E)), axis=-1)[..., :K]


def _b64(a):
    return base64.b64encode(np.ascontiguousarray(a, dtype="<i4").tobytes()).decode()


def _open(out):
    return cubes.open_routing(out, complete_only=False).load()


def _phase(ds, want):
    assert list(ds["phase"].values) == want


def sglang_chat(rid, prompt, completion, routed, *, start=None):
    ext = {"routed_experts": _b64(routed)}
    if start is not None:
        ext["routed_experts_start_len"] = start
    return {"id": rid, "object": "chat.completion", "created": 1760557826, "model": "Qwen/Qwen3-30B-A3B",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "..."}, "logprobs": None,
                         "finish_reason": "stop", "matched_stop": 151645, "sgl_ext": ext}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}}


def test_sglang_chat_completions_multi_turn(tmp_path):
    rng = np.random.default_rng(1)
    # turn 1: the whole sequence; turn 2: only the tokens after the first turn (routed_experts_start_len)
    t1 = _routing(rng, 6 + 4 - 1)
    t2 = _routing(rng, 15 + 3 - 1 - 10)
    recs = [sglang_chat("chatcmpl-1", 6, 4, t1), sglang_chat("chatcmpl-2", 15, 3, t2)]
    body = "\r\n".join(json.dumps(r) for r in recs) + "\r\n\r\n"
    (tmp_path / "chat.jsonl").write_bytes(b"\xef\xbb\xbf" + body.encode())
    s = import_trace("serving_json", tmp_path / "chat.jsonl", tmp_path / "c.zarr", num_experts=E, top_k=K,
                     side_table={"chatcmpl-2": {"domain": "agent"}})
    assert s["samples"] == 2 and s["layers"] == list(range(L))
    ds = _open(tmp_path / "c.zarr")
    np.testing.assert_array_equal(ds["expert_ids"].values[0], np.concatenate([t1, t2]).transpose(1, 0, 2))
    assert list(ds["position"].values) == list(range(9)) + list(range(10, 17))
    assert list(ds["domain"].values) == [""] * 9 + ["agent"] * 7
    _phase(ds, ["prefill"] * 6 + ["decode"] * 3 + ["prefill"] * 5 + ["decode"] * 2)
    # the same with the start echoed, and with only num_layers: the length comes from usage
    recs[1]["choices"][0]["sgl_ext"]["routed_experts_start_len"] = 10
    (tmp_path / "chat.json").write_text(json.dumps(recs))
    import_trace("serving_json", tmp_path / "chat.json", tmp_path / "d.zarr", num_layers=L)
    np.testing.assert_array_equal(_open(tmp_path / "d.zarr")["expert_ids"].values, ds["expert_ids"].values)
    recs[1]["choices"][0]["sgl_ext"]["routed_experts_start_len"] = 9
    (tmp_path / "chat.json").write_text(json.dumps(recs))
    with pytest.raises(TraceError, match=r"chat\.json: element 1: choices\[0\]: sgl_ext: field 'routed_experts': "
                                         r"7 routed tokens, but the sequence has 18 tokens .*start_len is 9"):
        import_trace("serving_json", tmp_path / "chat.json", tmp_path / "e.zarr", num_layers=L, top_k=K)
    assert not (tmp_path / "e.zarr").exists()


def test_vllm_http_choices_are_samples(tmp_path):
    rng = np.random.default_rng(2)
    prompt_ids = rng.integers(0, 1000, 5).tolist()
    outs = [rng.integers(0, 1000, 3).tolist(), rng.integers(0, 1000, 4).tolist()]
    routed = [_routing(rng, 5 + len(o) - 1) for o in outs]
    resp = {"id": "cmpl-9", "object": "text_completion", "model": "m", "prompt_token_ids": prompt_ids,
            "choices": [{"index": i, "text": "x", "token_ids": outs[i], "routed_experts": routed[i].tolist(),
                         "finish_reason": "length", "extra": None} for i in range(2)],
            "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}}
    (tmp_path / "v.json").write_text(json.dumps(resp, indent=2))
    s = import_trace("serving_json", tmp_path / "v.json", tmp_path / "c.zarr", num_experts=E)
    assert s["samples"] == 2
    ds = _open(tmp_path / "c.zarr")
    np.testing.assert_array_equal(ds["expert_ids"].values[0], np.concatenate(routed).transpose(1, 0, 2))
    want_tok = (prompt_ids + outs[0])[:7] + (prompt_ids + outs[1])[:8]
    assert list(ds["token_id"].values) == want_tok
    assert list(ds["position"].values) == list(range(7)) + list(range(8))
    _phase(ds, (["prefill"] * 5 + ["decode"] * 2) + (["prefill"] * 5 + ["decode"] * 3))
    # vLLM's split form: prompt part first
    resp["choices"] = [{"index": 0, "prompt_routed_experts": routed[0][:5].tolist(),
                        "routed_experts": routed[0][5:].tolist()}]
    resp["usage"] = {"prompt_tokens": 5, "completion_tokens": 3}
    (tmp_path / "w.json").write_text(json.dumps(resp))
    import_trace("serving_json", tmp_path / "w.json", tmp_path / "d.zarr")
    np.testing.assert_array_equal(_open(tmp_path / "d.zarr")["expert_ids"].values[0], routed[0].transpose(1, 0, 2))


def test_generate_meta_info_keeps_working_with_phase(tmp_path):
    rng = np.random.default_rng(3)
    r = _routing(rng, 4 + 2 - 1)
    rec = {"text": "hi", "meta_info": {"id": "g1", "prompt_tokens": 4, "completion_tokens": 2,
                                       "routed_experts": _b64(r.reshape(5, L * K))}}
    (tmp_path / "g.json").write_text(json.dumps(rec))
    for fmt in ("sglang", "serving_json"):
        import_trace(fmt, tmp_path / "g.json", tmp_path / f"{fmt}.zarr", top_k=K)
        ds = _open(tmp_path / f"{fmt}.zarr")
        np.testing.assert_array_equal(ds["expert_ids"].values[0], r.transpose(1, 0, 2))
        _phase(ds, ["prefill"] * 4 + ["decode"])


def test_serving_errors_name_the_response(tmp_path):
    rng = np.random.default_rng(4)
    resp = sglang_chat("c1", 3, 2, _routing(rng, 4))
    del resp["choices"][0]["sgl_ext"]
    (tmp_path / "a.json").write_text(json.dumps([resp]))
    with pytest.raises(TraceError, match=r"a\.json: element 0: choices\[0\]: field 'routed_experts': missing .*"
                                         r"return_routed_experts"):
        import_trace("serving_json", tmp_path / "a.json", tmp_path / "c.zarr")
    resp = sglang_chat("c1", 3, 2, _routing(rng, 4))
    resp.pop("usage")
    (tmp_path / "b.json").write_text(json.dumps(resp))
    with pytest.raises(TraceError, match=r"b\.json: choices\[0\]: sgl_ext: field 'routed_experts': the base64 payload "
                                         r"is flat and its token count is unknown"):
        import_trace("serving_json", tmp_path / "b.json", tmp_path / "c.zarr")
    resp = sglang_chat("c1", 3, 2, _routing(rng, 4))
    resp["choices"][0]["sgl_ext"]["routed_experts"] = "@@not-base64@@"
    (tmp_path / "c.jsonl").write_text("\n" + json.dumps(resp) + "\n")
    with pytest.raises(TraceError, match=r"c\.jsonl: line 2: choices\[0\]: sgl_ext: field 'routed_experts': not valid base64"):
        import_trace("serving_json", tmp_path / "c.jsonl", tmp_path / "c.zarr", num_layers=L, top_k=K)
    assert not (tmp_path / "c.zarr").exists()


def test_vllm_npy_phase_from_the_split_or_the_tokens_file(tmp_path):
    rng = np.random.default_rng(5)
    a, b = _routing(rng, 6), _routing(rng, 5)
    (tmp_path / "npz").mkdir()
    np.savez(tmp_path / "npz" / "req-1.npz", prompt_routed_experts=a[:4].astype(np.int16),
             routed_experts=a[4:].astype(np.int16))
    import_trace("vllm_npy", tmp_path / "npz", tmp_path / "c.zarr", top_k=K)
    ds = _open(tmp_path / "c.zarr")
    np.testing.assert_array_equal(ds["expert_ids"].values[0], a.transpose(1, 0, 2))
    _phase(ds, ["prefill"] * 4 + ["decode"] * 2)
    (tmp_path / "npy").mkdir()
    np.save(tmp_path / "npy" / "req-2.npy", b.astype(np.int16))
    (tmp_path / "tok.json").write_text(json.dumps({"req-2": {"prompt_token_ids": [5, 6, 7], "output_token_ids": [8, 9, 10]}}))
    import_trace("vllm_npy", tmp_path / "npy", tmp_path / "d.zarr", tokens=str(tmp_path / "tok.json"))
    ds = _open(tmp_path / "d.zarr")
    assert list(ds["token_id"].values) == [5, 6, 7, 8, 9]
    _phase(ds, ["prefill"] * 3 + ["decode"] * 2)
    with pytest.raises(TraceError, match=r"req-2\.npy: field 'routed_experts': shape \[5, 3, 2\]: 2 experts per token, "
                                         r"top_k=4"):
        import_trace("vllm_npy", tmp_path / "npy", tmp_path / "e.zarr", top_k=4)
