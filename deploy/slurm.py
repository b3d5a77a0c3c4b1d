"""Start a Dask cluster on SLURM and print its scheduler address.

Usage (on a login node, in the project's environment with ``pip install dask-jobqueue``)::

    python -m deploy.slurm --jobs 4 --cores 8 --memory 64GB --gpus 1 --walltime 04:00:00
    # prints: MOE_ATLAS_SCHEDULER=tcp://10.1.2.3:8786 ; keep it running
    MOE_ATLAS_SCHEDULER=tcp://10.1.2.3:8786 luigi --module tasks FullReport --experiment experiments/x.toml

The scheduler runs in this process; workers are SLURM jobs. Workers with GPUs
advertise a ``GPU`` resource so that capture jobs (one per checkpoint) get one
device each. The scheduler listens on the login node's interface reachable by
the compute nodes (``--interface``); the dashboard stays on 127.0.0.1 unless
``--dashboard-address`` says otherwise (reach it with an SSH tunnel).
"""

from __future__ import annotations

import argparse
import time


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--cores", type=int, default=4)
    p.add_argument("--memory", default="32GB")
    p.add_argument("--gpus", type=int, default=0)
    p.add_argument("--walltime", default="02:00:00")
    p.add_argument("--queue", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--interface", default=None, help="network interface of the scheduler (e.g. ib0)")
    p.add_argument("--dashboard-address", default="127.0.0.1:8787")
    a = p.parse_args(argv)
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError as exc:  # optional dependency
        raise SystemExit("deploy.slurm needs dask-jobqueue: pip install dask-jobqueue") from exc

    extra = ["--resources", f"GPU={a.gpus}"] if a.gpus else []
    cluster = SLURMCluster(
        cores=a.cores, processes=1, memory=a.memory, walltime=a.walltime, queue=a.queue, account=a.account,
        interface=a.interface, job_extra_directives=[f"--gres=gpu:{a.gpus}"] if a.gpus else [],
        worker_extra_args=extra, scheduler_options={"dashboard_address": a.dashboard_address},
        job_script_prologue=["export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false"],
    )
    cluster.scale(jobs=a.jobs)
    print(f"MOE_ATLAS_SCHEDULER={cluster.scheduler_address}", flush=True)
    print(f"dashboard: {cluster.dashboard_link}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        cluster.close()


if __name__ == "__main__":
    main()
