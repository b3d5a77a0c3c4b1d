"""Benchmark (issue 5): the whole pipeline from a clean checkout, then incremental re-runs.

1. ``git clone`` of the source repository's HEAD into a temporary directory
   (committed code only; the current virtualenv is used, nothing reinstalled;
   ``PYTHONPATH`` points at the clone so its packages shadow the editable install);
2. ``luigi --module tasks FullReport`` there (the embedded demo: train, tokenize,
   capture, analyse, report), timed;
3. the same command again: a no-op re-run, timed; then ``moe-atlas run`` three times
   (a no-op re-run in <= 3 s, issue 13), beside the import floor of the same run;
4. a second experiment with ``source = "checkpoints"`` naming the demo's trained
   checkpoints with one (a middle one) left out, over the demo's held-out data: run, timed;
5. the missing checkpoint added to that experiment: run, timed (only that checkpoint
   should be captured; analyses and report recomputed).

Prints JSON with each run's wall seconds, whether Luigi reported success and which
tasks ran (from Luigi's "done" log lines).

Run from the repository root::

    python -m bench.e2e                    # the default demo (a couple of minutes on 2 cores)
    python -m bench.e2e --tiny             # a very small demo model (smoke test)
    python -m bench.e2e --keep DIR         # keep the clone and the runs in DIR
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.analyses import emit, log, machine  # noqa: E402
from experiments.toml_writer import to_toml  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RUNNING = re.compile(r"\) running\s+(\w+)\((.*)\)\s*$")
DONE = re.compile(r"\) done\s+(\w+)\((.*)\)\s*$")
FAILED = re.compile(r"\) failed\s+(\w+)\((.*)\)\s*$")

def task_label(name: str, params: str) -> str:
    """``Name:param/param`` without the experiment path (the same in every task)."""
    parts = [p.split("=", 1)[1] for p in re.split(r",\s*", params) if "=" in p and not p.startswith("experiment=")]
    return f"{name}:{'/'.join(parts)}" if parts else name


def luigi_run(clone: Path, env: dict, experiment: str | None, log_file: Path) -> dict:
    """Run ``luigi --module tasks FullReport`` in ``clone``: wall seconds, tasks that ran and their seconds.

    Luigi's log lines carry no time, so each line is stamped as it arrives; a
    task's seconds run from its "running" line to its "done" line.
    """
    # A private lock directory: Luigi refuses to start while the same command line runs elsewhere
    # (another user's `luigi --module tasks FullReport` on this machine would stop the benchmark).
    cmd = [str(Path(sys.executable).parent / "luigi"), "--module", "tasks", "FullReport",
           "--lock-pid-dir", str(log_file.parent / "luigi-lock")]
    if experiment:
        cmd += ["--experiment", experiment]
    started: dict[str, float] = {}
    ran: list[str] = []
    failed: list[str] = []
    seconds: dict[str, float] = {}
    lines = []
    t0 = time.perf_counter()
    with subprocess.Popen(cmd, cwd=clone, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1) as proc:
        for line in proc.stdout:
            now = time.perf_counter()
            lines.append(f"{now - t0:9.3f} {line}")
            for pattern, sink in ((RUNNING, None), (DONE, ran), (FAILED, failed)):
                m = pattern.search(line)
                if not m:
                    continue
                label = task_label(*m.groups())
                if sink is None:
                    started[label] = now
                else:
                    sink.append(label)
                    if label in started:
                        seconds[label] = now - started[label]
        rc = proc.wait()
    wall = time.perf_counter() - t0
    out = "".join(lines)
    log_file.write_text(out)
    ok = rc == 0 and not failed and "This progress looks :)" in out
    return {"command": " ".join(["luigi"] + cmd[1:]), "cwd": str(clone), "wall_s": wall, "ok": ok,
            "returncode": rc, "tasks_ran": ran, "task_seconds": seconds, "tasks_failed": failed,
            "log": str(log_file)}


def cli_noop(clone: Path, env: dict, experiment: str, log_file: Path, *, repeats: int = 3) -> dict:
    """``moe-atlas run EXPERIMENT`` on a finished run, ``repeats`` times (issue 13: a no-op re-run in <= 3 s).

    Wall and CPU seconds (this process's children) of each, and in the same
    run the floor every command pays: ``python -c "import tasks, analyses"``
    (``import_floor_s``); ``ratio_to_import_floor`` compares the two within
    this run, so machine load cancels out at least partly.
    """
    import resource

    def timed(cmd) -> tuple[float, float, subprocess.CompletedProcess]:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=clone, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), proc

    runs, floor, out = [], [], []
    for _ in range(repeats):
        wall, cpu, proc = timed([sys.executable, "-m", "moe_atlas", "run", experiment])
        out.append(proc.stdout + proc.stderr)
        runs.append({"wall_s": wall, "cpu_s": cpu, "returncode": proc.returncode,
                     "nothing_to_run": "nothing to run" in proc.stdout})
        floor.append(timed([sys.executable, "-c", "import tasks, analyses"])[0])
    log_file.write_text("\n".join(out))
    best = min(r["wall_s"] for r in runs)
    return {"command": f"moe-atlas run {experiment}", "runs": runs, "wall_s": best, "best_wall_s": best,
            "median_wall_s": sorted(r["wall_s"] for r in runs)[len(runs) // 2],
            "import_floor_s": min(floor), "ratio_to_import_floor": best / min(floor), "target_s": 3.0,
            "meets_target": best <= 3.0, "ok": all(r["returncode"] == 0 and r["nothing_to_run"] for r in runs),
            "log": str(log_file)}


def checkpoints_experiment(demo: dict, demo_out: Path, out_dir: Path, ckpts: list[tuple[str, Path, int]]) -> str:
    """The demo experiment turned into a user's: ``source = "checkpoints"`` naming ``ckpts``.

    Everything but the model, the datasets, the name and the output directory
    is kept (capture options, conditions, analyses, report, dask), and the
    datasets are the demo's own held-out files, as ``tasks.datasets`` picks
    them for the demo (the paired file only when the experiment has conditions).
    """
    from capture.demo import EVAL_DATASET_NAME

    exp = {k: v for k, v in demo.items() if k not in ("name", "description", "output_dir", "model", "datasets")}
    data = demo_out / "model" / "data"
    datasets = [{"name": EVAL_DATASET_NAME, "path": str(data / "eval.jsonl")}]
    if demo.get("conditions", {}).get("a"):
        from capture.demo import PAIRED_DATASET_NAME

        datasets.append({"name": PAIRED_DATASET_NAME, "path": str(data / "paired.jsonl")})
    head = {"name": "checkpoints", "output_dir": str(out_dir),
            "model": {"source": "checkpoints",
                      "checkpoints": [{"name": n, "path": str(p), "step": s} for n, p, s in ckpts]},
            "datasets": datasets}
    # top-level scalars first: TOML puts everything after a table header into that table
    return "\n".join(to_toml({**{k: v for k, v in head.items() if k != "model" and k != "datasets"},
                              "model": head["model"], "datasets": datasets, **exp})) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default=str(REPO), help="repository to clone (its HEAD)")
    p.add_argument("--keep", default=None, help="keep the clone and runs in this directory (must not exist)")
    p.add_argument("--tiny", action="store_true", help="a very small demo model instead of the default demo")
    args = p.parse_args(argv)

    if args.keep:
        root = Path(args.keep)
        if root.exists():
            raise SystemExit(f"--keep {root}: already exists")
        root.mkdir(parents=True)
    else:
        root = Path(tempfile.mkdtemp(prefix="moe-atlas-bench-e2e-"))
    clone = root / "clone"
    doc = {"benchmark": "e2e", "issue": 5, "machine_start": machine(), "argv": sys.argv[1:] if argv is None else argv}
    try:
        head = subprocess.run(["git", "-C", args.source, "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        t = time.perf_counter()
        subprocess.run(["git", "clone", "--quiet", args.source, str(clone)], check=True)
        doc["clone"] = {"source": args.source, "commit": head, "seconds": time.perf_counter() - t}

        env = {**os.environ, "PYTHONPATH": str(clone), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "MPLBACKEND": "Agg"}
        where = subprocess.run([sys.executable, "-c", "import tasks, analyses; print(tasks.__file__)"], cwd=clone,
                               env=env, capture_output=True, text=True, check=True).stdout.strip()
        if not where.startswith(str(clone)):
            raise RuntimeError(f"the clone's packages do not shadow the installed ones: tasks from {where}")
        doc["code_from"] = where

        experiment = None
        if args.tiny:
            from experiments.tiny import tiny_experiment  # small enough for a smoke test; one analysis

            (clone / "experiments" / "tiny.toml").write_text(tiny_experiment("runs/tiny"))
            experiment = "experiments/tiny.toml"
        runs = doc["runs"] = {}
        log("1/4 FullReport from a clean checkout")
        runs["full_from_clean"] = luigi_run(clone, env, experiment, root / "1-full.log")
        log("2/4 no-op re-run")
        runs["noop_rerun"] = luigi_run(clone, env, experiment, root / "2-noop.log")
        log("2/4 no-op re-run with moe-atlas run (x3)")
        runs["noop_rerun_cli"] = cli_noop(clone, env, experiment or "experiments/demo.toml", root / "2-noop-cli.log")
        if not runs["full_from_clean"]["ok"]:
            raise RuntimeError(f"the demo run failed; see {runs['full_from_clean']['log']}")

        # The demo's own experiment file says where its run lives and how it captures.
        from experiments.spec import load_experiment

        demo_file = clone / (experiment or "experiments/demo.toml")
        exp = load_experiment(str(demo_file))
        demo_out = clone / exp.output_dir  # relative paths are taken from luigi's cwd, the clone
        if not demo_out.resolve().is_relative_to(root.resolve()):
            raise RuntimeError(f"the demo experiment writes to {demo_out}, outside the benchmark's directory {root}")
        ckpt_dirs = sorted((demo_out / "model" / "checkpoints").glob("step_*"))
        if len(ckpt_dirs) < 3:
            raise RuntimeError(f"{demo_out}: expected >= 3 demo checkpoints, found {[c.name for c in ckpt_dirs]}")
        ckpts = [(c.name, c, int(c.name.split("_")[1])) for c in ckpt_dirs]
        left_out = ckpts[len(ckpts) // 2]
        demo = tomllib.loads(demo_file.read_text())
        real = root / "checkpoints.toml"
        out_dir = root / "checkpoints-run"
        real.write_text(checkpoints_experiment(demo, demo_out, out_dir, [c for c in ckpts if c != left_out]))
        load_experiment(str(real))  # the spec's validator reads it back before Luigi does
        log(f"3/4 checkpoints experiment without {left_out[0]}")
        runs["checkpoints_minus_one"] = luigi_run(clone, env, str(real), root / "3-minus-one.log")
        real.write_text(checkpoints_experiment(demo, demo_out, out_dir, ckpts))
        log(f"4/4 checkpoint {left_out[0]} added")
        runs["add_one_checkpoint"] = luigi_run(clone, env, str(real), root / "4-add-one.log")
        doc["checkpoints"] = [c[0] for c in ckpts]
        doc["left_out_then_added"] = left_out[0]
        doc["add_one_captured_only_it"] = [t for t in runs["add_one_checkpoint"]["tasks_ran"]
                                           if t.startswith("Capture")] == [f"Capture:{left_out[0]}"]
    except Exception as exc:  # still print what was measured, and why it stopped
        doc["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        doc["machine_end"] = machine()
        if args.keep:
            doc["kept"] = str(root)
        else:
            shutil.rmtree(root, ignore_errors=True)
    emit(doc)
    return 0 if "error" not in doc and all(r["ok"] for r in doc["runs"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
