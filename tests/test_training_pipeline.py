"""tasks/training.py end to end: two tiny demo runs (with and without the load-balancing loss) side by side."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments.tiny import tiny_experiment
from pipeline_helpers import build



def tiny(name: str, out, *, coef: float, port: int, **tables) -> str:
    """The tiny demo (``experiments/tiny.py``), trained 8 steps with load-balancing loss coefficient ``coef``."""
    # balance: the cheapest analysis to draw (one figure), enough to show a section side by side
    return tiny_experiment(out, name=name, port=port, analyses=("balance",), demo=dict(
        steps=8, checkpoint_steps=[0, 8], eval_samples_per_domain=2, aux_loss_coef=coef), **tables)


@pytest.mark.slow
def test_two_runs_side_by_side(tmp_path):
    import xarray as xr

    import tasks
    from storage import cube as cubes

    other = tmp_path / "no_lb.toml"
    other.write_text(tiny("no_lb", tmp_path / "no_lb", coef=0.0, port=18960))
    scores = tmp_path / "results.json"
    scores.write_text(json.dumps({"results": {"arc_easy": {"acc,none": 0.25}}}))
    main = tmp_path / "main.toml"
    main.write_text(tiny("lb", tmp_path / "lb", coef=0.02, port=18961, runs=[{"name": "no_lb", "experiment": str(other)}],
                         training={"scores": [{"path": str(scores), "checkpoint": "step_0008", "step": 8}]}))
    ok, errors = build(main)
    assert ok, errors

    root = tmp_path / "lb" / "analyses" / "training"
    logs = cubes.open_result(root / "logs.zarr")
    assert list(logs.run.values) == ["lb", "no_lb"]
    # the no-LB run logs its aux loss too (coef 0 scales it, the model still computes it)
    assert np.isfinite(logs["value"].sel(metric="aux_loss", step=slice(1, None)).values).all()
    log = json.loads((tmp_path / "lb" / "model" / "training_log.json").read_text())
    assert logs["value"].sel(run="lb", step=8, metric="lm_loss").item() == log["steps"][-1]["loss"]
    # the demo logs each layer's routing entropy; at most log E, and the same at step 1 for both runs (same init)
    ent = [m for m in map(str, logs.metric.values) if "router_entropy" in m]
    assert len(ent) >= 2 and sorted(int(v) for v in logs.metric_layer.sel(metric=ent).values) == list(range(len(ent)))
    e1 = logs["value"].sel(metric=ent, step=1)
    n_experts = xr.open_zarr(tmp_path / "lb" / "routing.zarr").sizes["expert"]
    assert (e1 <= np.log(n_experts) + 1e-6).all() and np.allclose(e1.sel(run="lb"), e1.sel(run="no_lb"))

    cmp = cubes.open_result(root / "compare.zarr")
    # same seed, same init: identical routing at step 0, so no divergence there
    step0 = cmp.sel(run="no_lb", checkpoint="step_0000")
    assert (step0.agreement_top1 == 1).all() and int(step0.first_divergence_token) == -1
    assert cmp.attrs["against"] == "lb"
    # where the runs first differ, in the reader's terms (step 0 identical: no token)
    assert int(step0.first_divergence_position) == -1 and str(step0.first_divergence_sample.values) == ""

    gate = cubes.open_result(root / "gate.zarr")
    assert gate.effective_rank.dims == ("run", "step", "layer")
    assert (gate.sel(step=0).mean_row_norm_change == 0).all()
    # same init: the two runs' routers agree at step 0
    np.testing.assert_allclose(gate.row_norm.sel(run="lb", step=0), gate.row_norm.sel(run="no_lb", step=0))

    sc = cubes.open_result(root / "scores.zarr")
    assert {"code", "prose", "math", "data", "arc_easy"} <= set(sc.task.values)
    assert set(sc.metric.values) >= {"nll", "acc", "acc,none"}
    assert float(sc.score.sel(run="lb", step=8, task="arc_easy", metric="acc,none")) == 0.25

    comp = cubes.open_result(root / "composition.zarr")
    assert set(comp.dataset.values) >= {"train", "demo_eval"}
    routing = xr.open_zarr(tmp_path / "lb" / "routing.zarr")
    eval_tokens = int(comp.tokens.where(comp.dataset == "demo_eval", 0).sum())
    assert eval_tokens == routing.sizes["token"]

    summary = json.loads((tmp_path / "lb" / "summary.json").read_text())
    assert set(summary["training_runs"]["final_dead_experts"]) == {"lb", "no_lb"}
    html = (tmp_path / "lb" / "report" / "index.html").read_text()
    for stem in ("training_curves", "gate_diagnostics", "routing_agreement", "score_summary", "data_composition",
                 "entropy_trends", "logged_entropy"):
        assert f"{stem}.png" in html, stem
    assert (tmp_path / "lb" / "tables" / "training_logged_entropy.csv").is_file()
    assert (tmp_path / "lb" / "report" / "figures" / "training_runs" / "score_summary.pdf").is_file()
    assert (tmp_path / "lb" / "tables" / "training_entropy.csv").is_file()
    # a section both runs computed (balance) shows them side by side, each from its own cube
    assert "Runs side by side: lb, no_lb" in html
    assert list((tmp_path / "lb" / "report" / "figures" / "balance" / "runs" / "no_lb").glob("*.png"))
    assert (tmp_path / "no_lb" / "analyses" / "balance.zarr").is_dir()
    assert set(summary["analyses"]["balance"]["runs"]) == {"no_lb"}
    assert "First divergence from lb" in html

    # done: a second build runs nothing
    tasks._experiment.cache_clear()
    assert tasks.FullReport(experiment=str(main)).complete()


@pytest.mark.parametrize("extra,needle", [
    ('[[runs]]\nname = "x"\nexperiment = "missing.toml"\n', "'runs[0].experiment'"),
    ('[[runs]]\nname = "a b"\nexperiment = "other.toml"\n', "'runs[0].name'"),
    ('[[runs]]\nname = "main"\nexperiment = "other.toml"\n', "must differ"),
    ('[[training.logs]]\npath = "x.csv"\nformat = "excel"\n', "'training.logs[0].format'"),
    ('[[training.scores]]\npath = "r.json"\n', "'training.scores[0].checkpoint'"),
])
def test_spec_training_keys_refused_by_name(tmp_path, extra, needle):
    from experiments.spec import SpecError, load_experiment

    (tmp_path / "other.toml").write_text('name = "other"\noutput_dir = "o"\n')
    p = tmp_path / "main.toml"
    p.write_text(f'name = "main"\noutput_dir = "m"\n{extra}')
    with pytest.raises(SpecError, match="main.toml") as e:
        load_experiment(p)
    assert needle in str(e.value)


def test_spec_runs_resolved_against_the_file(tmp_path):
    from experiments.spec import load_experiment

    (tmp_path / "other.toml").write_text('name = "other"\noutput_dir = "o"\n')
    p = tmp_path / "main.toml"
    p.write_text('name = "main"\noutput_dir = "m"\n[[runs]]\nname = "b"\nexperiment = "other.toml"\n')
    exp = load_experiment(p)
    assert exp.runs[0].experiment == str(tmp_path / "other.toml")
    assert exp.training.enabled
