"""The report section of issue 14 (experts as objects, pruned-weight masks); called by analyses/report.py.

Reads ``<output_dir>/experts/experts.zarr`` and ``experts/mask_clusters.zarr`` (tasks/experts.py)
when they exist, draws the figures, writes the tables and returns the HTML section ("" when neither
stage ran). Every figure has a caption saying what it shows and how to read it.
"""

from __future__ import annotations

import html
import os
import shutil
from pathlib import Path

import numpy as np

from storage import cube as cubes

#: Captions of the four per-seed, per-k mask figures, in the order analyses.figures.masks.per_seed draws them.
PER_SEED_CAPTIONS = (
    "Spy plot: the selected rows (a random row's nearest rows by Hamming distance), kept weights black, ordered by "
    "k-means cluster, red lines at the cluster boundaries. Rows of one cluster share their pattern of kept inputs.",
    "Cluster statistics: rows per cluster, and the mean distance of a cluster's rows to its centre (lower = tighter).",
    "t-SNE (Hamming metric) of the selected rows, coloured by k-means cluster: separate clouds mean the clusters are "
    "real structure, one mixed cloud means k-means cut a continuum.",
    "Hamming distance between every two selected rows, ordered by cluster: within-cluster distances are the blocks "
    "on the diagonal, between-cluster distances the rest; dark diagonal blocks = well separated clusters.",
)


def _img(path: Path, root: Path, caption: str) -> str:
    rel = html.escape(os.path.relpath(path, root))
    return f'<figure><img src="{rel}" alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}</figcaption></figure>'


def _shown(files: list[Path]) -> list[Path]:
    """The files a browser shows: PNG, else SVG, one per figure stem."""
    for ext in (".png", ".svg"):
        picked = [f for f in files if f.suffix == ext]
        if picked:
            return picked
    return list(files)


def _html_table(df, caption: str) -> str:
    def cell(v):
        return f"{v:.3g}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in df.itertuples(index=False))
    return f'<table class="headline"><caption>{html.escape(caption)}</caption><tr>{head}</tr>{body}</table>'


def experts_table(ds):
    """Tidy table (checkpoint, layer, embedding): diversity, its random and earliest-checkpoint references,
    best k by silhouette, Mantel ρ / p against each routing matrix."""
    import pandas as pd

    rows = []
    for c in ds.checkpoint.values:
        for layer in ds.layer.values:
            for emb in ds.embedding.values:
                cell = ds.sel(checkpoint=c, layer=layer, embedding=emb)
                sil = cell["silhouette"].mean("kmeans_seed").values
                row = {"checkpoint": str(c), "step": int(cell["step"]), "layer": int(layer), "embedding": str(emb),
                       "diversity": float(cell["diversity"]), "diversity_random": float(cell["diversity_random"]),
                       "diversity_earliest": float(ds["diversity"].isel(checkpoint=0).sel(layer=layer, embedding=emb)),
                       "best_k": int(cell["k"].values[int(np.argmax(np.nan_to_num(sil, nan=-9)))])
                       if np.isfinite(sil).any() else -1,
                       "silhouette_best": float(np.nanmax(sil)) if np.isfinite(sil).any() else float("nan")}
                for name in ("coactivation", "usage"):
                    if f"mantel_r_{name}" in ds:
                        row[f"mantel_r_{name}"] = float(cell[f"mantel_r_{name}"])
                        row[f"mantel_p_{name}"] = float(cell[f"mantel_p_{name}"])
                rows.append(row)
    return pd.DataFrame(rows)


def _experts_part(ds, report_dir: Path, fig_dir: Path, tables: Path, formats, summary: dict) -> list[str]:
    from analyses.figures import experts as fe

    table = experts_table(ds)
    table.to_csv(tables / "experts.csv", index=False)
    last = ds.isel(checkpoint=-1)
    out = summary.setdefault("experts", {})
    for key, src in (("diversity_last", last), ("diversity_earliest", ds.isel(checkpoint=0))):
        out[key] = {str(e): float(src["diversity"].sel(embedding=e).mean()) for e in ds.embedding.values}
    out["diversity_random"] = {str(e): float(last["diversity_random"].sel(embedding=e).mean()) for e in ds.embedding.values}
    parts = [_img(f, report_dir, "Diversity (1 − mean off-diagonal cosine similarity of the experts) per layer across "
                  "training, for the router rows, the randomly projected FFN weights and the gate/up/down norms. Dashed: "
                  "Gaussian random matrices of the same shape; dotted: the earliest checkpoint (mean over layers). "
                  "Above the dashed line experts are more different from each other than random vectors, below it they "
                  "share a common direction.") for f in _shown(fe.diversity_across_checkpoints(ds, fig_dir, formats))]
    parts += [_img(f, report_dir, "Drift: mean over experts of the cosine distance of each expert's embedding to its "
                   "own final weights (0 at the last checkpoint): when the experts' weights settle.")
              for f in _shown(fe.drift_figure(ds, fig_dir, formats))]
    parts += [_img(f, report_dir, f"Cosine similarity of the experts, layer {f.stem.rsplit('_layer', 1)[-1]}, "
                   "at the last checkpoint, ordered by average-linkage clustering on cosine distance (dendrogram "
                   "above): red blocks on the diagonal are groups of experts with similar weights; the height of a "
                   "merge is the distance at which two groups join.")
              for f in _shown(fe.similarity_dendrograms(ds, fig_dir, formats))]
    parts += [_img(f, report_dir, "k-means of the experts (unit-normalised embeddings) for each k: silhouette with "
                   "cosine distance, mean ± std over the k-means seeds, a line per layer, at the last checkpoint. "
                   "Near 0: no cluster structure; the k with the highest silhouette is the table's best k.")
              for f in _shown(fe.silhouette_by_k(ds, fig_dir, formats))]
    mantel = [c for c in table.columns if c.startswith("mantel_")]
    if mantel:
        out["mantel_r"] = {c: float(table[c].mean()) for c in mantel if c.startswith("mantel_r_")}
        lt = table[(table.checkpoint == str(ds.checkpoint.values[-1])) & table.embedding.isin(["router", "ffn"])]
        parts.append(_html_table(lt[["layer", "embedding", *mantel]].round(3),
                                 "Does weight similarity predict routing? Mantel test at the last checkpoint: Spearman "
                                 "ρ between the experts' cosine similarity and their co-activation (or the cosine of "
                                 "their domain-usage profiles), one-sided permutation p (experts permuted jointly). "
                                 "ρ > 0 with small p: experts with similar weights are chosen together / for the same "
                                 "domains."))
    parts.append('<p class="files">Cube: <code>experts/experts.zarr</code> · table: <a href="tables/experts.csv">'
                 'experts.csv</a> (diversity, random and earliest-checkpoint references, best k of k-means by '
                 'silhouette, Mantel ρ and permutation p of weight similarity vs co-activation / shared domain usage).</p>')
    return parts


def _per_seed_parts(res, masks, report_dir: Path, out_dir: Path, formats) -> list[str]:
    """Spy plot, cluster statistics, t-SNE and distance heatmap of the first ``figure_seeds`` seeds, each ``figure_k``."""
    from analyses.figures import masks as fm
    from analyses.masks import unpack_rows

    parts = []
    nfig = int(res.attrs.get("figure_seeds", 1))
    fig_k = [int(k) for k in res.attrs.get("figure_k", None) or res.k.values]
    for v in masks.data_vars:
        a = masks[v].attrs
        cell = res.sel({"method": a["method"], "component": a["component"], "layer": a["layer"]})
        for s in range(min(nfig, cell.sizes["seed"])):
            rows = cell["rows"].isel(seed=s).values
            rows = rows[np.isfinite(rows)].astype(int) if rows.dtype.kind == "f" else rows[rows >= 0]
            x = unpack_rows(masks[v].values[rows], int(a["cols"]))
            for k in fig_k:
                lab = cell["labels"].isel(seed=s).sel(k=k).values[: len(rows)]
                if not np.all(np.isfinite(lab)) or (lab < 0).any():
                    continue
                stem = f"{a['method']}_{a['component']}_L{a['layer']}_seed{s}_k{int(k)}".replace(".", "_")
                title = f"{a['method']} · {a['component']} · L{a['layer']} · seed {s} · k={int(k)}"
                files = _shown(fm.per_seed(x, lab.astype(int), out_dir, stem, title, formats))
                parts.append("<details><summary>" + html.escape(title) + "</summary>"
                             + "".join(_img(f, report_dir, c) for f, c in zip(files, PER_SEED_CAPTIONS)) + "</details>")
    return parts


def _masks_part(res, root: Path, report_dir: Path, fig_dir: Path, tables: Path, formats, summary: dict) -> list[str]:
    from analyses.figures import masks as fm
    from analyses.masks import comparative_table

    table = comparative_table(res)
    table.to_csv(tables / "mask_clusters.csv", index=False)
    if (root / "metrics_summary.json").exists():
        shutil.copyfile(root / "metrics_summary.json", tables / "metrics_summary.json")
    summary.setdefault("masks", {})["verdicts"] = {
        f"{r.method}/{r.component}/L{r.layer}/k{r.k}": [round(r.separation_ratio_mean, 3), r.verdict]
        for r in table.itertuples()}
    sep, dist = _shown(fm.summaries(res, fig_dir / "masks", formats))
    parts = [_img(sep, report_dir, "Pruned-mask rows clustered by Hamming distance, mean ± std over seeds vs k. Left: "
                  "separation ratio (mean between-centre / mean within-cluster Euclidean distance; seed 003's bands "
                  "dashed: > 2 excellent, > 1 good, > 0.5 moderate). Rows without structure give ≈ √(2k/n) (dotted), not "
                  "1, so right: the Hamming ratio (between- / within-cluster Hamming distance), ≈ 1 without structure."),
             _img(dist, report_dir, "Distance trends vs k: mean within-cluster distance (falls as k grows, also for "
                  "random rows) and mean between-centre distance; structure shows as a within-distance well below "
                  "the between-distance.")]
    cols = ["method", "component", "layer", "k", "separation_ratio_mean", "separation_ratio_std", "hamming_ratio_mean",
            "hamming_min_mean", "hamming_max_mean", "verdict"]
    parts.append(_html_table(table[cols], "Comparative table, methods × components: separation ratio mean ± std over "
                             "seeds, Hamming ratio, Hamming distance of the nearest rows to the selected row (min/max), "
                             "and seed 003's verdict band of the mean separation ratio."))
    parts += _per_seed_parts(res, cubes.open_result(root / "masks.zarr"), report_dir, fig_dir / "masks", formats)
    parts.append('<p class="files">Masks (bit-packed, parameters in attrs): <code>experts/masks.zarr</code> · '
                 'results: <code>experts/mask_clusters.zarr</code> · table: <a href="tables/mask_clusters.csv">'
                 'mask_clusters.csv</a> · <a href="tables/metrics_summary.json">metrics_summary.json</a></p>')
    return parts


def report_hook(layout, formats, summary: dict) -> str:
    """Figures, tables and the HTML section of the experts/masks stages; "" when they did not run."""
    root = Path(layout.root) / "experts"
    report_dir = Path(layout.report_dir)
    fig_dir = Path(layout.figures_dir) / "experts"
    tables = report_dir / "tables"
    parts = []
    exp_path, mask_path = root / "experts.zarr", root / "mask_clusters.zarr"
    if cubes.result_fingerprint(exp_path):
        tables.mkdir(parents=True, exist_ok=True)
        parts += _experts_part(cubes.open_result(exp_path), report_dir, fig_dir, tables, formats, summary)
    if cubes.result_fingerprint(mask_path):
        tables.mkdir(parents=True, exist_ok=True)
        parts += _masks_part(cubes.open_result(mask_path), root, report_dir, fig_dir, tables, formats, summary)
    if not parts:
        return ""
    return ('<section id="experts"><h2>Experts as objects: weights and pruned masks</h2>'
            '<p class="caption">Read from the checkpoints\' safetensors, without a forward pass (masks: Wanda and '
            'SparseGPT use calibration activations of the experiment\'s datasets). Definitions in analyses/experts.py '
            'and analyses/masks.py; what the sizes are and how to read each figure in docs/experts.md.</p>'
            + "".join(parts) + "</section>")
