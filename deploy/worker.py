"""What every Dask worker of a moe-atlas run does before it runs a task.

:class:`PrepareWorker` is a worker plugin (``Client.register_plugin``): it runs
on every worker of the cluster, including workers that join or are restarted
by their nanny later, before they are handed tasks.

Why imports happen here: tasks import scipy, torch and transformers lazily, and
two tasks starting at once on a worker with ``threads_per_worker > 1`` import
the same module from two threads. A module that is half-initialised in one
thread is then seen by the other ("partially initialized module
'scipy.stats'"), and the worker failed. Importing once, in the worker's own
setup, before any task thread exists, removes the race.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

from distributed.diagnostics.plugin import WorkerPlugin

log = logging.getLogger("moe_atlas.deploy")

#: Modules a worker needs for capture and for every registered analysis, imported once per worker process.
WORKER_IMPORTS: tuple[str, ...] = (
    "numpy",
    "pandas",
    "scipy.special",
    "scipy.stats",
    "scipy.sparse",
    "scipy.cluster.hierarchy",
    "scipy.spatial.distance",
    "xarray",
    "zarr",
    "dask.array",
    "storage.cube",
    "analyses",  # imports every registered analysis module
    "torch",
    "transformers",
    "capture.job",
    "capture.run",
    "capture.load",
)


class PrepareWorker(WorkerPlugin):
    """Import :data:`WORKER_IMPORTS` and (for GPU runs) pin the worker to one device.

    Parameters
    ----------
    imports : sequence of module names
        Imported in ``setup``; a module that fails to import is logged with
        its name (a task that needs it then fails with the ImportError).
    gpu_ids : sequence of str, optional
        Local clusters with GPUs: the worker named ``i`` (LocalCluster names
        workers 0, 1, ...) sees only ``gpu_ids[i]`` through
        ``CUDA_VISIBLE_DEVICES``, so the captures of two workers never share
        a device. Set before anything initialises CUDA (torch reads it then).
    """

    name = "moe-atlas-prepare"
    idempotent = True

    def __init__(self, imports=WORKER_IMPORTS, gpu_ids=()):
        self.imports = tuple(imports)
        self.gpu_ids = tuple(str(g) for g in gpu_ids)

    def setup(self, worker):
        _quiet_heartbeat_at_close(worker)
        _unshadow_packages(worker)
        if self.gpu_ids:
            index = _worker_index(worker.name)
            if index is not None and index < len(self.gpu_ids):
                os.environ["CUDA_VISIBLE_DEVICES"] = self.gpu_ids[index]
        for name in self.imports:
            try:
                importlib.import_module(name)
            except Exception as exc:  # noqa: BLE001 - logged; a task that needs the module fails with its own error
                # Not fatal: an analysis-only run must not be stopped by, say, a broken transformers install.
                log.warning("Dask worker %s: cannot import %r: %s: %s", worker.address, name, type(exc).__name__, exc)


def _worker_index(name) -> int | None:
    try:
        return int(name)
    except (TypeError, ValueError):
        return None


class _HeartbeatAtClose(logging.Filter):
    """Drop distributed's "Failed to communicate with scheduler during heartbeat" once the worker is closing.

    A heartbeat in flight when the worker closes its connections at the end of
    a run fails and is logged with a traceback (a race inside distributed), so
    runs ended with an ERROR about nothing. While the worker is running the
    message is a real problem and passes through.
    """

    def __init__(self, worker):
        super().__init__()
        import weakref

        self.worker = weakref.ref(worker)

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Failed to communicate with scheduler during heartbeat"):
            return True
        w = self.worker()
        status = getattr(getattr(w, "status", None), "name", "")
        return not (w is None or status in ("closing", "closing_gracefully", "closed", "stopping", "stopped"))


def _quiet_heartbeat_at_close(worker) -> None:
    if not hasattr(worker, "status"):
        return
    logging.getLogger("distributed.worker").addFilter(_HeartbeatAtClose(worker))


#: This project's top-level packages (setup.cfg ``packages``).
OWN_PACKAGES = ("analyses", "capture", "deploy", "experiments", "moe_atlas", "storage", "tasks")


def _unshadow_packages(worker) -> None:
    """Keep the worker's scratch folder from shadowing this project's packages.

    Dask puts the worker's ``local_directory`` first on ``sys.path`` (for
    ``upload_file``) and spills into ``<local_directory>/storage``. With an
    editable install, whose finder comes after the path finder, ``import storage``
    then found that spill folder as a namespace package and ``from storage import
    RunLayout`` failed on the worker. moe-atlas uploads no files, so the folder
    leaves ``sys.path``, and a namespace module already made from it is dropped.
    """
    local = str(getattr(worker, "local_directory", "") or "")
    while local and local in sys.path:
        sys.path.remove(local)
    for name in OWN_PACKAGES:
        module = sys.modules.get(name)
        if module is not None and getattr(module, "__file__", None) is None:
            for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
                del sys.modules[key]
