"""analyses/weights_report.py: the experts/masks report section from small stored results."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import xarray as xr
from safetensors.numpy import save_file

from analyses import experts as X
from analyses import masks as M
from analyses.weights_report import PER_SEED_CAPTIONS, experts_table, report_hook
from storage import cube as cubes


def _checkpoint(path, router, seed):
    rng = np.random.default_rng(seed)
    t = {"model.layers.0.mlp.gate.weight": router.astype(np.float32)}
    for e in range(router.shape[0]):
        for proj, shape in (("gate_proj", (8, 16)), ("up_proj", (8, 16)), ("down_proj", (16, 8))):
            t[f"model.layers.0.mlp.experts.{e}.{proj}.weight"] = rng.standard_normal(shape).astype(np.float32)
    path.mkdir()
    save_file(t, str(path / "model.safetensors"))
    return path


def test_silhouette_by_k_plots_the_mean_and_std_over_seeds(tmp_path, monkeypatch):
    from analyses.figures import experts as fe
    from analyses.figures import plotting

    drawn = {}
    real = plotting.savefig
    monkeypatch.setattr(fe, "savefig", lambda fig, out, stem, formats: drawn.setdefault(stem, fig) and
                        real(fig, out, stem, formats))
    sil = np.array([[[[0.1, 0.3], [0.5, 0.7]]]])  # (checkpoint, layer, k, seed)
    ds = xr.Dataset({"silhouette": (("checkpoint", "layer", "embedding", "k", "kmeans_seed"), sil[:, :, None])},
                    coords={"checkpoint": ["c"], "layer": [0], "embedding": ["router"], "k": [2, 3]})
    files = fe.silhouette_by_k(ds, tmp_path)
    assert [f.name for f in files] == ["silhouette_by_k_c.png"]
    (line,) = drawn["silhouette_by_k_c"].axes[0].get_lines()[:1]
    np.testing.assert_allclose(line.get_ydata(), [0.2, 0.6])
    np.testing.assert_allclose(line.get_xdata(), [2, 3])


def test_section_has_every_figure_table_and_caption(tmp_path):
    rng = np.random.default_rng(0)
    r0 = rng.standard_normal((6, 16))
    parts = [X.layer_structure(_checkpoint(tmp_path / n, r0 * (1 + i), i), 0, ffn_dim=8, k_values=(2, 3),
                               kmeans_seeds=2, random_draws=3) for i, n in enumerate(("a", "b"))]
    ds = xr.concat(parts, "checkpoint", combine_attrs="drop_conflicts").assign_coords(
        checkpoint=["a", "b"], step=("checkpoint", np.array([0, 10])))
    ds = xr.merge([ds, X.drift(ds)], compat="override", combine_attrs="override")
    coact = xr.DataArray(np.exp(ds.similarity.sel(embedding="router").values), dims=("checkpoint", "layer", "expert", "expert_b"),
                         coords={"checkpoint": ["a", "b"], "layer": [0]})
    m = X.mantel_against(ds.similarity, coact, n_perm=19)
    ds = ds.assign(mantel_r_coactivation=m.mantel_r, mantel_p_coactivation=m.mantel_p)
    root = tmp_path / "run"
    cubes.write_result(ds, root / "experts" / "experts.zarr", fingerprint="x")
    planted = np.repeat(rng.random((3, 40)) < 0.5, 12, axis=0) ^ (rng.random((36, 40)) < 0.03)
    mats = {("user", "mlp.down_proj", 2): (planted, None)}
    cubes.write_result(M.masks_dataset(mats, {"sparsity": 0.0}), root / "experts" / "masks.zarr", fingerprint="x")
    res = M.combine_clusters(list(mats), [M.cluster_rows(M.pack_rows(planted), 40, n=16, k_values=(3,), seeds=2,
                                                         keep_rows=True)], {"n": 16, "figure_seeds": 1})
    cubes.write_result(res, root / "experts" / "mask_clusters.zarr", fingerprint="x")
    (root / "experts" / "metrics_summary.json").write_text(json.dumps(M.json_summary(res)))
    layout = SimpleNamespace(root=root, report_dir=root / "report", figures_dir=root / "report" / "figures")
    summary = {}
    page = report_hook(layout, ["png"], summary)

    imgs = page.count("<img ")
    # diversity, drift, one similarity heatmap per layer, silhouette by k, 2 summaries, 4 per seed & k
    assert imgs == 2 + 1 + 1 + 2 + 4
    for stem in ("diversity_across_checkpoints", "drift", "similarity_b_layer0", "silhouette_by_k_b",
                 "summary_separation_ratios",
                 "summary_distances", "user_mlp_down_proj_L2_seed0_k3_spy_plot", "user_mlp_down_proj_L2_seed0_k3_tsne"):
        assert stem in page and list((root / "report" / "figures").rglob(f"{stem}.png")), stem
    for caption in PER_SEED_CAPTIONS:
        assert caption.split(":")[0] in page
    assert "Mantel" in page and "excellent" in page  # the Mantel table and the verdict of the planted mask
    table = experts_table(ds)
    assert len(table) == 2 * 3  # checkpoints × embeddings
    np.testing.assert_allclose(table[table.checkpoint == "b"].diversity_earliest.values,
                               ds.diversity.sel(checkpoint="a", layer=0).values)
    for name in ("experts.csv", "mask_clusters.csv", "metrics_summary.json"):
        assert (root / "report" / "tables" / name).exists()
    assert summary["masks"]["verdicts"]["user/mlp.down_proj/L2/k3"][1] == "excellent"
    assert set(summary["experts"]["diversity_earliest"]) == {"router", "ffn", "norms"}
    empty = SimpleNamespace(root=tmp_path / "none", report_dir=tmp_path / "none/r", figures_dir=tmp_path / "none/f")
    assert report_hook(empty, ["png"], {}) == ""
