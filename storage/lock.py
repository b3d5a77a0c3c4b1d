"""The run lock: one writer per run directory at a time.

Two ``luigi`` invocations of one experiment would otherwise write the same
cubes at once (one recapturing a checkpoint un-marks it while the other
analyses it; both rename a template into place; both draw the same figure).
Every stage of ``tasks`` runs inside :func:`run_lock` on ``RunLayout.lock``.

Choice: **wait, with a timeout.** A second run waits for the lock, then finds
the stage done by the first run and skips it, so both finish and every stage
runs once. Waiting (rather than failing at once) also keeps workers that share
a central ``luigid`` cooperating: luigid hands them different tasks of one
experiment and the lock only serialises their writes. After
``MOE_ATLAS_LOCK_TIMEOUT`` seconds (default 86400; 0 = fail at once) the wait
ends with :class:`RunLocked`: "another moe-atlas run holds <path> (pid N)".

The lock is an exclusive ``fcntl.flock`` on the lock file, owned by the open
file: the kernel drops it when the holder exits or is killed (SIGKILL
included), so a crashed run never leaves a stale lock and there is nothing to
clean up. The file itself stays (deleting it would let two processes lock two
different inodes); the pid inside only names the last holder.

Limits: ``flock`` is advisory and local. It protects runs on one machine, or
on a shared file system whose ``flock`` is cluster-wide (Lustre/GPFS with the
option on, NFSv4); it does not cover object storage. Dask workers write inside
a stage whose lock the Luigi process holds.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from pathlib import Path

from .env import env_number

__all__ = ["RunLocked", "run_lock", "holder", "DEFAULT_TIMEOUT_S", "TIMEOUT_ENV"]

log = logging.getLogger("moe_atlas.lock")

TIMEOUT_ENV = "MOE_ATLAS_LOCK_TIMEOUT"
DEFAULT_TIMEOUT_S = 86400.0

# (pid, path) -> [fd, depth]: re-entrant within one process (a stage calling
# another locked helper must not wait for itself). Keyed by pid so that a
# forked child never believes it holds its parent's lock.
_HELD: dict[tuple[int, str], list[int]] = {}
_GUARD = threading.Lock()


class RunLocked(RuntimeError):
    """Another process holds the run lock (and did not release it in time)."""


def holder(path: str | os.PathLike) -> int | None:
    """The pid written by the last process that took the lock at ``path``, or None."""
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _timeout_from_env() -> float:
    return env_number(TIMEOUT_ENV, DEFAULT_TIMEOUT_S, unit="seconds")


@contextlib.contextmanager
def run_lock(path: str | os.PathLike, *, timeout: float | None = None, poll: float = 0.2):
    """Hold the exclusive run lock at ``path`` for the duration of the block.

    Parameters
    ----------
    path : lock file (``RunLayout.lock``); its directory is created if needed.
    timeout : seconds to wait for another holder; 0 fails at once; None reads
        ``MOE_ATLAS_LOCK_TIMEOUT`` (default one day).
    poll : seconds between attempts while waiting.

    Raises
    ------
    RunLocked : "another moe-atlas run holds <path> (pid N)" when the lock is
        still held after ``timeout`` seconds.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = (os.getpid(), str(path.resolve()))
    with _GUARD:
        entry = _HELD.get(key)
        if entry is not None:
            entry[1] += 1
    if entry is not None:
        try:
            yield path
        finally:
            with _GUARD:
                entry[1] -= 1
        return

    wait = _timeout_from_env() if timeout is None else float(timeout)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait
        announced = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pid = holder(path)
                who = f"pid {pid}" if pid is not None else "pid unknown"
                if time.monotonic() >= deadline:
                    raise RunLocked(
                        f"another moe-atlas run holds {path} ({who}); gave up after {wait:g} s "
                        f"({TIMEOUT_ENV}). Wait for it to finish, or stop it; a killed run releases the lock."
                    ) from None
                if not announced:
                    # Logging's last-resort handler prints warnings even where nothing configured logging.
                    log.warning("waiting for the run lock %s: another moe-atlas run holds it (%s)", path, who)
                    announced = True
                time.sleep(min(poll, max(0.0, deadline - time.monotonic())))
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except BaseException:
        os.close(fd)
        raise
    entry = [fd, 1]
    with _GUARD:
        _HELD[key] = entry
    try:
        yield path
    finally:
        with _GUARD:
            entry[1] -= 1
            last = entry[1] == 0
            if last:
                del _HELD[key]
        if last:
            # Closing the descriptor releases the flock; the file (and the stale pid) stays.
            os.close(fd)
