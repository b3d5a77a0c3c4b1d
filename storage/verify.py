"""Verify every store of a run against its manifests, and (on request) set damaged parts up to be rebuilt.

``verify_run(run)`` is what ``moe-atlas verify RUN`` reports: the routing
cube (root metadata, template arrays, every region marked complete), the
token tables and the analysis results, each checked in full (every chunk
object read and its CRC-32 compared, ``storage.manifest``). Each problem names
the store, the variable, the region and the fix:

- damage a rerun finds by itself (a chunk object missing or of the wrong
  size): the experiment's luigi command, which recaptures / recomputes it;
- damage only checksums find (same size, other bytes): ``moe-atlas verify RUN
  --repair`` first, which un-marks that checkpoint's region (``complete`` = 0)
  or removes the damaged result or template chunk (all written by moe-atlas,
  inside its own run), so that the rerun rebuilds it. Nothing is ever filled
  in or made up: what cannot be checked is reported, not trusted.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

from . import manifest as manifests
from .layout import RunLayout
from .ownership import read_marker, rerun_command

__all__ = ["verify_run", "verify_store", "repair"]


def _results(layout: RunLayout) -> list[Path]:
    out = []
    for folder in (layout.root / "tokens", layout.analyses_dir):
        if folder.is_dir():
            out.extend(sorted(p for p in folder.iterdir() if p.is_dir() and p.name.endswith(".zarr")))
    return out


def _routing_problems(path: Path, *, full: bool, rerun: str, repair_cmd: str) -> tuple[list, int]:
    """(problems, regions checked) of the routing cube at ``path``."""
    import numpy as np
    import zarr

    if not (path / "zarr.json").is_file():
        if manifests.state_file(path, manifests.META_COPY).is_file():
            fix = f"{rerun} (restores it from the kept copy)"
        else:
            fix = f"mv {path} {path}.damaged, then {rerun} (recaptures every checkpoint)"
        return [manifests.Problem(str(path), "(metadata)", "", "zarr.json is missing", fix)], 0
    if not manifests.has_manifests(path):
        return [manifests.Problem(str(path), "*", "", "written before manifests existed: its regions cannot be "
                                  "verified", f"mv {path} {path}.old, then {rerun} (recaptures every checkpoint)")], 0
    full_fix = f"{repair_cmd} && {rerun}"
    out = [
        replace(p, fix=full_fix if p.found_by == "full" else f"{rerun} (restores it from the token tables)")
        for p in manifests.check_template(path, full=full)
    ]
    g = zarr.open_group(str(path), mode="r")
    names = [str(n) for n in g["checkpoint"][:]]
    done = np.flatnonzero(g["complete"][:] == 1)
    arrays = manifests.routing_arrays(path)
    for ci in done:
        for p in manifests.check_region(path, int(ci), names[ci], full=full, arrays=arrays):
            fix = full_fix if p.found_by == "full" else f"{rerun} (recaptures checkpoint {names[ci]!r})"
            out.append(replace(p, fix=fix))
    return out, len(done)


def verify_store(path: str | os.PathLike, *, full: bool = True) -> list[manifests.Problem]:
    """Problems of one store (a routing cube or a result), outside of any run."""
    path = Path(path)
    if manifests.has_manifests(path) or (path / "complete").is_dir():
        return _routing_problems(path, full=full, rerun="capture it again", repair_cmd="moe-atlas verify --repair")[0]
    return manifests.check_result(path, full=full, fix="write it again")


def verify_run(run: str | os.PathLike, *, full: bool = True) -> tuple[list[manifests.Problem], dict]:
    """Every problem of the run folder ``run``, and counts of what was checked.

    Raises
    ------
    ValueError : ``run`` is not a moe-atlas run folder (no run marker).
    """
    layout = RunLayout(Path(run))
    if not layout.root.is_dir():
        raise ValueError(f"{layout.root}: no such folder")
    if read_marker(layout.root) is None:
        raise ValueError(f"{layout.root}: not a moe-atlas run folder (no .moe-atlas-run.json)")
    rerun = rerun_command(layout.root)
    repair_cmd = f"moe-atlas verify {layout.root} --repair"
    problems: list[manifests.Problem] = []
    counts = {"regions": 0, "results": 0}
    if layout.routing.exists():
        found, counts["regions"] = _routing_problems(layout.routing, full=full, rerun=rerun, repair_cmd=repair_cmd)
        problems.extend(found)
    for store in _results(layout):
        counts["results"] += 1
        for p in manifests.check_result(store, full=full):
            problems.append(replace(p, fix=(f"{repair_cmd} && {rerun}" if p.found_by == "full"
                                            else f"{rerun} (recomputes it)")))
    return problems, counts


def repair(run: str | os.PathLike, problems: list[manifests.Problem]) -> list[str]:
    """Set the damaged parts named by ``problems`` up to be rebuilt by the next run; returns what was done.

    Holds the run lock. A damaged region is un-marked (``complete`` = 0 first,
    then its manifest dropped); a damaged result store (token table, analysis),
    written by moe-atlas and proven damaged by its own manifest, is removed; a
    damaged template chunk object is removed so that the rerun restores it
    from the token tables (it is put back only if its checksum matches).
    """
    import zarr

    from .lock import run_lock

    layout = RunLayout(Path(run))
    if read_marker(layout.root) is None:
        raise ValueError(f"{layout.root}: not a moe-atlas run folder (no .moe-atlas-run.json)")
    done: list[str] = []
    with run_lock(layout.lock):
        routing = str(layout.routing)
        regions: set[int] = set()
        for p in problems:
            if p.store == routing and p.region.startswith("checkpoint "):
                regions.add(int(p.region.split("(index ", 1)[1].split(")", 1)[0]))
            elif p.store == routing and p.region.startswith("template chunk "):
                key = p.region[len("template chunk "):]
                target = layout.routing / key
                if target.is_file():
                    target.unlink()
                    done.append(f"{routing}: removed damaged template chunk {key} (the rerun restores it)")
        if regions:
            g = zarr.open_group(routing, mode="r+")
            for ci in sorted(regions):
                g["complete"][ci] = 0
                manifests.drop_region(routing, ci)
                done.append(f"{routing}: un-marked checkpoint {str(g['checkpoint'][ci])!r} (the rerun recaptures it)")
        stores = {p.store for p in problems if p.store != routing}
        for s in sorted(stores):
            sp = Path(s)
            if sp.parent in (layout.analyses_dir, layout.root / "tokens") and manifests.result_sealed(sp):
                shutil.rmtree(sp)
                done.append(f"{s}: removed the damaged result (the rerun recomputes it)")
    return done
