"""The ``moe-atlas`` command line (``moe_atlas.cli``) and :func:`open_run` for notebooks;
the framework itself lives in storage/, capture/, analyses/, tasks/."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Run", "open_run"]


@dataclass
class Run:
    """A run folder, opened: the routing cube and every analysis cube, lazy (Dask) and labelled.

    Attributes
    ----------
    path : the run folder (the experiment's ``output_dir``).
    routing : ``routing.zarr`` (checkpoint, layer, token, k[, expert]); only complete checkpoints
        unless ``open_run(..., complete_only=False)``.
    analyses : analysis name -> its result cube (``analyses/<name>.zarr``).
    report_path : ``report/index.html`` (it may not exist yet).
    """

    path: Path
    routing: object
    analyses: dict = field(default_factory=dict)
    report_path: Path | None = None

    def __repr__(self) -> str:
        sizes = dict(self.routing.sizes) if self.routing is not None else {}
        return f"Run({str(self.path)!r}, routing={sizes}, analyses={sorted(self.analyses)})"


def open_run(path, *, complete_only: bool = True) -> Run:
    """Open the run folder ``path``: its routing cube and analysis cubes, lazily (nothing is read but metadata).

    Raises
    ------
    FileNotFoundError when ``path`` holds no routing cube; storage.cube.CubeError for a damaged one.
    """
    from storage import RunLayout
    from storage import cube as cubes

    layout = RunLayout(Path(path).resolve())
    if not Path(layout.routing).exists():
        raise FileNotFoundError(f"{layout.root}: no routing.zarr here (is it a run folder, the experiment's "
                                f"output_dir?)")
    routing = cubes.open_routing(layout.routing, complete_only=complete_only)
    analyses = {}
    folder = Path(layout.analysis("x")).parent
    for store in sorted(folder.glob("*.zarr")) if folder.is_dir() else []:
        analyses[store.stem] = cubes.open_result(store)
    return Run(path=layout.root, routing=routing, analyses=analyses, report_path=Path(layout.report_index))
