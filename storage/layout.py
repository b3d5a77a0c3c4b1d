"""Where a run keeps its files. Tasks ask this object, never build paths themselves."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunLayout:
    """The directory of one experiment's run.

    ``runs/<name>/``: ``model/`` (demo model and data), ``tokens/<dataset>.zarr``,
    ``routing.zarr``, ``analyses/<name>.zarr``, ``report/index.html`` with
    ``report/figures/``, ``tables/*.csv``, ``summary.json``.
    """

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    def tokens(self, dataset: str) -> Path:
        return self.root / "tokens" / f"{dataset}.zarr"

    @property
    def routing(self) -> Path:
        return self.root / "routing.zarr"

    def capture_marker(self, checkpoint: str) -> Path:
        return self.root / "capture" / f"{checkpoint}.json"

    @property
    def analyses_dir(self) -> Path:
        return self.root / "analyses"

    def analysis(self, name: str) -> Path:
        return self.analyses_dir / f"{name}.zarr"

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    @property
    def figures_dir(self) -> Path:
        return self.report_dir / "figures"

    @property
    def report_index(self) -> Path:
        return self.report_dir / "index.html"

    @property
    def tables_dir(self) -> Path:
        return self.root / "tables"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"
