"""storage.training: every training-log format written here with known values reads back exactly."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st

from storage.training import (
    TrainingLogError, canonical_metric, demo_scores, read_lm_eval, read_log_records, read_scores_csv,
    read_training_logs, scores_cube, training_cube,
)

# step -> metric -> value; values exactly representable in float32 (TensorBoard stores float32)
KNOWN = {1: {"loss": 2.5, "lr": 0.001, "aux_loss": 2.125}, 2: {"loss": 2.25, "lr": 0.0005, "aux_loss": 2.0625},
         5: {"loss": 1.75, "lr": 0.00025}}


def _expect(ds, run="r"):
    for step, row in KNOWN.items():
        for m, v in row.items():
            got = float(ds["value"].sel(run=run, step=step, metric=m))
            assert got == pytest.approx(v, rel=1e-7), (step, m)
    # not logged -> NaN, never 0
    assert np.isnan(float(ds["value"].sel(run=run, step=5, metric="aux_loss")))


def test_hf_trainer_state(tmp_path):
    hist = [{"step": s, "loss": r["loss"], "learning_rate": r["lr"], **({"aux_loss": r["aux_loss"]} if "aux_loss" in r
            else {}), "epoch": 0.1 * s} for s, r in KNOWN.items()]
    hist.append({"step": 5, "eval_loss": 1.5, "eval_runtime": 3.0})
    p = tmp_path / "ckpt" / "trainer_state.json"
    p.parent.mkdir()
    p.write_text(json.dumps({"global_step": 5, "log_history": hist}))
    ds = read_training_logs([{"path": str(p), "run": "r"}])
    _expect(ds)
    assert float(ds["value"].sel(run="r", step=5, metric="eval_loss")) == 1.5
    assert ds.metric_unit.sel(metric="loss").item() == "nat/token"
    assert ds.metric_source_name.sel(metric="lr").item() == "learning_rate"
    assert ds.run_format.sel(run="r").item() == "hf_trainer"
    assert ds.run_source.sel(run="r").item() == str(p)
    # the run defaults to the checkpoint folder's name
    assert read_log_records(p)[0].run == "ckpt"
    # a log inside a run folder is named relative to it: the outputs do not say where the run lies
    named = read_training_logs([{"path": str(p), "run": "r", "source": "ckpt/trainer_state.json"}])
    assert named.run_source.sel(run="r").item() == "ckpt/trainer_state.json"
    xr.testing.assert_identical(named.drop_vars("run_source"), ds.drop_vars("run_source"))


def test_wandb_panel_export_splits_runs(tmp_path):
    p = tmp_path / "wandb_export.csv"
    with open(p, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Step", "smoe - train/loss", "smoe - train/loss__MIN", "smoe - train/loss__MAX", "xmoe - train/loss",
                    "_runtime"])
        w.writerow([1, 2.5, 2.4, 2.6, 3.0, 10])
        w.writerow([2, 2.25, 2.2, 2.3, "", 20])
    ds = read_training_logs([{"path": str(p)}])
    assert list(ds.run.values) == ["smoe", "xmoe"]
    assert list(ds.metric.values) == ["loss"]
    assert ds["value"].sel(metric="loss").values.tolist()[0] == [2.5, 2.25]
    assert np.isnan(ds["value"].sel(run="xmoe", step=2, metric="loss"))


def test_wandb_history_csv(tmp_path):
    p = tmp_path / "history.csv"
    with open(p, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["_step", "train/loss", "train/learning_rate", "train/load_balancing_loss", "_timestamp"])
        for s, r in KNOWN.items():
            w.writerow([s, r["loss"], r["lr"], r.get("aux_loss", ""), 1.7e9])
    _expect(read_training_logs([{"path": str(p), "format": "wandb_csv", "run": "r"}]))


def test_tensorboard_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(log_dir=str(tmp_path / "tb"))
    for s, r in KNOWN.items():
        w.add_scalar("train/loss", r["loss"], s)
        w.add_scalar("train/learning_rate", r["lr"], s)
        if "aux_loss" in r:
            w.add_scalar("moe/aux_loss", r["aux_loss"], s)
    w.close()
    ds = read_training_logs([{"path": str(tmp_path / "tb"), "run": "r"}])
    # float32 storage: the values above are exact in float32 except the learning rates
    for step, row in KNOWN.items():
        assert float(ds["value"].sel(run="r", step=step, metric="loss")) == row["loss"]
        assert float(ds["value"].sel(run="r", step=step, metric="lr")) == pytest.approx(row["lr"], rel=1e-6)
    assert float(ds["value"].sel(run="r", step=2, metric="moe/aux_loss")) == 2.0625
    assert ds.run_format.item() == "tensorboard"


def test_plain_csv_long_and_wide_and_jsonl(tmp_path):
    wide = tmp_path / "wide.csv"
    with open(wide, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss", "lr", "aux_loss"])
        for s, r in KNOWN.items():
            w.writerow([s, r["loss"], r["lr"], r.get("aux_loss", "")])
    _expect(read_training_logs([{"path": str(wide), "run": "r"}]))
    long = tmp_path / "long.csv"
    with open(long, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "step", "metric", "value"])
        for s, r in KNOWN.items():
            for m, v in r.items():
                w.writerow(["r", s, m, v])
    _expect(read_training_logs([{"path": str(long)}]))
    jl = tmp_path / "log.jsonl"
    jl.write_text("".join(json.dumps({"step": s, **r}) + "\n" for s, r in KNOWN.items()))
    _expect(read_training_logs([{"path": str(jl), "run": "r"}]))


def test_demo_log_and_scores(tmp_path):
    log = {"steps": [{"step": s, "loss": r["loss"], "lr": r["lr"], "aux_loss": r.get("aux_loss", 2.0)}
                     for s, r in KNOWN.items()],
           "checkpoints": [{"step": 0, "name": "step_0000", "eval_nll": {"code": 7.5, "prose": 7.0}},
                           {"step": 5, "name": "step_0005", "eval_nll": {"code": 3.5, "prose": 4.0},
                            "eval_acc": {"code": 0.25, "prose": 0.125}}]}
    p = tmp_path / "model" / "training_log.json"
    p.parent.mkdir()
    p.write_text(json.dumps(log))
    ds = read_training_logs([{"path": str(p), "run": "r"}])
    assert float(ds["value"].sel(run="r", step=2, metric="lm_loss")) == 2.25  # the demo's loss is the LM part
    assert float(ds["value"].sel(run="r", step=5, metric="eval_nll/code")) == 3.5
    sc = scores_cube(demo_scores(p, run="r"))
    assert float(sc.score.sel(run="r", step=5, task="prose", metric="acc")) == 0.125
    assert np.isnan(float(sc.score.sel(run="r", step=0, task="prose", metric="acc")))
    assert not bool(sc.higher_is_better.sel(metric="nll")) and bool(sc.higher_is_better.sel(metric="acc"))
    assert sc.checkpoint.sel(run="r", step=5).item() == "step_0005"


def test_lm_eval_results_and_scores_csv(tmp_path):
    res = {"results": {"arc_easy": {"alias": "arc_easy", "acc,none": 0.5, "acc_stderr,none": 0.01,
                                    "acc_norm,none": 0.625},
                       "wikitext": {"word_perplexity,none": 30.5, "word_perplexity_stderr,none": "N/A"}},
           "higher_is_better": {"arc_easy": {"acc": True, "acc_norm": True}}}
    p = tmp_path / "results.json"
    p.write_text(json.dumps(res))
    recs = read_lm_eval(p, run="smoe", checkpoint="ck1", step=100)
    sc = scores_cube(recs)
    assert float(sc.score.sel(task="arc_easy", metric="acc_norm,none").item()) == 0.625
    assert not bool(sc.higher_is_better.sel(metric="word_perplexity,none"))
    assert "acc_stderr,none" not in sc.metric.values
    c = tmp_path / "scores.csv"
    c.write_text("run,checkpoint,step,task,metric,value\nsmoe,a,1,t,acc,0.5\nxmoe,b,1,t,acc,0.75\n")
    sc = scores_cube(read_scores_csv(c))
    assert sc.score.sel(task="t", metric="acc", step=1).values.tolist() == [0.5, 0.75]


@pytest.mark.parametrize("content,fmt,needle", [
    ('{"log_history": [{"loss": 1.0}]}', "hf_trainer", "log_history[0]: no step field"),
    ('{"log_history": [{"step": 1, "loss": "abc"}]}', "hf_trainer", "log_history[0] field 'loss': expected a number"),
    ('{"log_history": [{"step": -1, "loss": 1}]}', "hf_trainer", "non-negative integer"),
    ("step,loss\n1,2\n2,x\n", "csv", "row 3 column 'loss'"),
    ("loss\n1\n", "csv", "no step column"),
    ('{"step": 1, "loss": 2}\nnot json\n', "jsonl", "line 2: not valid JSON"),
])
def test_bad_input_one_line_naming_file_and_record(tmp_path, content, fmt, needle):
    p = tmp_path / ("log.json" if fmt == "hf_trainer" else "log.jsonl" if fmt == "jsonl" else "log.csv")
    p.write_text(content)
    with pytest.raises(TrainingLogError) as e:
        read_log_records(p, format=fmt)
    msg = str(e.value)
    assert needle in msg and str(p) in msg and "\n" not in msg


def test_missing_and_unknown():
    with pytest.raises(TrainingLogError, match="not found"):
        read_log_records("/nonexistent/trainer_state.json")
    with pytest.raises(TrainingLogError, match="no training-log records"):
        training_cube([])


def test_aliases():
    assert canonical_metric("train/learning_rate") == "lr"
    assert canonical_metric("train_loss") == "loss"
    assert canonical_metric("router_z_loss") == "z_loss"
    assert canonical_metric("diversity_loss/layer_3") == "diversity_loss/layer_3"


@settings(max_examples=25, deadline=None)
@given(st.dictionaries(st.integers(0, 10_000), st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=20))
def test_jsonl_roundtrip_property(tmp_path_factory, series):
    p = tmp_path_factory.mktemp("jl") / "x.jsonl"
    p.write_text("".join(json.dumps({"step": s, "loss": v}) + "\n" for s, v in series.items()))
    ds = read_training_logs([{"path": str(p), "run": "x"}])
    assert ds.step.values.tolist() == sorted(series)
    assert ds["value"].sel(run="x", metric="loss").values.tolist() == [series[s] for s in sorted(series)]


@pytest.mark.parametrize("name,layer,dataset", [
    ("diversity_loss/layer_3", 3, ""),
    ("mmstar/diversity_loss/layer_0", 0, "mmstar"),
    ("train/diversity_loss_layer2", 2, ""),
    ("diversity/mme/l4", 4, "mme"),
    ("eval_nll/code", -1, "code"),
    ("lm_loss", -1, ""),
    ("eval/mme/acc", -1, "mme"),
])
def test_metric_parts(name, layer, dataset):
    from storage.training import metric_parts

    assert metric_parts(name) == (layer, dataset)


def test_cube_labels_layer_dataset_units_and_source(tmp_path):
    """Per-layer / per-dataset diversity series keep their labels; units and source are on the cube."""
    p = tmp_path / "div.csv"
    p.write_text("step,metric,value\n"
                 "1,mme/diversity_loss/layer_0,0.5\n1,mme/diversity_loss/layer_1,0.25\n"
                 "1,mmstar/diversity_loss/layer_0,0.125\n1,loss,2.0\n1,learning_rate,0.001\n")
    ds = read_training_logs([{"path": str(p), "run": "r"}])
    m = {str(k): (int(l), str(d), str(u)) for k, l, d, u in
         zip(ds.metric.values, ds.metric_layer.values, ds.metric_dataset.values, ds.metric_unit.values)}
    assert m == {"mme/diversity_loss/layer_0": (0, "mme", "1"), "mme/diversity_loss/layer_1": (1, "mme", "1"),
                 "mmstar/diversity_loss/layer_0": (0, "mmstar", "1"), "loss": (-1, "", "nat/token"),
                 "lr": (-1, "", "1")}
    assert ds.run_source.values.tolist() == [str(p)] and ds.run_format.values.tolist() == ["csv"]
    assert ds.metric_source_name.sel(metric="lr").item() == "learning_rate"
    for c in ("step", "metric_unit", "metric_layer", "metric_dataset", "run_source", "run_format"):
        assert ds[c].attrs.get("long_name"), c
    assert ds.attrs["source"] == "storage.training" and ds["value"].attrs["units"] == "see metric_unit"
