"""llama.cpp tensor traces as the seed-004 tool really writes them (FORMATS.md item 5).

The tool never increments ``token_id``, so its JSON export puts the prompt
batch and every decode step into ``token-00000.json``; it copies all 16
expert-id slots into every MUL_MAT_ID record although the model routes to
fewer (gpt-oss-20b: top-4 of 32), the slots past top-k holding whatever
followed the ids in memory (different for gate, up and down). The reference
is built the tool's own way (its analysis reads ``expert_ids[:4]`` of each
MUL_MAT_ID entry; we take the gate entry of each layer in file order), not by
the importer's step-splitting rule.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from storage import cube as cubes
from storage.importers import TraceError, import_trace
from storage.importers.llamacpp import RECORD

E, K, LAYERS, SLOTS = 32, 4, [0, 1, 2], 16


def _routing(rng, n):
    return np.argsort(rng.random((n, len(LAYERS), E)), axis=-1)[..., :K]


def _steps(rng, n_prompt, n_decode):
    """(phase, ids slots (L, 3, 16), truth (L, K)) per forward step: one prompt batch, then decode steps."""
    steps = []
    batch = _routing(rng, n_prompt)  # (n_prompt, L, K): the batch's ids tensor is (K, n_prompt), token-major
    slots = np.full((len(LAYERS), 3, SLOTS), -1)
    for li in range(len(LAYERS)):
        flat = batch[:, li, :].reshape(-1)[:SLOTS]
        for op in range(3):
            slots[li, op, :flat.size] = flat
            slots[li, op, flat.size:] = rng.integers(0, E, SLOTS - flat.size)
    steps.append(("PROMPT", slots, batch[0]))
    for t in range(n_decode):
        truth = _routing(rng, 1)[0]
        slots = rng.integers(0, 2**16, (len(LAYERS), 3, SLOTS))  # past top-k: memory after the ids, per op
        slots[:, :, :K] = truth[:, None, :]
        steps.append(("GENERATE", slots, truth))
    return steps


def _entry(i, token_id, layer, phase, op, name, ids=None, n=0):
    return {"entry_id": i, "timestamp_ns": 1000 + i, "timestamp_relative_ms": round(i * 0.001, 3), "token_id": token_id,
            "layer_id": layer, "thread_id": 7, "phase": phase, "operation_type": op, "dst_name": name,
            "num_sources": 2, "sources": [{"name": f"blk.{layer}.x", "tensor_ptr": "0x1", "size_bytes": 8,
                                          "layer_id": layer, "memory_source": "BUFFER", "buffer_id": 3}],
            "expert_ids": [] if ids is None else [int(x) for x in ids], "num_experts": n}


def _step_entries(step, token_id, start):
    phase, slots, _ = step
    out = [_entry(start, token_id, None, phase, "GET_ROWS", "inp_embd")]
    for li, layer in enumerate(LAYERS):
        out.append(_entry(start + len(out), token_id, layer, phase, "MUL_MAT", f"attn_q-{layer}"))
        for op, name in enumerate(("gate", "up", "down")):
            out.append(_entry(start + len(out), token_id, layer, phase, "MUL_MAT_ID", f"ffn_moe_{name}-{layer}",
                              slots[li, op], SLOTS))
            if name != "down":
                out.append(_entry(start + len(out), token_id, layer, phase, "ADD_ID", f"ffn_moe_{name}_b-{layer}",
                                  slots[li, op], SLOTS))  # gpt-oss expert biases: same ids, not a routing record
    return out


def write_seed004_json(folder, steps, *, one_file=True):
    """The tool's export: token_id stays 0 (one file with every step), or one file per step (a fixed tool)."""
    tdir = folder / "traces"
    tdir.mkdir(parents=True)
    if one_file:
        entries = []
        for s in steps:
            entries += _step_entries(s, 0, len(entries))
        files = {0: entries}
    else:
        files = {t: _step_entries(s, t, 0) for t, s in enumerate(steps)}
    for t, entries in files.items():
        doc = {"token_id": t, "metadata": {"total_entries": len(entries), "duration_ms": 1.5,
                                           "timestamp_start_ns": 1000, "format_version": "1024-byte"},
               "entries": entries}
        (tdir / f"token-{t:05d}.json").write_text(json.dumps(doc, indent=2))


def tool_rule(folder):
    """The tool's own reading: each MUL_MAT_ID entry's expert_ids[:4]; one (the gate) per layer and step."""
    rows = []
    for path in sorted((folder / "traces").glob("token-*.json")):
        for e in json.loads(path.read_text())["entries"]:
            if e["operation_type"] == "MUL_MAT_ID" and e["expert_ids"] and e["dst_name"].startswith("ffn_moe_gate"):
                rows.append((e["phase"], e["expert_ids"][:4]))
    ids = np.array([r[1] for r in rows]).reshape(-1, len(LAYERS), K)
    phases = [rows[i][0] for i in range(0, len(rows), len(LAYERS))]
    return ids, phases


def _open(out):
    return cubes.open_routing(out, complete_only=False).load()


def _check(ds, ref_ids, ref_phases, domain):
    np.testing.assert_array_equal(ds["expert_ids"].values[0], ref_ids.transpose(1, 0, 2))
    assert list(ds["position"].values) == list(range(len(ref_phases)))
    assert set(ds["domain"].values) == {domain}
    assert ds.attrs["top_k"] == K and ds.attrs["num_experts"] == E
    want = ["prefill" if p == "PROMPT" else "decode" for p in ref_phases]
    assert list(ds["phase"].values) == want


@pytest.mark.parametrize("one_file", [True, False])
def test_seed004_json_every_step_in_one_file(tmp_path, one_file):
    rng = np.random.default_rng(4)
    steps = _steps(rng, n_prompt=6, n_decode=5)
    folder = tmp_path / "exp" / "domain-1-code"
    write_seed004_json(folder, steps, one_file=one_file)
    ref, phases = tool_rule(folder)
    # the truth the file was written from agrees with the tool's rule
    np.testing.assert_array_equal(ref, np.stack([s[2] for s in steps]))
    out = tmp_path / "r.zarr"
    s = import_trace("llamacpp_json", tmp_path / "exp", out, num_experts=E, top_k=K)
    assert s["tokens"] == 6 and s["top_k"] == K
    _check(_open(out), ref, phases, "code")


def test_seed004_json_needs_the_models_top_k(tmp_path):
    rng = np.random.default_rng(5)
    write_seed004_json(tmp_path / "run", _steps(rng, 5, 3))
    with pytest.raises(TraceError, match=r"traces: field 'num_experts': every record fills all 16 slots.*top_k"):
        import_trace("llamacpp_json", tmp_path / "run", tmp_path / "r.zarr", num_experts=E)
    assert not (tmp_path / "r.zarr").exists()


def test_seed004_json_decode_only_on_request(tmp_path):
    rng = np.random.default_rng(6)
    steps = _steps(rng, 4, 3)
    write_seed004_json(tmp_path / "run", steps)
    import_trace("llamacpp_json", tmp_path / "run", tmp_path / "r.zarr", top_k=K, num_experts=E, include_prompt=False)
    ds = _open(tmp_path / "r.zarr")
    np.testing.assert_array_equal(ds["expert_ids"].values[0], np.stack([s[2] for s in steps[1:]]).transpose(1, 0, 2))
    assert list(ds["position"].values) == [1, 2, 3]  # positions keep the step index in the run


def test_seed004_json_quirks_and_errors(tmp_path):
    rng = np.random.default_rng(7)
    steps = _steps(rng, 4, 2)
    write_seed004_json(tmp_path / "run", steps)
    path = tmp_path / "run" / "traces" / "token-00000.json"
    text = path.read_text()
    # a BOM and CRLF line ends, ids written as floats by some other exporter: still the same routing
    doc = json.loads(text)
    for e in doc["entries"]:
        e["expert_ids"] = [float(x) for x in e["expert_ids"]]
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(doc, indent=1).replace("\n", "\r\n").encode())
    import_trace("llamacpp_json", tmp_path / "run", tmp_path / "a.zarr", top_k=K, num_experts=E)
    np.testing.assert_array_equal(_open(tmp_path / "a.zarr")["expert_ids"].values[0],
                                  np.stack([s[2] for s in steps]).transpose(1, 0, 2))
    # gate/up/down that really disagree on the routed ids
    doc = json.loads(text)
    mm = [e for e in doc["entries"] if e["operation_type"] == "MUL_MAT_ID"]
    mm[-1]["expert_ids"][1] = (mm[-1]["expert_ids"][1] + 1) % E
    path.write_text(json.dumps(doc))
    with pytest.raises(TraceError, match=rf"token-00000\.json: entry {mm[-1]['entry_id']}: field 'expert_ids': "
                                         r"MUL_MAT_ID entries of layer 2 disagree"):
        import_trace("llamacpp_json", tmp_path / "run", tmp_path / "b.zarr", top_k=K)
    # an interrupted export: the file ends inside an entry
    path.write_text(text[: len(text) // 2])
    with pytest.raises(TraceError, match=r"token-00000\.json: entries element \d+ at character \d+: file ends inside"):
        import_trace("llamacpp_json", tmp_path / "run", tmp_path / "c.zarr", top_k=K)
    # the last step lost a layer (the run was killed between layers)
    doc = json.loads(text)
    last_layer2 = [i for i, e in enumerate(doc["entries"]) if e["layer_id"] == 2]
    cut = [i for i in last_layer2 if i > len(doc["entries"]) - 12]
    doc["entries"] = [e for i, e in enumerate(doc["entries"]) if i not in cut]
    path.write_text(json.dumps(doc))
    with pytest.raises(TraceError, match=r"\(step 2 of run\): field 'layer_id': MoE layers \[0, 1\] differ .*missing \[2\]"):
        import_trace("llamacpp_json", tmp_path / "run", tmp_path / "d.zarr", top_k=K)
    for name in ("b", "c", "d"):
        assert not (tmp_path / f"{name}.zarr").exists()


def write_seed004_bin(path, steps, *, token_id_increments=False, same_name=False):
    """tensor_trace.bin records as the tool writes them: 16 slots copied, token_id constant (or counting)."""
    recs = []

    def rec(token, layer, op, phase, name, ids=None):
        r = np.zeros(1, RECORD)
        r["timestamp_ns"], r["token_id"], r["layer_id"], r["operation_type"], r["phase"] = (
            1 + len(recs), token, layer, op, phase)
        r["dst_name"] = name.encode()
        if ids is not None:
            r["expert_ids"][0], r["num_experts"] = np.asarray(ids, np.int32), SLOTS
        recs.append(r)

    for t, (phase, slots, _) in enumerate(steps):
        token = t if token_id_increments else 0
        ph = 0 if phase == "PROMPT" else 1
        rec(token, 65535, 40, ph, "inp_embd")
        for li, layer in enumerate(LAYERS):
            rec(token, layer, 29, ph, f"attn_q-{layer}")
            for op, name in enumerate(("gate", "up", "down")):
                rec(token, layer, 30, ph, f"blk.{layer}.ffn_moe" if same_name else f"ffn_moe_{name}-{layer}", slots[li, op])
    np.concatenate(recs).tofile(path)


@pytest.mark.parametrize("increments,same_name", [(False, False), (True, False), (False, True)])
def test_seed004_binary_steps_in_record_order(tmp_path, increments, same_name):
    rng = np.random.default_rng(8)
    steps = _steps(rng, 5, 4)
    (tmp_path / "exp" / "domain-2-math").mkdir(parents=True)
    write_seed004_bin(tmp_path / "exp" / "domain-2-math" / "tensor_trace.bin", steps, token_id_increments=increments,
                      same_name=same_name)
    # reference the tool's way: the first 4 slots of every layer's first MUL_MAT_ID record, in file order
    recs = np.fromfile(tmp_path / "exp" / "domain-2-math" / "tensor_trace.bin", dtype=RECORD)
    mm = recs[recs["operation_type"] == 30]
    gate = mm[::3]
    ref = gate["expert_ids"][:, :4].reshape(-1, len(LAYERS), K)
    phases = ["PROMPT" if p == 0 else "GENERATE" for p in gate["phase"][:: len(LAYERS)]]
    out = tmp_path / "r.zarr"
    import_trace("llamacpp_bin", tmp_path / "exp", out, top_k=K, num_experts=E)
    _check(_open(out), ref, phases, "math")
    with pytest.raises(TraceError, match=r"tensor_trace\.bin: field 'num_experts': every record fills all 16 slots"):
        import_trace("llamacpp_bin", tmp_path / "exp", tmp_path / "x.zarr")


def test_seed004_one_layer_model_splits_on_the_repeated_operation(tmp_path):
    """With one MoE layer the layer never goes down: the gate operation coming again starts the next step."""
    global LAYERS
    rng = np.random.default_rng(9)
    saved, LAYERS = LAYERS, [3]
    try:
        steps = _steps(rng, 4, 3)
        write_seed004_bin(tmp_path / "t.bin", steps)
        import_trace("llamacpp_bin", tmp_path / "t.bin", tmp_path / "r.zarr", top_k=K)
        ds = _open(tmp_path / "r.zarr")
        np.testing.assert_array_equal(ds["expert_ids"].values[0, 0], np.stack([s[2][0] for s in steps]))
        write_seed004_json(tmp_path / "run", steps)
        import_trace("llamacpp_json", tmp_path / "run", tmp_path / "j.zarr", top_k=K)
        np.testing.assert_array_equal(_open(tmp_path / "j.zarr")["expert_ids"].values, ds["expert_ids"].values)
    finally:
        LAYERS = saved
