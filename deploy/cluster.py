"""The one place a Dask client is made.

``client()`` connects to an existing scheduler when one is configured
(experiment ``[dask] scheduler`` or the ``MOE_ATLAS_SCHEDULER`` environment
variable), else starts a LocalCluster bound to 127.0.0.1 with its dashboard on
:8787 or the next free port. The cluster lives as long as the process (one per
``luigi`` invocation) and is shared by every task in it.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket

log = logging.getLogger("moe_atlas.deploy")

_CLIENT = None
_CLUSTER = None


def _free_port(host: str, start: int, tries: int = 50) -> int:
    for port in range(start, start + tries):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port for the Dask dashboard on {host} in {start}..{start + tries - 1}")


def client(
    *,
    scheduler: str = "",
    n_workers: int = 2,
    threads_per_worker: int = 1,
    host: str = "127.0.0.1",
    dashboard_port: int = 8787,
    memory_limit: str = "auto",
    gpus_per_worker: int = 0,
    announce: bool = True,
):
    """Return the process-wide Dask client, creating it on first use.

    Parameters mirror the experiment's ``[dask]`` table. Workers are processes
    (capture runs torch, which holds the GIL in places). With ``gpus_per_worker``
    each local worker advertises a ``GPU`` resource, and capture jobs that ask
    for one never share a device.
    """
    global _CLIENT, _CLUSTER
    from distributed import Client, LocalCluster

    if _CLIENT is not None and _CLIENT.status == "running":
        return _CLIENT
    scheduler = scheduler or os.environ.get("MOE_ATLAS_SCHEDULER", "")
    if scheduler:
        _CLIENT = Client(scheduler)
    else:
        port = _free_port(host, dashboard_port)
        _CLUSTER = LocalCluster(
            n_workers=n_workers,
            threads_per_worker=threads_per_worker,
            processes=True,
            host=host,
            scheduler_port=0,
            dashboard_address=f"{host}:{port}",
            memory_limit=memory_limit,
            resources={"GPU": gpus_per_worker} if gpus_per_worker else None,
            # Workers inherit this so that torch in a worker does not oversubscribe cores.
            # one BLAS thread per worker thread: idle BLAS threads spin and steal the other workers' cores
            env={"OMP_NUM_THREADS": str(threads_per_worker), "OPENBLAS_NUM_THREADS": str(threads_per_worker),
                 "MKL_NUM_THREADS": str(threads_per_worker), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
        )
        _CLIENT = Client(_CLUSTER)
        atexit.register(close_client)
    if announce:
        msg = f"Dask dashboard: {dashboard_link()}  (scheduler {_CLIENT.scheduler.address})"
        log.info(msg)
        print(msg, flush=True)
    return _CLIENT


def dashboard_link() -> str:
    if _CLIENT is None:
        return ""
    return _CLIENT.dashboard_link


def close_client() -> None:
    global _CLIENT, _CLUSTER
    if _CLIENT is not None:
        try:
            _CLIENT.close()
        except Exception:  # closing at interpreter exit may race the event loop
            pass
    if _CLUSTER is not None:
        try:
            _CLUSTER.close()
        except Exception:
            pass
    _CLIENT = _CLUSTER = None
