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
import os
from pathlib import Path

import luigi

from storage import cube as cubes

from . import Analyse, Capture, ImportTrace, PrepareModel, _experiment, _layout, _path_stamp, _Stage, checkpoints, datasets


def _run_inputs(exp, name: str, *, own: bool):
    from analyses.training_runs import RunInput

    layout = _layout(exp)
    log = layout.model_dir / "training_log.json"
    ck = [] if exp.model.source == "import" else [(c.name, c.step, c.path) for c in checkpoints(exp)]
    return RunInput(
        name=name, routing=str(layout.routing), checkpoints=tuple(ck),
        training_log=str(log) if exp.model.source == "demo" and log.is_file() else "",
        training_log_source=str(log.relative_to(layout.root)),
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
        return reqs + [t for _, t in self._side_by_side()]

    def _side_by_side(self) -> list:
        """(run name, Analyse) for each analysis this experiment and a ``[[runs]]`` experiment both list.

        Those run on the other run's own cube too, so that the report shows them side by side
        (``analyses/figures/training_runs.side_by_side``); the other experiment's ``[analyses] run``
        says which it affords.
        """
        out = []
        for r in self.exp.runs:
            other = _experiment(r.experiment).analyses.run
            out += [(r.name, Analyse(experiment=r.experiment, analysis=a)) for a in self.exp.analyses.run if a in other]
        return out

    def _runs(self):
        exp = self.exp
        out = [_run_inputs(exp, exp.name, own=True)]
        out += [_run_inputs(_experiment(r.experiment), r.name, own=False) for r in exp.runs]
        return out

    def fingerprint(self) -> str:
        from analyses import module_version

        parts = []
        for r in self._runs():
            try:
                attrs, names = cubes.routing_head(r.routing)  # metadata only: complete() must stay cheap
                parts.append([attrs.get("inputs_hash"), attrs.get(ImportTrace.MARK), sorted(names)])
            except cubes.CubeError:
                parts.append(None)
            parts.append([r.name, [c[:2] for c in r.checkpoints], _path_stamp(r.training_log) if r.training_log else ""])
        t = self.exp.training
        files = [_path_stamp(x.path) for x in (*t.logs, *t.scores)]
        side = [[name, a.analysis, cubes.result_fingerprint(a.output().path, verify=False)]
                for name, a in self._side_by_side()]
        return cubes.fingerprint("training", dataclasses.asdict(t), files, parts, side,
                                 module_version("analyses.training_runs"), 3)

    def output(self):
        return luigi.LocalTarget(str(self.layout.analysis("training")))

    def complete(self):
        return self._stored_matches(cubes.result_fingerprint(self.output().path))

    def run(self):
        import xarray as xr

        from analyses.training_runs import build

        fp = self.fingerprint()
        out_dir = self.layout.analyses_dir / "training"
        parts = build(self._runs())
        for name, ds in parts.items():
            cubes.write_result(ds, out_dir / f"{name}.zarr", fingerprint=fp)
        side: dict[str, list[str]] = {}
        for name, a in self._side_by_side():
            side.setdefault(a.analysis, []).append(name)
        # run folders relative to this one: a run's outputs never name where it lies (a moved or copied run
        # folder, or the same experiment run elsewhere, gives identical outputs; tests/test_faults.py)
        here = self.layout.root.resolve()
        roots = ["."] + [os.path.relpath(_layout(_experiment(r.experiment)).root.resolve(), here) for r in self.exp.runs]
        # last: the mark the report and complete() read; the report finds the other runs' folders here
        cubes.write_result(xr.Dataset(attrs={"parts": list(parts), "runs": [r.name for r in self._runs()],
                                             "run_roots": roots, "side_by_side": side}),
                           self.output().path, fingerprint=fp)


def report_requires(experiment: str) -> list:
    """What FullReport needs of this module: the training stage unless ``[training] enabled = false``."""
    exp = _experiment(experiment)
    return [TrainingRuns(experiment=experiment)] if exp.training.enabled else []


def training_dir(layout) -> Path:
    return Path(layout.analyses_dir) / "training"
