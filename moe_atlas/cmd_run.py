"""``moe-atlas run EXPERIMENT.toml``: the whole pipeline (``tasks.FullReport``) from any folder.

The same as ``luigi --module tasks FullReport --experiment EXPERIMENT.toml``
run from the repository root, without needing ``luigi.cfg`` there: Luigi's
in-process scheduler, one Luigi worker (``--workers``), INFO logging. The
experiment is validated before anything runs (one line naming the file and key,
exit 2). Exit status 0 when every task succeeded (or had nothing to do), 1 when
a task failed or could not be scheduled, with one line per failed task on
stderr; Luigi's tracebacks are shown only with ``--debug``.

Progress: the Dask dashboard address when there is work to do (before
training), then one line per finished stage with its elapsed time.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

HELP = "run an experiment (train/capture or import, analyses, report) with Luigi's local scheduler"

#: Luigi settings of a moe-atlas run (what luigi.cfg sets for `luigi --module tasks` in the repository root).
LUIGI_SETTINGS = {
    "worker": {"keep_alive": "false", "no_install_shutdown_handler": "false"},
    "execution_summary": {"summary_length": "10"},
}

EXIT_FAILED = 1
_HANDLERS = None


def add_arguments(p) -> None:
    p.add_argument("experiment", metavar="EXPERIMENT.toml", help="the experiment file (paths in it are relative to "
                   "its folder)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="Luigi worker processes (default 1; the fan-out happens on the Dask cluster)")
    p.add_argument("--scheduler-address", default="", metavar="ADDR",
                   help="a running Dask scheduler (tcp://host:8786 or tls://...) instead of a LocalCluster; "
                        "its workers must see the same filesystem")


def configure_luigi() -> None:
    """Apply :data:`LUIGI_SETTINGS` to Luigi's configuration, whatever folder the command runs in."""
    import luigi.configuration

    cfg = luigi.configuration.get_config()
    for section, values in LUIGI_SETTINGS.items():
        if not cfg.has_section(section):
            cfg.add_section(section)
        for key, value in values.items():
            cfg.set(section, key, value)


class _NoTraceback(logging.Filter):
    """Drop the traceback of Luigi's "failed" log records (the one-line reason stays); --debug keeps them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            exc = record.exc_info[1]
            record.msg = f"{record.getMessage()}: {type(exc).__name__}: {' '.join(str(exc).split())}"
            record.args = ()
            record.exc_info = record.exc_text = None
        return True


def _progress_handlers():
    """Print one line per finished or failed stage, with its elapsed time (Luigi events)."""
    import luigi

    from tasks import _Stage

    started: dict[str, float] = {}

    def label(task) -> str:
        params = [str(v) for k, v in task.param_kwargs.items() if k != "experiment"]
        return f"{task.task_family}({', '.join(params)})" if params else task.task_family

    @_Stage.event_handler(luigi.Event.START)
    def _start(task):
        started[task.task_id] = time.perf_counter()

    @_Stage.event_handler(luigi.Event.SUCCESS)
    def _done(task):
        s = time.perf_counter() - started.get(task.task_id, time.perf_counter())
        print(f"moe-atlas: {label(task)} done in {s:.1f} s", flush=True)

    @_Stage.event_handler(luigi.Event.FAILURE)
    def _failed(task, exc):
        s = time.perf_counter() - started.get(task.task_id, time.perf_counter())
        print(f"moe-atlas: {label(task)} FAILED after {s:.1f} s: {type(exc).__name__}: {' '.join(str(exc).split())}",
              file=sys.stderr, flush=True)

    return _start, _done, _failed


def run(args) -> int:
    from experiments.spec import load_experiment

    debug = bool(getattr(args, "debug", False))
    path = Path(args.experiment).resolve()
    exp = load_experiment(path)  # SpecError: one line, exit 2 (moe_atlas.cli)
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if args.scheduler_address:
        os.environ["MOE_ATLAS_SCHEDULER"] = args.scheduler_address
    t0 = time.perf_counter()
    import luigi
    from luigi.execution_summary import LuigiStatusCode

    import deploy
    import tasks

    configure_luigi()
    if not debug:
        logging.getLogger("luigi-interface").addFilter(_NoTraceback())
    global _HANDLERS
    if _HANDLERS is None:  # once per process (Luigi keeps class-level handlers)
        _HANDLERS = _progress_handlers()
    report = tasks.FullReport(experiment=str(path))
    if _complete(report):
        # Nothing to do: say so without a second round of Luigi's completeness checks (a no-op re-run
        # stays within seconds; bench/e2e.py measures it).
        print(f"moe-atlas: {exp.name}: every stage is up to date, nothing to run; report "
              f"{tasks._layout(exp).report_index} ({time.perf_counter() - t0:.1f} s)", flush=True)
        return 0
    try:
        # The cluster (and the dashboard address) from the start, not after the demo's training.
        tasks._client(exp)
        result = luigi.build([report], local_scheduler=True, workers=args.workers, log_level="INFO",
                             detailed_summary=True)
    finally:
        deploy.close_client()
    ok = result.status in (LuigiStatusCode.SUCCESS, LuigiStatusCode.SUCCESS_WITH_RETRY)
    took = time.perf_counter() - t0
    if ok:
        print(f"moe-atlas: {exp.name}: report {tasks._layout(exp).report_index} ({took:.1f} s)", flush=True)
        return 0
    print(f"moe-atlas run: {path}: {result.status.name.lower().replace('_', ' ')} "
          f"({result.status.value[1]}; see the lines above) after {took:.1f} s", file=sys.stderr, flush=True)
    return EXIT_FAILED


def _complete(task) -> bool:
    """Whether ``task`` has nothing to do; a check that fails counts as work to do (Luigi reports why)."""
    import tasks

    try:
        with tasks.checking_once():  # each stage's check once, however many stages require it
            return bool(task.complete())
    except Exception:  # noqa: BLE001 - Luigi's own scheduling reports the error
        return False
