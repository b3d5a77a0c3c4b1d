"""End to end: the Luigi DAG on a very small demo, then on its checkpoints as a real user's.

Checks the outputs a user sees, that a re-run does nothing, that adding a
checkpoint captures only that checkpoint, and that bad input stops with a
clear message and leaves nothing marked complete.
"""

import json
import os
from pathlib import Path

import luigi
import numpy as np
import pytest
import xarray as xr

import tasks
from pipeline_helpers import tiny_experiment
from storage import cube as cubes

pytestmark = pytest.mark.slow

#: Every analysis whose inputs the tiny demo captures (conditions, logit lens, divergence).
ANALYSES = ["usage", "confidence", "change", "divergence", "lens"]


class Ran:
    """Names of tasks that actually ran (Luigi SUCCESS events) during a build."""

    def __init__(self):
        self.names: list[str] = []
        self.failures: list[str] = []

    def __enter__(self):
        luigi.Task.event_handler(luigi.Event.SUCCESS)(self._ok)
        luigi.Task.event_handler(luigi.Event.FAILURE)(self._fail)
        return self

    def _ok(self, task):
        if task.task_id.startswith("Capture_"):
            # Luigi batches pending captures into one task (tasks.Capture): one name per checkpoint it captured.
            self.names.extend(f"Capture:{n}" for n in task._names())
            return
        self.names.append(task.task_id.split("_")[0] + ":" + "/".join(str(v) for k, v in task.param_kwargs.items() if k != "experiment"))

    def _fail(self, task, exc):
        self.failures.append(str(exc))

    def __exit__(self, *a):
        luigi.Task._event_callbacks.get(luigi.Task, {}).get(luigi.Event.SUCCESS, set()).discard(self._ok)
        luigi.Task._event_callbacks.get(luigi.Task, {}).get(luigi.Event.FAILURE, set()).discard(self._fail)


def build(exp_path) -> tuple[bool, Ran]:
    tasks._experiment.cache_clear()
    with Ran() as ran:
        ok = luigi.build([tasks.FullReport(experiment=str(exp_path))], local_scheduler=True, workers=1,
                         log_level="WARNING")
    return ok, ran


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    exp = root / "tiny.toml"
    exp.write_text(tiny_experiment(root / "run", port=18787, analyses=ANALYSES))
    ok, ran = build(exp)
    assert ok, ran.failures
    return root, exp, ran


def test_demo_outputs(demo_run):
    root, exp, ran = demo_run
    run = root / "run"
    ds = xr.open_zarr(run / "routing.zarr")
    assert set(ds.expert_ids.dims) == {"checkpoint", "layer", "token", "k"}
    assert ds.router_logits.dims == ("checkpoint", "layer", "token", "expert")
    for c in ("sample", "position", "token_id", "token_text", "domain"):
        assert c in ds.coords
    assert list(ds.checkpoint.values) == ["step_0000", "step_0006", "step_0012"]
    assert (ds.complete.values == 1).all()
    ids = ds.expert_ids.values
    assert ids.min() >= 0 and ids.max() < 4
    w = ds.expert_weights.values
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-4)  # Mixtral renormalises top-k
    assert (np.diff(w, axis=-1) <= 1e-6).all()  # slots sorted by weight
    assert len(set(ds.domain.values)) >= 4
    # Routing really comes from the model: the captured top-k are the top-k of the captured logits.
    logits = ds.router_logits.values.astype(np.float32)
    top = np.argsort(-logits, axis=-1, kind="stable")[..., :2]
    agree = (np.sort(top, -1) == np.sort(ids, -1)).all(-1).mean()
    assert agree > 0.99  # float16 storage of logits may swap near-ties

    for name in ("usage", "confidence", "change"):
        res = xr.open_zarr(run / "analyses" / f"{name}.zarr")
        assert res.attrs["definition"]
        assert (run / "tables" / f"{name}.csv").stat().st_size > 0
        pngs = list((run / "report" / "figures" / name).glob("*.png"))
        assert pngs and all(p.stat().st_size > 5000 for p in pngs)
    html = (run / "report" / "index.html").read_text()
    assert "<img" in html and "Chance level" in html
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["analyses"]) == set(ANALYSES)
    assert any(n.startswith("Capture") for n in ran.names)


def test_paired_outputs(demo_run):
    """The demo's two conditions: alignment in the cube, lens, divergence, mask points, report section."""
    run = demo_run[0] / "run"
    ds = xr.open_zarr(run / "routing.zarr")
    assert ds.attrs["condition_a"] == "tool_context" and ds.attrs["condition_b"] == "plain"
    assert json.loads(ds.attrs["alignment"])["pairs"] == 3
    aligned = ds.aligned_token.values
    t = np.flatnonzero(aligned >= 0)
    assert t.size and (aligned[aligned[t]] == t).all()
    text, cond = ds.token_text.values, ds.condition.values
    assert all("".join(text[a].split()) == "".join(text[aligned[a]].split()) for a in t)
    plain = (cond == "plain") & ds.canonical.values
    assert (aligned[plain] >= 0).mean() > 0.9  # the code is the same in both conditions
    assert ds.last_canonical.values.sum() == len(np.unique(ds["sample"].values))
    lens, nll = ds.lens_logprob.values, ds.nll.values
    np.testing.assert_allclose(lens[:, -1], -nll, atol=1e-4)  # lens at the last layer = the model's NLL
    js = ds.lens_js.values
    assert np.isfinite(js).any() and np.nanmin(js) >= 0 and np.nanmax(js) <= np.log(2) + 1e-6

    ckpt = str(ds.checkpoint.values[-1])
    for name in ("divergence", "lens"):
        assert (run / "tables" / f"{name}.csv").stat().st_size > 0
        assert list((run / "report" / "figures" / name).glob("*.png"))
    points = json.loads((run / "tables" / "divergence" / ckpt /
                         "last_canonical_tool_context_minus_plain_points.json").read_text())
    assert len(points) == ds.sizes["layer"] * ds.sizes["expert"]
    assert all(p["value"] >= q["value"] for p, q in zip(points, points[1:]))
    html = (run / "report" / "index.html").read_text()
    assert "Routing divergence between two conditions" in html and "Logit lens" in html
    assert "last_canonical_tool_context_minus_plain_points.json" in html


def test_rerun_does_nothing(demo_run):
    root, exp, _ = demo_run
    ok, ran = build(exp)
    assert ok and ran.names == []


def test_adding_a_checkpoint_captures_only_it(demo_run, tmp_path):
    root, _, _ = demo_run
    ckpts = root / "run" / "model" / "checkpoints"
    data = root / "run" / "model" / "data" / "eval.jsonl"
    spec = f"""
name = "real"
output_dir = "{tmp_path / 'real'}"
[model]
source = "checkpoints"
[[datasets]]
name = "eval"
path = "{data}"
[analyses]
run = ["usage", "change"]
[dask]
n_workers = 1
dashboard_port = 18797
"""
    for name, step in (("step_0000", 0), ("step_0012", 12)):
        spec += f'[[model.checkpoints]]\nname = "{name}"\npath = "{ckpts / name}"\nstep = {step}\n'
    exp = tmp_path / "real.toml"
    exp.write_text(spec)
    ok, ran = build(exp)
    assert ok, ran.failures
    assert sorted(n for n in ran.names if n.startswith("Capture")) == ["Capture:step_0000", "Capture:step_0012"]

    exp.write_text(spec + f'[[model.checkpoints]]\nname = "step_0006"\npath = "{ckpts / "step_0006"}"\nstep = 6\n')
    ok, ran = build(exp)
    assert ok, ran.failures
    assert [n for n in ran.names if n.startswith("Capture")] == ["Capture:step_0006"]
    assert not any(n.startswith("Tokenize") for n in ran.names)
    assert {"Analyse:usage", "Analyse:change", "FullReport:"} <= set(ran.names)
    res = xr.open_zarr(tmp_path / "real" / "analyses" / "change.zarr")
    assert list(res.step.values) == [0, 6, 12]
    # The same checkpoints captured by the demo run give identical routing.
    a = xr.open_zarr(tmp_path / "real" / "routing.zarr").expert_ids.sel(checkpoint="step_0006").values
    demo = xr.open_zarr(root / "run" / "routing.zarr")
    # the demo cube also holds the paired set, after the evaluation samples
    b = demo.expert_ids.sel(checkpoint="step_0006").isel(token=np.flatnonzero(demo.dataset.values == "demo_eval"))
    b = b.values
    np.testing.assert_array_equal(a, b)


def _bad(tmp_path, body: str) -> tuple[bool, Ran, Path]:
    exp = tmp_path / "bad.toml"
    exp.write_text(f'name = "bad"\noutput_dir = "{tmp_path / "out"}"\n' + body)
    ok, ran = build(exp)
    return ok, ran, tmp_path / "out"


def _bad_checkpoint(tmp_path, checkpoint, data, **model) -> tuple[bool, Ran, Path]:
    """:func:`_bad` with one checkpoint 'a' at ``checkpoint`` (and ``model`` keys) and one dataset ``data``."""
    from experiments.toml_writer import dumps

    return _bad(tmp_path, dumps({"model": {"source": "checkpoints", **model,
                                           "checkpoints": [{"name": "a", "path": str(checkpoint), "step": 0}]},
                                 "datasets": [{"name": "d", "path": str(data)}]}))


def test_missing_checkpoint_dir(tmp_path, demo_run):
    data = demo_run[0] / "run" / "model" / "data" / "eval.jsonl"
    ok, ran, out = _bad_checkpoint(tmp_path, tmp_path / "nope", data)
    assert not ok
    assert any(str(tmp_path / "nope") in f for f in ran.failures), ran.failures
    assert not (out / "routing.zarr").exists()


def test_checkpoint_without_moe_layers(tmp_path, demo_run):
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = tmp_path / "dense"
    LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=2, vocab_size=384)).save_pretrained(dense)
    data = demo_run[0] / "run" / "model" / "data" / "eval.jsonl"
    ok, ran, out = _bad_checkpoint(tmp_path, dense, data, tokenizer=str(demo_run[0] / "run" / "model" / "tokenizer"))
    assert not ok
    assert any("no MoE router" in f and str(dense) in f for f in ran.failures), ran.failures
    assert not (out / "routing.zarr").exists()


def test_empty_dataset(tmp_path, demo_run):
    ckpt = demo_run[0] / "run" / "model" / "checkpoints" / "step_0000"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    ok, ran, out = _bad_checkpoint(tmp_path, ckpt, empty)
    assert not ok
    assert any(str(empty) in f and "no samples" in f for f in ran.failures), ran.failures
    assert not (out / "routing.zarr").exists()
    assert cubes.result_fingerprint(out / "tokens" / "d.zarr") is None


def test_malformed_experiment(tmp_path):
    ok, ran, out = _bad(tmp_path, "[capture]\nkeep_router_logits = 3\n")
    assert not ok
    assert not out.exists()


def test_demo_built_before_the_paired_set_gets_it_without_retraining(demo_run, tmp_path):
    import shutil

    from capture.demo import DemoConfig, load_manifest, prepare_demo

    src = demo_run[0] / "run" / "model"
    out = tmp_path / "model"
    shutil.copytree(src, out)
    manifest = json.loads((out / "manifest.json").read_text())
    cfg = DemoConfig(**manifest["config"])
    # a model directory written before data/paired.jsonl existed (paths in it point at the copy)
    old = json.loads(json.dumps(manifest).replace(str(src), str(out)))
    del old["paired"]
    (out / "manifest.json").write_text(json.dumps(old))
    (out / "data" / "paired.jsonl").unlink()
    weights = out / "checkpoints" / "step_0012" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    again = prepare_demo(out, cfg, progress=False)
    assert weights.stat().st_mtime_ns == before  # no retraining
    assert (out / "data" / "paired.jsonl").read_text() == (src / "data" / "paired.jsonl").read_text()
    assert load_manifest(out)["paired"]["pairs"] == again["paired"]["pairs"] == 3
