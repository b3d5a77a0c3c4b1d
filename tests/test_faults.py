"""Fault injection: killed workers, killed runs and concurrent runs leave nothing lost or corrupted.

Every run here is the tiny demo of test_pipeline (model prepared once, copied).
Kills land at fixed points, not after a delay: Dask worker plugins and the
fault hooks of ``pipeline_helpers`` stop the pipeline where the test wants it
and write a signal file, then the test sends SIGKILL.

- ``clean_run``: two ``luigi`` runs of one experiment started together; both
  finish, every stage runs once (the other run waits on the run lock, then
  skips it). Its outputs are the reference the other tests compare with.
- a Dask worker killed while it executes a task of an analysis: the result is
  identical to the same analysis computed without a cluster;
- ``luigi`` SIGKILLed after a checkpoint's data is written but before it is
  marked complete (its Dask worker, still inside the capture, must die with
  it), then SIGKILLed with its whole process group after an analysis result
  is written to its temporary store but before the rename; the partial stores
  are never taken as complete, and a third run finishes with outputs identical
  to the clean run, recomputing only what was lost and leaving no temporaries;
- a run that finds the lock held and may not wait fails with a message naming
  the lock file and the holder's pid, and writes nothing; the lock is
  re-entrant within a process and dies with a SIGKILLed holder.
"""

from __future__ import annotations

import json
import os
import re
import signal as signal_module
import subprocess
import sys
import threading
from pathlib import Path

import luigi
import numpy as np
import pytest
import xarray as xr

import tasks
from pipeline_helpers import (
    FAULT_ENV,
    FAULT_SIGNAL_ENV,
    REPO,
    assert_same_outputs,
    build,
    checkpoint_names,
    dag,
    finish,
    group_pids,
    kill_group,
    kill_leader,
    leftovers,
    new_run,
    outputs,
    start_luigi,
    tiny_model,  # noqa: F401  (fixture)
    wait_for,
)
from storage import RunLayout
from storage import cube as cubes
from storage.lock import RunLocked, run_lock

pytestmark = pytest.mark.slow


def _task(text: str) -> str:
    """A task repr without its experiment path (runs may spell the path differently): ``Capture(step_0000)``."""
    family, params = re.match(r"(\w+)\((.*)\)$", text).groups()
    rest = [p.split("=", 1)[1] for p in params.split(", ") if p and not p.startswith("experiment=")]
    return f"{family}({', '.join(rest)})"


def _tasks_in(log: str, verb: str) -> list[str]:
    """Tasks that a luigi log says were ``running`` / ``done``.

    Luigi batches pending captures into one task (``tasks.Capture``), logged as
    ``Capture(..., checkpoint=["a","b"])``: that counts as ``Capture(a)`` and ``Capture(b)``.
    """
    return [u for t in re.findall(rf"\) {verb}\s+(\w+\(.*?\))\s*$", log, flags=re.M) for u in _unbatch(_task(t))]


def _unbatch(t: str) -> list[str]:
    if t.startswith("Capture([") and t.endswith("])"):
        return [f"Capture({n})" for n in json.loads(t[len("Capture("):-1])]
    return [t]


def _skipped(log: str) -> list[str]:
    found = re.findall(r"^INFO: (\w+\(.*?\)): done by another run while this one waited; skipped", log, flags=re.M)
    return [u for t in found for u in _unbatch(_task(t))]


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, tiny_model):
    """Two FullReport runs of one experiment at once; returns (run dir, log A, log B).

    The test holds the run lock until both runs are waiting for it, so that
    they really contend (otherwise one could finish before the other starts).
    """
    root = tmp_path_factory.mktemp("concurrent")
    exp = new_run(root, tiny_model, port=18910)
    layout = RunLayout(root / "run")
    logs = [root / "a.log", root / "b.log"]
    with run_lock(layout.lock, timeout=0):
        # The same experiment, spelt two ways (Luigi itself would stop an identical command line).
        procs = [start_luigi(exp, logs[0]), start_luigi(os.path.relpath(exp, REPO), logs[1])]
        for p, log in zip(procs, logs):
            wait_for(lambda log=log: "waiting for the run lock" in log.read_text(errors="replace"),
                     what=f"{log.name} to wait for the run lock", proc=p, log=log)
    texts = [finish(p, log) for p, log in zip(procs, logs)]
    return layout.root, texts


def test_concurrent_runs_share_the_work_without_corruption(clean_run):
    run, (a, b) = clean_run
    exp = run.parent / "tiny.toml"
    # Every stage but PrepareModel (its model dir was copied in), e.g. Capture(step_0000).
    stages = {_task(t) for t in dag(exp) if not t.startswith("PrepareModel(")}
    ran_a = set(_tasks_in(a, "running")) - set(_skipped(a))
    ran_b = set(_tasks_in(b, "running")) - set(_skipped(b))
    # Each process scheduled every stage; each stage did its work in exactly one of them.
    assert set(_tasks_in(a, "done")) == set(_tasks_in(b, "done")) == stages
    assert not ran_a & ran_b, f"stages run twice: {ran_a & ran_b}"
    assert ran_a | ran_b == stages
    assert _skipped(a) or _skipped(b)
    assert cubes.completed_checkpoints(run / "routing.zarr") == checkpoint_names(exp)
    assert (run / "report" / "index.html").is_file()
    assert leftovers(run) == []
    out = outputs(run)
    # Every store in analyses/ is the output of a stage of the DAG (Analyse, and TrainingRuns' mark), and each is there.
    in_analyses = {Path(o.path).name for t in dag(exp).values() for o in luigi.task.flatten(t.output())
                   if Path(getattr(o, "path", "")).parent == run / "analyses"}
    assert {f"{a}.zarr" for a in tasks._experiment(str(exp)).analyses.run} <= in_analyses
    assert set(out["analyses"]) == in_analyses
    assert (out["routing"].expert_ids.values >= 0).all()


def test_lock_held_and_no_wait_fails_clearly(tmp_path, tiny_model, monkeypatch):
    """A run that may not wait (MOE_ATLAS_LOCK_TIMEOUT=0) stops at once, names the lock and its holder, writes nothing."""
    exp = new_run(tmp_path, tiny_model, port=18920)
    layout = RunLayout(tmp_path / "run")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom storage.lock import run_lock\n"
         "with run_lock(sys.argv[1], timeout=0):\n    print('held', flush=True)\n    time.sleep(600)\n", str(layout.lock)],
        cwd=Path(tasks.__file__).parents[1], stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setenv("MOE_ATLAS_LOCK_TIMEOUT", "0")
        ok, errors = build(exp)
    finally:
        holder.kill()
        holder.wait()
    assert not ok
    assert errors and all(isinstance(e, RunLocked) for e in errors), errors
    assert f"another moe-atlas run holds {layout.lock} (pid {holder.pid})" in str(errors[0])
    assert sorted(p.name for p in layout.root.iterdir()) == [".lock", ".moe-atlas-run.json", "model"]  # as new_run left it
    # The holder was killed: its lock went with it, nothing stale is left to clean.
    with run_lock(layout.lock, timeout=0):
        pass


def test_run_lock_is_reentrant_and_dies_with_its_holder(tmp_path):
    """Nested use in one process does not wait for itself; a SIGKILLed holder leaves no stale lock."""
    lock = tmp_path / "run" / ".lock"
    with run_lock(lock, timeout=0):
        with run_lock(lock, timeout=0):
            pass
        # Still held after the inner block: another process cannot take it.
        probe = subprocess.run([sys.executable, "-c", "import sys\nfrom storage.lock import run_lock\n"
                                "with run_lock(sys.argv[1], timeout=0.3):\n    pass\n", str(lock)],
                               cwd=REPO, capture_output=True, text=True)
        assert probe.returncode != 0 and f"another moe-atlas run holds {lock} (pid {os.getpid()})" in probe.stderr
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom storage.lock import run_lock\n"
                               "with run_lock(sys.argv[1], timeout=0):\n    print('held', flush=True)\n"
                               "    time.sleep(600)\n", str(lock)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunLocked, match=rf"\(pid {holder.pid}\)"):
        with run_lock(lock, timeout=0):
            pass
    holder.send_signal(signal_module.SIGKILL)
    holder.wait()
    with run_lock(lock, timeout=0):
        pass


def test_killed_dask_worker_mid_analysis(clean_run):
    """SIGKILL a worker while it executes a task of the analysis: distributed reruns its tasks, result unchanged."""
    from distributed import Client, LocalCluster, WorkerPlugin

    from analyses.runner import compute_analysis

    run, _ = clean_run
    names = checkpoint_names(run.parent / "tiny.toml")

    class StallOnce(WorkerPlugin):
        """The first worker to start executing a task claims ``signal`` (O_EXCL) and freezes until killed."""

        def __init__(self, signal: str):
            self.signal = signal

        def transition(self, key, start, finish, **kw):
            import os
            import time

            if finish != "executing":
                return
            try:
                fd = os.open(self.signal, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            while True:
                time.sleep(60)

    # 'change' compares checkpoints: its graph reads every checkpoint's chunks.
    task = tasks.Analyse(experiment=str(run.parent / "tiny.toml"), analysis="change")
    signal = run.parent / "stall-change"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=":0") as cl, \
            Client(cl) as client:
        client.register_plugin(StallOnce(str(signal)), name="stall")
        box = {}

        def compute():
            try:
                box["result"] = compute_analysis(run / "routing.zarr", "change", task.params(), checkpoints=names,
                                                 client=client)
            except BaseException as exc:  # handed to the test thread
                box["error"] = exc

        t = threading.Thread(target=compute)
        t.start()
        wait_for(lambda: signal.exists() and signal.read_text(), what="a worker to stall")
        pid = int(signal.read_text())
        assert t.is_alive(), "the analysis finished before the worker was killed"
        os.kill(pid, signal_module.SIGKILL)
        t.join(timeout=180)
        assert not t.is_alive()
        assert "error" not in box, box.get("error")
        assert pid not in client.run(os.getpid).values()  # it really died (the nanny started a new one)
    clean = compute_analysis(run / "routing.zarr", "change", task.params(), checkpoints=names)
    xr.testing.assert_identical(box["result"], clean)
    # And the same as what the clean pipeline run wrote.
    stored = cubes.open_result(run / "analyses" / "change.zarr")
    del stored.attrs[cubes.FINGERPRINT_ATTR]
    xr.testing.assert_identical(box["result"], stored)


def test_killed_luigi_mid_capture_then_mid_analysis_resumes(tmp_path, tiny_model, clean_run):
    exp = new_run(tmp_path, tiny_model, port=18930)
    run = tmp_path / "run"
    routing = run / "routing.zarr"
    names = checkpoint_names(exp)
    victim = names[len(names) // 2]
    signal = tmp_path / "signal.json"
    hooks = {FAULT_SIGNAL_ENV: str(signal)}

    # 1. Killed after the victim checkpoint's data is written, before it is marked complete.
    log1 = tmp_path / "run1.log"
    p = start_luigi(exp, log1, module="pipeline_helpers", env={
        **hooks, FAULT_ENV: f"capture:{victim}", "DASK_DISTRIBUTED__WORKER__PRELOAD": '["pipeline_helpers"]'})
    info = wait_for(lambda: signal.exists() and json.loads(signal.read_text()), what="capture to stall", proc=p,
                    log=log1)
    assert info["pid"] in group_pids(p.pid)  # the stalled writer is a Dask worker of this run
    # Only the Luigi process is killed: the worker, still inside the capture, must die with it, so that
    # nothing writes after the run lock is released.
    kill_leader(p)
    signal.unlink()
    ci = info["index"]
    assert list((routing / "expert_ids" / "c" / str(ci)).rglob("*")), "the killed capture had written data"
    done1 = cubes.completed_checkpoints(routing)
    assert victim not in done1
    assert victim not in set(cubes.open_routing(routing).checkpoint.values)
    tasks._experiment.cache_clear()
    assert not tasks.Capture(experiment=str(exp), checkpoint=victim).complete()
    from analyses.runner import compute_analysis

    with pytest.raises(cubes.CubeError, match=victim):
        compute_analysis(routing, "usage", {}, checkpoints=names)

    # 2. Killed after the 'change' result is in its temporary store, before the rename.
    log2 = tmp_path / "run2.log"
    p = start_luigi(exp, log2, module="pipeline_helpers", env={**hooks, FAULT_ENV: "analysis:change"})
    info = wait_for(lambda: signal.exists() and json.loads(signal.read_text()), what="analysis to stall", proc=p,
                    log=log2)
    kill_group(p)
    captured2 = {t[len("Capture("):-1] for t in _tasks_in(log2.read_text(), "running") if t.startswith("Capture(")}
    assert captured2 == set(names) - set(done1), "run 2 recaptures exactly what run 1 left incomplete"
    assert cubes.completed_checkpoints(routing) == names
    tmp_store = Path(info["tmp"])
    assert (tmp_store / "zarr.json").is_file(), "the killed analysis had written its temporary store"
    assert cubes.result_fingerprint(run / "analyses" / "change.zarr") is None
    assert not tasks.Analyse(experiment=str(exp), analysis="change").complete()
    assert not tasks.FullReport(experiment=str(exp)).complete()

    # 3. A plain rerun finishes, redoing only what was lost, and leaves no temporaries.
    log3 = tmp_path / "run3.log"
    text = finish(start_luigi(exp, log3), log3)
    ran3 = [t.split("(")[0] for t in _tasks_in(text, "running")]
    assert "Capture" not in ran3 and "Tokenize" not in ran3 and "RoutingTemplate" not in ran3
    assert "Analyse" in ran3 and "FullReport" in ran3
    assert leftovers(run) == []
    assert_same_outputs(outputs(run), outputs(clean_run[0]))
    np.testing.assert_array_equal(cubes.open_routing(routing).complete.values, 1)
