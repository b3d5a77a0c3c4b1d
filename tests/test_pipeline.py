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
from storage import cube as cubes

pytestmark = pytest.mark.slow

TINY_DEMO = """
name = "tiny"
output_dir = "{out}"
[model]
source = "demo"
[model.demo]
steps = 12
checkpoint_steps = [0, 6, 12]
hidden_size = 32
intermediate_size = 64
num_layers = 2
num_heads = 2
num_experts = 4
top_k = 2
vocab_size = 384
seq_len = 64
batch_size = 8
lr = 0.01
warmup_steps = 2
eval_samples_per_domain = 3
eval_max_chars = 300
train_chars_per_domain = 20000
[capture]
keep_router_logits = true
batch_size = 4
max_length = 64
[dask]
n_workers = 1
dashboard_port = {port}
"""


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
    exp.write_text(TINY_DEMO.format(out=root / "run", port=18787))
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
    assert set(summary["analyses"]) == {"usage", "confidence", "change"}
    assert any(n.startswith("Capture") for n in ran.names)


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
    b = xr.open_zarr(root / "run" / "routing.zarr").expert_ids.sel(checkpoint="step_0006").values
    np.testing.assert_array_equal(a, b)


def _bad(tmp_path, body: str) -> tuple[bool, Ran, Path]:
    exp = tmp_path / "bad.toml"
    exp.write_text(f'name = "bad"\noutput_dir = "{tmp_path / "out"}"\n' + body)
    ok, ran = build(exp)
    return ok, ran, tmp_path / "out"


def test_missing_checkpoint_dir(tmp_path, demo_run):
    data = demo_run[0] / "run" / "model" / "data" / "eval.jsonl"
    ok, ran, out = _bad(
        tmp_path,
        f'[model]\nsource = "checkpoints"\n[[model.checkpoints]]\nname = "a"\npath = "{tmp_path / "nope"}"\nstep = 0\n'
        f'[[datasets]]\nname = "d"\npath = "{data}"\n',
    )
    assert not ok
    assert any(str(tmp_path / "nope") in f for f in ran.failures), ran.failures
    assert not (out / "routing.zarr").exists()


def test_checkpoint_without_moe_layers(tmp_path, demo_run):
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = tmp_path / "dense"
    LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=2, vocab_size=384)).save_pretrained(dense)
    data = demo_run[0] / "run" / "model" / "data" / "eval.jsonl"
    ok, ran, out = _bad(
        tmp_path,
        f'[model]\nsource = "checkpoints"\ntokenizer = "{demo_run[0] / "run" / "model" / "tokenizer"}"\n'
        f'[[model.checkpoints]]\nname = "a"\npath = "{dense}"\nstep = 0\n[[datasets]]\nname = "d"\npath = "{data}"\n',
    )
    assert not ok
    assert any("no MoE router" in f and str(dense) in f for f in ran.failures), ran.failures
    assert not (out / "routing.zarr").exists()


def test_empty_dataset(tmp_path, demo_run):
    ckpt = demo_run[0] / "run" / "model" / "checkpoints" / "step_0000"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    ok, ran, out = _bad(
        tmp_path,
        f'[model]\nsource = "checkpoints"\n[[model.checkpoints]]\nname = "a"\npath = "{ckpt}"\nstep = 0\n'
        f'[[datasets]]\nname = "d"\npath = "{empty}"\n',
    )
    assert not ok
    assert any(str(empty) in f and "no samples" in f for f in ran.failures), ran.failures
    assert not (out / "routing.zarr").exists()
    assert cubes.result_fingerprint(out / "tokens" / "d.zarr") is None


def test_malformed_experiment(tmp_path):
    ok, ran, out = _bad(tmp_path, "[capture]\nkeep_router_logits = 3\n")
    assert not ok
    assert not out.exists()
