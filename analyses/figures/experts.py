"""Figures of the expert weight-space analyses: similarity heatmaps with dendrograms, diversity across checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from .plotting import new_figure, plt, safe_stem, savefig


def similarity_dendrograms(sim: xr.Dataset, out_dir, formats=("png",), *, checkpoint=None) -> list[Path]:
    """Per layer: cosine similarity of the experts (router and ffn embeddings), ordered by the dendrogram above it."""
    from scipy.cluster.hierarchy import dendrogram

    c = sim.checkpoint.values[-1] if checkpoint is None else checkpoint
    files = []
    for layer in sim.layer.values:
        fig, axes = new_figure(2, 2, panel_size=(3.2, 1.6), height_ratios=[1, 2.2])
        for j, emb in enumerate(("router", "ffn")):
            cell = sim.sel(checkpoint=c, layer=layer, embedding=emb)
            link = cell["linkage"].values
            s = cell["similarity"].values
            ax_d, ax_h = axes[0, j], axes[1, j]
            if np.all(np.isfinite(link)) and len(link):
                order = dendrogram(link, ax=ax_d, no_labels=True, color_threshold=0, above_threshold_color="0.3")["leaves"]
            else:
                order = list(range(len(s)))
            ax_d.set_title(f"{emb}: average linkage, cosine distance", fontsize=7)
            ax_d.set_yticks([])
            im = ax_h.imshow(s[np.ix_(order, order)], vmin=-1, vmax=1, cmap="RdBu_r")
            ax_h.set_xticks(range(len(order)), order, fontsize=6)
            ax_h.set_yticks(range(len(order)), order, fontsize=6)
            ax_h.set_xlabel("expert")
            fig.colorbar(im, ax=ax_h, shrink=0.8, label="cosine")
        fig.suptitle(f"Expert similarity, layer {layer}, {c}", fontsize=8)
        files += savefig(fig, out_dir, f"similarity_{safe_stem(c)}_layer{layer}", formats)
    return files


def diversity_across_checkpoints(sim: xr.Dataset, out_dir, formats=("png",)) -> list[Path]:
    """Diversity per layer vs training step, one panel per embedding, random-matrix reference dashed."""
    embs = list(sim.embedding.values)
    fig, axes = new_figure(1, len(embs), panel_size=(2.4, 2.2))
    steps = sim["step"].values if "step" in sim.coords else np.arange(sim.sizes["checkpoint"])
    for j, emb in enumerate(embs):
        ax = axes[0, j]
        for layer in sim.layer.values:
            ax.plot(steps, sim["diversity"].sel(embedding=emb, layer=layer).values, marker="o", ms=3, label=f"layer {layer}")
        ref = sim["diversity_random"].sel(embedding=emb).isel(checkpoint=0).mean("layer").item()
        ax.axhline(ref, ls="--", color="0.4", lw=0.8, label="random matrices")
        first = sim["diversity"].sel(embedding=emb).isel(checkpoint=0).mean("layer").item()
        ax.axhline(first, ls=":", color="0.2", lw=0.8, label=f"earliest checkpoint ({sim.checkpoint.values[0]})")
        ax.set_title(emb, fontsize=8)
        ax.set_xlabel("training step")
        if j == 0:
            ax.set_ylabel("diversity = 1 − mean cos")
    axes[0, -1].legend(fontsize=5)
    return savefig(fig, out_dir, "diversity_across_checkpoints", formats)


def drift_figure(dr: xr.Dataset, out_dir, formats=("png",)) -> list[Path]:
    """Mean (over experts) cosine distance to the final weights vs step, per embedding."""
    fig, axes = new_figure(1, 1, panel_size=(4.0, 2.4))
    ax = axes[0, 0]
    steps = dr["step"].values if "step" in dr.coords else np.arange(dr.sizes["checkpoint"])
    for emb in ("router", "ffn"):
        for layer in dr.layer.values:
            ax.plot(steps, dr["drift"].sel(embedding=emb, layer=layer).mean("expert").values, marker="o", ms=3,
                    ls="-" if emb == "router" else ":", label=f"{emb}, layer {layer}")
    ax.set_xlabel("training step")
    ax.set_ylabel("1 − cos(e, e_final)")
    ax.legend(fontsize=5, ncol=2)
    return savefig(fig, out_dir, "drift", formats)


def silhouette_by_k(ds: xr.Dataset, out_dir, formats=("png",), *, checkpoint=None) -> list[Path]:
    """k-means over the experts: silhouette (cosine) against k, mean ± std over the k-means seeds, a line per
    layer, a panel per embedding (last checkpoint by default). 0 = no cluster structure."""
    c = ds.checkpoint.values[-1] if checkpoint is None else checkpoint
    embs = [e for e in ds.embedding.values if np.isfinite(ds["silhouette"].sel(checkpoint=c, embedding=e)).any()]
    if not embs:
        return []
    ks = ds["k"].values
    fig, axes = new_figure(1, len(embs), panel_size=(2.4, 2.2))
    for j, emb in enumerate(embs):
        ax = axes[0, j]
        for layer in ds.layer.values:
            sil = ds["silhouette"].sel(checkpoint=c, embedding=emb, layer=layer)
            ax.errorbar(ks, sil.mean("kmeans_seed").values, yerr=sil.std("kmeans_seed").values, marker="o", ms=3,
                        capsize=2, lw=1, label=f"layer {layer}")
        ax.axhline(0, ls="--", color="0.4", lw=0.8)
        ax.set_xticks(ks)
        ax.set_title(str(emb), fontsize=8)
        ax.set_xlabel("k (clusters of experts)")
        if j == 0:
            ax.set_ylabel("silhouette (cosine)")
    axes[0, -1].legend(fontsize=5)
    fig.suptitle(f"k-means of the experts, {c}: mean ± std over seeds", fontsize=8)
    return savefig(fig, out_dir, f"silhouette_by_k_{safe_stem(str(c))}", formats)
