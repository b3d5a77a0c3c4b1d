"""Long routing tables (format ``table``) and the vLLM routing-logger JSONL (``vllm_routes_jsonl``).

Files are written here the way research scripts and the public vLLM logger
patches write them (FORMATS.md items 8 and 9), quirks included: BOM, CRLF,
blank lines, trailing whitespace, unknown fields, ints as floats or strings,
lists in CSV cells as "[1, 5]", "1 5" or "1;5", rows in any order, tokens that
miss a layer. The reference is the routing the rows were generated from,
arranged per sample with plain Python loops (not the importer's lexsort/grid).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage import cube as cubes
from storage.importers import TraceError, import_trace
from storage.importers import table as table_mod
from storage.importers._core import Block, Samples

E, K, LAYERS = 16, 2, [0, 1, 3]


def make_rows(rng, samples, *, missing=()):
    """Rows (dict per (sample, token, layer)) with distinct top-k ids and descending weights; ``missing``:
    (sample, token, layer) left out."""
    rows = []
    for s, n in samples.items():
        for t in range(n):
            for layer in LAYERS:
                if (s, t, layer) in missing:
                    continue
                ids = rng.permutation(E)[:K].tolist()
                w = np.sort(rng.dirichlet(np.ones(E))[:K])[::-1].round(6).tolist()
                rows.append({"sample": s, "token": t, "layer": layer, "ids": ids, "w": w})
    return rows


def reference(rows, samples, *, drop_missing=True, layers=LAYERS):
    """Per sample in first-seen order: (positions, ids (L, T, K), weights) built with dict lookups."""
    by = {(r["sample"], r["token"], r["layer"]): r for r in rows}
    order = list(dict.fromkeys(r["sample"] for r in rows))
    ids, ws, pos = [], [], []
    for s in order:
        for t in range(samples[s]):
            have = [(s, t, layer) in by for layer in layers]
            if (drop_missing and not all(have)) or not any(have):
                continue
            pos.append(t)
            ids.append([by[(s, t, layer)]["ids"] if (s, t, layer) in by else [-1] * K for layer in layers])
            ws.append([by[(s, t, layer)]["w"] if (s, t, layer) in by else [np.nan] * K for layer in layers])
    shape = (-1, len(layers), K)
    return (order, np.array(pos, dtype=np.int64), np.array(ids, dtype=np.int64).reshape(shape).transpose(1, 0, 2),
            np.array(ws, dtype=float).reshape(shape).transpose(1, 0, 2))


def _open(out):
    return cubes.open_routing(out, complete_only=False).load()


def _check(out, rows, samples, *, drop_missing=True, weights=True, keys=None):
    order, pos, ids, ws = reference(rows, samples, drop_missing=drop_missing)
    ds = _open(out)
    np.testing.assert_array_equal(ds["expert_ids"].values[0], ids)
    if weights:
        np.testing.assert_allclose(ds["expert_weights"].values[0], ws, rtol=1e-6)
    np.testing.assert_array_equal(ds["position"].values, pos)
    return ds


# --------------------------------------------------------------------------- JSONL


def test_jsonl_problem_rows_with_quirks(tmp_path):
    rng = np.random.default_rng(1)
    samples = {"p7": 4, "p2": 3}
    rows = make_rows(rng, samples)
    order = rng.permutation(len(rows))  # rows of both samples interleaved
    lines = []
    for i in order:
        r = rows[i]
        rec = {"dataset": "gsm8k", "problem_id": r["sample"], "layer": float(r["layer"]), "token_idx": str(r["token"]),
               "experts": r["ids"], "gating_probs": r["w"], "model": "qwen3-30b-a3b", "extra": {"x": 1}}
        lines.append(json.dumps(rec) + "  ")
    body = "\r\n".join(lines[:5]) + "\r\n\r\n" + "\r\n".join(lines[5:]) + "\r\n"
    (tmp_path / "r.jsonl").write_bytes(b"\xef\xbb\xbf" + body.encode())
    s = import_trace("table", tmp_path / "r.jsonl", tmp_path / "c.zarr", num_experts=E, top_k=K,
                     side_table={"gsm8k/p7": {"domain": "math"}})
    assert s["samples"] == 2 and s["layers"] == LAYERS
    written = [rows[i] for i in order]
    ds = _check(tmp_path / "c.zarr", written, samples)
    first_seen = list(dict.fromkeys(r["sample"] for r in written))
    assert set(ds["dataset"].values) == {"gsm8k"}
    assert list(ds["domain"].values) == ["math" if k == "p7" else "" for k in first_seen for _ in range(samples[k])]


def test_jsonl_truncated_last_line_is_named(tmp_path):
    rng = np.random.default_rng(2)
    rows = make_rows(rng, {"a": 2})
    text = "".join(json.dumps({"req_id": r["sample"], "layer_id": r["layer"], "pos": r["token"],
                               "topk_ids": r["ids"]}) + "\n" for r in rows)
    (tmp_path / "t.jsonl").write_text(text[:-15])
    with pytest.raises(TraceError, match=rf"t\.jsonl: line {len(rows)}: truncated last line"):
        import_trace("table", tmp_path / "t.jsonl", tmp_path / "c.zarr")
    bad = text.splitlines()
    bad[1] = bad[1][:-3]
    (tmp_path / "t.jsonl").write_text("\n".join(bad) + "\n")
    with pytest.raises(TraceError, match=r"t\.jsonl: line 2: not valid JSON"):
        import_trace("table", tmp_path / "t.jsonl", tmp_path / "c.zarr")
    assert not (tmp_path / "c.zarr").exists()


# --------------------------------------------------------------------------- CSV


@pytest.mark.parametrize("style", ["brackets", "spaces", "semicolons"])
def test_csv_list_cells(tmp_path, style):
    rng = np.random.default_rng(3)
    samples = {"doc-1": 3, "doc-2": 2}
    rows = make_rows(rng, samples)

    def cell(xs):
        if style == "brackets":
            return '"[' + ", ".join(map(str, xs)) + ']"'
        return (" " if style == "spaces" else ";").join(map(str, xs))

    lines = ["doc_id , layer_id,token_idx,selected_experts,topk_weights,note"]
    for r in rows:
        lines.append(f"{r['sample']},{r['layer']}.0,{r['token']},{cell(r['ids'])},{cell(r['w'])},x ")
    (tmp_path / "r.csv").write_bytes(b"\xef\xbb\xbf" + ("\r\n".join(lines) + "\r\n\r\n").encode())
    import_trace("table", tmp_path / "r.csv", tmp_path / "c.zarr", num_experts=E)
    _check(tmp_path / "c.zarr", rows, samples)


def test_csv_missing_layers_drop_or_fill(tmp_path):
    rng = np.random.default_rng(4)
    samples = {"r1": 4, "r2": 3}
    missing = {("r1", 2, 3), ("r2", 0, 0), ("r2", 0, 1)}
    rows = make_rows(rng, samples, missing=missing)
    lines = ["req_id,layer,pos,topk_ids,phase"]
    for r in rows:
        lines.append(f"{r['sample']},{r['layer']},{r['token']},\"{r['ids']}\",{'prefill' if r['token'] < 2 else 'decode'}")
    (tmp_path / "r.csv").write_text("\n".join(lines) + "\n")
    s = import_trace("table", tmp_path / "r.csv", tmp_path / "d.zarr", num_experts=E)
    ds = _check(tmp_path / "d.zarr", rows, samples, weights=False)
    assert s["tokens"] == 5
    assert ds.attrs["tokens_missing_layers"].startswith("2 token(s) miss a layer") and "dropped" in ds.attrs["tokens_missing_layers"]
    assert list(ds["phase"].values) == ["prefill", "prefill", "decode", "prefill", "decode"]
    import_trace("table", tmp_path / "r.csv", tmp_path / "f.zarr", num_experts=E, missing_layers="fill")
    ds = _check(tmp_path / "f.zarr", rows, samples, drop_missing=False, weights=False)
    assert "kept with ids -1" in ds.attrs["tokens_missing_layers"]
    with pytest.raises(ValueError, match="missing_layers='keep'"):
        import_trace("table", tmp_path / "r.csv", tmp_path / "x.zarr", missing_layers="keep")


def test_csv_bad_rows_are_named(tmp_path):
    head = "req_id,layer,pos,topk_ids\n"
    (tmp_path / "a.csv").write_text(head + "r,0,0,\"[1, 2]\"\nr,0,1,\"[1, 2, 3]\"\n")
    with pytest.raises(TraceError, match=r"a\.csv: line 3: field 'ids': 3 experts, the first row .* has 2 \(ragged"):
        import_trace("table", tmp_path / "a.csv", tmp_path / "c.zarr")
    (tmp_path / "a.csv").write_text(head + "r,0,0,\"[1, 2]\"\nr,0,0,\"[3, 2]\"\n")
    with pytest.raises(TraceError, match=r"a\.csv: line 3: field 'layer': sample 'r', token 0, layer 0 was already "
                                         r"given at .*a\.csv: line 2"):
        import_trace("table", tmp_path / "a.csv", tmp_path / "c.zarr")
    (tmp_path / "a.csv").write_text(head + "r,0,0,\"[1, 2]\"\nr,x,1,\"[1, 2]\"\n")
    with pytest.raises(TraceError, match=r"a\.csv: line 3: field 'layer': expected an integer, got 'x'"):
        import_trace("table", tmp_path / "a.csv", tmp_path / "c.zarr")
    (tmp_path / "a.csv").write_text(head + "r,0,0,\"[1, 2]\"\nr,0,1,\"[1")
    with pytest.raises(TraceError, match=r"a\.csv: line 3: truncated last line"):
        import_trace("table", tmp_path / "a.csv", tmp_path / "c.zarr")
    (tmp_path / "a.csv").write_text("req_id,doc_id,layer,pos,topk_ids\nr,d,0,0,\"[1, 2]\"\n")
    with pytest.raises(TraceError, match=r"columns \['req_id', 'doc_id'\] could each be the sample"):
        import_trace("table", tmp_path / "a.csv", tmp_path / "c.zarr")
    import_trace("table", tmp_path / "a.csv", tmp_path / "c.zarr", columns={"sample": "doc_id"})
    assert _open(tmp_path / "c.zarr").sizes["token"] == 1
    (tmp_path / "b.csv").write_text("who,layer,pos,topk_ids\nr,0,0,\"[1, 2]\"\n")
    with pytest.raises(TraceError, match=r"b\.csv: line 1: no column for \['sample'\]"):
        import_trace("table", tmp_path / "b.csv", tmp_path / "d.zarr")
    assert not (tmp_path / "d.zarr").exists()


# --------------------------------------------------------------------------- Parquet


def test_parquet_list_columns(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rng = np.random.default_rng(5)
    samples = {"q1": 3, "q2": 4}
    rows = make_rows(rng, samples, missing={("q2", 3, 1)})
    table = pa.table({
        "doc_id": [r["sample"] for r in rows],
        "layer": pa.array([r["layer"] for r in rows], pa.int16()),
        "token_idx": [r["token"] for r in rows],
        "topk_ids": pa.array([r["ids"] for r in rows], pa.list_(pa.int32())),
        "probs": pa.array([r["w"] for r in rows], pa.list_(pa.float32())),
        "token_id": [1000 + r["token"] for r in rows],
    })
    pq.write_table(table, tmp_path / "r.parquet")
    import_trace("table", tmp_path / "r.parquet", tmp_path / "c.zarr", num_experts=E)
    order, pos, ids, ws = reference(rows, samples)
    ds = _open(tmp_path / "c.zarr")
    np.testing.assert_array_equal(ds["expert_ids"].values[0], ids)
    np.testing.assert_allclose(ds["expert_weights"].values[0], ws, rtol=1e-6)
    np.testing.assert_array_equal(ds["token_id"].values, 1000 + pos)
    assert "1 token(s) miss a layer" in ds.attrs["tokens_missing_layers"]
    # kept with fill: ids -1 and weights NaN at the missing layer only
    import_trace("table", tmp_path / "r.parquet", tmp_path / "f.zarr", num_experts=E, missing_layers="fill")
    order, pos, ids, ws = reference(rows, samples, drop_missing=False)
    ds = _open(tmp_path / "f.zarr")
    np.testing.assert_array_equal(ds["expert_ids"].values[0], ids)
    np.testing.assert_allclose(ds["expert_weights"].values[0], ws, rtol=1e-6)
    assert np.isnan(ds["expert_weights"].values[0]).sum() == K


# --------------------------------------------------------------------------- the grid, property-based


def _collect(trace):
    """Samples and blocks of a trace, without writing a cube: key -> (positions, ids (L, T, K))."""
    out, cur = {}, None
    for ev in trace.events:
        if isinstance(ev, Samples):
            m = ev.metas[0]
            cur = m.key
            out[cur] = [m.position.tolist(), {}]
        else:
            assert isinstance(ev, Block)
            ids = ev.ids.copy()
            if ev.missing is not None:
                ids[ev.missing] = -1
            out[cur][1][ev.layer] = ids.tolist()
    return out


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_row_order_and_missing_pattern_gives_the_reference(tmp_path, data):
    n_samples = data.draw(st.integers(1, 3))
    samples = {f"s{i}": data.draw(st.integers(1, 4)) for i in range(n_samples)}
    cells = [(s, t, layer) for s, n in samples.items() for t in range(n) for layer in LAYERS]
    missing = set(data.draw(st.lists(st.sampled_from(cells), max_size=4, unique=True)))
    seed = data.draw(st.integers(0, 2**16))
    rows = make_rows(np.random.default_rng(seed), samples, missing=missing)
    if not rows:
        return
    perm = data.draw(st.permutations(range(len(rows))))
    rows = [rows[i] for i in perm]
    fill = data.draw(st.booleans())
    path = tmp_path / f"h{seed}.jsonl"
    path.write_text("".join(json.dumps({"sample_id": r["sample"], "layer": r["layer"], "position": r["token"],
                                        "expert_ids": r["ids"]}) + "\n" for r in rows))
    present_layers = sorted({r["layer"] for r in rows})  # a layer no row has is not a layer of the table
    order, pos, ids, _ = reference(rows, samples, drop_missing=not fill, layers=present_layers)
    if len(pos) == 0:
        with pytest.raises(TraceError, match="no token has routing at every layer"):
            _collect(table_mod.read(path, missing_layers="fill" if fill else "drop"))
        return
    got = _collect(table_mod.read(path, missing_layers="fill" if fill else "drop"))
    got_pos = [p for k in got for p in got[k][0]]
    assert got_pos == pos.tolist()
    for li, lay in enumerate(present_layers):
        assert [x for k in got for x in got[k][1][lay]] == ids[li].tolist()


# --------------------------------------------------------------------------- vLLM routing logger


def write_routes(path, rng, reqs, *, meta=True, weights=True, quirks=False):
    """Interleaved route lines of requests ``reqs`` {req_id: n_tokens}, as a logger in the engine loop writes them."""
    truth = {r: [[(rng.permutation(E)[:K].tolist(), np.sort(rng.dirichlet(np.ones(E))[:K])[::-1].round(6).tolist())
                  for _ in LAYERS] for _ in range(n)] for r, n in reqs.items()}
    lines = []
    if meta:
        lines.append({"type": "meta", "model_id": "Qwen/Qwen3-30B-A3B", "vllm_version": "0.11.0", "top_k": K,
                      "layers_logged": LAYERS, "seed": 0, "device": "cuda:0"})
    step = 0
    while any(step < n for n in reqs.values()):
        for r, n in reqs.items():
            if step >= n:
                continue
            for li, layer in enumerate(LAYERS):
                ids, w = truth[r][step][li]
                rec = {"type": "route", "req_id": r, "token_idx": step, "layer": layer, "topk_ids": ids,
                       "ts": 1.5 * step, "is_prefill": step < 2}
                if weights:
                    rec["topk_weights"] = w
                if quirks:
                    rec["token_idx"] = float(step)
                    rec["topk_ids"] = [str(x) for x in ids]
                lines.append(rec)
        step += 1
    text = "\n".join(json.dumps(x) + (" " if quirks else "") for x in lines) + "\n"
    if quirks:
        text = "\ufeff" + text.replace("\n", "\r\n", 3) + "\n"
    path.write_text(text, encoding="utf-8")
    return truth


def test_vllm_routes_requests_are_samples(tmp_path):
    rng = np.random.default_rng(6)
    reqs = {"cmpl-b": 3, "cmpl-a": 5, 17: 2}
    truth = write_routes(tmp_path / "routes.jsonl", rng, reqs, quirks=True)
    s = import_trace("vllm_routes_jsonl", tmp_path / "routes.jsonl", tmp_path / "c.zarr", num_experts=E,
                     side_table={"cmpl-a": {"domain": "chat"}, "17": {"domain": "code"}})
    assert s["samples"] == 3 and s["top_k"] == K
    ds = _open(tmp_path / "c.zarr")
    ids = np.array([[truth[r][t][li][0] for r in reqs for t in range(reqs[r])] for li in range(len(LAYERS))])
    ws = np.array([[truth[r][t][li][1] for r in reqs for t in range(reqs[r])] for li in range(len(LAYERS))])
    np.testing.assert_array_equal(ds["expert_ids"].values[0], ids)
    np.testing.assert_allclose(ds["expert_weights"].values[0], ws, rtol=1e-6)
    assert list(ds["position"].values) == [t for r in reqs for t in range(reqs[r])]
    assert list(ds["domain"].values) == [""] * 3 + ["chat"] * 5 + ["code"] * 2
    assert list(ds["phase"].values) == ["prefill" if t < 2 else "decode" for r in reqs for t in range(reqs[r])]
    assert ds.attrs["log_model_id"] == "Qwen/Qwen3-30B-A3B"


def test_vllm_routes_batch_under_one_req_id_and_errors(tmp_path):
    rng = np.random.default_rng(7)
    write_routes(tmp_path / "a.jsonl", rng, {"batch": 2}, meta=False)
    text = (tmp_path / "a.jsonl").read_text()
    (tmp_path / "b.jsonl").write_text(text + text)  # the same req_id logged for two requests of a batch
    import_trace("vllm_routes_jsonl", tmp_path / "b.jsonl", tmp_path / "c.zarr", top_k=K)
    ds = _open(tmp_path / "c.zarr")
    assert ds.sizes["token"] == 4 and "repeated_request_ids" in ds.attrs
    assert ds.attrs["inputs_hash"]
    with pytest.raises(TraceError, match=r"a\.jsonl: line 1: field 'topk_ids': 2 experts, option top_k says top_k=3"):
        import_trace("vllm_routes_jsonl", tmp_path / "a.jsonl", tmp_path / "d.zarr", top_k=3)
    lines = text.splitlines()
    (tmp_path / "e.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    with pytest.raises(TraceError, match=rf"e\.jsonl: line {len(lines)}: truncated last line"):
        import_trace("vllm_routes_jsonl", tmp_path / "e.jsonl", tmp_path / "d.zarr")
    rec = json.loads(lines[0])
    del rec["layer"]
    (tmp_path / "f.jsonl").write_text(json.dumps(rec) + "\n")
    with pytest.raises(TraceError, match=r"f\.jsonl: line 1: field 'layer': missing"):
        import_trace("vllm_routes_jsonl", tmp_path / "f.jsonl", tmp_path / "d.zarr")
    assert not (tmp_path / "d.zarr").exists()


def test_vllm_routes_folder_of_logs_and_concatenated_logs(tmp_path):
    rng = np.random.default_rng(8)
    (tmp_path / "logs").mkdir()
    t1 = write_routes(tmp_path / "logs" / "rank0.jsonl", rng, {"a": 2, "b": 3})
    t2 = write_routes(tmp_path / "logs" / "rank1.jsonl", rng, {"c": 4})
    s = import_trace("vllm_routes_jsonl", tmp_path / "logs", tmp_path / "c.zarr", num_experts=E)
    assert s["samples"] == 3 and s["tokens"] == 9
    ids = np.array([[t[r][i][li][0] for t in (t1, t2) for r in t for i in range(len(t[r]))] for li in range(len(LAYERS))])
    np.testing.assert_array_equal(_open(tmp_path / "c.zarr")["expert_ids"].values[0], ids)
    both = (tmp_path / "logs" / "rank0.jsonl").read_text() + (tmp_path / "logs" / "rank1.jsonl").read_text()
    (tmp_path / "cat.jsonl").write_text(both)
    n0 = len((tmp_path / "logs" / "rank0.jsonl").read_text().splitlines())
    with pytest.raises(TraceError, match=rf"cat\.jsonl: line {n0 + 1}: field 'type': a meta line after route lines"):
        import_trace("vllm_routes_jsonl", tmp_path / "cat.jsonl", tmp_path / "d.zarr")


def _same_columns(a, b):
    for name in ("sample", "token", "layer", "ids", "phase", "token_id", "token_text"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    if a.weights is None:
        assert b.weights is None
    else:
        np.testing.assert_allclose(a.weights, b.weights, rtol=1e-6)
    assert a.labels == b.labels
    assert [a.where(i) for i in range(a.n)] == [b.where(i) for i in range(b.n)]


@pytest.mark.parametrize("style", ["brackets", "spaces"])
def test_column_wise_csv_reader_agrees_with_the_row_reader(tmp_path, style):
    """Regular files are read column by column; the row-by-row reader (which names bad lines) is the reference."""
    rng = np.random.default_rng(9)
    rows = make_rows(rng, {"a": 3, "b": 2})
    lines = ["dataset ,doc_id,layer,pos,topk_ids,probs,phase,token_id"]
    for r in rows:
        cell = (lambda xs: f'"{xs}"') if style == "brackets" else (lambda xs: " ".join(map(str, xs)))
        lines.append(f"ds,{r['sample']},{r['layer']},{r['token']}.0,{cell(r['ids'])},{cell(r['w'])},"
                     f"{'PROMPT' if r['token'] == 0 else 'decode'},{100 + r['token']}  ")
    body = "\r\n".join(lines[:4]) + "\r\n \r\n" + "\r\n".join(lines[4:]) + "\r\n\r\n"
    (tmp_path / "t.csv").write_bytes(b"\xef\xbb\xbf" + body.encode())
    fast = table_mod._fast_csv(tmp_path / "t.csv", None, None, ",")
    assert fast is not None
    slow = table_mod.Rows()
    table_mod._read_csv(tmp_path / "t.csv", slow, None, None, ",")
    _same_columns(fast, table_mod.rows_to_columns(slow, "topk_ids"))
    assert fast.where(3) == f"{tmp_path / 't.csv'}: line 6"  # a blank line before it
    # an irregular cell sends the file to the row reader, which names the line
    (tmp_path / "t.csv").write_text("\n".join(lines[:3] + [lines[3].replace("ds,", "ds,,", 1)]) + "\n")
    assert table_mod._fast_csv(tmp_path / "t.csv", None, None, ",") is None


def test_column_wise_parquet_reader_agrees_with_the_row_reader(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rng = np.random.default_rng(10)
    rows = make_rows(rng, {"x": 2, "y": 3})
    pq.write_table(pa.table({
        "req_id": [r["sample"] for r in rows], "layer_id": [r["layer"] for r in rows],
        "token_idx": [float(r["token"]) for r in rows], "experts": [r["ids"] for r in rows],
        "gating_probs": [r["w"] for r in rows], "domain": ["d"] * len(rows),
    }), tmp_path / "t.parquet")
    fast = table_mod._fast_parquet(tmp_path / "t.parquet", None, K)
    assert fast is not None
    slow = table_mod.Rows()
    table_mod._read_parquet(tmp_path / "t.parquet", slow, None, K)
    _same_columns(fast, table_mod.rows_to_columns(slow, "experts"))
