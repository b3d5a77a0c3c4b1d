"""Move captured batches off the forward's critical path.

On a GPU the forward is queued asynchronously: anything that makes the host
wait for it (``.cpu()``, a boolean mask, ``nonzero``) lets the GPU run dry
while the CPU sorts, copies, compresses and writes. Capture therefore

1. copies each batch's result device → pinned host memory with
   ``non_blocking=True`` and records one CUDA event after the copies
   (:func:`stage_to_host`);
2. hands it to a :class:`BackgroundWriter`: one thread that waits for that
   event, then runs the sink (validation, Zarr compression and writes) while
   the GPU already computes the next batches.

The writer's queue is bounded (``depth`` batches), so host memory stays
bounded and the GPU runs at most ``depth`` batches ahead of the disk. An
exception in the writer thread is raised again in the caller at its next
``submit`` or at ``close``; after one, nothing more is written.

On CPU there is nothing to overlap with a stalled device: copies are no-ops
and, unless asked for, the sink runs inline (``threaded=False``).
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable

import torch

__all__ = ["BackgroundWriter", "StagedBatch", "stage_to_host", "to_device"]

_STOP = object()


def to_device(a, device: torch.device) -> torch.Tensor:
    """A host numpy array on ``device`` without making the host wait for the GPU.

    A copy from pageable memory waits for the device's queue to drain; from
    pinned memory it is queued like a kernel (the host caching allocator keeps
    the pinned block alive until the copy has run).
    """
    t = torch.from_numpy(a)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class StagedBatch:
    """Host copies of one batch's tensors, and the event after which they are valid.

    Attributes
    ----------
    host : {name: tensor on the CPU} (pinned when copied from a GPU).
    event : list of ``torch.cuda.Event`` recorded after the copies (one per GPU
        the tensors came from), or None (CPU tensors).
    meta : whatever the producer needs to interpret the batch.
    """

    __slots__ = ("host", "event", "meta")

    def __init__(self, host: dict[str, torch.Tensor], event, meta: Any = None):
        self.host = host
        self.event = event
        self.meta = meta

    def numpy(self) -> dict:
        """Wait for the copies (the one synchronisation per batch, off the forward's thread); numpy views."""
        for ev in self.event or ():
            ev.synchronize()
        return {k: v.numpy() for k, v in self.host.items()}


def stage_to_host(tensors: dict[str, torch.Tensor], *, meta: Any = None) -> StagedBatch:
    """Start copying ``tensors`` to the host without waiting for them.

    CUDA tensors go to freshly allocated pinned buffers (``non_blocking``)
    followed by one event; CPU tensors are taken as they are (detached, no copy).
    """
    devices = {t.device.type for t in tensors.values()}
    if devices <= {"cpu"}:
        return StagedBatch({k: t.detach() for k, t in tensors.items()}, None, meta)
    host = {}
    for k, t in tensors.items():
        h = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
        h.copy_(t, non_blocking=True)  # queued on the current stream of t's device
        host[k] = h
    events = []
    for dev in {t.device for t in tensors.values() if t.device.type == "cuda"}:
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(dev))  # after the copies from that device
        events.append(ev)
    return StagedBatch(host, events, meta)


class BackgroundWriter:
    """Run ``consume(item)`` for each submitted item, in order, in one background thread.

    Parameters
    ----------
    consume : called once per item, in submission order (in the writer thread
        when ``threaded``, else inline in ``submit``).
    threaded : run ``consume`` in a background thread.
    depth : items that may wait in the queue; ``submit`` blocks beyond that
        (memory stays bounded by ``depth`` + 1 items in flight).
    name : thread name (shows in tracebacks and profilers).

    Use as a context manager: a clean exit waits for every item and raises the
    writer's error if it had one; an exit by exception stops the writer without
    running the items still queued.
    """

    def __init__(self, consume: Callable[[Any], None], *, threaded: bool = True, depth: int = 2,
                 name: str = "moe-atlas-writer"):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._consume = consume
        self.threaded = threaded
        self.depth = depth
        self._error: BaseException | None = None
        self._abort = threading.Event()
        self._closed = False
        self._thread = None
        if threaded:
            self._queue: queue.Queue = queue.Queue(maxsize=depth)
            self._thread = threading.Thread(target=self._run, name=name, daemon=True)
            self._thread.start()

    # -- writer thread ---------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            # After a failure (or an abort) keep draining, so the producer's put never blocks forever.
            if self._error is not None or self._abort.is_set():
                continue
            try:
                self._consume(item)
            except BaseException as exc:  # noqa: BLE001 - handed to the producer thread as is
                self._error = exc

    # -- producer side ---------------------------------------------------------
    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, item: Any) -> None:
        """Queue ``item`` (blocks while ``depth`` items wait); raises the writer's earlier error, if any."""
        if self._closed:
            raise RuntimeError("BackgroundWriter: submit after close")
        self._raise_if_failed()
        if not self.threaded:
            self._consume(item)
            return
        self._queue.put(item)

    def close(self) -> None:
        """Wait until every submitted item is consumed; raise the writer's error if it had one."""
        if not self._closed:
            self._closed = True
            if self._thread is not None:
                self._queue.put(_STOP)
                self._thread.join()
        self._raise_if_failed()

    def abort(self) -> None:
        """Stop without consuming the queued items (after a failure in the producer); never raises."""
        if self._closed:
            return
        self._closed = True
        self._abort.set()
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join()

    @property
    def error(self) -> BaseException | None:
        return self._error

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False
