"""Input validation (issue 10 and item 7): every bad input stops with one line naming the file and the key,
line or record, or gives the correct result.

Unit-level and fast: experiment files, analysis parameters, datasets, checkpoint headers and configs,
.npy/.npz sizes, the JSONL fast paths and CSV tables, each checked where a user meets it first.
"""

from __future__ import annotations

import dataclasses
import json
import struct
import zipfile
from pathlib import Path
from typing import Annotated

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import analyses
from analyses import registry
from analyses.registry import MAX_BOOT, ParamError, Range, validate_params
from analyses.report import csv_safe, escape_cell
from experiments.spec import SpecError, load_experiment
from spec_helpers import MINIMAL

# ------------------------------------------------------------------ experiment files

BASE = MINIMAL + """{dataset}
[capture]
device = "{device}"
[analyses]
run = {run}
{params}
[report]
formats = {formats}
[dask]
{dask}
"""


def spec(tmp_path, *, dataset="", device="cpu", run='["usage", "confidence"]', params="", formats='["png"]',
         dask="n_workers = 1") -> Path:
    p = tmp_path / "exp.toml"
    p.write_text(BASE.format(dataset=dataset, device=device, run=run, params=params, formats=formats, dask=dask))
    return p


def refused(path: Path, *phrases: str) -> str:
    with pytest.raises(SpecError) as info:
        load_experiment(path)
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert msg.startswith(f"{path}: "), msg
    for phrase in phrases:
        assert phrase in msg, f"{phrase!r} not in {msg!r}"
    return msg


def test_good_spec_with_params_loads(tmp_path):
    p = spec(tmp_path, params="[analyses.params.confidence]\nn_boot = 0\nci = 0.9\nview = \"canonical\"\n"
                              "[analyses.params.usage]\nviews = [\"all\"]\n",
             dask='n_workers = 2\nhost = "localhost"\ndashboard_port = 9000\nmemory_limit = "2GB"')
    exp = load_experiment(p)
    assert exp.analyses.params["confidence"] == {"n_boot": 0, "ci": 0.9, "view": "canonical"}
    assert exp.dask.allow_remote is False


@pytest.mark.parametrize("params, phrase", [
    ('n_boot = "many"', "expected an integer in [0, 100000], got 'many'"),
    ("n_boot = -5", "got -5"),
    ("n_boot = 1e7", "got 10000000.0"),
    ("n_boot = 10000000", "[0, 100000], got 10000000"),
    ("ci = 5.0", "expected a number in (0, 1), got 5.0"),
    ("ci = 0", "got 0"),
    ('view = "tokens"', "one of 'all', 'canonical', 'last_canonical'"),
    ("hist_bins = 0", "[1, 10000], got 0"),
    ("seed = true", "got True"),
    ("bins = 3", "unknown key"),
])
def test_analysis_params_are_checked_by_type_and_range(tmp_path, params, phrase):
    # the message names the key: analyses.params.confidence.<the parameter set>
    key = "analyses.params.confidence." + params.split(" = ")[0]
    refused(spec(tmp_path, params=f"[analyses.params.confidence]\n{params}\n"), key, phrase)


def test_list_params_are_checked(tmp_path):
    refused(spec(tmp_path, params='[analyses.params.usage]\nviews = []\n'), "analyses.params.usage.views",
            "distinct names")
    refused(spec(tmp_path, params='[analyses.params.usage]\nviews = ["all", "all"]\n'), "analyses.params.usage.views")
    refused(spec(tmp_path, params='[analyses.params.usage]\nviews = "all"\n'), "a list of strings")


@pytest.mark.parametrize("kw, key, phrase", [
    (dict(dataset="max_samples = -1"), "'max_samples'", "must be >= 0"),
    (dict(run="[]"), "'analyses.run' is empty", "usage"),
    (dict(run='["usage", "usage"]'), "'analyses.run'", "twice"),
    (dict(formats="[]"), "'report.formats' is empty", "png"),
    (dict(device="tpu:9"), "'capture.device'", "'tpu:9'"),
    (dict(device="cuda:x"), "'capture.device'", "'cuda:N'"),
    (dict(dask="dashboard_port = -5"), "'dask.dashboard_port'", "[0, 65535] (0 = any free port), got -5"),
    (dict(dask="dashboard_port = 70000"), "'dask.dashboard_port'", "got 70000"),
    (dict(dask="n_workers = 10000"), "'dask.n_workers'", "[1, 256], got 10000"),
    (dict(dask="n_workers = 0"), "'dask.n_workers'", "got 0"),
    (dict(dask="threads_per_worker = 5000"), "'dask.threads_per_worker'", "got 5000"),
    (dict(dask='memory_limit = "lots"'), "'dask.memory_limit'", "'lots'"),
    (dict(dask='host = "0.0.0.0"'), "'dask.host' = '0.0.0.0'", "allow_remote = true"),
    (dict(dask='host = "192.168.1.5"'), "'dask.host'", "beyond this machine"),
])
def test_spec_values_are_checked(tmp_path, kw, key, phrase, monkeypatch):
    monkeypatch.delenv("MOE_ATLAS_ALLOW_REMOTE_DASK", raising=False)
    refused(spec(tmp_path, **kw), key, phrase)


def test_remote_host_only_on_purpose(tmp_path, monkeypatch):
    monkeypatch.delenv("MOE_ATLAS_ALLOW_REMOTE_DASK", raising=False)
    assert load_experiment(spec(tmp_path, dask='host = "0.0.0.0"\nallow_remote = true')).dask.allow_remote
    # the cluster's own opt-in (deploy.cluster) is honoured too; it warns when the cluster starts
    monkeypatch.setenv("MOE_ATLAS_ALLOW_REMOTE_DASK", "1")
    assert load_experiment(spec(tmp_path, dask='host = "10.0.0.3"')).dask.host == "10.0.0.3"
    monkeypatch.delenv("MOE_ATLAS_ALLOW_REMOTE_DASK")
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        load_experiment(spec(tmp_path, dask=f'host = "{host}"'))  # loopback: no flag needed
    # with an external scheduler the LocalCluster's host is not used
    load_experiment(spec(tmp_path, dask='host = "0.0.0.0"\nscheduler = "tls://10.0.0.1:8786"'))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU-only torch")
def test_cuda_on_cpu_only_torch_is_refused_early(tmp_path):
    refused(spec(tmp_path, device="cuda"), "'capture.device'", "'cuda' requested but this torch", "has no CUDA")
    # a remote cluster's workers may have GPUs: only the name is checked here, the load checks the rest
    load_experiment(spec(tmp_path, device="cuda", dask='scheduler = "tcp://10.0.0.1:8786"'))
    from capture.load import load_model

    with pytest.raises(ValueError, match=r"^/nonexistent: capture\.device: 'cuda' requested but this torch .*no CUDA"):
        load_model("/nonexistent", device="cuda")


def test_top_k_option_larger_than_num_experts(tmp_path):
    p = tmp_path / "imp.toml"
    p.write_text('name = "x"\noutput_dir = "o"\n[model]\nsource = "import"\n[trace]\nformat = "router_logits"\n'
                 'paths = ["t.pt"]\nnum_experts = 8\n[trace.options]\ntop_k = 9\nsemantics = "softmax_topk"\n'
                 'renormalize = true\n')
    refused(p, "'trace.options.top_k' = 9", "'trace.num_experts' = 8")


# ------------------------------------------------------------------ analysis parameters (registry)


@settings(max_examples=60, deadline=None)
@given(st.one_of(st.integers(-10**9, 10**9), st.floats(allow_nan=True), st.text(max_size=3), st.booleans()))
def test_n_boot_accepted_exactly_in_range(value):
    """Property: n_boot passes iff it is a (non-bool) integer in [0, MAX_BOOT]; the message names the key."""
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_BOOT
    try:
        out = validate_params("change", {"n_boot": value})
    except ParamError as exc:
        assert not ok and str(exc).startswith("analyses.params.change.n_boot: expected an integer")
    else:
        assert ok and out == {"n_boot": value}


def test_float_params_widen_ints_and_refuse_nan():
    assert validate_params("balance", {"dead_fraction": 0, "cold_fraction": 1}) == {"dead_fraction": 0.0,
                                                                                  "cold_fraction": 1.0}
    with pytest.raises(ParamError, match="cold_fraction: expected a number in"):
        validate_params("balance", {"cold_fraction": float("nan")})


def test_new_analysis_gets_validation_from_its_signature():
    """A newly registered analysis declares a constraint in its signature; nothing else is needed."""
    base = analyses.REGISTRY["change"]

    def probe(routing, *, width: Annotated[int, Range(2, 9)] = 3, label: str = "a", n_boot: int = 10):
        raise AssertionError("never reached with bad parameters")

    registry.register(dataclasses.replace(base, name="probe_params", func=probe))  # defaults: the signature's
    try:
        specs = registry.param_specs("probe_params")
        assert (specs["width"].type, specs["width"].constraint) == (int, Range(2, 9))
        assert specs["n_boot"].constraint == registry.PARAM_RULES["n_boot"]  # shared meaning, for free
        with pytest.raises(ParamError, match=r"^analyses\.params\.probe_params\.width: expected an integer in "
                                             r"\[2, 9\], got 10$"):
            validate_params("probe_params", {"width": 10})
        with pytest.raises(ParamError, match=r"probe_params\.label: expected a string, got 5"):
            validate_params("probe_params", {"label": 5})
        with pytest.raises(ParamError, match=r"n_boot: expected an integer in \[0, 100000\], got -1"):
            analyses.run("probe_params", _tiny_cube(), n_boot=-1)  # run() checks before calling the function
    finally:
        del analyses.REGISTRY["probe_params"]


def _tiny_cube():
    from storage.schema import mock_cube

    return mock_cube(n_checkpoints=2, n_layers=1, num_experts=4, top_k=2, n_samples=3, seq_len=4, seed=0)


def test_run_refuses_bad_params_before_computing():
    with pytest.raises(ParamError, match=r"analyses\.params\.confidence\.ci: expected a number in \(0, 1\)"):
        analyses.run("confidence", _tiny_cube(), ci=5.0)


# ------------------------------------------------------------------ datasets


def _jsonl(tmp_path, raw: bytes) -> Path:
    p = tmp_path / "eval.jsonl"
    p.write_bytes(raw)
    return p


def test_dataset_not_utf8_names_line_and_byte(tmp_path):
    from capture.tokenize import read_jsonl

    p = _jsonl(tmp_path, b'{"text": "ok", "domain": "d"}\n{"text": "caf\xe9", "domain": "d"}\n')
    with pytest.raises(ValueError, match=rf"^{p}:2: not valid UTF-8 at byte 13 "):
        read_jsonl(p)


@pytest.mark.parametrize("field", ["text", "domain", "pair"])
def test_dataset_lone_surrogate_names_line_and_field(tmp_path, field):
    from capture.tokenize import read_jsonl

    row = {"text": "ok", "domain": "d", field: "a\\ud800b"}
    p = _jsonl(tmp_path, b'{"text": "fine", "domain": "d"}\n' + json.dumps(row).replace("\\\\", "\\").encode())
    with pytest.raises(ValueError, match=rf"^{p}:2: field '{field}' holds a lone surrogate '\\ud800' at character 1"):
        read_jsonl(p)


def test_dataset_deep_nesting_names_line(tmp_path):
    from capture.tokenize import read_jsonl

    deep = '{"text": "x", "domain": "d", "meta": ' + "[" * 200_000 + "]" * 200_000 + "}"
    p = _jsonl(tmp_path, b'{"text": "ok", "domain": "d"}\n\n' + deep.encode() + b"\n")
    with pytest.raises(ValueError, match=rf"^{p}:3: invalid JSON \(nested too deeply to parse\)$"):
        read_jsonl(p)


def test_pair_tokens_bad_bytes_and_nesting(tmp_path):
    from capture.pairs import read_pair_tokens

    p = tmp_path / "pairs.json"
    p.write_bytes(b'[{"id": "\xff"}]')
    with pytest.raises(ValueError, match=rf"^{p}: not valid UTF-8 at byte 9"):
        read_pair_tokens(p, condition_a="a", condition_b="b", dataset="d")
    p.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(ValueError, match=rf"^{p}: invalid JSON \(nested too deeply"):
        read_pair_tokens(p, condition_a="a", condition_b="b", dataset="d")
    with pytest.raises(ValueError, match=rf"^{p}: max_samples must be an integer >= 0 \(0 = all\), got -2$"):
        read_pair_tokens(p, condition_a="a", condition_b="b", dataset="d", max_samples=-2)


def test_negative_max_samples_is_refused(tmp_path):
    from capture.tokenize import tokenize_jsonl

    p = _jsonl(tmp_path, b'{"text": "a", "domain": "d"}\n{"text": "b", "domain": "d"}\n')
    with pytest.raises(ValueError, match=rf"^{p}: max_samples must be an integer >= 0 \(0 = all\), got -1$"):
        tokenize_jsonl(p, tmp_path / "no-tokenizer", dataset="d", max_length=8, max_samples=-1)


# ------------------------------------------------------------------ checkpoints: safetensors header, config


def _safetensors(path: Path, header: bytes) -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    return path


def _config_dir(tmp_path, **kw) -> Path:
    from transformers import MixtralConfig

    d = tmp_path / "ckpt"
    MixtralConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, vocab_size=64, **kw).save_pretrained(d)
    return d


@pytest.mark.parametrize("header, phrase", [
    (b"[" * 200_000 + b"]" * 200_000, "JSON nested too deeply"),
    (b'{"w": ' + b"[" * 500 + b"]" * 500 + b"}", "entry 'w': expected"),
    (b'{"w": {"dtype": "F32", "shape": [[[2]]], "data_offsets": [0, 8]}}', "entry 'w': expected"),
    (b'{"__metadata__": {"a": {"b": {}}}}', "'__metadata__' must map strings to strings"),
    (b"[1, 2]", "expected a JSON object, got list"),
])
def test_safetensors_header_is_checked_before_parsing_tensors(tmp_path, header, phrase):
    from capture.load import check_checkpoint_dir

    d = _config_dir(tmp_path)
    f = _safetensors(d / "model.safetensors", header)
    with pytest.raises(ValueError) as info:
        check_checkpoint_dir(d, need_weights=True)
    msg = str(info.value)
    assert msg.startswith(f"{f}: corrupt safetensors header") and phrase in msg and "\n" not in msg, msg


def test_config_top_k_larger_than_experts(tmp_path):
    from capture.load import describe_checkpoint

    d = _config_dir(tmp_path, num_local_experts=4, num_experts_per_tok=9)
    with pytest.raises(ValueError, match=rf"^{d / 'config.json'}: num_experts_per_tok=9 is larger than "
                                         rf"num_local_experts=4"):
        describe_checkpoint(d)
    assert describe_checkpoint(_config_dir(tmp_path / "ok", num_local_experts=4, num_experts_per_tok=4)).top_k == 4


@pytest.mark.parametrize("device, phrase", [("tpu:9", "not a device torch knows"), ("meta", "not a supported device"),
                                            ("cpu", "")])
def test_device_problem(device, phrase):
    from capture.load import device_problem

    assert (phrase in device_problem(device)) and (bool(device_problem(device)) == bool(phrase))


# ------------------------------------------------------------------ .npy / .npz sizes


def _npz_member(zf: zipfile.ZipFile, name: str, shape, dtype, data_chunks):
    """Write member ``name`` with an .npy header for ``shape``/``dtype`` and the given raw data, streamed."""
    with zf.open(name, "w", force_zip64=True) as f:
        np.lib.format.write_array_header_1_0(f, {"descr": np.dtype(dtype).str, "fortran_order": False,
                                                  "shape": tuple(shape)})
        for chunk in data_chunks:
            f.write(chunk)


def test_npz_bomb_refused_before_allocating(tmp_path):
    from storage.importers import serving
    from storage.importers._core import TraceError

    size = 80 << 20  # 80 MiB of int64 zeros deflate to ~80 kB: a scaled-down 3 MB -> 3.2 GB bomb
    p = tmp_path / "routes.npz"
    with zipfile.ZipFile(p, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        _npz_member(zf, "routed_experts.npy", (size // 64, 8), "<i8", (bytes(1 << 20) for _ in range(80)))
    assert p.stat().st_size < 1 << 20
    import tracemalloc

    tracemalloc.start()  # numpy reports its buffers to tracemalloc: np.load would show the 80 MiB here
    try:
        with pytest.raises(TraceError) as info:
            serving._load_npy(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak} bytes allocated while refusing the archive"
    msg = str(info.value)
    assert msg.startswith(f"{p}: member 'routed_experts.npy': ") and "decompression bomb" in msg, msg


def test_npz_forged_header_and_limit(tmp_path, monkeypatch):
    from storage.importers import serving
    from storage.importers._core import TraceError

    p = tmp_path / "forged.npz"
    with zipfile.ZipFile(p, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        _npz_member(zf, "routed_experts.npy", (400_000_000,), "<i8", [bytes(64)])  # declares 3.2 GB, holds 64 B
    with pytest.raises(TraceError, match=rf"^{p}: member 'routed_experts.npy': header declares 3\.2 GB .* but the "
                                         rf"member holds 64 bytes \(truncated or forged\)$"):
        serving._load_npy(p)
    good = tmp_path / "good.npz"
    ids = np.arange(24, dtype=np.int32).reshape(6, 4) % 8
    np.savez_compressed(good, routed_experts=ids)
    np.testing.assert_array_equal(serving._load_npy(good), ids)
    monkeypatch.setenv("MOE_ATLAS_MAX_NPZ_BYTES", "50")
    with pytest.raises(TraceError, match=rf"^{good}: member 'routed_experts.npy': the archive's arrays declare 96 "
                                         rf"bytes so far, over the limit of 50 bytes"):
        serving._load_npy(good)


def test_npy_forged_header(tmp_path):
    from storage.importers._core import TraceError
    from storage.importers.logits import _load_ids

    p = tmp_path / "ids.npy"
    with open(p, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<i8", "fortran_order": False, "shape": (400_000_000,)})
        f.write(bytes(80))
    with pytest.raises(TraceError, match=rf"^{p}: header declares 3\.2 GB .* but the file holds 80 bytes"):
        _load_ids(p)
    np.save(p, np.arange(6).reshape(2, 3))
    np.testing.assert_array_equal(_load_ids(p), np.arange(6).reshape(2, 3))


# ------------------------------------------------------------------ JSONL fast paths


def _olmoe_line(ids, exp) -> str:
    return json.dumps({"input_ids": ids, "predicted_token_ids": ids, "exp_ids": exp})


def test_olmoe_ragged_exp_ids_refused(tmp_path):
    """Totals add up (n*k*L = 8 numbers, 1+n+n*k brackets) but the rows are ragged: refused, naming the line."""
    from storage.importers.olmoe import parse_line
    from storage.importers._core import TraceError

    ragged = _olmoe_line([5, 6], [[[1, 2, 3], [4]], [[5, 6], [7, 0]]])
    with pytest.raises(TraceError, match=r"^f: line 2: field 'exp_ids': ragged"):
        parse_line(ragged, "f: line 2")
    ids, exp = parse_line(_olmoe_line([5, 6], [[[1, 2], [3, 4]], [[5, 6], [7, 0]]]), "f: line 1")
    np.testing.assert_array_equal(exp, [[[1, 2], [3, 4]], [[5, 6], [7, 0]]])


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_olmoe_fast_path_equals_json(data):
    """Property: for any nested list (regular or ragged) the fast path gives json.loads' array or an error."""
    from storage.importers._core import TraceError
    from storage.importers.olmoe import parse_line

    n = data.draw(st.integers(1, 4), label="n")
    k = data.draw(st.integers(1, 3), label="k")
    L = data.draw(st.integers(1, 3), label="L")
    exp = [[[data.draw(st.integers(-1, 63)) for _ in range(L)] for _ in range(k)] for _ in range(n)]
    if data.draw(st.booleans(), label="ragged"):
        # move one id from one innermost row to another: totals unchanged
        a, b = data.draw(st.tuples(st.integers(0, n * k - 1), st.integers(0, n * k - 1)))
        ra, rb = exp[a // k][a % k], exp[b // k][b % k]
        if ra and a != b:
            rb.append(ra.pop())
    ids = list(range(n))
    line = _olmoe_line(ids, exp)
    if data.draw(st.booleans(), label="spaces"):
        line = line.replace(", ", " ,\t")
    regular = all(len(row) == L for tok in exp for row in tok)
    try:
        got_ids, got = parse_line(line, "f: line 1")
    except TraceError:
        assert not regular
    else:
        assert regular
        np.testing.assert_array_equal(got, np.asarray(exp))
        np.testing.assert_array_equal(got_ids, ids)


def test_megatron_ragged_top_indices_refused():
    from storage.importers._core import TraceError
    from storage.importers.megatron import _top_indices

    line = json.dumps({"top_indices": [[1, 2, 3], [4]]})
    with pytest.raises(TraceError, match=r"^f: line 3: field 'top_indices'"):
        _top_indices(line, 2, 2, "f: line 3")
    np.testing.assert_array_equal(_top_indices(json.dumps({"top_indices": [[1, 2], [3, 4]]}), 2, 2, "f"),
                                  [[1, 2], [3, 4]])


# ------------------------------------------------------------------ CSV tables


@pytest.mark.parametrize("cell, expected", [
    ("=HYPERLINK(\"http://x\")", "'=HYPERLINK(\"http://x\")"), ("+1+cmd|' /C calc'!A0", "'+1+cmd|' /C calc'!A0"),
    ("-2+3", "'-2+3"), ("@SUM(A1)", "'@SUM(A1)"), ("\tx", "'\tx"), ("\rx", "'\rx"),
    ("-3", "-3"), ("+1e5", "+1e5"), ("code", "code"), ("", ""), (-3, -3), (-0.5, -0.5),
])
def test_escape_cell(cell, expected):
    assert escape_cell(cell) == expected


def test_csv_safe_roundtrip(tmp_path):
    df = pd.DataFrame({"domain": pd.Categorical(["=cmd", "code"]), "token_text": ["@x", "-"],
                       "value": [-1.5, 2.0], "count": [-3, 4], "flag": [True, False]})
    p = tmp_path / "t.csv"
    csv_safe(df).to_csv(p, index=False)
    back = pd.read_csv(p)
    assert back["domain"].tolist() == ["'=cmd", "code"] and back["token_text"].tolist() == ["'@x", "'-"]
    assert back["value"].tolist() == [-1.5, 2.0] and back["count"].tolist() == [-3, 4]
    assert df["domain"].tolist() == ["=cmd", "code"]  # the caller's table is not modified


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from("=+-@\t\r'aZ1. e"), max_size=6))
def test_escaped_cells_never_start_a_formula(text):
    """Property: an escaped string starts with no formula character unless it is a plain number, and
    removing the added quote gives the original back."""
    out = escape_cell(text)
    if out != text:
        assert out == "'" + text
    else:
        try:
            float(text)
            is_number = text.strip() == text and text not in ("", "+", "-") and "_" not in text
        except ValueError:
            is_number = False
        assert not text.startswith(("=", "+", "-", "@", "\t", "\r")) or is_number, text
