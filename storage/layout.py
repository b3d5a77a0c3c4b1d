"""Where a run keeps its files. Tasks ask this object, never build paths themselves."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunLayout:
    """The directory of one experiment's run.

    ``runs/<name>/``: ``model/`` (demo model and data, laid out by ``capture.demo``;
    ``model/prepared.json``), ``tokens/<dataset>.zarr``, ``routing.zarr`` with
    ``routing.template.json``, ``analyses/<name>.zarr``, ``report/index.html`` with
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

    @property
    def template_marker(self) -> Path:
        """What the routing cube's template was last built from (fingerprint of the token tables; tasks.RoutingTemplate)."""
        return self.root / "routing.template.json"

    @property
    def prepared(self) -> Path:
        """What the model stage last checked or built (tasks.PrepareModel)."""
        return self.model_dir / "prepared.json"

    @property
    def analyses_dir(self) -> Path:
        return self.root / "analyses"

    def analysis(self, name: str) -> Path:
        return self.analyses_dir / f"{name}.zarr"

    def intervention(self, sweep: str) -> Path:
        """Per-sample scores of one intervention sweep (issue 15), ``interventions/<sweep>.zarr``."""
        return self.root / "interventions" / f"{sweep}.zarr"

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
