"""End to end on imported traces: OLMoE-style JSONL in, every supported analysis and the report out."""

import json

import luigi
import pytest
import xarray as xr

import tasks
from spec_helpers import import_experiment
from storage.exporters import export_olmoe_jsonl
from storage.schema import mock_cube

pytestmark = pytest.mark.slow


def test_fullreport_on_imported_olmoe_traces(tmp_path):
    cube = mock_cube(n_checkpoints=2, n_samples=12, seq_len=24, with_logits=False, seed=5)
    files = sorted(export_olmoe_jsonl(cube, tmp_path / "traces", main=None))
    side = tmp_path / "samples.csv"
    # OLMoE lines carry no domain: the side table gives one per sample (line index).
    domains = [str(cube.domain.values[cube["sample"].values == s][0]) for s in range(12)]
    side.write_text("sample,domain\n" + "".join(f"c4/{i},{d}\n" for i, d in enumerate(domains)))
    exp = import_experiment(tmp_path, {"format": "olmoe_jsonl", "paths": [str(f) for f in files], "side_table": str(side),
                                       "num_experts": 8},
                            run=["usage", "confidence", "change", "coactivation"], port=18807)
    assert luigi.build([tasks.FullReport(experiment=str(exp))], local_scheduler=True, log_level="WARNING")
    run = tmp_path / "run"
    ds = xr.open_zarr(run / "routing.zarr")
    assert sorted(int(s) for s in ds.step.values) == sorted(int(s) for s in cube.step.values)
    assert set(ds.domain.values) == set(cube.domain.values)
    summary = json.loads((run / "summary.json").read_text())
    # OLMoE traces have ids only: weight-based statistics are skipped with a reason, the rest computed.
    assert "confidence" in summary.get("skipped", {}) and "expert_weights" in summary["skipped"]["confidence"]
    assert {"usage", "change", "coactivation"} <= set(summary["analyses"])
    html = (run / "report" / "index.html").read_text()
    assert "Skipped:" in html
    usage = xr.open_zarr(run / "analyses" / "usage.zarr")
    ref = cube.expert_ids.values
    got = ds.expert_ids.sortby("step").values
    assert (got == ref).all()
    assert float(usage.usage_all.sum("expert").mean()) == pytest.approx(1.0)
    # Re-running does nothing.
    tasks._experiment.cache_clear()
    ran = []
    handler = luigi.Task.event_handler(luigi.Event.SUCCESS)(lambda t: ran.append(t))
    try:
        assert luigi.build([tasks.FullReport(experiment=str(exp))], local_scheduler=True, log_level="WARNING")
    finally:
        luigi.Task._event_callbacks[luigi.Task][luigi.Event.SUCCESS].discard(handler)
    assert ran == []
