"""Which folders are moe-atlas runs, which experiment each belongs to, and what moe-atlas may delete.

A run folder carries a marker, ``<output_dir>/.moe-atlas-run.json``, written
when a run first starts in it: the experiment's name and identity (a
fingerprint of what makes it that experiment), the experiment file, and when
it was claimed. Rules:

- a run starts only in a missing or empty folder (claiming it) or in a folder
  whose marker names the same identity; any other non-empty folder is refused
  with a message saying how to proceed (:class:`RunRefused`), so files already
  there are never touched;
- a second, different experiment pointed at a claimed folder is refused; the
  same experiment waits on the run lock (storage/lock.py) as before;
- output_dir "", "/", the home folder or one of its parents is refused outright;
- moe-atlas deletes only what it can prove it created: temporaries named by its
  own writers (``<known name>.tmp-<tag>``, ``.old-<tag>``) inside a claimed
  run (:func:`remove_own_temporaries`). A folder moe-atlas did not claim is
  never cleaned.

The identity is what the caller (``tasks``) says makes an experiment itself:
its name, model source, tokenizer and datasets, not its checkpoints or
analyses, so adding a checkpoint or an analysis later continues the same run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

__all__ = [
    "MARKER",
    "RunRefused",
    "check_output_dir",
    "claim_run",
    "identity_hash",
    "owned_root",
    "precheck_run",
    "read_marker",
    "remove_own_temporaries",
    "rerun_command",
]

MARKER = ".moe-atlas-run.json"
MARKER_FORMAT = 1
# Entries a run creates at its root before (or without) holding the marker: the run lock file.
_SILENT = {".lock"}

# Names the writers of storage/, tasks/ and analyses/ give their temporaries:
# "<target>.tmp-<8 hex>" (uuid), "<target>.tmp-<tag>-<8 hex>" (importers),
# "<target>.old-<8 hex>" (the replaced store during a rename), "<target>.tmp-<pid>" (small JSON files).
TEMP_RE = re.compile(r"^(?P<base>.+)\.(?:tmp-(?:[a-z]+-)?[0-9a-f]{8}|old-[0-9a-f]{8}|tmp-[0-9]{1,10})$")


class RunRefused(ValueError):
    """The output folder is not (or not this experiment's) moe-atlas run; nothing was written there."""


def identity_hash(identity: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_output_dir(raw: str, *, where: str = "experiment") -> Path:
    """The run folder of ``output_dir`` = ``raw``, refused if it is a place no run may own.

    Raises
    ------
    RunRefused : for "", "/", the home folder or one of its parents ("<where>: output_dir ...").
    """
    if not str(raw).strip():
        raise RunRefused(f"{where}: output_dir is empty; name a folder of its own, e.g. output_dir = \"runs/<name>\"")
    path = Path(os.path.expanduser(str(raw)))
    resolved = path.resolve()
    home = Path.home().resolve()
    if resolved == Path(resolved.anchor) or resolved == home or resolved in home.parents:
        raise RunRefused(
            f"{where}: output_dir = {raw!r} is {resolved}, a folder moe-atlas will not use as a run folder; "
            "name a folder of its own, e.g. output_dir = \"runs/<name>\""
        )
    return path


def read_marker(root: str | os.PathLike) -> dict | None:
    """The run marker of ``root`` as a dict, None if there is none.

    Raises
    ------
    RunRefused : the marker exists but cannot be read as JSON (names the file).
    """
    p = Path(root) / MARKER
    try:
        text = p.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise RunRefused(f"{p}: cannot read the run marker: {exc}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise RunRefused(f"{p}: run marker is not valid JSON ({exc}); restore it or start the run in a new "
                         "output_dir") from None
    if not isinstance(data, dict) or "identity" not in data:
        raise RunRefused(f"{p}: run marker has no 'identity'; restore it or start the run in a new output_dir")
    return data


def owned_root(path: str | os.PathLike, *, levels: int = 3) -> Path | None:
    """The claimed run folder ``path`` lies in (itself or up to ``levels`` parents), or None."""
    p = Path(path).absolute()
    for cand in [p, *list(p.parents)[:levels]]:
        if (cand / MARKER).is_file():
            return cand
    return None


def _foreign_entries(root: Path) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(root) if e.name not in _SILENT)
    except FileNotFoundError:
        return []
    except NotADirectoryError:
        raise RunRefused(f"{root}: output_dir is a file, not a folder") from None


def _refuse_other(root: Path, marker: dict, identity: dict, experiment_file: str) -> None:
    theirs = marker.get("identity_parts") or {}
    differ = sorted(k for k in set(theirs) | set(identity) if theirs.get(k) != identity.get(k)) if theirs else []
    raise RunRefused(
        f"{root} belongs to experiment {marker.get('experiment', '?')!r} (identity {marker.get('identity')}, "
        f"from {marker.get('experiment_file') or '?'}); {experiment_file or 'this experiment'} is "
        f"{identity.get('experiment', '?')!r} (identity {identity_hash(identity)})"
        + (f", differing in {', '.join(differ)}" if differ else "")
        + ". Use a new output_dir, or delete that run folder to start over."
    )


def precheck_run(root: str | os.PathLike, identity: dict, *, experiment_file: str = "") -> bool:
    """Refuse, before anything is written, a folder this experiment may not use; True if it is already claimed.

    Raises
    ------
    RunRefused : ``root`` is a non-empty folder without a run marker, or the
        run of another experiment (different identity).
    """
    root = Path(root)
    marker = read_marker(root) if root.is_dir() else None
    if marker is not None:
        if marker.get("identity") != identity_hash(identity):
            _refuse_other(root, marker, identity, experiment_file)
        return True
    entries = _foreign_entries(root)
    if entries:
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        raise RunRefused(
            f"{root}: output_dir is not empty ({shown}) and is not a moe-atlas run (no {MARKER}); moe-atlas "
            "starts only in a new or empty folder and touches nothing already there. Set output_dir to a new "
            "folder, e.g. output_dir = \"runs/<name>\"."
        )
    return False


def claim_run(root: str | os.PathLike, identity: dict, *, experiment_file: str = "") -> dict:
    """Make ``root`` this experiment's run folder, or check that it already is; returns the marker.

    Call with the run lock held: two runs of different experiments that both
    saw an empty folder are then told apart here (the second one is refused).

    Raises
    ------
    RunRefused : as :func:`precheck_run`.
    """
    root = Path(root)
    if precheck_run(root, identity, experiment_file=experiment_file):
        return read_marker(root)
    root.mkdir(parents=True, exist_ok=True)
    marker = {
        "format": MARKER_FORMAT,
        "experiment": identity.get("experiment", ""),
        "identity": identity_hash(identity),
        "identity_parts": identity,
        "experiment_file": str(Path(experiment_file).resolve()) if experiment_file else "",
        "claimed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    tmp = root / f"{MARKER}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
    try:
        # link, not replace: if another process claimed the folder meanwhile, its marker wins and is checked below
        os.link(tmp, root / MARKER)
    except FileExistsError:
        pass
    except OSError:  # a file system without hard links: exclusive create (the run lock is held)
        try:
            with open(root / MARKER, "x") as f:
                f.write(tmp.read_text())
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)
    if not precheck_run(root, identity, experiment_file=experiment_file):  # pragma: no cover - marker just written
        raise RunRefused(f"{root}: could not write the run marker {MARKER}")
    return read_marker(root)


def rerun_command(path: str | os.PathLike) -> str:
    """The one command that rebuilds what is missing in the run holding ``path`` (the experiment's pipeline)."""
    root = owned_root(path)
    marker = read_marker(root) if root is not None else None
    exp = (marker or {}).get("experiment_file")
    return f"luigi --module tasks FullReport --experiment {exp}" if exp else "rerun the experiment's luigi command"


def remove_own_temporaries(directory: str | os.PathLike, *, names: set[str] | None = None) -> list[Path]:
    """Remove temporaries moe-atlas's writers left in ``directory`` when killed before their rename.

    Only inside a claimed run folder (:func:`owned_root`), and only entries
    named ``<base>.tmp-<tag>`` / ``<base>.old-<tag>`` by moe-atlas's own
    writers (:data:`TEMP_RE`) whose ``<base>`` is in ``names`` when given.
    Anything else, including every entry of a folder that is not a run, stays.

    Returns the removed paths.
    """
    directory = Path(directory)
    if not directory.is_dir() or owned_root(directory) is None:
        return []
    removed = []
    for entry in os.scandir(directory):
        m = TEMP_RE.match(entry.name)
        if not m or (names is not None and m.group("base") not in names):
            continue
        p = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed
