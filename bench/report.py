"""Benchmark: the report stage, its analysis sections rendered here or in a pool of forked processes.

    python -m bench.report [EXPERIMENT]     # default: experiments/demo.toml (its run must exist)

The run folder is copied to a scratch directory (the run itself is not touched), then
``analyses.report.build_report`` renders it twice there, ``parallel=False`` and
``parallel=True``, in alternating order over ``--repeats`` rounds. Prints JSON: each
build's wall seconds, the median ratio serial / parallel, the pool size, and whether the
two builds wrote the same files and the same ``summary.json`` (less its time stamp).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.analyses import emit, log, machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _files(root: Path) -> set[str]:
    return {str(f.relative_to(root)) for f in root.rglob("*") if f.is_file()}


def main(argv=None) -> int:
    import tasks
    from analyses import report
    from storage.layout import RunLayout

    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", nargs="?", default=str(REPO / "experiments" / "demo.toml"))
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    task = tasks.FullReport(experiment=str(Path(args.experiment).resolve()))
    if not Path(task.output().path).exists():
        print(f"bench.report: {task.layout.root}: no finished run (run `luigi --module tasks FullReport` first)",
              file=sys.stderr)
        return 1
    names = [r.analysis for r in task.requires() if isinstance(r, tasks.Analyse)]
    fingerprint = task.fingerprint()
    times: dict[str, list[float]] = {"serial": [], "parallel": []}
    outputs: dict[str, tuple] = {}
    with tempfile.TemporaryDirectory(prefix="bench-report-") as scratch:
        for i in range(args.repeats):
            for mode in (("serial", "parallel") if i % 2 == 0 else ("parallel", "serial")):
                root = Path(scratch) / mode
                shutil.rmtree(root, ignore_errors=True)
                shutil.copytree(task.layout.root, root)
                layout = RunLayout(root)
                shutil.rmtree(layout.report_dir)
                log(f"round {i + 1}: {mode}")
                t0 = time.perf_counter()
                report.build_report(task.exp, layout, names, fingerprint=fingerprint, parallel=mode == "parallel")
                times[mode].append(time.perf_counter() - t0)
                summary = json.loads(layout.summary.read_text())
                summary.pop("generated", None)
                outputs[mode] = (_files(layout.report_dir), summary)
    ratios = [s / p for s, p in zip(times["serial"], times["parallel"])]
    emit({
        "experiment": args.experiment,
        "analyses": names,
        "pool_processes": report._render_processes(len(names)),
        "cores": len(os.sched_getaffinity(0)),
        "serial_s": times["serial"],
        "parallel_s": times["parallel"],
        "speedup_median": statistics.median(ratios),
        "same_files": outputs["serial"][0] == outputs["parallel"][0],
        "same_summary": outputs["serial"][1] == outputs["parallel"][1],
        "machine": machine(),
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
