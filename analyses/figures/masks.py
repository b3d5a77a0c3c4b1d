"""Figures of the pruned-mask Hamming clustering (seed 003): per seed and k, and summaries over seeds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from .plotting import new_figure, plt, safe_stem, savefig


def per_seed(x: np.ndarray, labels: np.ndarray, out_dir, stem: str, title: str, formats=("png",)) -> list[Path]:
    """Spy plot (rows ordered by cluster, boundaries), cluster statistics, t-SNE, within/between distance heatmap.

    x : (n, cols) 0/1 rows; labels : (n,) k-means labels.
    """
    from sklearn.manifold import TSNE

    order = np.argsort(labels, kind="stable")
    xs, ls = x[order], labels[order]
    files = []
    fig, axes = new_figure(1, 1, panel_size=(5.0, 2.6))
    ax = axes[0, 0]
    ax.imshow(xs, aspect="auto", cmap="Greys", interpolation="nearest")
    for b in np.flatnonzero(np.diff(ls)) + 0.5:
        ax.axhline(b, color="tab:red", lw=0.6)
    ax.set_xlabel("input feature (column)")
    ax.set_ylabel("selected rows, by cluster")
    ax.set_title(f"{title}: kept weights (black)", fontsize=8)
    files += savefig(fig, out_dir, f"{stem}_spy_plot", formats)

    k = int(labels.max()) + 1
    sizes = np.bincount(labels, minlength=k)
    cen = np.array([x[labels == c].mean(0) if sizes[c] else np.zeros(x.shape[1]) for c in range(k)])
    coh = [np.linalg.norm(x[labels == c] - cen[c], axis=1).mean() if sizes[c] else np.nan for c in range(k)]
    fig, axes = new_figure(1, 2, panel_size=(2.6, 2.2))
    axes[0, 0].bar(range(k), sizes, color="tab:blue")
    axes[0, 0].set_xlabel("cluster")
    axes[0, 0].set_ylabel("rows")
    axes[0, 1].bar(range(k), coh, color="tab:orange")
    axes[0, 1].set_xlabel("cluster")
    axes[0, 1].set_ylabel("mean distance to centre")
    fig.suptitle(f"{title}: cluster statistics", fontsize=8)
    files += savefig(fig, out_dir, f"{stem}_statistics", formats)

    emb = TSNE(n_components=2, perplexity=min(30.0, max(2.0, (len(x) - 1) / 3)), metric="hamming", init="random",
               random_state=0).fit_transform(x.astype(np.float64))
    fig, axes = new_figure(1, 1, panel_size=(3.4, 2.8))
    sc = axes[0, 0].scatter(emb[:, 0], emb[:, 1], c=labels, cmap="tab20", s=8)
    axes[0, 0].set_title(f"{title}: t-SNE (Hamming)", fontsize=8)
    fig.colorbar(sc, ax=axes[0, 0], label="cluster")
    files += savefig(fig, out_dir, f"{stem}_tsne", formats)

    d = (xs[:, None, :] != xs[None, :, :]).sum(-1)
    fig, axes = new_figure(1, 1, panel_size=(3.4, 2.8))
    im = axes[0, 0].imshow(d, cmap="viridis")
    for b in np.flatnonzero(np.diff(ls)) + 0.5:
        axes[0, 0].axhline(b, color="w", lw=0.5)
        axes[0, 0].axvline(b, color="w", lw=0.5)
    axes[0, 0].set_title(f"{title}: Hamming distances (within blocks on the diagonal)", fontsize=7)
    fig.colorbar(im, ax=axes[0, 0], label="bits")
    files += savefig(fig, out_dir, f"{stem}_distance_heatmap", formats)
    return files


def summaries(res: xr.Dataset, out_dir, formats=("png",)) -> list[Path]:
    """Separation ratio vs k (mean ± std over seeds) and within/between distance trends, one line per matrix."""
    files = []
    fig, axes = new_figure(1, 2, panel_size=(3.2, 2.4))
    fig2, axes2 = new_figure(1, 2, panel_size=(3.2, 2.4))
    ks = res.k.values
    for m in res.method.values:
        for c in res.component.values:
            for layer in res.layer.values:
                cell = res.sel({"method": m, "component": c, "layer": layer})
                if not np.isfinite(cell["separation_ratio"].values).any():
                    continue
                lab = f"{m} · {c} · L{layer}"
                for ax, var in ((axes[0, 0], "separation_ratio"), (axes[0, 1], "hamming_ratio")):
                    ax.errorbar(ks, cell[var].mean("seed"), yerr=cell[var].std("seed"), marker="o", ms=3, capsize=2, label=lab)
                axes2[0, 0].plot(ks, cell["within"].mean("seed"), marker="o", ms=3, label=lab)
                axes2[0, 1].plot(ks, cell["between"].mean("seed"), marker="o", ms=3, label=lab)
    for ax, t in ((axes[0, 0], "separation ratio (between/within)"), (axes[0, 1], "Hamming between/within")):
        ax.set_xlabel("k")
        ax.set_title(t, fontsize=8)
    for y, word in ((2, "excellent"), (1, "good"), (0.5, "moderate")):
        axes[0, 0].axhline(y, color="0.6", lw=0.6, ls="--")
        axes[0, 0].text(ks[0], y, word, fontsize=5, va="bottom")
    n = int(res.attrs.get("n", 0))
    if n:  # rows without structure: centres differ only by sampling noise
        axes[0, 0].plot(ks, np.sqrt(2 * ks / n), color="0.3", lw=0.8, ls=":", label="no structure ≈ √(2k/n)")
    axes[0, 1].axhline(1, color="0.6", lw=0.6, ls="--")
    axes[0, 0].legend(fontsize=5)
    files += savefig(fig, out_dir, "summary_separation_ratios", formats)
    for ax, t in ((axes2[0, 0], "mean within-cluster distance"), (axes2[0, 1], "mean between-centre distance")):
        ax.set_xlabel("k")
        ax.set_title(t, fontsize=8)
    axes2[0, 0].legend(fontsize=5)
    files += savefig(fig2, out_dir, "summary_distances", formats)
    return files
