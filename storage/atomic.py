"""Atomic writes: everything moe-atlas writes appears whole or not at all.

One pattern, used by every writer (cubes, results, manifests, the demo's
files, the report, the pipeline's stage markers): write a *temporary sibling*
of the target, then move it into place with one ``os.replace``. The temporary
is named ``<name>.tmp-[<tag>-]<8 hex>`` (``.<name>.tmp-…`` when ``hidden``),
which is what :data:`storage.ownership.TEMP_RE` recognises, so what a killed
writer leaves behind is removed by :func:`storage.ownership.remove_own_temporaries`
inside a claimed run, and nowhere else. A directory that is replaced is first
renamed aside to ``<name>.old-<8 hex>`` and deleted only after the new one is
in place.

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> write_json(d / "a.json", {"x": 1})
>>> (d / "a.json").read_text()
'{\\n  "x": 1\\n}'
>>> with staged(d / "store") as tmp:
...     _ = tmp.mkdir()
...     _ = (tmp / "f").write_text("whole")
>>> sorted(p.name for p in d.iterdir())
['a.json', 'store']
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

__all__ = ["temp_path", "replace", "staged", "write_bytes", "write_text", "write_json"]


def temp_path(path: str | os.PathLike, tag: str = "", *, hidden: bool = False) -> Path:
    """A fresh temporary sibling of ``path``: ``<name>.tmp-[<tag>-]<8 hex>`` (``.<name>…`` when ``hidden``).

    ``tag`` is lower-case letters only (``"import"``, ``"spool"``): the
    ownership rules recognise exactly these names.
    """
    path = Path(path)
    if tag and not (tag.isalpha() and tag.islower() and tag.isascii()):
        raise ValueError(f"temp_path: tag must be lower-case ASCII letters; got {tag!r}")
    name = f".{path.name}" if hidden else path.name
    return path.with_name(f"{name}.tmp-{tag + '-' if tag else ''}{uuid.uuid4().hex[:8]}")


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def replace(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Move the finished temporary ``tmp`` to ``path``, replacing what is there.

    A file is replaced by one ``os.replace``. An existing directory (a Zarr
    store, a tokenizer folder) cannot be replaced in one step: it is renamed
    aside to ``<name>.old-<8 hex>``, the new one renamed into place, then the
    old one deleted. The caller decides beforehand whether ``path`` may be
    replaced at all (it is one of moe-atlas's own outputs).
    """
    tmp, path = Path(tmp), Path(path)
    if path.is_dir() and not path.is_symlink():
        trash = path.with_name(f"{path.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(path, trash)
        os.replace(tmp, path)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, path)


@contextlib.contextmanager
def staged(path: str | os.PathLike, tag: str = "", *, hidden: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write (a file or a directory); on success move it into place.

    If the block raises, the temporary is removed and ``path`` is untouched.
    Nothing is created before the block writes: ``tmp`` does not exist yet.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path, tag, hidden=hidden)
    try:
        yield tmp
        replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = False, hidden: bool = False) -> None:
    """Write ``data`` to ``path`` atomically (parents created). ``fsync``: flush to disk before the rename."""
    with staged(path, hidden=hidden) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())


def write_text(path: str | os.PathLike, text: str, *, fsync: bool = False, hidden: bool = False) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes(path, text.encode("utf-8"), fsync=fsync, hidden=hidden)


def write_json(path: str | os.PathLike, obj, *, indent: int | None = 2, sort_keys: bool = False, default=str,
               ensure_ascii: bool = True, newline: bool = False, fsync: bool = False, hidden: bool = False) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (``json.dumps`` options; ``newline`` ends the file with one)."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, default=default, ensure_ascii=ensure_ascii)
    write_text(path, text + ("\n" if newline else ""), fsync=fsync, hidden=hidden)
