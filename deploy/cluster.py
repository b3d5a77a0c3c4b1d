"""The one place a Dask client is made.

``client()`` connects to an existing scheduler when one is configured
(experiment ``[dask] scheduler`` or the ``MOE_ATLAS_SCHEDULER`` environment
variable), else starts a LocalCluster bound to 127.0.0.1 with its dashboard on
:8787 or the next free port. The cluster lives as long as the process (one per
``luigi`` invocation) and is shared by every task in it.

Security
--------
A Dask scheduler or worker runs whatever a connected client sends it, so a
cluster without authentication hands code execution as the run's user to every
local account that can reach its port. The LocalCluster therefore speaks TLS
with credentials made for this run only (``distributed.Security.temporary()``:
a fresh key and self-signed certificate, held in memory and handed to the
worker processes by their nanny): a client without them is refused during the
TLS handshake. The dashboard is plain HTTP (bokeh), read-only, and stays on
127.0.0.1 whatever ``host`` is.

An external scheduler is reached with the user's own TLS settings: the ``tls``
argument (CA file, client certificate, key), else distributed's configuration
(``distributed.comm.tls.*`` in ~/.config/dask/*.yaml or ``DASK_DISTRIBUTED__COMM__TLS__*``).
A plain ``tcp://`` scheduler that is not on this machine is used, with a loud
warning.

Dying workers
-------------
Workers import what tasks need before running any (``deploy.worker``), and the
LocalCluster's scheduler fails a task after :data:`ALLOWED_FAILURES` retries
on workers that died running it (``KilledWorker``), or after
:data:`NO_WORKERS_TIMEOUT` without any worker able to run it (a nanny gets
:data:`LOST_WORKER_TIMEOUT` to restart its worker), so a crashed
worker ends the Luigi task with a message (:func:`cluster_errors`) instead of
waiting forever.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import logging
import os
import socket
import warnings

log = logging.getLogger("moe_atlas.deploy")

_CLIENT = None
_CLUSTER = None
_PID = None  # the process that made _CLIENT: a forked child (luigi workers > 1) must connect anew
_SECURITY = None  # this run's TLS credentials (LocalCluster) or the user's (external scheduler)
_ADDRESS = None

#: Retries of a task whose worker died while running it (distributed's default is 3: four full captures).
ALLOWED_FAILURES = 1
#: A task no worker can run (all dead and not restarted; no worker with a GPU) fails after this long.
#: Longer than a nanny's restart of a worker (which imports torch again: a minute on two busy cores).
NO_WORKERS_TIMEOUT = "300s"
#: How long the LocalCluster waits for a dead worker's nanny to bring it back before it closes that nanny
#: for good. distributed's default (15 s) is shorter than a restart on a busy machine: the cluster then lost
#: its only worker for good and the run waited for the no-workers timeout.
LOST_WORKER_TIMEOUT = "600s"
#: Worker processes per core at most: each one is a Python process that may load a whole model.
MAX_WORKERS_PER_CORE = 2
#: Connecting to an external scheduler gives up after this long (distributed's default is 30 s).
CONNECT_TIMEOUT = "30s"

ALLOW_REMOTE_ENV = "MOE_ATLAS_ALLOW_REMOTE_DASK"


class ClusterError(RuntimeError):
    """A Dask setting that cannot work or is unsafe, or a cluster that cannot be reached."""


def _free_port(host: str, start: int, tries: int = 50) -> int:
    for port in range(start, start + tries):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise ClusterError(f"no free port for the Dask dashboard on {host} in {start}..{start + tries - 1}")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _address_host(address: str) -> str:
    """'tls://10.0.0.1:8786' -> '10.0.0.1'; '[::1]:8786' -> '::1'."""
    rest = address.split("://", 1)[-1]
    if rest.startswith("["):
        return rest[1:rest.index("]")]
    return rest.rsplit(":", 1)[0] if rest.count(":") == 1 else rest


def check_settings(*, n_workers: int, threads_per_worker: int, host: str, dashboard_port: int,
                   allow_remote: bool = False, cores: int | None = None) -> None:
    """Refuse LocalCluster settings that cannot work or would expose the run.

    Raises
    ------
    ClusterError
        One line naming the ``[dask]`` key, the value and what is accepted:
        a dashboard port outside 0..65535 (0 = any free port), fewer than one
        worker or thread, more than :data:`MAX_WORKERS_PER_CORE` workers per
        core, or a ``host`` that is not loopback unless ``allow_remote`` (or
        ``MOE_ATLAS_ALLOW_REMOTE_DASK=1``) says so; then it warns instead.
    """
    cores = cores or os.cpu_count() or 1
    for key, value in (("n_workers", n_workers), ("threads_per_worker", threads_per_worker),
                       ("dashboard_port", dashboard_port)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ClusterError(f"[dask] {key} = {value!r}: expected an integer")
    if not 0 <= dashboard_port <= 65535:
        raise ClusterError(f"[dask] dashboard_port = {dashboard_port}: expected a TCP port 1..65535 "
                           "(or 0 for any free port)")
    if n_workers < 1:
        raise ClusterError(f"[dask] n_workers = {n_workers}: expected at least 1 worker process")
    cap = MAX_WORKERS_PER_CORE * cores
    if n_workers > cap:
        raise ClusterError(f"[dask] n_workers = {n_workers}: this machine has {cores} cores, at most {cap} local "
                           f"worker processes ({MAX_WORKERS_PER_CORE} per core) are accepted; each loads a model "
                           "(use [dask] scheduler for a larger cluster)")
    if threads_per_worker < 1:
        raise ClusterError(f"[dask] threads_per_worker = {threads_per_worker}: expected at least 1")
    if n_workers * threads_per_worker > cap:
        raise ClusterError(f"[dask] n_workers x threads_per_worker = {n_workers} x {threads_per_worker}: this "
                           f"machine has {cores} cores, at most {cap} worker threads are accepted")
    if not isinstance(host, str) or not host:
        raise ClusterError(f"[dask] host = {host!r}: expected an interface address such as 127.0.0.1")
    if not is_loopback(host):
        allowed = allow_remote or os.environ.get(ALLOW_REMOTE_ENV, "") == "1"
        if not allowed:
            raise ClusterError(
                f"[dask] host = {host!r} is not loopback: the scheduler and workers would listen on the network. "
                f"They use this run's TLS credentials, but set {ALLOW_REMOTE_ENV}=1 if you really mean it, "
                "or use host = \"127.0.0.1\""
            )
        msg = (f"WARNING: the Dask scheduler and workers of this run listen on {host} (reachable from the "
               "network, TLS with this run's credentials); the dashboard stays on 127.0.0.1")
        warnings.warn(msg, stacklevel=3)
        log.warning(msg)
        print(msg, flush=True)


def _visible_gpus() -> list[str]:
    """The GPU ids this process may use: CUDA_VISIBLE_DEVICES if set, else every device torch sees."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - no torch / no driver: no GPU
        return []


def external_security(address: str, tls: dict | None = None):
    """Security for connecting to a scheduler this run did not start.

    Parameters
    ----------
    tls : dict, optional
        ``{"ca_file": ..., "cert": ..., "key": ...}`` (paths). Without it,
        distributed's own configuration is used (``distributed.comm.tls.ca-file``,
        ``...tls.client.cert``, ``...tls.client.key``).
    """
    from distributed import Security

    if tls:
        unknown = set(tls) - {"ca_file", "cert", "key"}
        if unknown:
            raise ClusterError(f"Dask TLS settings: unknown keys {sorted(unknown)} (expected ca_file, cert, key)")
        for k in ("ca_file", "cert"):
            if not tls.get(k):
                raise ClusterError(f"Dask TLS settings for {address}: {k} is missing")
        for k, path in tls.items():
            if path and not os.path.isfile(path):
                raise ClusterError(f"Dask TLS settings for {address}: {k} = {path!r} is not a file")
        sec = Security(tls_ca_file=tls["ca_file"], tls_client_cert=tls["cert"], tls_client_key=tls.get("key"),
                       require_encryption=True)
    else:
        sec = Security()  # distributed.comm.tls.* from the user's dask config
    scheme = address.split("://", 1)[0] if "://" in address else "tcp"
    if scheme == "tls" and not (sec.tls_ca_file and sec.tls_client_cert):
        raise ClusterError(
            f"Dask scheduler {address} speaks TLS but no client credentials are configured: set "
            "distributed.comm.tls.ca-file, distributed.comm.tls.client.cert and .key in your dask config "
            "(or DASK_DISTRIBUTED__COMM__TLS__CA_FILE etc.)"
        )
    if scheme == "tcp" and not is_loopback(_address_host(address)):
        msg = (f"WARNING: Dask scheduler {address} is reached without TLS: anyone who can reach it can run code "
               "on its workers; configure TLS (https://distributed.dask.org/en/stable/tls.html)")
        warnings.warn(msg, stacklevel=3)
        log.warning(msg)
        print(msg, flush=True)
    return sec


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
    allow_remote: bool = False,
    tls: dict | None = None,
):
    """Return the process-wide Dask client, creating it on first use.

    Parameters mirror the experiment's ``[dask]`` table. Workers are processes
    (capture runs torch, which holds the GIL in places). With ``gpus_per_worker``
    each local worker advertises a ``GPU`` resource and sees one device of its
    own (at most one worker per visible GPU), so capture jobs that ask for one
    never share a device. ``tls`` applies to an external scheduler only (see
    :func:`external_security`); a LocalCluster always uses fresh credentials.

    Raises
    ------
    ClusterError
        Bad settings (:func:`check_settings`), an unreachable scheduler, or
        TLS settings that cannot work, in one line.
    """
    global _CLIENT, _CLUSTER, _PID, _SECURITY, _ADDRESS
    from distributed import Client

    if _CLIENT is not None and _PID == os.getpid() and _CLIENT.status == "running":
        return _CLIENT
    if _CLIENT is not None and _PID != os.getpid():
        # A forked child (luigi with workers > 1): the parent's client thread did not survive the fork, but its
        # credentials (memory) did. Connect to the same scheduler; never close the parent's cluster from here.
        _CLIENT, _CLUSTER, _PID = Client(_ADDRESS, security=_SECURITY, timeout=CONNECT_TIMEOUT), None, os.getpid()
        _prepare_workers(_CLIENT)
        return _CLIENT
    if _CLIENT is not None:
        close_client()  # a client of this process that is no longer running: do not leave its cluster behind
    scheduler = scheduler or os.environ.get("MOE_ATLAS_SCHEDULER", "")
    if scheduler:
        _SECURITY = external_security(scheduler, tls)
        try:
            _CLIENT = Client(scheduler, security=_SECURITY, timeout=CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            raise ClusterError(f"cannot reach the Dask scheduler {scheduler} ([dask] scheduler or "
                               f"MOE_ATLAS_SCHEDULER): {type(exc).__name__}: {exc}") from exc
        gpu_ids: list[str] = []
    else:
        _SECURITY, _CLUSTER, gpu_ids = _start_local(
            n_workers=n_workers, threads_per_worker=threads_per_worker, host=host, dashboard_port=dashboard_port,
            memory_limit=memory_limit, gpus_per_worker=gpus_per_worker, allow_remote=allow_remote,
        )
        _CLIENT = Client(_CLUSTER, security=_SECURITY)
        atexit.register(close_client)
    _PID = os.getpid()
    _ADDRESS = _CLIENT.scheduler.address
    _prepare_workers(_CLIENT, gpu_ids)
    if announce:
        msg = f"Dask dashboard: {dashboard_link()}  (scheduler {_CLIENT.scheduler.address})"
        log.info(msg)
        print(msg, flush=True)
    return _CLIENT


def _start_local(*, n_workers, threads_per_worker, host, dashboard_port, memory_limit, gpus_per_worker,
                 allow_remote):
    """A LocalCluster with this run's TLS credentials; returns (security, cluster, GPU ids of the workers)."""
    import dask
    from distributed import LocalCluster, Security

    check_settings(n_workers=n_workers, threads_per_worker=threads_per_worker, host=host,
                   dashboard_port=dashboard_port, allow_remote=allow_remote)
    gpu_ids: list[str] = []
    if gpus_per_worker:
        gpu_ids = _visible_gpus()
        if not gpu_ids:
            raise ClusterError("[capture] device is cuda but this machine shows no GPU (CUDA_VISIBLE_DEVICES, "
                               "torch.cuda.device_count() == 0); use device = \"cpu\"")
        if n_workers > len(gpu_ids):
            log.warning("[dask] n_workers = %d but %d GPU(s): starting %d workers, one GPU each",
                        n_workers, len(gpu_ids), len(gpu_ids))
            n_workers = len(gpu_ids)
    try:
        security = Security.temporary()  # sets require_encryption too
    except ImportError as exc:
        raise ClusterError("the Dask cluster's TLS credentials need the 'cryptography' package: "
                           "pip install cryptography") from exc
    # The dashboard is HTTP and separate from the TLS comm: always loopback (reach it with an SSH tunnel).
    port = 0 if dashboard_port == 0 else _free_port("127.0.0.1", dashboard_port)
    # Read by the cluster whenever a worker is lost (not only at start), so set for the process.
    dask.config.set({"distributed.deploy.lost-worker-timeout": LOST_WORKER_TIMEOUT})
    # Read by the scheduler when it is made (in this process) and passed on to the nannies' workers.
    with dask.config.set({"distributed.scheduler.allowed-failures": ALLOWED_FAILURES,
                          "distributed.scheduler.no-workers-timeout": NO_WORKERS_TIMEOUT}):
        cluster = LocalCluster(
            n_workers=n_workers,
            threads_per_worker=threads_per_worker,
            processes=True,
            host=host,
            scheduler_port=0,
            dashboard_address=f"127.0.0.1:{port}",
            memory_limit=memory_limit,
            security=security,
            protocol="tls://",
            resources={"GPU": gpus_per_worker} if gpus_per_worker else None,
            # Workers inherit this so that torch in a worker does not oversubscribe cores.
            # one BLAS thread per worker thread: idle BLAS threads spin and steal the other workers' cores
            env={"OMP_NUM_THREADS": str(threads_per_worker), "OPENBLAS_NUM_THREADS": str(threads_per_worker),
                 "MKL_NUM_THREADS": str(threads_per_worker), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
        )
    return security, cluster, gpu_ids


def _prepare_workers(c, gpu_ids=()) -> None:
    """Register :class:`deploy.worker.PrepareWorker` (imports, GPU pinning) on every present and future worker."""
    from .worker import PrepareWorker

    c.register_plugin(PrepareWorker(gpu_ids=gpu_ids), name=PrepareWorker.name)


def security():
    """The Security of the current client (this run's TLS credentials for a LocalCluster), or None."""
    return _SECURITY


def dashboard_link() -> str:
    if _CLIENT is None:
        return ""
    return _CLIENT.dashboard_link


def explain(exc: BaseException, what: str) -> str | None:
    """One line saying what a cluster failure means for ``what`` (e.g. "capture of checkpoint step_0100"), or None.

    Looks through ``exc`` and its causes for distributed's ``KilledWorker``
    (the workers running it died), ``NoValidWorkerError`` (no worker could run
    it in time), ``NoWorkerError`` (no worker at all, in time), and a lost
    scheduler connection.
    """
    from distributed.scheduler import KilledWorker, NoValidWorkerError, NoWorkerError

    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, KilledWorker):
            return (f"{what}: the Dask worker running it died {e.allowed_failures + 1} times (killed, out of memory, "
                    f"or crashed; the worker log above says why), last on {e.last_worker.address}; rerun to retry")
        if isinstance(e, NoValidWorkerError):
            need = f" with {e.resource_restrictions}" if e.resource_restrictions else ""
            return (f"{what}: no Dask worker{need} could run it for {e.timeout:.0f} s (all workers died and were not "
                    "restarted, or none has the resource)")
        if isinstance(e, NoWorkerError):
            return (f"{what}: no Dask worker was running for {e.timeout:.0f} s (the workers died and their "
                    "nannies did not restart them; the worker log above says why)")
        name = type(e).__name__
        if name in ("CancelledError", "FutureCancelledError"):
            return f"{what}: the Dask job was cancelled (the scheduler connection was lost or the client closed): {e}"
        e = e.__cause__ or e.__context__
    return None


@contextlib.contextmanager
def cluster_errors(what: str):
    """Turn a cluster failure inside the block into ``ClusterError`` with one line from :func:`explain`."""
    try:
        yield
    except Exception as exc:
        line = explain(exc, what)
        if line is None:
            raise
        raise ClusterError(line) from exc


def close_client() -> None:
    """Close this process's client, and the LocalCluster if this process started it."""
    global _CLIENT, _CLUSTER, _PID
    if _CLIENT is not None and _PID == os.getpid():
        try:
            _CLIENT.close()
        except Exception:  # closing at interpreter exit may race the event loop
            pass
    if _CLUSTER is not None and _PID == os.getpid():
        try:
            _CLUSTER.sync(_close_nannies, _CLUSTER, WORKER_EXIT_S)
        except Exception:  # noqa: BLE001 - the cluster's own close below still ends every worker
            pass
        try:
            _CLUSTER.close()
        except Exception:
            pass
    _CLIENT = _CLUSTER = _PID = None


#: How long a closing worker process may take to exit before its nanny kills it.
WORKER_EXIT_S = 20.0


async def _close_nannies(cluster, timeout: float) -> None:
    """Close every nanny with a longer grace period than ``LocalCluster.close`` gives (5 s, killing after 4).

    A worker that has imported torch and transformers needs seconds just to
    finalise the interpreter; with two of them on two busy cores the default
    grace ran out at the end of every run ("Worker process still alive after
    4.0 seconds, killing"), and the killed workers skipped their cleanup.
    """
    import asyncio

    names = list(cluster.workers)
    if names and cluster.scheduler_comm is not None:
        # As LocalCluster does: the scheduler lets go of the workers first, so none is heartbeating into a close.
        await cluster.scheduler_comm.retire_workers(workers=names)
    await asyncio.gather(*(w.close(timeout=timeout) for w in list(cluster.workers.values())),
                         return_exceptions=True)
