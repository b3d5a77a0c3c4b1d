"""Smoke tests of the benchmarks in bench/: each script's --tiny mode prints the JSON it promises.

No timing is checked against a threshold (machines are noisy); the tests check
that the figures are there, are consistent with each other, and that the
synthetic data and traces the benchmarks measure are what they claim to be.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def run_bench(module: str, *args: str, timeout: int = 300) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)  # stdout must be exactly one JSON document


def check_machine(doc):
    for key in ("machine_start", "machine_end"):
        m = doc[key]
        assert m["cpus"] >= 1
        assert len(m["loadavg"]) == 3 and all(x >= 0 for x in m["loadavg"])


def check_summary(s):
    assert s["median_s"] > 0 and s["min_s"] <= s["median_s"]
    assert len(s["repeats_s"]) >= 1 and min(s["repeats_s"]) == pytest.approx(s["min_s"], abs=1e-6)


# ---------------------------------------------------------------- the synthetic generator


def test_synthetic_cube_is_valid_skewed_routing(tmp_path):
    from bench.analyses import write_synthetic_cube
    from storage import cube as cubes

    info = write_synthetic_cube(tmp_path / "r.zarr", n_checkpoints=2, n_layers=3, n_tokens=3000, num_experts=8,
                                top_k=2, keep_logits=True, progress=False)
    assert info["decisions"] == 2 * 3 * 3000
    ds = cubes.open_routing(tmp_path / "r.zarr").load()  # validates the schema; only complete checkpoints
    assert ds.sizes["checkpoint"] == 2 and ds.sizes["token"] == 3000
    ids = ds.expert_ids.values
    assert ids.min() >= 0 and ids.max() < 8
    assert (ids[..., 0] != ids[..., 1]).all()  # top-k without repeats
    w = ds.expert_weights.values
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
    assert (np.diff(w, axis=-1) <= 0).all()  # slots sorted by weight
    # The ids are the top-k of the stored logits (float16 storage may swap near-ties).
    top = np.argsort(-ds.router_logits.values.astype(np.float32), axis=-1, kind="stable")[..., :2]
    assert (np.sort(top, -1) == np.sort(ids, -1)).all(-1).mean() > 0.99
    # Skewed like a trained router: top-1 usage far from uniform, and it depends on the domain.
    top1 = ids[0, 0, :, 0]
    p = np.bincount(top1, minlength=8) / top1.size
    assert -(p[p > 0] * np.log2(p[p > 0])).sum() < 2.9  # log2(8) = 3 is uniform
    dom = ds.domain.values.astype(str)
    per_dom = [np.bincount(top1[dom == d], minlength=8) / (dom == d).sum() for d in np.unique(dom)]
    assert max(np.abs(a - b).sum() for a in per_dom for b in per_dom) > 0.2
    # Paired samples: the alignment is symmetric, one to one, and pairs tokens of equal id across conditions.
    aligned = ds.aligned_token.values
    idx = np.flatnonzero(aligned >= 0)
    assert idx.size > 1000 and (aligned[aligned[idx]] == idx).all()
    assert (ds.token_id.values[idx] == ds.token_id.values[aligned[idx]]).all()
    cond = ds.condition.values.astype(str)
    assert set(cond[idx]) == {"plain", "chat"} and (cond[idx] != cond[aligned[idx]]).all()
    assert ds.canonical.values[idx].all()
    # NLL is NaN exactly at each sample's last position.
    sample = ds["sample"].values
    last = np.r_[sample[1:] != sample[:-1], True]
    assert np.isnan(ds.nll.values[:, last]).all() and not np.isnan(ds.nll.values[:, ~last]).any()


def test_json_trace_matches_the_llama_cpp_export_layout():
    from bench.storage import token_trace

    ids = np.array([[3, 1], [0, 7], [5, 2]])
    doc = token_trace(12, ids, num_experts=8)
    assert set(doc) == {"token_id", "metadata", "entries"}
    assert set(doc["metadata"]) == {"total_entries", "duration_ms", "timestamp_start_ns", "format_version"}
    assert doc["metadata"]["total_entries"] == len(doc["entries"]) == 3 * 3
    entry_fields = {"entry_id", "timestamp_ns", "timestamp_relative_ms", "token_id", "layer_id", "thread_id", "phase",
                    "operation_type", "dst_name", "num_sources", "sources", "expert_ids", "num_experts"}
    for i, e in enumerate(doc["entries"]):
        assert set(e) == entry_fields
        assert e["operation_type"] == "MUL_MAT_ID" and e["token_id"] == 12 and e["entry_id"] == i
        assert e["layer_id"] == i // 3 and e["expert_ids"] == ids[i // 3].tolist() and e["num_experts"] == 2
        assert e["num_sources"] == len(e["sources"]) == 3
    assert [e["dst_name"] for e in doc["entries"][:3]] == ["ffn_moe_gate-0", "ffn_moe_up-0", "ffn_moe_down-0"]
    ts = [e["timestamp_ns"] for e in doc["entries"]]
    assert ts == sorted(ts) and doc["entries"][0]["timestamp_relative_ms"] >= 0


# ---------------------------------------------------------------- the scripts, tiny


def test_analyses_tiny():
    import analyses

    # One cheap analysis keeps the smoke test short; the real run iterates the whole registry.
    doc = run_bench("bench.analyses", "--tiny", "--analyses", "change")
    check_machine(doc)
    cube = doc["cube"]
    assert cube["decisions"] == cube["checkpoints"] * cube["layers"] * cube["tokens"] >= 4000
    check_summary(doc["bincount"])
    base = doc["bincount"]["median_s"]
    assert doc["bincount"]["decisions_per_s"] == pytest.approx(cube["decisions"] / base)
    # Every registered analysis is accounted for: timed, skipped for a missing variable, or failed.
    seen = set(doc["analyses"]) | set(doc["skipped"]) | set(doc["errors"]) | set(doc["not_selected"])
    assert seen == set(analyses.REGISTRY)
    assert doc["errors"] == {}, doc["errors"]
    assert list(doc["analyses"]) == ["change"]
    for name, a in doc["analyses"].items():
        check_summary(a["workers_1"])
        check_summary(a["workers_2"])
        t1, t2 = a["workers_1"]["median_s"], a["workers_2"]["median_s"]
        assert a["workers_1"]["decisions_per_s"] == pytest.approx(cube["decisions"] / t1)
        assert a["slowdown_vs_bincount_1_worker"] == pytest.approx(t1 / base)
        assert a["speedup_2_over_1_workers"] == pytest.approx(t1 / t2)
        assert len(a["speedup_2_over_1_per_repeat"]) == doc["repeats"]
        assert a["graph_tasks"] >= doc["cube_blocks"] >= 1
    for name, why in doc["skipped"].items():
        assert "needs cube variable" in why
    assert doc["kept"] is None


def test_capture_tiny():
    doc = run_bench("bench.capture", "--tiny")
    check_machine(doc)
    v = doc["variants"]
    expected = ["plain", "ids_weights", "+logits", "+logits+nll"]
    for kw in doc["lens_options"]:  # each lens option capture_model has adds one variant
        expected.append(expected[-1] + "+" + kw.replace("keep_", ""))
    assert list(v) == expected + [f"{expected[-1]}->zarr"]
    assert v["plain"]["ratio_to_plain"] == 1.0
    for name, s in v.items():
        check_summary(s)
        assert math.isfinite(s["ratio_to_plain"]) and s["tokens_per_s"] > 0
    assert doc["inputs"]["tokens"] > 0 and doc["model"]["num_experts"] == 8 and doc["model"]["top_k"] == 2
    assert doc["zarr_bytes_after_run"] > 0


def test_specialization_tiny():
    doc = run_bench("bench.specialization", "--tiny")
    check_machine(doc)
    (shape,) = doc["shapes"]
    assert shape["experts"] == 8 and shape["distinct_counts"] <= shape["n_types"]
    assert shape["relative_difference"] < 1e-12  # the fast floor against the plain definition, same inputs
    assert set(shape["median_s"]) == {"fast", "plain"} and shape["plain_over_fast"] > 0


def test_storage_tiny():
    doc = run_bench("bench.storage", "--tiny")
    check_machine(doc)
    (cfg,) = doc["synthetic"]
    iw, iwl, js = cfg["ids_weights"], cfg["ids_weights_logits"], cfg["json_trace"]
    assert iw["decisions"] == iwl["decisions"] >= 4000
    assert "router_logits" not in iw["bytes"] and iwl["bytes"]["router_logits"] > 0
    b = iw["bytes_per_decision"]
    assert 0 < b["expert_ids"] < b["ids_weights"] < b["whole_store"]
    assert iwl["bytes_per_decision"]["ids_weights_logits"] > b["ids_weights"]
    assert iw["bytes"]["total"] == sum(v for k, v in iw["bytes"].items() if k != "total")
    assert js["files"] == 5 and js["decisions"] == 5 * iw["sizes"]["layer"] and js["extrapolated"]
    assert js["bytes_per_decision"] > b["whole_store"] and js["gzip_bytes"] < js["bytes"]
    assert cfg["json_over_zarr"]["json_vs_zarr_whole_store"] == pytest.approx(
        js["bytes_per_decision"] / b["whole_store"])
    assert 0 < iw["top1_entropy_bits"] < 3


@pytest.mark.slow
def test_e2e_tiny():
    doc = run_bench("bench.e2e", "--tiny", timeout=600)
    check_machine(doc)
    runs = doc["runs"]
    assert set(runs) == {"full_from_clean", "noop_rerun", "noop_rerun_cli", "checkpoints_minus_one",
                         "add_one_checkpoint"}
    assert all(r["ok"] and r["wall_s"] > 0 for r in runs.values())
    assert "FullReport" in runs["full_from_clean"]["tasks_ran"]
    assert runs["noop_rerun"]["tasks_ran"] == []
    cli = runs["noop_rerun_cli"]  # moe-atlas run on the finished run: nothing to run, every time (issue 13)
    assert len(cli["runs"]) == 3 and all(r["nothing_to_run"] and r["returncode"] == 0 for r in cli["runs"])
    assert cli["ratio_to_import_floor"] == pytest.approx(cli["best_wall_s"] / cli["import_floor_s"])
    added = doc["left_out_then_added"]
    assert [t for t in runs["add_one_checkpoint"]["tasks_ran"] if t.startswith("Capture")] == [f"Capture:{added}"]
    assert doc["add_one_captured_only_it"] is True
    assert doc["code_from"].endswith("clone/tasks/__init__.py")


def test_checkpoints_experiment_keeps_the_demo_settings(tmp_path):
    """The e2e benchmark's user experiment: the demo's tables, its model and datasets swapped, valid TOML."""
    import tomllib

    from bench.e2e import checkpoints_experiment
    from experiments.spec import load_experiment

    demo = {"name": "demo", "description": "x", "output_dir": "runs/demo", "model": {"source": "demo", "demo": {"seed": 0}},
            "capture": {"keep_router_logits": True, "batch_size": 16, "logit_lens": True},
            "conditions": {"a": "tool_context", "b": "plain"},
            "analyses": {"run": ["usage", "lens"]}, "dask": {"n_workers": 2}}
    ckpts = [("step_0000", tmp_path / "c0", 0), ("step_0300", tmp_path / "c3", 300)]
    text = checkpoints_experiment(demo, tmp_path / "demo", tmp_path / "out", ckpts)
    exp = tomllib.loads(text)
    assert exp["model"] == {"source": "checkpoints", "checkpoints": [
        {"name": "step_0000", "path": str(tmp_path / "c0"), "step": 0},
        {"name": "step_0300", "path": str(tmp_path / "c3"), "step": 300}]}
    assert [d["path"] for d in exp["datasets"]] == [str(tmp_path / "demo" / "model" / "data" / "eval.jsonl"),
                                                   str(tmp_path / "demo" / "model" / "data" / "paired.jsonl")]
    for table in ("capture", "conditions", "analyses", "dask"):
        assert exp[table] == demo[table]
    assert exp["output_dir"] == str(tmp_path / "out") and "description" not in exp
    f = tmp_path / "x.toml"
    f.write_text(text)
    assert load_experiment(str(f)).model.checkpoints[1].step == 300  # the project's validator accepts it
