"""Manifests of what a Zarr store must hold, so that a lost or damaged chunk is never read as fill.

Zarr stores no object for a chunk equal to the fill value, so a chunk lost
from a store (an interrupted copy, a full disk, a deleted file) reads as fill:
NaN weights, token id 0, expert id -1. Every store moe-atlas writes therefore
carries, in files ``<store>/.moe-atlas-*.json`` (plain files at the store's
root, which Zarr readers ignore), the list of chunk objects it must hold
with their sizes and CRC-32 checksums of the stored (compressed) bytes:

- the routing cube: ``.moe-atlas-template.json`` for the arrays written with the template
  (token table coordinates, layer, expert, ...), ``.moe-atlas-region-<i>.json`` for
  checkpoint ``i``'s region (every variable with a checkpoint dim), written
  by ``seal_region`` *before* ``complete[i]`` is set, and ``.moe-atlas-zarr.json``, a copy
  of the root metadata, so that losing the root ``zarr.json`` loses nothing
  (``restore_metadata``);
- a result cube (analysis, token table): ``.moe-atlas-manifest.json`` for every file of
  the store, written into the temporary store before its rename.

Checks come in two strengths: ``full=False`` (on every open) only lists the
chunk objects and compares their sizes, no data is read; ``full=True``
(``moe-atlas verify``) also reads every object and compares checksums.
A problem is reported as one :class:`Problem` per (store, variable, region).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

from .atomic import staged, write_json

__all__ = [
    "STATE_DIR",
    "Problem",
    "backup_metadata",
    "check_region",
    "check_result",
    "check_template",
    "drop_region",
    "has_manifests",
    "restore_metadata",
    "seal_region",
    "seal_result",
    "seal_template",
]

STATE_DIR = ".moe-atlas"  # prefix of the state files, "<store>/.moe-atlas-<name>"
RESULT_MANIFEST = "manifest.json"
TEMPLATE_MANIFEST = "template.json"
META_COPY = "zarr.json"


def state_file(store, name: str) -> Path:
    """``<store>/.moe-atlas-<name>``: a plain file at the store's root (a directory would read as a Zarr group)."""
    return Path(store) / f"{STATE_DIR}-{name}"
FORMAT = 1


@dataclass(frozen=True)
class Problem:
    """One damaged part of a store: the store, the variable, the region, what is wrong, and what fixes it."""

    store: str
    variable: str
    region: str
    what: str
    fix: str = ""
    # "cheap": found by listing (a rerun finds it too), "full": found only by checksums
    found_by: str = "cheap"

    def line(self) -> str:
        where = f"{self.store}: variable {self.variable!r}" + (f", {self.region}" if self.region else "")
        return f"{where}: {self.what}" + (f"; fix: {self.fix}" if self.fix else "")


def _digest(path: str) -> tuple[int, int]:
    crc = 0
    size = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            crc = zlib.crc32(block, crc)
            size += len(block)
    return size, crc


def _write_json_atomic(path: Path, obj) -> None:
    write_json(path, obj, indent=None, sort_keys=True, default=None)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"_unreadable": True}


# ------------------------------------------------------------------ the routing cube


@dataclass(frozen=True)
class _Array:
    """What a check needs of an array: its path, shape, chunk shape, dims and chunk key encoding."""

    path: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dims: tuple[str, ...]
    separator: str = "/"
    v2_keys: bool = False

    def encode_chunk_key(self, idx) -> str:
        if self.v2_keys:
            return self.separator.join(map(str, idx)) if idx else "0"
        return self.separator.join(["c", *map(str, idx)])


def _array_info(path: str, meta: dict) -> _Array:
    enc = meta.get("chunk_key_encoding") or {"name": "default"}
    grid = (meta.get("chunk_grid") or {}).get("configuration", {})
    if meta.get("zarr_format", 3) != 3 or "chunk_shape" not in grid or enc.get("name") not in ("default", "v2"):
        raise ValueError("unsupported")
    return _Array(path, tuple(meta["shape"]), tuple(grid["chunk_shape"]), tuple(meta.get("dimension_names") or ()),
                  (enc.get("configuration") or {}).get("separator", "/" if enc["name"] == "default" else "."),
                  enc["name"] == "v2")


def _arrays(store: Path) -> list[tuple[str, _Array]]:
    """(name, array description) of every array of the cube, from the consolidated metadata in the root zarr.json.

    Read as JSON, without zarr-python: a check must cost a metadata read and a
    listing, nothing more. Falls back to zarr for stores without consolidated metadata.
    """
    try:
        root = json.loads((Path(store) / "zarr.json").read_text())
        members = root["consolidated_metadata"]["metadata"]
        return sorted((name, _array_info(name, m)) for name, m in members.items()
                      if m.get("node_type") == "array" and "/" not in name)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    import zarr

    g = zarr.open_group(str(store), mode="r")
    out = []
    for name, arr in g.arrays():
        m = arr.metadata
        enc = m.chunk_key_encoding
        out.append((name, _Array(arr.path, tuple(arr.shape), tuple(arr.chunks), tuple(m.dimension_names or ()),
                                 getattr(enc, "separator", "/"), type(enc).__name__.startswith("V2"))))
    return out


def _dims(arr) -> tuple[str, ...]:
    return arr.dims


def _chunk_keys(arr, fixed: dict[int, int] | None = None) -> list[str]:
    """Keys (relative to the store) of the array's chunk objects; ``fixed`` pins axis -> chunk index."""
    fixed = fixed or {}
    ranges = [
        [fixed[ax]] if ax in fixed else range(-(-n // c))
        for ax, (n, c) in enumerate(zip(arr.shape, arr.chunks))
    ]
    return [f"{arr.path}/{arr.encode_chunk_key(idx)}" for idx in itertools.product(*ranges)]


def _record(store: Path, keys: list[str]) -> dict:
    present, absent = {}, []
    for k in keys:
        p = store / k
        if p.is_file():
            present[k] = list(_digest(str(p)))
        else:
            absent.append(k)  # a chunk equal to fill is not stored; it must stay absent
    return {"present": present, "absent": absent}


def _compare(store: Path, rec: dict, *, full: bool) -> list[tuple[str, str, str]]:
    """(key, what, found_by) for every object that differs from its record."""
    out = []
    for k, (size, crc) in rec.get("present", {}).items():
        p = store / k
        try:
            st = os.stat(p)
        except FileNotFoundError:
            out.append((k, "chunk object missing (would read as fill)", "cheap"))
            continue
        if st.st_size != size:
            out.append((k, f"chunk object is {st.st_size} bytes, {size} were written (truncated or overwritten)",
                        "cheap"))
        elif full and _digest(str(p))[1] != crc:
            out.append((k, "chunk object checksum differs from what was written (corrupt)", "full"))
    for k in rec.get("absent", []):
        if (store / k).exists():
            out.append((k, "chunk object present that was not written (stray data)", "cheap"))
    return out


def has_manifests(store: str | os.PathLike) -> bool:
    """Whether the cube was written with manifests (cubes from before they existed were not)."""
    return state_file(store, TEMPLATE_MANIFEST).is_file()


def backup_metadata(store: str | os.PathLike) -> None:
    """Keep a copy of the root ``zarr.json`` (call after every change of the root metadata)."""
    store = Path(store)
    with staged(state_file(store, META_COPY)) as tmp:
        shutil.copyfile(store / "zarr.json", tmp)


def restore_metadata(store: str | os.PathLike) -> bool:
    """Put the kept copy of the root ``zarr.json`` back; False if there is no (readable) copy."""
    store = Path(store)
    src = state_file(store, META_COPY)
    meta = _read_json(src)
    if not meta or meta.get("_unreadable") or meta.get("node_type") != "group":
        return False
    with staged(store / "zarr.json") as tmp:
        shutil.copyfile(src, tmp)
    return True


def seal_template(store: str | os.PathLike) -> None:
    """Record the chunk objects of the arrays written with the template (no checkpoint dim) and back up metadata."""
    store = Path(store)
    arrays = {}
    for name, arr in _arrays(store):
        if "checkpoint" not in _dims(arr):
            arrays[name] = _record(store, _chunk_keys(arr))
    _write_json_atomic(state_file(store, TEMPLATE_MANIFEST), {"format": FORMAT, "arrays": arrays})
    backup_metadata(store)


def check_template(store: str | os.PathLike, *, full: bool = False, fix: str = "") -> list[Problem]:
    """Problems of the template's arrays: token coordinates, layer, expert, checkpoint names and steps.

    Cheap unless ``full``. A cube without manifests (older than them) yields no problems.
    """
    store = Path(store)
    man = _read_json(state_file(store, TEMPLATE_MANIFEST))
    if man is None:
        return []
    if man.get("_unreadable"):
        return [Problem(str(store), TEMPLATE_MANIFEST, "", "the template manifest is unreadable", fix)]
    out = []
    arrays = dict(_arrays(store))
    for name, rec in man.get("arrays", {}).items():
        if name not in arrays:
            out.append(Problem(str(store), name, "template", "array metadata missing", fix))
            continue
        for key, what, how in _compare(store, rec, full=full):
            out.append(Problem(str(store), name, f"template chunk {key}", what, fix, how))
    for name, arr in arrays.items():
        dims = _dims(arr)
        if name == "checkpoint" and dims == ("checkpoint",):
            # checkpoint names: rewritten on every append, so only their presence is checked (a name is never
            # the fill ""; a step may be 0, the fill, and 'complete' reads 0, "not captured", which is safe)
            for key in _chunk_keys(arr):
                if not (store / key).is_file():
                    out.append(Problem(str(store), name, f"chunk {key}", "chunk object missing (would read as fill)",
                                       fix))
    return out


def _region_file(store: Path, ci: int) -> Path:
    return state_file(store, f"region-{int(ci)}.json")


def _region_arrays(arrays) -> dict:
    return {n: a for n, a in arrays if _dims(a)[:1] == ("checkpoint",) and len(_dims(a)) > 1}


def seal_region(store: str | os.PathLike, ci: int, checkpoint: str) -> None:
    """Record checkpoint ``ci``'s chunk objects of every region variable (sizes, CRC-32); before ``complete``."""
    store = Path(store)
    arrays = {}
    for name, arr in _region_arrays(_arrays(store)).items():
        ax = _dims(arr).index("checkpoint")
        arrays[name] = _record(store, _chunk_keys(arr, {ax: int(ci) // arr.chunks[ax]}))
    _write_json_atomic(_region_file(store, ci), {"format": FORMAT, "checkpoint": str(checkpoint), "index": int(ci),
                                                 "arrays": arrays})


def drop_region(store: str | os.PathLike, ci: int) -> None:
    """Forget checkpoint ``ci``'s manifest (its region is being rewritten; ``complete`` is already 0)."""
    _region_file(Path(store), ci).unlink(missing_ok=True)


def check_region(store: str | os.PathLike, ci: int, checkpoint: str, *, full: bool = False, fix: str = "",
                 arrays=None) -> list[Problem]:
    """Problems of checkpoint ``ci``'s region against its manifest (cheap unless ``full``).

    ``arrays``: the cube's (name, array) pairs, to share one metadata read over many regions.
    """
    store = Path(store)
    region = f"checkpoint {checkpoint!r} (index {int(ci)})"
    man = _read_json(_region_file(store, ci))
    if man is None:
        return [Problem(str(store), "*", region, "marked complete but its manifest is missing "
                        f"({_region_file(store, ci).name}), so its data cannot be verified", fix)]
    if man.get("_unreadable") or man.get("checkpoint") != str(checkpoint):
        return [Problem(str(store), "*", region, "its manifest is unreadable or names another checkpoint "
                        f"({man.get('checkpoint')!r})", fix)]
    current = _region_arrays(arrays if arrays is not None else _arrays(store))
    out = []
    for name in sorted(set(current) - set(man.get("arrays", {}))):
        out.append(Problem(str(store), name, region, "variable not in the region's manifest", fix))
    for name, rec in man.get("arrays", {}).items():
        if name not in current:
            out.append(Problem(str(store), name, region, "array metadata missing", fix))
            continue
        for key, what, how in _compare(store, rec, full=full):
            out.append(Problem(str(store), name, f"{region}, chunk {key}", what, fix, how))
    return out


def routing_arrays(store: str | os.PathLike):
    """The cube's (name, array) pairs, for :func:`check_region`'s ``arrays``."""
    return _arrays(Path(store))


# ------------------------------------------------------------------ result cubes


def _files(store: Path) -> list[str]:
    """Every file of the store but its state files, relative to it."""
    out = []
    for dirpath, _, filenames in os.walk(store):
        rel = os.path.relpath(dirpath, store)
        out.extend(os.path.normpath(os.path.join(rel, f)) for f in filenames
                   if not (rel == "." and f.startswith(f"{STATE_DIR}-")))
    return sorted(out)


def seal_result(store: str | os.PathLike) -> None:
    """Record every file of a just-written result store (size, CRC-32); call before it is renamed into place."""
    store = Path(store)
    files = {f: list(_digest(str(store / f))) for f in _files(store)}
    _write_json_atomic(state_file(store, RESULT_MANIFEST), {"format": FORMAT, "files": files})


def result_sealed(store: str | os.PathLike) -> bool:
    return state_file(store, RESULT_MANIFEST).is_file()


def check_result(store: str | os.PathLike, *, full: bool = False, fix: str = "") -> list[Problem]:
    """Problems of a result store against its manifest (cheap unless ``full``); a store without one is a problem."""
    store = Path(store)
    man = _read_json(state_file(store, RESULT_MANIFEST))
    if man is None or man.get("_unreadable"):
        return [Problem(str(store), "*", "", f"no readable manifest ({state_file(store, RESULT_MANIFEST).name}), so its data "
                        "cannot be verified", fix)]
    out = []
    have = set(_files(store))
    for rel, (size, crc) in man.get("files", {}).items():
        var = rel.split(os.sep)[0] if os.sep in rel else "(metadata)"
        if rel not in have:
            out.append(Problem(str(store), var, f"object {rel}", "missing (would read as fill)", fix))
            continue
        st = os.stat(store / rel)
        if st.st_size != size:
            out.append(Problem(str(store), var, f"object {rel}",
                               f"is {st.st_size} bytes, {size} were written (truncated or overwritten)", fix))
        elif full and _digest(str(store / rel))[1] != crc:
            out.append(Problem(str(store), var, f"object {rel}", "checksum differs from what was written (corrupt)",
                               fix, "full"))
    for rel in sorted(have - set(man.get("files", {}))):
        var = rel.split(os.sep)[0] if os.sep in rel else "(metadata)"
        out.append(Problem(str(store), var, f"object {rel}", "present but not written with the result (stray data)",
                           fix))
    return out
