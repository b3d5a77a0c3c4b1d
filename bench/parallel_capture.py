"""Benchmark (issue 11.3): the demo's captures one at a time vs side by side on the Dask cluster.

The demo experiment (``experiments/demo.toml``: its model architecture, its
held-out and paired data, its capture settings: router logits, NLL, logit
lens, JS divergence; ``[dask] n_workers = 2, threads_per_worker = 1``) with
fewer training steps (``--train-steps``): what a capture costs does not depend
on how long the model was trained, and training is not what is measured.
The model, token tables and routing template are made once; each repetition
copies that run folder and captures its four checkpoints through the real
Luigi tasks on one warm ``deploy.client()`` cluster (TLS, workers prepared):

``sequential``  ``luigi.build([Capture(c) for c in checkpoints])`` with ``Capture.max_batch_size = 1``:
                one Capture task, hence one job on the cluster, at a time (what every run did before)
``concurrent``  the same build with batching on (the default): Luigi hands the pending captures over as one
                task, which submits the four jobs at once

Repetitions interleave the two modes (rotated order). Prints JSON: per mode the
median seconds and every repeat, the ratio sequential / concurrent (of medians
and per repetition), the capture jobs' own seconds and span (Dask task stream),
the load average at start and end.

Run from the repository root::

    python -m bench.parallel_capture             # the demo's data and model size, 2 repeats (~2 min on 2 cores)
    python -m bench.parallel_capture --tiny      # a tiny model and data; for the smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.analyses import emit, log, machine, summary  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def experiment_text(out: Path, *, steps: int, tiny: bool) -> str:
    """demo.toml with ``output_dir = out``, ``steps`` training steps and four checkpoints spread over them."""
    text = (REPO / "experiments" / "demo.toml").read_text()
    text = re.sub(r'(?m)^output_dir = .*$', f'output_dir = "{out}"', text)
    ckpts = sorted({0, steps // 3, 2 * steps // 3, steps})
    if len(ckpts) != 4:
        raise SystemExit(f"--train-steps {steps}: need at least 3 steps for four distinct checkpoints")
    if tiny:
        from experiments.tiny import demo_section

        section = demo_section(steps=steps, checkpoint_steps=ckpts, warmup_steps=1)
        text = re.sub(r"(?ms)^\[model\.demo\]\n.*?(?=^\[)", lambda _: section + "\n", text)
    else:
        text = text.replace("[model.demo]\n", f"[model.demo]\nsteps = {steps}\ncheckpoint_steps = {ckpts}\n"
                            f"warmup_steps = {max(1, steps // 10)}\n", 1)
    return text


def build(tasks_to_run) -> None:
    import luigi

    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON document
        result = luigi.build(tasks_to_run, local_scheduler=True, workers=1, log_level="WARNING",
                             detailed_summary=True)
    if not result.scheduling_succeeded or result.status.name not in ("SUCCESS", "SUCCESS_WITH_RETRY"):
        raise SystemExit(f"luigi build failed: {result.summary_text}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--train-steps", type=int, default=12)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--keep", type=Path, default=None, help="keep the run folders here")
    a = p.parse_args(argv)
    if a.tiny:
        a.repeats = 1

    import deploy
    import tasks

    start = machine()
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="bench-parallel-capture-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        base = work / "base"
        exp = work / "base.toml"
        exp.write_text(experiment_text(base, steps=a.train_steps, tiny=a.tiny))
        log(f"preparing the demo model ({a.train_steps} training steps), token tables and routing template in {base}")
        tasks._experiment.cache_clear()
        build([tasks.RoutingTemplate(experiment=str(exp))])
        spec = tasks._experiment(str(exp))
        names = [c.name for c in tasks.checkpoints(spec)]
        n_tokens = int(tasks.cubes.open_routing(base / "routing.zarr", complete_only=False).sizes["token"])
        d = spec.dask
        with contextlib.redirect_stdout(sys.stderr):
            client = deploy.client(n_workers=d.n_workers, threads_per_worker=d.threads_per_worker,
                                   dashboard_port=0, announce=False)
        log(f"cluster: {len(client.scheduler_info()['workers'])} workers x {d.threads_per_worker} thread(s), "
            f"{client.scheduler.address}; {len(names)} checkpoints x {n_tokens} tokens")

        times: dict[str, list[float]] = {"sequential": [], "concurrent": []}
        jobs: dict[str, list[dict]] = {"sequential": [], "concurrent": []}
        for rep in range(a.repeats):
            order = ["sequential", "concurrent"] if rep % 2 == 0 else ["concurrent", "sequential"]
            for mode in order:
                run = work / f"{mode}-{rep}"
                if run.exists():
                    shutil.rmtree(run)
                shutil.copytree(base, run)  # model, token tables and the routing template: nothing captured yet
                e = work / f"{mode}-{rep}.toml"
                e.write_text(experiment_text(run, steps=a.train_steps, tiny=a.tiny))
                tasks._experiment.cache_clear()
                captures = [tasks.Capture(experiment=str(e), checkpoint=n) for n in names]
                assert not any(t.complete() for t in captures)
                from distributed import get_task_stream

                stream = get_task_stream(client)
                stream.__enter__()
                t0 = time.perf_counter()
                # The same single Luigi build in both modes; ``max_batch_size = 1`` turns batching off, so the
                # captures run as every run ran them before: one Capture task, hence one Dask job, at a time.
                tasks.Capture.max_batch_size = 1 if mode == "sequential" else float("inf")
                try:
                    build(captures)
                finally:
                    tasks.Capture.max_batch_size = float("inf")
                dt = time.perf_counter() - t0
                stream.__exit__(None, None, None)
                spans = [(ss["start"], ss["stop"]) for x in stream.data if str(x["key"]).startswith("capture-")
                         for ss in x["startstops"] if ss["action"] == "compute"]
                jobs[mode].append({"job_seconds_sum": sum(b - a for a, b in spans),
                                   "jobs_span_s": max(b for _, b in spans) - min(a for a, _ in spans),
                                   "jobs": len(spans)})
                assert all(t.complete() for t in captures), f"{mode}: not every checkpoint was captured"
                times[mode].append(dt)
                log(f"repeat {rep} {mode}: {dt:.2f} s")
        seq, conc = summary(times["sequential"]), summary(times["concurrent"])
        doc = {
            "benchmark": "parallel_capture",
            "what": "the demo's checkpoints captured through tasks.Capture on one warm deploy.client() cluster, "
                    "one Luigi build of all of them: batching off, one job at a time (sequential) vs on, all jobs "
                    "submitted at once (concurrent)",
            "experiment": "experiments/demo.toml" + (" (tiny model and data)" if a.tiny else "")
                          + f", {a.train_steps} training steps",
            "checkpoints": names,
            "tokens_per_checkpoint": n_tokens,
            "dask": {"n_workers": d.n_workers, "threads_per_worker": d.threads_per_worker},
            "sequential": seq,
            "concurrent": conc,
            "speedup_sequential_over_concurrent": seq["median_s"] / conc["median_s"],
            "speedup_per_repeat": [s / c for s, c in zip(times["sequential"], times["concurrent"])],
            # From the Dask task stream: the capture jobs' own compute seconds (summed) and the wall span from the
            # first job's start to the last one's end. Wall time minus span is Luigi's per-task overhead
            # (completeness checks, the run lock), which batching also pays once instead of once per checkpoint.
            "capture_jobs": jobs,
            "machine_start": start,
        }
        with contextlib.redirect_stdout(sys.stderr):
            deploy.close_client()
        doc["machine_end"] = machine()
        emit(doc)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
