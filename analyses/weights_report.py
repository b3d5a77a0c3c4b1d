"""The report section of issue 14 (experts as objects, pruned-weight masks); called by analyses/report.py.

Reads ``<output_dir>/experts/experts.zarr`` and ``experts/mask_clusters.zarr`` (tasks/experts.py)
when they exist, draws the figures, writes the tables and returns the HTML section ("" when neither
stage ran).
"""

from __future__ import annotations

import html
import os
import shutil
from pathlib import Path

import numpy as np

from storage import cube as cubes


def _img(path: Path, root: Path, caption: str) -> str:
    rel = html.escape(os.path.relpath(path, root))
    return f'<figure><img src="{rel}" alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}</figcaption></figure>'


def experts_table(ds):
    import pandas as pd

    rows = []
    for c in ds.checkpoint.values:
        for layer in ds.layer.values:
            for emb in ds.embedding.values:
                cell = ds.sel(checkpoint=c, layer=layer, embedding=emb)
                row = {"checkpoint": str(c), "step": int(cell["step"]), "layer": int(layer), "embedding": str(emb),
                       "diversity": float(cell["diversity"]), "diversity_random": float(cell["diversity_random"]),
                       "best_k": int(cell["k"].values[int(np.nanargmax(np.nan_to_num(cell["silhouette"].mean("kmeans_seed").values, nan=-9)))]),
                       "silhouette_best": float(np.nanmax(cell["silhouette"].mean("kmeans_seed").values))
                       if np.isfinite(cell["silhouette"].values).any() else float("nan")}
                for name in ("coactivation", "usage"):
                    if f"mantel_r_{name}" in ds:
                        row[f"mantel_r_{name}"] = float(cell[f"mantel_r_{name}"])
                        row[f"mantel_p_{name}"] = float(cell[f"mantel_p_{name}"])
                rows.append(row)
    return pd.DataFrame(rows)


def report_hook(layout, formats, summary: dict) -> str:
    """Figures, tables and the HTML section of the experts/masks stages; "" when they did not run."""
    from analyses.figures import experts as fe
    from analyses.figures import masks as fm

    root = Path(layout.root) / "experts"
    report_dir = Path(layout.report_dir)
    fig_dir = Path(layout.figures_dir) / "experts"
    tables = report_dir / "tables"
    parts = []
    exp_path, mask_path = root / "experts.zarr", root / "mask_clusters.zarr"
    if cubes.result_fingerprint(exp_path):
        ds = cubes.open_result(exp_path)
        tables.mkdir(parents=True, exist_ok=True)
        table = experts_table(ds)
        table.to_csv(tables / "experts.csv", index=False)
        last = ds.isel(checkpoint=-1)
        summary.setdefault("experts", {})["diversity_last"] = {
            str(e): float(last["diversity"].sel(embedding=e).mean()) for e in ds.embedding.values}
        summary["experts"]["diversity_random"] = {
            str(e): float(last["diversity_random"].sel(embedding=e).mean()) for e in ds.embedding.values}
        figs = fe.diversity_across_checkpoints(ds, fig_dir, formats)
        parts.append(_img(figs[0], report_dir, "Diversity (1 − mean off-diagonal cosine similarity of the experts) per "
                          "layer across training, for the router rows, the randomly projected FFN weights and the "
                          "gate/up/down norms. The dashed line is the level of Gaussian random matrices of the same "
                          "shape; the first checkpoint (initialisation) sits at it, specialisation moves away from it."))
        figs = fe.drift_figure(ds, fig_dir, formats)
        parts.append(_img(figs[0], report_dir, "Drift: mean over experts of the cosine distance of each expert's "
                          "embedding to its final weights; 0 at the last checkpoint."))
        for f in fe.similarity_dendrograms(ds, fig_dir, formats):
            if f.suffix == ".png":
                parts.append(_img(f, report_dir, "Cosine similarity of the experts at the last checkpoint, ordered by "
                                  "average-linkage clustering (dendrogram above): blocks on the diagonal are groups "
                                  "of experts with similar weights."))
        mantel = [c for c in table.columns if c.startswith("mantel_r_")]
        if mantel:
            summary["experts"]["mantel_r"] = {c: float(table[c].mean()) for c in mantel}
        parts.append('<p class="files">Cube: <code>experts/experts.zarr</code> · table: '
                     '<a href="tables/experts.csv">experts.csv</a> (diversity, random reference, best k by '
                     'silhouette, Mantel ρ and permutation p of weight similarity vs co-activation / shared domain '
                     'usage).</p>')
    if cubes.result_fingerprint(mask_path):
        from analyses.masks import comparative_table, unpack_rows

        res = cubes.open_result(mask_path)
        tables.mkdir(parents=True, exist_ok=True)
        table = comparative_table(res)
        table.to_csv(tables / "mask_clusters.csv", index=False)
        if (root / "metrics_summary.json").exists():
            shutil.copyfile(root / "metrics_summary.json", tables / "metrics_summary.json")
        summary.setdefault("masks", {})["verdicts"] = {
            f"{r.method}/{r.component}/L{r.layer}/k{r.k}": [round(r.separation_ratio_mean, 3), r.verdict]
            for r in table.itertuples()}
        figs = fm.summaries(res, fig_dir / "masks", formats)
        parts.append(_img(figs[0], report_dir, "Pruned-mask rows clustered by Hamming distance: separation ratio "
                          "(mean between-centre / mean within-cluster Euclidean distance, seed 003's bands dashed) "
                          "and the Hamming ratio (≈ 1 when rows have no structure), mean ± std over seeds, vs k."))
        masks = cubes.open_result(root / "masks.zarr")
        nfig = int(res.attrs.get("figure_seeds", 1)) if "figure_seeds" in res.attrs else 1
        for v in masks.data_vars:
            a = masks[v].attrs
            cell = res.sel({"method": a["method"], "component": a["component"], "layer": a["layer"]})
            packed = masks[v].values
            for s in range(min(nfig, cell.sizes["seed"])):
                rows = cell["rows"].isel(seed=s).values
                rows = rows[np.isfinite(rows)].astype(int) if rows.dtype.kind == "f" else rows[rows >= 0]
                x = unpack_rows(packed[rows], int(a["cols"]))
                for k in cell.k.values:
                    lab = cell["labels"].isel(seed=s).sel(k=k).values[: len(rows)]
                    if not np.all(np.isfinite(lab)) or (lab < 0).any():
                        continue
                    stem = f"{a['method']}_{a['component']}_L{a['layer']}_seed{s}_k{int(k)}".replace(".", "_")
                    title = f"{a['method']} · {a['component']} · L{a['layer']} · seed {s} · k={int(k)}"
                    files = fm.per_seed(x, lab.astype(int), fig_dir / "masks", stem, title, formats)
                    pngs = [f for f in files if f.suffix == ".png"]
                    parts.append("<details><summary>" + html.escape(title) + "</summary>" + "".join(
                        _img(f, report_dir, cap) for f, cap in zip(pngs, (
                            "Spy plot: the selected rows (the random row's nearest by Hamming distance), kept weights "
                            "black, ordered by k-means cluster, red lines between clusters.",
                            "Cluster sizes and mean distance of the rows to their centre.",
                            "t-SNE (Hamming metric) of the selected rows, coloured by cluster.",
                            "Hamming distance between the selected rows, ordered by cluster: dark blocks on the "
                            "diagonal = tight clusters.")))
                        + "</details>")
        parts.append('<p class="files">Masks (bit-packed, parameters in attrs): <code>experts/masks.zarr</code> · '
                     'results: <code>experts/mask_clusters.zarr</code> · table: <a href="tables/mask_clusters.csv">'
                     'mask_clusters.csv</a> (verdicts: &gt; 2 excellent, &gt; 1 good, &gt; 0.5 moderate, else poor) · '
                     '<a href="tables/metrics_summary.json">metrics_summary.json</a></p>')
    if not parts:
        return ""
    return ('<section id="experts"><h2>Experts as objects: weights and pruned masks</h2>'
            '<p class="caption">Read from the checkpoints\' safetensors, without a forward pass (masks: Wanda uses '
            'calibration activations of the experiment\'s datasets). Definitions in analyses/experts.py and '
            'analyses/masks.py.</p>' + "".join(parts) + "</section>")
