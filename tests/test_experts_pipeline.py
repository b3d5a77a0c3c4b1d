"""tasks/experts.py through Luigi and Dask on the tiny demo: both stages write what the report reads."""

from __future__ import annotations

import json
import shutil

import numpy as np

from pipeline_helpers import build, tiny_model  # noqa: F401  (fixture)


def test_experts_and_masks_stages_run_on_the_cluster(tiny_model, tmp_path):  # noqa: F811
    """The stages' Dask jobs are analyses/ functions (a worker that unpickled a tasks/ function lost its
    connection: ``storage`` is a namespace package there, see analyses.experts.layer_structure)."""
    import tasks
    from experiments.tiny import tiny_experiment
    from storage import cube as cubes
    from storage.ownership import MARKER
    from tasks.experts import ExpertWeights, Masks

    shutil.copytree(tiny_model, tmp_path / "run" / "model")
    shutil.copy2(tiny_model.parent / MARKER, tmp_path / "run" / MARKER)
    exp = tmp_path / "tiny.toml"
    exp.write_text(tiny_experiment(
        tmp_path / "run", analyses=("usage", "coactivation"), port=18981,
        experts={"enabled": True, "ffn_dim": 16, "k_values": [2], "kmeans_seeds": 1, "random_draws": 2, "n_perm": 9},
        masks={"enabled": True, "methods": ["magnitude", "wanda", "sparsegpt"],
               "components": ["self_attn.q_proj", "experts.down_proj"], "layers": [1], "calibration_samples": 4,
               "seeds": 2, "n_similar": 8, "k_values": [2], "figure_seeds": 0}))
    ok, errors = build(exp, [ExpertWeights(experiment=str(exp)), Masks(experiment=str(exp))])
    assert ok, errors
    root = tmp_path / "run" / "experts"
    ds = cubes.open_result(root / "experts.zarr")
    assert ds.sizes["checkpoint"] == len(tasks.checkpoints(tasks._experiment(str(exp))))
    assert np.isfinite(ds["diversity"].sel(embedding="router").values).all()
    assert "mantel_r_coactivation" in ds and "mantel_p_usage" in ds
    np.testing.assert_allclose(ds["drift"].isel(checkpoint=-1).sel(embedding="router").values, 0, atol=1e-6)
    res = cubes.open_result(root / "mask_clusters.zarr")
    assert set(res.method.values) == {"magnitude", "wanda", "sparsegpt"}
    assert np.isfinite(res["separation_ratio"].values).all()
    masks = cubes.open_result(root / "masks.zarr")
    assert all(abs(masks[v].attrs["kept_fraction"] - 0.5) < 0.02 for v in masks.data_vars)
    summary = json.loads((root / "metrics_summary.json").read_text())
    assert len(summary["matrices"]) == 6
