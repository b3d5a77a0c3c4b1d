"""Importers: every format, written here as its tool writes it (FORMATS.md), imported into the routing cube.

Each case writes two checkpoints of a small trace with known routing and the
awkward cases its format has (1-based layers, unsorted top-k, duplicated
MUL_MAT_ID entries, layer ids with gaps, prompt records, padding), imports it
and compares the cube with the routing that was written. One parametrised
test runs every registered analysis that the cube supports; bad input is
checked for a clear error naming file, record and field, and for leaving
nothing at the output path.
"""

from __future__ import annotations

import base64
import json
import pickle
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

import analyses
from storage import cube as cubes
from storage.importers import IMPORTERS, TraceError, import_trace, importer_options
from storage.importers.llamacpp import RECORD
from storage.schema import AGGREGATE_VARIABLES, validate_routing

E, K = 8, 2


def routing(rng, T, L, E=E, k=K):
    """(T, L, k) distinct expert ids per token and layer."""
    return np.argsort(rng.random((T, L, E)), axis=-1)[..., :k].astype(np.int64)


def bf16_bytes(x: np.ndarray) -> bytes:
    return torch.tensor(x, dtype=torch.float32).to(torch.bfloat16).view(torch.int16).numpy().tobytes()


def bf16_round(x: np.ndarray) -> np.ndarray:
    return torch.tensor(x, dtype=torch.float32).to(torch.bfloat16).float().numpy()


# --------------------------------------------------------------------------- writers, one per format
# Each returns dict(sources, options, side_table, expect) with expect["ids"] of shape (C, L, T, k) in cube order.


def case_llamacpp_json(tmp, rng):
    layers, n_gen = [1, 3], 4  # layer ids with a gap (dense layers 0 and 2 are not MoE)
    truth = {d: [routing(rng, n_gen, 2) for _ in range(2)] for d in ("code", "math")}
    sources = []
    for c in range(2):
        root = tmp / f"ckpt{c}"
        for j, dom in enumerate(truth):
            tdir = root / f"domain-{j + 1}-{dom}" / "traces"
            tdir.mkdir(parents=True)
            for t in range(n_gen + 1):  # token 0 = the prompt batch (skipped)
                phase = "PROMPT" if t == 0 else "GENERATE"
                entries = [{"entry_id": 0, "layer_id": None, "operation_type": "GET_ROWS", "phase": phase,
                            "expert_ids": [], "num_experts": 0}]
                for li, layer in enumerate(layers):
                    ids = list(range(16)) if t == 0 else truth[dom][c][t - 1, li].tolist() + [0] * 14
                    n = 16 if t == 0 else K
                    entries.append({"layer_id": layer, "operation_type": "MUL_MAT", "phase": phase,
                                    "expert_ids": [], "num_experts": 0})
                    for name in ("gate", "up", "down"):  # the same ids three times
                        entries.append({"entry_id": len(entries), "timestamp_ns": 1, "timestamp_relative_ms": 0.1,
                                        "token_id": t, "layer_id": layer, "thread_id": 0, "phase": phase,
                                        "operation_type": "MUL_MAT_ID", "dst_name": f"ffn_moe_{name}-{layer}",
                                        "num_sources": 3, "sources": [], "expert_ids": ids, "num_experts": n})
                (tdir / f"token-{t:05d}.json").write_text(json.dumps(
                    {"token_id": t, "metadata": {"total_entries": len(entries), "duration_ms": 1.0,
                                                 "timestamp_start_ns": 1, "format_version": "1024-byte"},
                     "entries": entries}, indent=2))
        sources.append(root)
    # both phases are kept: the prompt step is one token, the first k ids of its batch record
    prompt = np.broadcast_to(np.arange(K), (1, 2, K))
    ids = np.stack([np.concatenate([np.concatenate([prompt, truth[d][c]]) for d in truth]).transpose(1, 0, 2)
                    for c in range(2)])
    return dict(sources=sources, options={}, side_table=None,
                expect=dict(ids=ids, layers=layers, position=np.tile(np.arange(0, n_gen + 1), 2),
                            domain=["code"] * (n_gen + 1) + ["math"] * (n_gen + 1)))


def write_binary(path: Path, truth: np.ndarray, layers, *, prompt=True, garbage=True):
    """tensor_trace.bin with 3 MUL_MAT_ID records per (token, layer) and unrelated records between them."""
    recs = []

    def rec(token, layer, op, phase, ids=(), n=0):
        r = np.zeros(1, RECORD)
        r["timestamp_ns"], r["token_id"], r["layer_id"], r["operation_type"], r["phase"] = 1 + len(recs), token, layer, op, phase
        slots = np.full(16, 77, np.int32) if garbage else np.zeros(16, np.int32)  # unused slots hold junk
        slots[:len(ids)] = ids
        r["expert_ids"][0], r["num_experts"] = slots, n
        recs.append(r)

    if prompt:
        for layer in layers:
            rec(0, layer, 30, 0, ids=range(16), n=16)  # a prompt batch: 16 ids of several tokens
    for t in range(truth.shape[0]):
        rec(t + 1, 65535, 40, 1)  # GET_ROWS, no layer
        for li, layer in enumerate(layers):
            rec(t + 1, layer, 29, 1)  # MUL_MAT
            for _ in range(3):
                rec(t + 1, layer, 30, 1, ids=truth[t, li], n=truth.shape[2])
    np.concatenate(recs).tofile(path)


def case_llamacpp_bin(tmp, rng):
    layers, n = [0, 2, 5], 6
    truth = {d: [routing(rng, n, 3) for _ in range(2)] for d in ("code", "prose")}
    sources = []
    for c in range(2):
        for j, dom in enumerate(truth):
            d = tmp / f"ckpt{c}" / f"domain-{j + 1}-{dom}"
            d.mkdir(parents=True)
            write_binary(d / "tensor_trace.bin", truth[dom][c], layers)
        sources.append(tmp / f"ckpt{c}")
    prompt = np.broadcast_to(np.arange(K), (1, 3, K))  # the prompt step: the first k ids of its batch record
    ids = np.stack([np.concatenate([np.concatenate([prompt, truth[d][c]]) for d in truth]).transpose(1, 0, 2)
                    for c in range(2)])
    return dict(sources=sources, options={}, side_table=None,
                expect=dict(ids=ids, layers=layers, position=np.tile(np.arange(0, n + 1), 2),
                            domain=["code"] * (n + 1) + ["prose"] * (n + 1)))


def csv_folders(tmp, truth, rows) -> list:
    """One folder per checkpoint c, holding ``<s>.csv`` = ``rows(s, truth[s][c])`` for each source s."""
    sources = []
    for c in range(2):
        folder = tmp / f"ckpt{c}"
        folder.mkdir()
        for s, per in truth.items():
            (folder / f"{s}.csv").write_text("\n".join(rows(s, per[c])) + "\n")
        sources.append(folder)
    return sources


def case_csv_layer_expert(tmp, rng):
    """A 3-token prompt batch (layer-major runs of 3*k rows), then 4 single-token decode steps."""
    layers = [0, 1, 2]
    truth = {s: [routing(rng, 7, 3) for _ in range(2)] for s in ("code", "math")}

    def rows(s, ids):
        out = ["layer,expert"] if s == "code" else []  # the math file is written without a header
        for batch in [range(0, 3)] + [range(t, t + 1) for t in range(3, 7)]:
            for li, layer in enumerate(layers):
                for t in batch:
                    out += [f"{layer},{e}" for e in ids[t, li]]
        return out

    sources = csv_folders(tmp, truth, rows)
    ids = np.stack([np.concatenate([truth[s][c] for s in truth]).transpose(1, 0, 2) for c in range(2)])
    side = {"code": {"domain": "code"}, "math": {"domain": "math"}}
    return dict(sources=sources, options={"top_k": K}, side_table=side,
                expect=dict(ids=ids, layers=layers, domain=["code"] * 7 + ["math"] * 7))


def case_csv_pos_layer_ids(tmp, rng):
    """Two samples in one file (positions restart), 1-based layer ids, rows of a token in any layer order."""
    layers = [1, 2, 3]
    lens = [5, 4]
    truth = [[routing(rng, n, 3) for n in lens] for _ in range(2)]
    sources = []
    for c in range(2):
        rows = ["pos,layer,id0,id1"]
        for s, n in enumerate(lens):
            for p in range(n):
                for li in rng.permutation(3):
                    rows.append(f"{p},{layers[li]},{truth[c][s][p, li, 0]},{truth[c][s][p, li, 1]}")
        path = tmp / f"ckpt{c}.csv"
        path.write_text("\n".join(rows) + "\n")
        sources.append(path)
    ids = np.stack([np.concatenate(truth[c]).transpose(1, 0, 2) for c in range(2)])
    side = {"ckpt0/0": {"domain": "code"}, "ckpt0/1": {"domain": "math"}}
    # sample keys carry the file stem: one side table per checkpoint would differ, so key by the first file's names
    return dict(sources=sources, options={}, side_table=side, rename_stems=True,
                expect=dict(ids=ids, layers=layers, domain=["code"] * 5 + ["math"] * 4,
                            position=np.r_[np.arange(5), np.arange(4)]))


def case_csv_phase_token(tmp, rng):
    """Rows of a (token, layer) in shuffled rank order (unsorted top-k), ranks 1-based."""
    layers = [0, 1]
    truth = {s: [routing(rng, 5, 2) for _ in range(2)] for s in ("code", "math")}

    def rows(s, ids):
        out = ["phase,token,layer,rank,expert"]
        for t in range(5):
            cells = [(li, r) for li in range(2) for r in range(K)]
            for i in rng.permutation(len(cells)):
                li, r = cells[i]
                out.append(f"{'prompt' if t < 2 else 'decode'},{t},{layers[li]},{r + 1},{ids[t, li, r]}")
        return out

    sources = csv_folders(tmp, truth, rows)
    ids = np.stack([np.concatenate([truth[s][c] for s in truth]).transpose(1, 0, 2) for c in range(2)])
    return dict(sources=sources, options={}, side_table={"code": {"domain": "code"}, "math": {"domain": "math"}},
                expect=dict(ids=ids, layers=layers, domain=["code"] * 5 + ["math"] * 5))


def libmoe_run(root: Path, ckpt: int, docs, *, with_ids: bool):
    """<root>/Full_smoe/analysts/<run>/{mmstar.json, results.json} with LibMoE's nesting."""
    run = root / "Full_smoe" / "analysts" / f"0717_{ckpt}_llava_mmstar"
    run.mkdir(parents=True)
    logs = []
    for doc_id, domain, per_layer in docs:
        layer_logs = {"time_inference": 4.2, "mm_projector": {"entropy_weight_topk": 0.9, "dist_experts_top1": [1, 2]}}
        for layer, (ids, ent_k, ent_a, margin) in per_layer.items():
            m = {"entropy_weight_topk": ent_k, "entropy_weight_all": ent_a,
                 "dist_experts_top1": np.bincount(ids[:, 0], minlength=E).tolist(),
                 "dist_experts_top2": np.bincount(ids.ravel(), minlength=E).tolist(),
                 "router_magine": margin.tolist(), "balance_loss": 1.01}
            if with_ids:
                m["selected_experts"] = [ids.tolist()]  # [batch=1][N][k]
            layer_logs[str(layer)] = m
        logs.append({"doc_id": doc_id, "target": "A", "doc": {"question": "q"}, "arguments": [], "resps": [["A"]],
                     "filtered_resps": ["A"], "logs_metrics_mlp": [[{"balance_loss": 1.0}]],
                     "logs_metrics_vision": [[layer_logs]], "domain": [domain, "perception"]})
    (run / "mmstar.json").write_text(json.dumps({"args": {"output_path": "/x/logs/"},
                                                  "model_configs": {"model_args": "x"}, "logs": logs, "time": "t"}))
    (run / "results.json").write_text(json.dumps(
        {"results": {"mmstar": {"acc": 0.5}},
         "model_configs": {"model_args": f"pretrained=/data/Full_smoe/checkpoint-{ckpt},conv_template=vicuna_v1"}}))
    return run


def _libmoe_docs(rng, c_truth, layers):
    docs = []
    for i, (dom, ids) in enumerate(c_truth):
        per_layer = {layer: (ids[:, li], float(rng.random()), float(rng.random()), rng.random(ids.shape[0]))
                     for li, layer in enumerate(layers)}
        docs.append((100 + i, dom, per_layer))
    return docs


def case_libmoe(tmp, rng):
    layers = [0, 2]  # gap: layer 1 is not logged
    truth = [[(dom, routing(rng, 6, 2)) for dom in ("coarse", "fine", "coarse")] for _ in range(2)]
    sources = [libmoe_run(tmp, step, _libmoe_docs(rng, truth[c], layers), with_ids=True)
               for c, step in enumerate((100, 200))]
    ids = np.stack([np.concatenate([t[1] for t in truth[c]]).transpose(1, 0, 2) for c in range(2)])
    return dict(sources=sources, options={}, side_table=None,
                expect=dict(ids=ids, layers=layers, steps=[100, 200], checkpoints=["checkpoint-100", "checkpoint-200"],
                            domain=["coarse|perception"] * 6 + ["fine|perception"] * 6 + ["coarse|perception"] * 6))


def case_libmoe_aggregates(tmp, rng):
    layers = [0, 1, 3]
    truth = [[(dom, routing(rng, 5, 3)) for dom in ("a", "b")] for _ in range(2)]
    docs = [_libmoe_docs(rng, truth[c], layers) for c in range(2)]
    sources = [libmoe_run(tmp, step, docs[c], with_ids=False) for c, step in enumerate((10, 20))]
    agg = {}
    for c in range(2):
        for li, layer in enumerate(layers):
            per = [d[2][layer] for d in docs[c]]
            agg[(c, li)] = dict(
                top1=sum(np.bincount(p[0][:, 0], minlength=E) for p in per),
                topk=sum(np.bincount(p[0].ravel(), minlength=E) for p in per),
                ent_k=np.mean([p[1] for p in per]), ent_a=np.mean([p[2] for p in per]),
                margin=np.concatenate([p[3] for p in per]).mean())
    return dict(sources=sources, options={}, side_table=None, expect=dict(aggregates=agg, layers=layers, steps=[10, 20]))


def case_olmoe(tmp, rng):
    """exp_ids [n][k][L] with the layer axis last; the final checkpoint is the unsuffixed 'main' file."""
    L, lens = 4, [12, 12, 12]
    tokens = [rng.integers(0, 50000, n) for n in lens]
    truth = [[routing(rng, n, L) for n in lens] for _ in range(2)]
    sources = []
    for c, name in enumerate(("c4_results_5000.jsonl", "c4_results.jsonl")):
        with open(tmp / name, "w") as f:
            for s in range(3):
                f.write(json.dumps({"input_ids": tokens[s].tolist(), "predicted_token_ids": tokens[s].tolist(),
                                    "exp_ids": truth[c][s].transpose(0, 2, 1).tolist()}) + "\n")
        sources.append(tmp / name)
    ids = np.stack([np.concatenate(truth[c]).transpose(1, 0, 2) for c in range(2)])
    side = {"c4/0": {"domain": "web"}, "c4/1": {"domain": "news"}, "c4/2": {"domain": "web"}}
    return dict(sources=sources, options={}, side_table=side, num_experts=E,
                expect=dict(ids=ids, layers=list(range(L)), token_id=np.concatenate(tokens), steps=[5000, 5001],
                            checkpoints=["step5000", "main"], domain=["web"] * 12 + ["news"] * 12 + ["web"] * 12))


def case_megatron(tmp, rng):
    """Ascending ids (routing map) with a bf16 logits sidecar: slots come out sorted by logit."""
    layers, steps, n = [0, 1, 2], 2, 10
    out = []
    sources = []
    for c in range(2):
        d = tmp / f"ckpt{c}"
        d.mkdir()
        per_c = np.empty((len(layers), steps * n, K), np.int64)
        logit_c = np.empty((len(layers), steps * n, E), np.float32)
        with open(d / "router_trace_rank0.jsonl", "w") as f, open(d / "logits_rank0.bin", "wb") as lf:
            off = 0
            for s in range(steps):
                for li, layer in enumerate(layers):
                    x = bf16_round(rng.standard_normal((n, E)).astype(np.float32) * 2)
                    top = np.argsort(-x, axis=1, kind="stable")[:, :K]
                    raw = bf16_bytes(x)
                    lf.write(raw)
                    rec = {"step": s, "stage": "pre_dispatch", "block": "decoder", "layer": layer, "rank": 0,
                           "num_tokens": n, "topk": K, "logit_offset": off, "logit_bytes": len(raw),
                           "logit_shape": [n, E], "top_indices": np.sort(top, axis=1).tolist()}
                    off += len(raw)
                    f.write(json.dumps(rec) + "\n")
                    per_c[li, s * n:(s + 1) * n] = top
                    logit_c[li, s * n:(s + 1) * n] = x
                # an MTP record is skipped
                f.write(json.dumps({"step": s, "stage": "pre_dispatch", "block": "mtp", "layer": 0, "mtp_idx": 0,
                                    "rank": 0, "num_tokens": n, "topk": K, "top_indices": [[0, 1]] * n}) + "\n")
        out.append((per_c, logit_c))
        sources.append(d)
    ids = np.stack([o[0] for o in out])
    logits = np.stack([o[1] for o in out])
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    w = np.take_along_axis(p, ids, -1)
    w /= w.sum(-1, keepdims=True)
    return dict(sources=sources, options={"semantics": "softmax_topk", "top_k": K, "renormalize": True},
                side_table={"step0": {"domain": "code"}, "step1": {"domain": "math"}},
                expect=dict(ids=ids, layers=layers, logits=logits, weights=w, domain=["code"] * n + ["math"] * n))


def case_vllm(tmp, rng):
    L, reqs = 3, {"req-a": (6, 4), "req-b": (5, 3)}  # prompt, generated
    truth = [{r: routing(rng, p + g - 1, L) for r, (p, g) in reqs.items()} for _ in range(2)]
    toks = {r: {"prompt_token_ids": rng.integers(0, 1000, p).tolist(), "output_token_ids": rng.integers(0, 1000, g).tolist()}
            for r, (p, g) in reqs.items()}
    (tmp / "tokens.json").write_text(json.dumps(toks))
    sources = []
    for c in range(2):
        d = tmp / f"ckpt{c}"
        d.mkdir()
        for r in reqs:
            np.save(d / f"{r}.npy", truth[c][r].astype(np.int16))
        sources.append(d)
    ids = np.stack([np.concatenate([truth[c][r] for r in reqs]).transpose(1, 0, 2) for c in range(2)])
    tid = np.concatenate([(toks[r]["prompt_token_ids"] + toks[r]["output_token_ids"])[:p + g - 1]
                          for r, (p, g) in reqs.items()])
    return dict(sources=sources, options={"tokens": str(tmp / "tokens.json")},
                side_table={"req-a": {"domain": "chat", "condition": "A"}, "req-b": {"domain": "code"}},
                expect=dict(ids=ids, layers=list(range(L)), token_id=tid, domain=["chat"] * 9 + ["code"] * 7))


def case_sglang(tmp, rng):
    L, lens = 4, [(5, 3), (4, 4)]
    truth = [[routing(rng, p + g - 1, L) for p, g in lens] for _ in range(2)]
    inp = [rng.integers(0, 999, p).tolist() for p, _ in lens]
    outp = [rng.integers(0, 999, g).tolist() for _, g in lens]
    sources = []
    for c in range(2):
        recs = []
        for i, (p, g) in enumerate(lens):
            payload = base64.b64encode(truth[c][i].reshape(p + g - 1, L * K).astype("<i4").tobytes()).decode()
            recs.append({"text": "...", "input_ids": inp[i], "output_ids": outp[i],
                         "meta_info": {"id": f"r{i}", "prompt_tokens": p, "completion_tokens": g,
                                       "finish_reason": {"type": "stop"}, "routed_experts": payload}})
        (tmp / f"ckpt{c}.json").write_text(json.dumps(recs))
        sources.append(tmp / f"ckpt{c}.json")
    ids = np.stack([np.concatenate(truth[c]).transpose(1, 0, 2) for c in range(2)])
    tid = np.concatenate([(inp[i] + outp[i])[:p + g - 1] for i, (p, g) in enumerate(lens)])
    return dict(sources=sources, options={"num_layers": L}, side_table={"r0": {"domain": "a"}, "r1": {"domain": "b"}},
                expect=dict(ids=ids, layers=list(range(L)), token_id=tid, domain=["a"] * 7 + ["b"] * 7))


def _hf_logits(rng, B, S, n_layers):
    return [rng.standard_normal((B * S, E)).astype(np.float32) * 2 for _ in range(n_layers)]


def _expected_from_logits(logits_c, mask, renorm):
    ids, ws = [], []
    for x in logits_c:
        x = x[mask.ravel()]
        p = np.exp(x - x.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        top = np.argsort(-p, axis=1, kind="stable")[:, :K]
        w = np.take_along_axis(p, top, 1)
        ids.append(top)
        ws.append(w / w.sum(1, keepdims=True) if renorm else w)
    return np.stack(ids), np.stack(ws)


def case_router_logits_torch(tmp, rng):
    """torch.save of output_router_logits (tuple per MoE layer) + padded input ids; semantics stated."""
    B, S, layers = 2, 7, [1, 3]
    input_ids = rng.integers(1, 500, (B, S))
    mask = np.ones((B, S), bool)
    mask[1, 5:] = False  # right padding
    input_ids[~mask] = 0
    sources, exp_ids, exp_w, exp_l = [], [], [], []
    for c in range(2):
        lg = _hf_logits(rng, B, S, 2)
        torch.save({"router_logits": tuple(torch.tensor(x) for x in lg), "input_ids": torch.tensor(input_ids),
                    "attention_mask": torch.tensor(mask.astype(np.int64))}, tmp / f"ckpt{c}.pt")
        sources.append(tmp / f"ckpt{c}.pt")
        i, w = _expected_from_logits(lg, mask, renorm=False)
        exp_ids.append(i), exp_w.append(w), exp_l.append(np.stack([x[mask.ravel()] for x in lg]))
    return dict(sources=sources,
                options={"semantics": "softmax_topk", "top_k": K, "renormalize": False, "layers": layers},
                side_table={"0": {"domain": "x"}, "1": {"domain": "y"}},
                expect=dict(ids=np.stack(exp_ids), weights=np.stack(exp_w), logits=np.stack(exp_l), layers=layers,
                            token_id=input_ids[mask], domain=["x"] * 7 + ["y"] * 5))


def case_router_logits_safetensors(tmp, rng):
    """No semantics stated: logits only, no expert ids."""
    from safetensors.numpy import save_file

    B, S, layers = 2, 5, [0, 2]
    input_ids = rng.integers(1, 500, (B, S))
    sources, exp_l = [], []
    for c in range(2):
        lg = _hf_logits(rng, B, S, 2)
        save_file({f"router_logits.{layer}": x for layer, x in zip(layers, lg)} | {"input_ids": input_ids},
                  str(tmp / f"ckpt{c}.safetensors"))
        sources.append(tmp / f"ckpt{c}.safetensors")
        exp_l.append(np.stack(lg))
    return dict(sources=sources, options={}, side_table=None,
                expect=dict(logits=np.stack(exp_l), layers=layers, token_id=input_ids.ravel()))


def case_segments(tmp, rng):
    """Time-step-major report: segment 0 of every document, then segment 1, ... (documents not contiguous)."""
    docs = {"doc_a": 3, "doc_b": 2}
    truth = [{d: rng.dirichlet(np.ones(4), size=n) for d, n in docs.items()} for _ in range(2)]
    sources = []
    for c in range(2):
        data = [{"document_id": d, "segment_idx": s, "routing_probs": truth[c][d][s].tolist()}
                for s in range(3) for d in docs if s < docs[d]]
        report = {"model_id": "user/gmmxlnet-squad-k4", "num_experts": 4, "evaluation_dataset": "squad_v2_dev",
                  "metrics": {"routing_entropy": 1.2}, "routing_data": data}
        (tmp / f"ckpt{c}.json").write_text(json.dumps(report))
        sources.append(tmp / f"ckpt{c}.json")
    ids, ws = [], []
    for c in range(2):
        p = np.concatenate([truth[c][d] for d in docs])
        top = np.argsort(-p, axis=1, kind="stable")[:, :K]
        ids.append(top[None]), ws.append(np.take_along_axis(p, top, 1)[None])
    return dict(sources=sources, options={"top_k": K}, side_table={"doc_a": {"domain": "wiki"}, "doc_b": {"domain": "news"}},
                expect=dict(ids=np.stack(ids), weights=np.stack(ws), layers=[0],
                            position=np.r_[np.arange(3), np.arange(2)], domain=["wiki"] * 3 + ["news"] * 2))


def case_vllm_routes(tmp, rng):
    """Routing-logger JSONL: a meta line, then route lines of two requests interleaved token by token."""
    layers, reqs = [0, 2], {"req-a": 3, "req-b": 4}
    truth = [{r: routing(rng, n, 2) for r, n in reqs.items()} for _ in range(2)]
    w = [{r: np.sort(rng.random((n, 2, K)), axis=-1)[..., ::-1] for r, n in reqs.items()} for _ in range(2)]
    sources = []
    for c in range(2):
        lines = [{"type": "meta", "model_id": "m", "vllm_version": "0.11", "top_k": K, "layers_logged": layers}]
        for t in range(max(reqs.values())):
            for r, n in reqs.items():
                if t < n:
                    lines += [{"type": "route", "req_id": r, "token_idx": t, "layer": layer,
                               "topk_ids": truth[c][r][t, li].tolist(), "topk_weights": w[c][r][t, li].tolist()}
                              for li, layer in enumerate(layers)]
        (tmp / f"ckpt{c}.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
        sources.append(tmp / f"ckpt{c}.jsonl")
    ids = np.stack([np.concatenate([truth[c][r] for r in reqs]).transpose(1, 0, 2) for c in range(2)])
    ws = np.stack([np.concatenate([w[c][r] for r in reqs]).transpose(1, 0, 2) for c in range(2)])
    return dict(sources=sources, options={}, side_table={"req-a": {"domain": "chat"}, "req-b": {"domain": "code"}},
                num_experts=E, expect=dict(ids=ids, weights=ws, layers=layers, position=[0, 1, 2, 0, 1, 2, 3],
                                           domain=["chat"] * 3 + ["code"] * 4))


def case_table(tmp, rng):
    """A long routing table (CSV, one row per sample, layer, token; rows shuffled; lists in cells)."""
    layers, docs = [1, 2, 5], {"d1": 4, "d2": 2}
    truth = [{d: routing(rng, n, 3) for d, n in docs.items()} for _ in range(2)]
    sources = []
    for c in range(2):
        rows = [f"{d},{layer},{t},\"{truth[c][d][t, li].tolist()}\""
                for d, n in docs.items() for t in range(n) for li, layer in enumerate(layers)]
        first = rows[0]
        rest = [rows[i] for i in rng.permutation(np.arange(1, len(rows)))]
        (tmp / f"ckpt{c}.csv").write_text("doc_id,layer_id,pos,selected_experts\n" + "\n".join([first] + rest) + "\n")
        sources.append(tmp / f"ckpt{c}.csv")
    ids = np.stack([np.concatenate([truth[c][d] for d in docs]).transpose(1, 0, 2) for c in range(2)])
    return dict(sources=sources, options={"top_k": K}, side_table={"d1": {"domain": "wiki"}, "d2": {"domain": "news"}},
                num_experts=E, expect=dict(ids=ids, layers=layers, position=[0, 1, 2, 3, 0, 1],
                                           domain=["wiki"] * 4 + ["news"] * 2))


def case_serving(tmp, rng):
    """OpenAI-compatible chat completions with SGLang's sgl_ext.routed_experts (base64 int32)."""
    lens = [(4, 3), (3, 3)]
    truth = [[routing(rng, p + g - 1, 2) for p, g in lens] for _ in range(2)]
    sources = []
    for c in range(2):
        recs = [{"id": f"chatcmpl-{i}", "object": "chat.completion",
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": "."},
                              "sgl_ext": {"routed_experts": base64.b64encode(truth[c][i].astype("<i4").tobytes()).decode()}}],
                 "usage": {"prompt_tokens": p, "completion_tokens": g, "total_tokens": p + g}}
                for i, (p, g) in enumerate(lens)]
        (tmp / f"ckpt{c}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        sources.append(tmp / f"ckpt{c}.jsonl")
    ids = np.stack([np.concatenate(truth[c]).transpose(1, 0, 2) for c in range(2)])
    return dict(sources=sources, options={"num_layers": 2, "top_k": K},
                side_table={"chatcmpl-0": {"domain": "a"}, "chatcmpl-1": {"domain": "b"}},
                expect=dict(ids=ids, layers=[0, 1], position=list(range(6)) + list(range(5)),
                            domain=["a"] * 6 + ["b"] * 5))


CASES = {
    "llamacpp_json": case_llamacpp_json,
    "llamacpp_bin": case_llamacpp_bin,
    "moe_trace_csv:layer_expert": case_csv_layer_expert,
    "moe_trace_csv:pos_layer_ids": case_csv_pos_layer_ids,
    "moe_trace_csv:phase_token": case_csv_phase_token,
    "libmoe": case_libmoe,
    "libmoe:aggregates": case_libmoe_aggregates,
    "olmoe_jsonl": case_olmoe,
    "megatron": case_megatron,
    "vllm_npy": case_vllm,
    "sglang": case_sglang,
    "router_logits:torch": case_router_logits_torch,
    "router_logits:safetensors": case_router_logits_safetensors,
    "segments_json": case_segments,
    "vllm_routes_jsonl": case_vllm_routes,
    "table": case_table,
    "serving_json": case_serving,
}


def run_case(name, tmp_path):
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    case = CASES[name](tmp_path, rng)
    sources = case["sources"]
    if case.get("rename_stems"):  # sample keys carry the file stem; make both checkpoints' stems alike
        moved = []
        for i, s in enumerate(sources):
            (tmp_path / f"c{i}").mkdir()
            moved.append(s.rename(tmp_path / f"c{i}" / "ckpt0.csv"))
        sources = moved
    out = tmp_path / "routing.zarr"
    summary = import_trace(name.split(":")[0], sources, out, side_table=case["side_table"],
                           num_experts=case.get("num_experts"), **case["options"])
    return case, summary, out


def open_cube(out):
    ds = cubes.open_routing(out, complete_only=False)
    validate_routing(ds)
    assert (ds["complete"].values == 1).all()
    return ds.load()


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """Every case imported once (the cube tests and the analysis test share them)."""
    done = {}
    for name in CASES:
        case, summary, out = run_case(name, tmp_path_factory.mktemp(name.replace(":", "_")))
        done[name] = (case, summary, open_cube(out))
    return done


def test_registry_covers_every_format():
    # olmoe_counts builds an aggregate-counts cube, not a routing cube: tests/test_olmoe_counts.py covers it
    assert set(IMPORTERS) - {"olmoe_counts"} == {n.split(":")[0] for n in CASES}
    for fmt in IMPORTERS:
        assert "source" not in importer_options(fmt)


@pytest.mark.parametrize("name", list(CASES))
def test_import_gives_the_written_routing(name, imported):
    case, summary, ds = imported[name]
    exp = case["expect"]
    assert ds.attrs["source"].startswith(f"moe-atlas importer '{name.split(':')[0]}' v")
    assert ds.attrs["router_semantics"]
    assert list(ds["layer"].values) == exp["layers"]
    assert ds.sizes["checkpoint"] == 2
    if "steps" in exp:
        assert list(ds["step"].values) == exp["steps"]
    if "checkpoints" in exp:
        assert list(ds["checkpoint"].values) == exp["checkpoints"]
    if "aggregates" in exp:
        assert "expert_ids" not in ds and ds.attrs["has_token_ids"] is False
        assert ds.sizes["token"] == 0 and ds.attrs["top_k"] == K and ds.attrs["num_experts"] == E
        for (c, li), a in exp["aggregates"].items():
            np.testing.assert_array_equal(ds["agg_top1_counts"].values[c, li], a["top1"])
            np.testing.assert_array_equal(ds["agg_topk_counts"].values[c, li], a["topk"])
            np.testing.assert_allclose(ds["agg_entropy_topk"].values[c, li], a["ent_k"], rtol=1e-6)
            np.testing.assert_allclose(ds["agg_entropy_all"].values[c, li], a["ent_a"], rtol=1e-6)
            np.testing.assert_allclose(ds["agg_margin"].values[c, li], a["margin"], rtol=1e-6)
            assert ds["agg_samples"].values[c, li] == 2
        return
    if "ids" in exp:
        np.testing.assert_array_equal(ds["expert_ids"].values, exp["ids"])
        assert ds.attrs["has_token_ids"] is True and ds.attrs["top_k"] == K
    else:
        assert "expert_ids" not in ds and ds.attrs["has_token_ids"] is False
        assert "logits only" in ds.attrs["source"] and "unknown" in ds.attrs["router_semantics"]
    if "weights" in exp:
        np.testing.assert_allclose(ds["expert_weights"].values, exp["weights"], rtol=1e-5)
    else:
        assert "expert_weights" not in ds
    if "logits" in exp:
        np.testing.assert_allclose(ds["router_logits"].values, exp["logits"], rtol=1e-3, atol=1e-3)
    for coord in ("token_id", "position"):
        if coord in exp:
            np.testing.assert_array_equal(ds[coord].values, exp[coord])
    if "domain" in exp:
        assert list(ds["domain"].values) == exp["domain"]
    assert summary["tokens"] == ds.sizes["token"] and summary["checkpoints"] == list(ds["checkpoint"].values)


PAIRED = ("condition", "align", "paired")


@pytest.mark.parametrize("name", list(CASES))
def test_registered_analyses_run_on_every_import(name, imported):
    """Every analysis the cube supports runs and keeps the result contract; the others say what is missing."""
    _, _, ds = imported[name]
    ran = 0
    for aname, a in sorted(analyses.REGISTRY.items()):
        missing = analyses.missing_requirements(aname, ds)
        if missing:
            with pytest.raises(ValueError, match=missing[0]):
                analyses.run(aname, ds)
            continue
        fast = {p: 0 for p in ("n_boot",) if p in a.params} | ({"n_shuffle": 10} if "n_shuffle" in a.params else {})
        if "condition_a" in a.params:
            # paired analyses need tokens aligned across conditions, which capture.align makes and traces lack
            with pytest.raises(ValueError, match="|".join(PAIRED)):
                analyses.run(aname, ds, **fast)
            continue
        result = analyses.run(aname, ds, **fast)
        analyses.check_result(result, aname)
        ran += 1
    if "expert_ids" in ds:
        assert ran >= 4
    else:
        assert ran == 0


# --------------------------------------------------------------------------- details of single formats


def test_llamacpp_prompt_records_only_on_request(tmp_path):
    rng = np.random.default_rng(1)
    truth = routing(rng, 3, 2)
    (tmp_path / "run").mkdir()
    write_binary(tmp_path / "run" / "tensor_trace.bin", truth, [0, 1], prompt=False)
    s = import_trace("llamacpp_bin", tmp_path / "run" / "tensor_trace.bin", tmp_path / "a.zarr", num_experts=E)
    assert s["tokens"] == 3
    # a prompt batch record holds 16 ids of several tokens: kept as one token, the batch's first k ids
    write_binary(tmp_path / "run" / "tensor_trace.bin", truth, [0, 1], prompt=True)
    s = import_trace("llamacpp_bin", tmp_path / "run" / "tensor_trace.bin", tmp_path / "b.zarr")
    assert s["tokens"] == 4 and s["top_k"] == K
    np.testing.assert_array_equal(open_cube(tmp_path / "b.zarr")["expert_ids"].values[0, :, 0], [[0, 1], [0, 1]])
    s = import_trace("llamacpp_bin", tmp_path / "run" / "tensor_trace.bin", tmp_path / "c.zarr", include_prompt=False)
    assert s["tokens"] == 3


def test_segments_default_is_soft_routing_over_all_experts(tmp_path):
    probs = [[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]]
    (tmp_path / "r.json").write_text(json.dumps([{"document_id": "d", "segment_idx": i, "routing_probs": p}
                                                 for i, p in enumerate(probs)]))
    import_trace("segments_json", tmp_path / "r.json", tmp_path / "c.zarr")
    ds = open_cube(tmp_path / "c.zarr")
    assert ds.attrs["top_k"] == 3 and "soft routing" in ds.attrs["router_semantics"]
    np.testing.assert_array_equal(ds["expert_ids"].values[0, 0], [[1, 2, 0], [0, 2, 1]])
    np.testing.assert_allclose(ds["expert_weights"].values[0, 0], [[0.6, 0.3, 0.1], [0.5, 0.3, 0.2]], rtol=1e-6)


def test_csv_phase_token_reads_the_token_table(tmp_path):
    rows = ["phase,token,layer,rank,expert"] + [f"decode,{t},0,{r},{(t + r) % E}" for t in (3, 4) for r in (1, 0)]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "tok.csv").write_text("token,token_id,text\n3,101,Hel\n4,102,lo\n")
    import_trace("moe_trace_csv", tmp_path / "t.csv", tmp_path / "c.zarr", tokens=str(tmp_path / "tok.csv"))
    ds = open_cube(tmp_path / "c.zarr")
    assert list(ds["token_id"].values) == [101, 102] and list(ds["token_text"].values) == ["Hel", "lo"]
    assert list(ds["position"].values) == [3, 4]
    np.testing.assert_array_equal(ds["expert_ids"].values[0, 0], [[3, 4], [4, 5]])


def test_megatron_without_logits_keeps_file_order_and_unflattens_batches(tmp_path):
    d = tmp_path / "t"
    d.mkdir()
    S, b = 3, 2  # rows are [seq, batch] flattened
    ids = np.array([[[0, 5], [1, 2]], [[3, 4], [2, 6]], [[1, 7], [0, 3]]])  # (S, b, k)
    lines = [json.dumps({"step": 0, "stage": "pre_dispatch", "block": "decoder", "layer": layer, "rank": 0,
                         "num_tokens": S * b, "topk": K, "top_indices": ids.reshape(S * b, K).tolist()})
             for layer in (1, 2)]
    (d / "router_trace_rank0.jsonl").write_text("\n".join(lines) + "\n")
    import_trace("megatron", d, tmp_path / "c.zarr", micro_batch_size=b, num_experts=E)
    ds = open_cube(tmp_path / "c.zarr")
    assert "ascending" in ds.attrs["slot_order"]
    np.testing.assert_array_equal(ds["expert_ids"].values[0, 0], ids.transpose(1, 0, 2).reshape(-1, K))
    assert list(ds["sample"].values) == [0, 0, 0, 1, 1, 1] and list(ds["position"].values) == [0, 1, 2] * 2


def test_megatron_several_ranks_need_a_choice(tmp_path):
    for r in (0, 1):
        (tmp_path / f"router_trace_rank{r}.jsonl").write_text(json.dumps(
            {"step": 0, "stage": "pre_dispatch", "block": "decoder", "layer": 0, "rank": r, "num_tokens": 1,
             "topk": 1, "top_indices": [[r]]}) + "\n")
    with pytest.raises(ValueError, match="rank=<r>.*data_parallel"):
        import_trace("megatron", tmp_path, tmp_path / "c.zarr")
    s = import_trace("megatron", tmp_path, tmp_path / "c.zarr", ranks="data_parallel", num_experts=2)
    assert s["samples"] == 2


def test_semantics_must_be_complete(tmp_path):
    case = case_router_logits_torch(tmp_path, np.random.default_rng(0))
    with pytest.raises(ValueError, match="renormalize"):
        import_trace("router_logits", case["sources"][0], tmp_path / "c.zarr", semantics="softmax_topk", top_k=2)
    with pytest.raises(ValueError, match="cannot be rebuilt"):
        import_trace("router_logits", case["sources"][0], tmp_path / "c.zarr", semantics="grouped_topk", top_k=2)


# --------------------------------------------------------------------------- bad input


def _no_leftovers(tmp_path, out):
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def _olmoe_line(rng, n=4, L=2, **override):
    rec = {"input_ids": list(range(n)), "predicted_token_ids": list(range(n)),
           "exp_ids": routing(rng, n, L).transpose(0, 2, 1).tolist()}
    rec.update(override)
    return json.dumps(rec)


@pytest.mark.parametrize(("label", "mutate", "match"), [
    ("wrong field name", lambda rng: _olmoe_line(rng).replace('"exp_ids"', '"expert_ids"'),
     r"line 2: field 'exp_ids': missing"),
    ("ragged", lambda rng: _olmoe_line(rng, exp_ids=[[[0, 1], [2, 3]], [[0, 1], [2]], [[0, 1], [2, 3]], [[0, 1], [2, 3]]]),
     r"line 2: field 'exp_ids': ragged"),
    ("id >= E", lambda rng: _olmoe_line(rng, exp_ids=[[[0, 1], [2, 9]]] * 4),
     r"line 2: field 'exp_ids': expert id 9 >= num_experts=8"),
    ("truncated", lambda rng: _olmoe_line(rng)[:-25], r"line 2: not valid JSON .*truncated"),
    ("more layers", lambda rng: _olmoe_line(rng, L=3), r"line 2: field 'exp_ids': 3 layers"),
])
def test_bad_olmoe_lines_name_file_line_and_field(tmp_path, label, mutate, match):
    rng = np.random.default_rng(3)
    src = tmp_path / "c4_results_10.jsonl"
    src.write_text(_olmoe_line(rng) + "\n" + mutate(rng) + "\n")
    out = tmp_path / "routing.zarr"
    with pytest.raises(ValueError, match=match) as err:
        import_trace("olmoe_jsonl", src, out, num_experts=E)
    assert str(src) in str(err.value)
    _no_leftovers(tmp_path, out)


def test_layer_missing_in_one_record_is_refused(tmp_path):
    case = case_llamacpp_json(tmp_path, np.random.default_rng(4))
    victim = case["sources"][0] / "domain-2-math" / "traces" / "token-00003.json"
    doc = json.loads(victim.read_text())
    doc["entries"] = [e for e in doc["entries"] if e.get("layer_id") != 3]
    victim.write_text(json.dumps(doc))
    out = tmp_path / "routing.zarr"
    with pytest.raises(TraceError, match=r"token-00003\.json: entry \d+ \(step 3 of domain-2-math\): field 'layer_id': MoE layers \[1\] differ .*missing \[3\]"):
        import_trace("llamacpp_json", case["sources"], out)
    _no_leftovers(tmp_path, out)


def test_disagreeing_duplicates_are_refused(tmp_path):
    case = case_llamacpp_json(tmp_path, np.random.default_rng(5))
    victim = case["sources"][1] / "domain-1-code" / "traces" / "token-00002.json"
    doc = json.loads(victim.read_text())
    last = [e for e in doc["entries"] if e["operation_type"] == "MUL_MAT_ID"][-1]
    last["expert_ids"] = [(x + 1) % E for x in last["expert_ids"]]
    victim.write_text(json.dumps(doc))
    with pytest.raises(TraceError, match=r"token-00002\.json: entry \d+: field 'expert_ids': MUL_MAT_ID entries of layer 3 disagree"):
        import_trace("llamacpp_json", case["sources"], tmp_path / "routing.zarr")


def test_binary_truncated_and_missing_layer(tmp_path):
    rng = np.random.default_rng(6)
    path = tmp_path / "tensor_trace.bin"
    write_binary(path, routing(rng, 4, 2), [0, 1])
    raw = path.read_bytes()
    path.write_bytes(raw[:-100])
    out = tmp_path / "routing.zarr"
    with pytest.raises(TraceError, match=r"tensor_trace\.bin: .* byte offset \d+ is truncated"):
        import_trace("llamacpp_bin", path, out)
    # drop the last token's layer-1 records: the trace was cut between layers
    recs = np.frombuffer(raw, dtype=RECORD)
    keep = ~((recs["token_id"] == 4) & (recs["layer_id"] == 1))
    recs[keep].tofile(path)
    with pytest.raises(TraceError, match=r"tensor_trace\.bin: step 4 \(record at byte offset \d+\): field 'layer_id': no MUL_MAT_ID record for layer 1"):
        import_trace("llamacpp_bin", path, out)
    _no_leftovers(tmp_path, out)


def test_megatron_truncated_and_ragged(tmp_path):
    case = case_megatron(tmp_path, np.random.default_rng(7))
    src = case["sources"][0] / "router_trace_rank0.jsonl"
    lines = src.read_text().splitlines()
    src.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    out = tmp_path / "routing.zarr"
    with pytest.raises(TraceError, match=rf"line {len(lines)}: .*truncated"):
        import_trace("megatron", case["sources"][0], out, num_experts=E)
    rec = json.loads(lines[1])
    rec["top_indices"][3] = [1, 2, 3]
    src.write_text("\n".join([lines[0], json.dumps(rec)] + lines[2:]) + "\n")
    with pytest.raises(TraceError, match=r"line 2: field 'top_indices': ragged"):
        import_trace("megatron", case["sources"][0], out, num_experts=E)
    (case["sources"][0] / "logits_rank0.bin").write_bytes(b"\0" * 64)
    src.write_text("\n".join(lines) + "\n")
    with pytest.raises(TraceError, match=r"line 1: field 'logit_offset': .*past the end .*truncated"):
        import_trace("megatron", case["sources"][0], out)
    _no_leftovers(tmp_path, out)


def test_truncated_libmoe_log(tmp_path):
    case = case_libmoe(tmp_path, np.random.default_rng(8))
    log = case["sources"][0] / "mmstar.json"
    text = log.read_text()
    log.write_text(text[: int(len(text) * 0.6)])
    with pytest.raises(TraceError, match=r"mmstar\.json: logs element \d+ at character \d+: file ends inside it \(truncated\)"):
        import_trace("libmoe", case["sources"][0], tmp_path / "routing.zarr")


@pytest.mark.parametrize("fmt,suffix", [("router_logits", ".pt"), ("router_logits", ".safetensors"), ("vllm_npy", ".npy")])
def test_a_pickle_instead_of_a_tensor_file_is_never_unpickled(tmp_path, fmt, suffix):
    path = tmp_path / f"trace{suffix}"
    path.write_bytes(pickle.dumps({"router_logits": [np.zeros((2, E))]}))
    with pytest.raises(TraceError, match=r"pickle") as err:
        import_trace(fmt, path, tmp_path / "routing.zarr", input_ids=None) if fmt == "router_logits" else \
            import_trace(fmt, path, tmp_path / "routing.zarr")
    assert str(path) in str(err.value)


def test_torch_archive_with_arbitrary_objects_is_refused(tmp_path):
    path = tmp_path / "logits.pt"
    torch.save({"router_logits": [torch.zeros(2, E)], "note": Fraction(1, 3)}, path)
    with pytest.raises(TraceError, match=r"weights_only=True"):
        import_trace("router_logits", path, tmp_path / "routing.zarr", batch_shape=(1, 2))


def test_sglang_and_vllm_shape_errors(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((4, 2), np.int32))
    with pytest.raises(TraceError, match=r"a\.npy: field 'routed_experts': shape \[4, 2\]"):
        import_trace("vllm_npy", tmp_path / "a.npy", tmp_path / "c.zarr")
    payload = base64.b64encode(np.zeros(10, "<i4").tobytes()).decode()
    (tmp_path / "r.json").write_text(json.dumps({"meta_info": {"routed_experts": payload}}))
    with pytest.raises(TraceError, match=r"r\.json: meta_info: field 'routed_experts': 10 ids .*num_layers=3"):
        import_trace("sglang", tmp_path / "r.json", tmp_path / "c.zarr", num_layers=3, top_k=2)


def test_side_table_and_option_errors(tmp_path):
    case = case_olmoe(tmp_path, np.random.default_rng(9))
    src = case["sources"][0]
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['top_kk'\]"):
        import_trace("olmoe_jsonl", src, tmp_path / "c.zarr", top_kk=2)
    (tmp_path / "side.csv").write_text("sample,domain\nc4/0,web\nnope/7,news\n")
    with pytest.raises(TraceError, match=r"side table names 1 sample\(s\) not in the trace, e\.g\. \['nope/7'\]"):
        import_trace("olmoe_jsonl", src, tmp_path / "c.zarr", side_table=tmp_path / "side.csv")
    (tmp_path / "side.csv").write_text("sample,colour\nc4/0,red\n")
    with pytest.raises(TraceError, match=r"field 'colour': unknown column"):
        import_trace("olmoe_jsonl", src, tmp_path / "c.zarr", side_table=tmp_path / "side.csv")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        import_trace("olmoe_jsonl", tmp_path / "nowhere_results.jsonl", tmp_path / "c.zarr")
    with pytest.raises(ValueError, match="unknown trace format"):
        import_trace("parquet", src, tmp_path / "c.zarr")


def test_mismatched_checkpoints_and_existing_output(tmp_path):
    case = case_olmoe(tmp_path, np.random.default_rng(10))
    other = tmp_path / "other"
    other.mkdir()
    lines = case["sources"][1].read_text().splitlines()
    (other / "c4_results_9.jsonl").write_text("\n".join(lines[:2]) + "\n")
    out = tmp_path / "routing.zarr"
    with pytest.raises(TraceError, match="identical inputs"):
        import_trace("olmoe_jsonl", [case["sources"][0], other / "c4_results_9.jsonl"], out)
    _no_leftovers(tmp_path, out)
    import_trace("olmoe_jsonl", case["sources"][0], out)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        import_trace("olmoe_jsonl", case["sources"][0], out)
    s = import_trace("olmoe_jsonl", case["sources"], out, overwrite=True, checkpoint=["early", "late"])
    assert s["checkpoints"] == ["early", "late"] and cubes.completed_checkpoints(out) == ["early", "late"]


def test_aggregate_variables_are_declared_in_the_schema():
    assert {"agg_entropy_topk", "agg_entropy_all", "agg_margin", "agg_top1_counts", "agg_topk_counts",
            "agg_samples"} == set(AGGREGATE_VARIABLES)


@pytest.mark.parametrize("name", list(CASES))
def test_imported_cube_explains_itself(name, imported):
    """CF long_name/units on every variable and coordinate (issue 13); each sample keeps its key as ``sample_id``."""
    case, _, ds = imported[name]
    assert [n for n in ds.variables if not {"long_name", "units"} <= set(ds[n].attrs)] == []
    if ds.sizes["token"] == 0:
        return
    sample, ids = ds["sample"].values, ds["sample_id"].values.astype(str)
    first = np.r_[True, sample[1:] != sample[:-1]]
    assert (ids != "").all() and len(set(ids[first])) == first.sum()  # one own id per sample, none repeated
    assert all((ids[sample == s] == ids[sample == s][0]).all() for s in np.unique(sample))
    if case["side_table"]:  # the side table's keys are the ids it labelled
        assert set(case["side_table"]) <= set(ids)
