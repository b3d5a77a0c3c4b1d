"""A small moe-atlas run folder built without the pipeline: claimed, a routing cube with two captured
checkpoints, a token table and an analysis result, each written by the storage functions the pipeline uses.

Used by test_manifest.py and test_cli.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr

from storage import cube as cubes
from storage.layout import RunLayout
from storage.ownership import claim_run
from storage.schema import empty_routing, mock_cube

IDENTITY = {"experiment": "built", "source": "checkpoints", "tokenizer": "/nowhere/tok", "datasets": []}
NAMES = ["step0", "step100"]


@dataclass
class Run:
    layout: RunLayout
    cube: xr.Dataset  # the reference values (mock_cube) the stores hold
    experiment_file: Path

    @property
    def routing(self) -> Path:
        return self.layout.routing


def tokens_of(m: xr.Dataset) -> xr.Dataset:
    return m.drop_vars(list(m.data_vars)).drop_dims(["checkpoint", "layer", "k", "expert"])


def template(m: xr.Dataset, names=NAMES) -> xr.Dataset:
    return empty_routing(
        tokens_of(m), checkpoints=list(names), steps=[int(n[4:]) for n in names], layers=list(m.layer.values),
        num_experts=m.sizes["expert"], top_k=m.sizes["k"], keep_logits=True,
        attrs={"model_family": "mock", "router_semantics": "softmax", "source": "test"},
    )


def capture(path: Path, m: xr.Dataset, ci: int, name: str, batch: int = 37) -> None:
    """Write checkpoint ``ci`` of ``m`` into the cube's region ``name`` the way capture does (RoutingWriter)."""
    T = m.sizes["token"]
    with cubes.RoutingWriter(path, name) as w:
        for s in range(0, T, batch):
            e = min(T, s + batch)
            w.append(expert_ids=m.expert_ids.values[ci][:, s:e], expert_weights=m.expert_weights.values[ci][:, s:e],
                     router_logits=m.router_logits.values[ci][:, s:e], nll=m.nll.values[ci][s:e])


def build_run(root: Path, *, seed: int = 5) -> Run:
    """Claim ``root`` and fill it: routing.zarr (2 checkpoints, several token chunks), tokens/, analyses/."""
    exp_file = root.parent / f"{root.name}.toml"
    exp_file.write_text("# stands for the experiment file of this run\n")
    claim_run(root, IDENTITY, experiment_file=str(exp_file))
    layout = RunLayout(root)
    m = mock_cube(n_checkpoints=2, n_samples=6, seq_len=20, n_layers=2, num_experts=8, top_k=2, seed=seed)
    cubes.prepare_routing(layout.routing, template(m), token_chunk=32)
    for ci, name in enumerate(NAMES):
        capture(layout.routing, m, ci, name)
    cubes.write_result(tokens_of(m).reset_coords(), layout.tokens("eval"), fingerprint="tok")
    usage = xr.Dataset({"share": (("layer", "expert"), np.random.default_rng(seed).random((2, 8)))},
                       coords={"layer": [0, 1], "expert": np.arange(8)})
    cubes.write_result(usage, layout.analysis("usage"), fingerprint="use")
    return Run(layout, m, exp_file)


def chunk(store: Path, var: str, *index: int) -> Path:
    """The chunk object of ``var`` at chunk index ``index`` (zarr 3 default key encoding, "c/i/j/...")."""
    return store / var / "c" / "/".join(map(str, index))


def files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (to show that nothing was touched)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
