"""Helpers for tests that run the Luigi pipeline on the tiny demo, in-process or as ``luigi`` subprocesses.

- :func:`tiny_model`: a session fixture, the tiny demo of :func:`tiny_experiment`
  prepared once (trained, ``prepared.json`` written); :func:`new_run` copies its
  model dir into a fresh run, so a run starts at Tokenize.
- :func:`start_luigi`: ``luigi --module ... FullReport`` in its own session;
  :func:`kill_group` SIGKILLs it with its Dask nanny and workers,
  :func:`kill_leader` only the Luigi process (and checks the rest follow).
- Fault hooks: with ``MOE_ATLAS_FAULT=capture:<checkpoint>`` or
  ``analysis:<name>`` in the environment, importing this module (as the Luigi
  ``--module`` and as a Dask worker preload) makes the pipeline stop at a fixed
  point and sleep, after writing a JSON signal file (``MOE_ATLAS_FAULT_SIGNAL``):

  * ``capture:<c>`` (in the Dask worker): checkpoint c's data are all written
    to routing.zarr, its ``complete`` flag not yet set;
  * ``analysis:<a>`` (in the Luigi process): analysis a's result is written to
    its temporary store, not yet renamed into place.

  The test then kills the run at exactly that point (:func:`kill_leader`,
  :func:`kill_group`). Production code has no test hooks.
- :func:`outputs` / :func:`assert_same_outputs`: what a user gets from a run,
  compared value for value.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
FAULT_ENV = "MOE_ATLAS_FAULT"
FAULT_SIGNAL_ENV = "MOE_ATLAS_FAULT_SIGNAL"


# ------------------------------------------------------------------ fault hooks


def _signal(payload: dict) -> None:
    path = Path(os.environ[FAULT_SIGNAL_ENV])
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(dict(payload, pid=os.getpid())))
    os.replace(tmp, path)  # the test never reads half a signal


def _stall(payload: dict) -> None:
    _signal(payload)
    while True:  # until the test kills the process group
        time.sleep(60)


def _install_fault_hook(spec: str) -> None:
    kind, _, name = spec.partition(":")
    from storage import cube

    if kind == "capture":
        flush = cube.RoutingWriter._flush

        def _flush(self, *, final):
            flush(self, final=final)
            if final and self.checkpoint == name:
                _stall({"checkpoint": name, "routing": str(self.path), "index": self.ci})

        cube.RoutingWriter._flush = _flush
    elif kind == "analysis":
        import xarray as xr

        write_result = cube.write_result

        def _write_result(ds, path, *, fingerprint):
            if Path(path).name == f"{name}.zarr" and Path(path).parent.name == "analyses":
                to_zarr = xr.Dataset.to_zarr

                def _to_zarr(self, store, *args, **kwargs):
                    out = to_zarr(self, store, *args, **kwargs)
                    _stall({"analysis": name, "tmp": str(store), "target": str(path)})
                    return out

                xr.Dataset.to_zarr = _to_zarr
            return write_result(ds, path, fingerprint=fingerprint)

        cube.write_result = _write_result
    else:
        raise ValueError(f"{FAULT_ENV}={spec!r}: expected 'capture:<checkpoint>' or 'analysis:<name>'")


if os.environ.get(FAULT_ENV):
    import tasks  # noqa: F401  (``luigi --module pipeline_helpers`` must see the task classes)

    _install_fault_hook(os.environ[FAULT_ENV])


# ------------------------------------------------------------------ the tiny demo

_MODEL: dict[str, Path] = {}


# Fault tests need one analysis per checkpoint and one across checkpoints; more only costs time.
ANALYSES = ("usage", "change")


#: test_pipeline's tiny demo: the tiny experiment with paired conditions and the lens/divergence capture.
CONDITIONS = {"a": "tool_context", "b": "plain"}
LENS_CAPTURE = {"logit_lens": True, "js_divergence": True}


def tiny_experiment(out: Path, *, port: int, analyses=ANALYSES) -> str:
    """The tiny demo (``experiments/tiny.py``) with conditions and the lens capture, running ``analyses``."""
    from experiments.tiny import tiny_experiment as tiny

    return tiny(out, analyses=analyses, port=port, capture=LENS_CAPTURE, conditions=CONDITIONS)


def build(exp_path, targets=None) -> tuple[bool, list[BaseException]]:
    """luigi.build in this process; returns (ok, exceptions raised by tasks or while scheduling them)."""
    import luigi

    import tasks

    tasks._experiment.cache_clear()
    errors: list[BaseException] = []

    def failed(task, exc):
        errors.append(exc)

    luigi.Task.event_handler(luigi.Event.FAILURE)(failed)
    luigi.Task.event_handler(luigi.Event.BROKEN_TASK)(failed)
    try:
        ok = luigi.build(targets or [tasks.FullReport(experiment=str(exp_path))], local_scheduler=True, workers=1,
                         log_level="WARNING")
    finally:
        for event in (luigi.Event.FAILURE, luigi.Event.BROKEN_TASK):
            luigi.Task._event_callbacks.get(luigi.Task, {}).get(event, set()).discard(failed)
    return ok, errors


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The tiny demo's model dir (checkpoints, tokenizer, eval data, prepared.json), prepared once per session.

    Cached at module level: test modules that import this fixture get separate
    fixture definitions, but share one trained model.
    """
    if "model" not in _MODEL or not _MODEL["model"].exists():
        import tasks

        root = tmp_path_factory.mktemp("tiny_model")
        exp = root / "tiny.toml"
        exp.write_text(tiny_experiment(root / "run", port=18900))
        ok, errors = build(exp, [tasks.PrepareModel(experiment=str(exp))])
        assert ok, errors
        _MODEL["model"] = root / "run" / "model"
    return _MODEL["model"]


def dag(exp_path) -> dict[str, object]:
    """Every task of the experiment's FullReport DAG, by ``str(task)`` (what luigi logs)."""
    import luigi

    import tasks

    tasks._experiment.cache_clear()
    seen: dict[str, object] = {}
    todo = [tasks.FullReport(experiment=str(exp_path))]
    while todo:
        t = todo.pop()
        if str(t) not in seen:
            seen[str(t)] = t
            todo.extend(luigi.task.flatten(t.requires()))
    return seen


def checkpoint_names(exp_path) -> list[str]:
    import tasks

    tasks._experiment.cache_clear()
    return [c.name for c in tasks.checkpoints(tasks._experiment(str(exp_path)))]


def new_run(root: Path, model: Path, *, port: int) -> Path:
    """A fresh run of the tiny demo under ``root/run`` whose model is already prepared; returns the experiment file."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(model, root / "run" / "model")
    # The run folder the model was prepared in is the tiny experiment's (storage/ownership.py): copying
    # its marker makes the copy that experiment's run too (a non-empty folder without one is refused).
    from storage.ownership import MARKER

    shutil.copy2(model.parent / MARKER, root / "run" / MARKER)
    exp = root / "tiny.toml"
    exp.write_text(tiny_experiment(root / "run", port=port))
    return exp


# ------------------------------------------------------------------ subprocesses


def start_luigi(exp: Path | str, log: Path, *, module: str = "tasks", env: dict | None = None) -> subprocess.Popen:
    """``luigi --module <module> FullReport --experiment <exp>`` from the repository root, in its own session.

    Luigi itself refuses to start a command line identical to one already
    running (exit 0, "Pid(s) ... already running"); tests of the run lock spell
    the experiment path differently in each run.
    """
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS)] + ([e["PYTHONPATH"]] if e.get("PYTHONPATH") else []))
    e.update(env or {})
    luigi_bin = Path(sys.executable).with_name("luigi")
    with open(log, "wb") as f:
        return subprocess.Popen(
            [str(luigi_bin), "--module", module, "FullReport", "--experiment", str(exp)],
            cwd=REPO, env=e, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
        )


def group_pids(pgid: int) -> list[int]:
    """Live processes of a process group (zombies excluded)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(d.name))
    return pids


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the Luigi process and everything it started (nanny, Dask workers), and wait until all are gone."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)
    wait_for(lambda: not group_pids(proc.pid), what=f"the processes of group {proc.pid} to exit")


def kill_leader(proc: subprocess.Popen) -> None:
    """SIGKILL the Luigi process alone; its Dask nanny and workers must exit by themselves (they do not
    outlive it: distributed's worker processes exit when their parent's pipe closes)."""
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    try:
        wait_for(lambda: not group_pids(proc.pid), what=f"the Dask processes of the killed run {proc.pid} to exit",
                 timeout=60)
    finally:
        for pid in group_pids(proc.pid):  # only if the assertion above failed
            os.kill(pid, signal.SIGKILL)


def wait_for(cond, *, what: str, timeout: float = 180, proc: subprocess.Popen | None = None, log: Path | None = None):
    """Poll ``cond`` until it is true; fail early if ``proc`` exits first. The timeout only guards against hangs."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-4000:] if log else ""
            pytest.fail(f"process exited (rc {proc.returncode}) before {what}:\n{tail}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> str:
    """Wait for a luigi subprocess; its log text. Fails with the log tail unless it succeeded."""
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        pytest.fail(f"luigi did not finish in {timeout} s:\n{log.read_text(errors='replace')[-4000:]}")
    text = log.read_text(errors="replace")
    assert rc == 0 and "This progress looks :)" in text, text[-4000:]
    return text


def listening_sockets(pids) -> list[tuple[str, int, int]]:
    """(ip, port, pid) of every listening TCP socket (IPv4 and IPv6) owned by ``pids``, from /proc."""
    import ipaddress

    inode_pid = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                try:
                    target = os.readlink(fd)
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inode_pid[target[8:-1]] = pid
        except OSError:
            continue
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            local, state, inode = parts[1], parts[3], parts[9]
            if state != "0A" or inode not in inode_pid:  # 0A = LISTEN
                continue
            hexip, hexport = local.split(":")
            raw = bytes.fromhex(hexip)
            # /proc stores the address as host-order 32-bit words.
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            ip = str(ipaddress.ip_address(raw))
            out.append((ip, int(hexport, 16), inode_pid[inode]))
    return out


def descendants(pid: int) -> list[int]:
    """``pid`` and all its live descendants."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


# ------------------------------------------------------------------ outputs


def outputs(run: Path) -> dict:
    """Everything a user reads from a finished run, as comparable values.

    routing.zarr (variables, coords, attrs, complete flags), every analysis
    result (and every part of a stage with several, analyses/<stage>/*.zarr), tables/*.csv, summary.json without the fields that name the run
    (its file, output dir, time), the figure file names.
    """
    import xarray as xr

    from storage import cube as cubes

    routing = xr.open_zarr(run / "routing.zarr", consolidated=None).load()
    summary = json.loads((run / "summary.json").read_text())
    # Fingerprints hash the analyses' source code too (analyses.VERSION): left out, so that runs made while
    # someone edits the code still compare on what they computed.
    for volatile in ("generated", "experiment_file", "experiment_spec", "fingerprint"):
        summary.pop(volatile, None)
    results = {p.name: cubes.open_result(p) for p in sorted((run / "analyses").glob("*.zarr"))}
    # a stage's several results (analyses/training/*.zarr; the stage's mark is analyses/training.zarr)
    parts = {str(p.relative_to(run)): cubes.open_result(p) for p in sorted((run / "analyses").glob("*/*.zarr"))}
    for ds in [*results.values(), *parts.values()]:
        ds.attrs.pop(cubes.FINGERPRINT_ATTR, None)
    return {
        "routing": routing,
        "analyses": results,
        "parts": parts,
        "tables": {p.name: p.read_text() for p in sorted((run / "tables").glob("*.csv"))},
        "summary": summary,
        "figures": sorted(str(p.relative_to(run)) for p in (run / "report").rglob("*.png")),
    }


def assert_same_outputs(a: dict, b: dict) -> None:
    import xarray as xr

    xr.testing.assert_identical(a["routing"], b["routing"])
    assert sorted(a["analyses"]) == sorted(b["analyses"])
    for name in a["analyses"]:
        xr.testing.assert_identical(a["analyses"][name], b["analyses"][name])
    assert sorted(a["parts"]) == sorted(b["parts"])
    for name in a["parts"]:
        xr.testing.assert_identical(a["parts"][name], b["parts"][name])
    assert a["tables"] == b["tables"]
    assert a["summary"] == b["summary"]
    assert a["figures"] == b["figures"]


def leftovers(run: Path) -> list[str]:
    """Temporary stores or files of killed writes anywhere under the run dir."""
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if ".tmp-" in p.name or ".old-" in p.name)
