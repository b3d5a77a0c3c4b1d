"""Training runs stage: logs, router weights, scores, data composition, runs side by side (issue 16).

``TrainingRuns`` requires every run's captured routing (this experiment's and each
``[[runs]]`` experiment's, through their own ``Capture`` tasks and run folders), then
``analyses.training_runs.build`` makes the section's cubes under
``analyses/training/`` and the completion mark ``analyses/training.zarr`` is written
last. ``FullReport`` requires it (see :func:`report_requires`). Numbers live in
``analyses.training``; this module only wires inputs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import luigi

from storage import cube as cubes

from . import Capture, ImportTrace, PrepareModel, _experiment, _layout, _path_stamp, _Stage, checkpoints, datasets


def _run_inputs(exp, name: str, *, own: bool):
    from analyses.training_runs import RunInput

    layout = _layout(exp)
    log = layout.model_dir / "training_log.json"
    ck = [] if exp.model.source == "import" else [(c.name, c.step, c.path) for c in checkpoints(exp)]
    return RunInput(
        name=name, routing=str(layout.routing), checkpoints=tuple(ck),
        training_log=str(log) if exp.model.source == "demo" and log.is_file() else "",
        datasets=tuple((d.name, d.path) for d in datasets(exp)),
        extra_logs=tuple(dataclasses.asdict(x) for x in exp.training.logs) if own else (),
        score_files=tuple(dataclasses.asdict(x) for x in exp.training.scores) if own else (),
    )


def _routing_of(experiment: str) -> list:
    exp = _experiment(experiment)
    if exp.model.source == "import":
        return [ImportTrace(experiment=experiment)]
    return [PrepareModel(experiment=experiment)] + [Capture(experiment=experiment, checkpoint=c.name)
                                                    for c in checkpoints(exp)]


class TrainingRuns(_Stage):
    """analyses/training/*.zarr: training logs, router weights, expert load, run comparison, scores, composition."""

    def requires(self):
        reqs = _routing_of(self.experiment)
        for r in self.exp.runs:
            reqs += _routing_of(r.experiment)
        return reqs

    def _runs(self):
        exp = self.exp
        out = [_run_inputs(exp, exp.name, own=True)]
        out += [_run_inputs(_experiment(r.experiment), r.name, own=False) for r in exp.runs]
        return out

    def fingerprint(self) -> str:
        from analyses import VERSION

        parts = []
        for r in self._runs():
            try:
                ds = cubes.open_routing(r.routing, complete_only=False)
                parts.append([ds.attrs.get("inputs_hash"), ds.attrs.get(ImportTrace.MARK), sorted(map(str, ds.checkpoint.values))])
            except cubes.CubeError:
                parts.append(None)
            parts.append([r.name, [c[:2] for c in r.checkpoints], _path_stamp(r.training_log) if r.training_log else ""])
        t = self.exp.training
        files = [_path_stamp(x.path) for x in (*t.logs, *t.scores)]
        return cubes.fingerprint("training", dataclasses.asdict(t), files, parts, VERSION, 2)

    def output(self):
        return luigi.LocalTarget(str(self.layout.analysis("training")))

    def complete(self):
        if not all(r.complete() for r in self.requires()):
            return False
        return cubes.result_fingerprint(self.output().path) == self.fingerprint()

    def run(self):
        import xarray as xr

        from analyses.training_runs import build

        fp = self.fingerprint()
        out_dir = self.layout.analyses_dir / "training"
        parts = build(self._runs())
        for name, ds in parts.items():
            cubes.write_result(ds, out_dir / f"{name}.zarr", fingerprint=fp)
        # last: the mark the report and complete() read
        cubes.write_result(xr.Dataset(attrs={"parts": list(parts), "runs": [r.name for r in self._runs()]}),
                           self.output().path, fingerprint=fp)


def report_requires(experiment: str) -> list:
    """What FullReport needs of this module: the training stage unless ``[training] enabled = false``."""
    exp = _experiment(experiment)
    return [TrainingRuns(experiment=experiment)] if exp.training.enabled else []


def training_dir(layout) -> Path:
    return Path(layout.analyses_dir) / "training"
