"""Experts as objects: embeddings of each expert read from the weights, and their similarity structure.

No forward pass: :func:`expert_embeddings` streams one checkpoint's safetensors
(``storage.weights.iter_expert_tensors``, one tensor at a time) into three
embeddings per (layer, expert), labelled by the ``embedding`` coordinate of every
derived result:

* ``router``: the router's weight row of the expert (dim ``hidden``);
* ``ffn``: the expert's gate, up and down weights flattened and reduced to
  ``ffn_dim`` (default 256) by a seeded sparse random projection
  (``sklearn.random_projection.SparseRandomProjection``, Li et al.'s very sparse
  projection, density 1/√n, ``random_state = seed·3 + {gate: 0, up: 1, down: 2}``, default seed 0):
  the projection of the concatenation [gate, up, down] equals the sum of the
  three blocks' projections, so no expert is ever concatenated or held twice;
* ``norms``: Frobenius norms of the gate, up and down projections (dim ``proj``).

:func:`similarity_structure` gives, per (layer, embedding): the cosine similarity
matrix, diversity = 1 − mean off-diagonal cosine (seed 002's definition), its
reference level from Gaussian random matrices of the same shape (absolute values for the non-negative norms), the
average-linkage hierarchy on cosine distance (``scipy.cluster.hierarchy``) and
k-means (``sklearn``, on unit-normalised rows) over several k and seeds with the
cosine silhouette. :func:`drift` compares each checkpoint with the last;
:func:`mantel` tests whether weight similarity predicts co-activation (or shared
domain usage): Spearman ρ of the two matrices' upper triangles, with a
permutation p-value (experts permuted jointly in rows and columns).

Dims: checkpoint, layer, expert, expert_b, embedding, hidden, ffn_dim, proj, k,
kmeans_seed, merge, linkage_field.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import xarray as xr

from analyses.outputs import Output, apply_outputs

VERSION = "experts-2"
EMBEDDINGS = ("router", "ffn", "norms")
PROJ = ("gate", "up", "down")
LINKAGE_FIELDS = ("left", "right", "distance", "size")

OUTPUTS = {
    "emb_router": Output("router row", "1", "the router's weight row of the expert (raw weights)"),
    "emb_ffn": Output("projected FFN weights", "1",
                      "gate, up and down weights of the expert flattened and reduced by a seeded sparse random "
                      "projection (attrs ffn_dim, seed)", nan_where="the layer has no routed experts of that kind"),
    "emb_norms": Output("projection norms", "1", "Frobenius norm of the expert's gate, up and down weight",
                        nan_where="the checkpoint has no such projection"),
    "similarity": Output("cosine similarity", "1", "cosine of the two experts' embeddings", chance=0.0,
                         nan_where="an embedding is all zeros"),
    "diversity": Output("expert diversity", "1", "1 − mean off-diagonal cosine similarity (seed 002)",
                        chance="diversity_random", nan_where="an embedding is all zeros"),
    "diversity_random": Output("diversity of random matrices", "1",
                               "mean diversity of Gaussian random matrices of the same (expert × dim) shape "
                               "(absolute values of Gaussians for the norms, which are non-negative)"),
    "diversity_random_std": Output("diversity of random matrices, std", "1",
                                   "standard deviation of that reference over its draws"),
    "linkage": Output("average-linkage hierarchy", "1",
                      "scipy linkage matrix on cosine distance: merged clusters, distance, size",
                      nan_where="an embedding is all zeros"),
    "silhouette": Output("silhouette (cosine)", "1", "sklearn silhouette of k-means labels, cosine metric",
                         chance=0.0, nan_where="k ≥ number of experts, or a degenerate clustering"),
    "inertia": Output("k-means inertia", "1", "sum of squared distances of unit rows to their centre",
                      nan_where="k ≥ number of experts"),
    "labels": Output("k-means labels", "1", "cluster of each expert, from the seed with the best silhouette",
                     nan_where="k ≥ number of experts"),
    "drift": Output("cosine distance to the final weights", "1",
                    "1 − cos(embedding at this checkpoint, embedding at the last checkpoint)",
                    nan_where="an embedding is all zeros"),
    "drift_rel": Output("relative distance to the final weights", "1",
                        "‖e_c − e_final‖ / ‖e_final‖", nan_where="the final embedding is all zeros"),
    "mantel_r": Output("Mantel Spearman ρ", "1",
                       "Spearman ρ between off-diagonal weight similarity and the routing matrix", chance=0.0,
                       nan_where="no routing matrix for this checkpoint and layer, or a constant matrix"),
    "mantel_p": Output("Mantel permutation p-value", "1",
                       "(1 + #permutations with ρ ≥ observed) / (1 + n_perm), experts permuted jointly",
                       nan_where="no routing matrix for this checkpoint and layer, or a constant matrix"),
}


@lru_cache(maxsize=32)
def _projector(n_features: int, n_components: int, random_state: int):
    import scipy.sparse as sp
    from sklearn.random_projection import SparseRandomProjection

    rp = SparseRandomProjection(n_components=n_components, density="auto", random_state=random_state,
                                dense_output=True)
    rp.fit(sp.csr_matrix((1, n_features), dtype=np.float32))  # fit only draws the matrix from the shape
    return rp


def project(flat: np.ndarray, kind: str, *, ffn_dim: int, seed: int) -> np.ndarray:
    """Seeded sparse random projection of one flattened projection weight → (ffn_dim,)."""
    rp = _projector(int(flat.size), int(ffn_dim), int(seed) * 3 + PROJ.index(kind))
    return np.asarray(rp.transform(flat.reshape(1, -1).astype(np.float32)))[0].astype(np.float64)


def expert_embeddings(path, *, layers=None, family: str | None = None, ffn_dim: int = 256,
                      seed: int = 0) -> xr.Dataset:
    """Embeddings of every routed expert of one checkpoint, streamed from its safetensors.

    Parameters
    ----------
    path : checkpoint directory (save_pretrained, *.safetensors) or one safetensors file.
    layers : iterable of layer indices to read (default: all MoE layers).
    family : model_type override (default: config.json).
    ffn_dim, seed : dimension and seed of the FFN random projection.

    Returns
    -------
    xr.Dataset with ``emb_router`` (layer, expert, hidden), ``emb_ffn`` (layer, expert, ffn_dim),
    ``emb_norms`` (layer, expert, proj). Raises ValueError naming the path when it holds no
    routed experts.
    """
    from storage.weights import iter_expert_tensors

    wanted = None if layers is None else {int(x) for x in layers}
    routers: dict[int, np.ndarray] = {}
    ffn: dict[tuple[int, int], np.ndarray] = {}
    norms: dict[tuple[int, int, str], float] = {}
    for t in iter_expert_tensors(path, family, layers=wanted):
        if t.kind == "router":
            routers[t.layer] = t.array.astype(np.float64)
            continue
        key = (t.layer, t.expert)
        v = project(t.array.ravel(), t.kind, ffn_dim=ffn_dim, seed=seed)
        ffn[key] = ffn.get(key, 0.0) + v
        norms[(t.layer, t.expert, t.kind)] = float(np.linalg.norm(t.array))
    found = sorted(set(routers) | {k[0] for k in ffn})
    if not found:
        raise ValueError(f"{path}: no routed experts found (no router or experts.* weights in its safetensors)")
    E = max([r.shape[0] for r in routers.values()] + [k[1] + 1 for k in ffn])
    H = max([r.shape[1] for r in routers.values()] or [0])
    L = len(found)
    r = np.full((L, E, H), np.nan)
    f = np.full((L, E, ffn_dim), np.nan)
    n = np.full((L, E, len(PROJ)), np.nan)
    for i, layer in enumerate(found):
        if layer in routers:
            r[i, : routers[layer].shape[0], : routers[layer].shape[1]] = routers[layer]
        for e in range(E):
            if (layer, e) in ffn:
                f[i, e] = ffn[(layer, e)]
            for j, kind in enumerate(PROJ):
                n[i, e, j] = norms.get((layer, e, kind), np.nan)
    ds = xr.Dataset(
        {"emb_router": (("layer", "expert", "hidden"), r), "emb_ffn": (("layer", "expert", "ffn_dim"), f),
         "emb_norms": (("layer", "expert", "proj"), n)},
        coords={"layer": np.asarray(found, dtype=np.int64), "expert": np.arange(E), "proj": list(PROJ)},
        attrs={"ffn_dim": int(ffn_dim), "seed": int(seed), "projection": "sklearn SparseRandomProjection, "
               "density 1/sqrt(n_features), random_state = seed*3 + {gate:0, up:1, down:2}, summed over blocks"},
    )
    return apply_outputs(ds, OUTPUTS, where="expert_embeddings")


def cosine_matrix(x: np.ndarray) -> np.ndarray:
    """(n, d) → (n, n) cosine similarity; rows of zeros give NaN."""
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        u = x / norm
    return u @ u.T


def diversity(x: np.ndarray) -> float:
    """1 − mean off-diagonal cosine similarity of the rows of ``x`` (n ≥ 2)."""
    s = cosine_matrix(x)
    off = ~np.eye(len(s), dtype=bool)
    return float(1.0 - s[off].mean())


def random_diversity(n: int, d: int, *, draws: int = 20, seed: int = 0, nonneg: bool = False) -> tuple[float, float]:
    """Mean and std of :func:`diversity` over ``draws`` Gaussian (n, d) matrices (their absolute values if ``nonneg``)."""
    rng = np.random.default_rng(seed)
    vals = [diversity(np.abs(x) if nonneg else x) for x in (rng.standard_normal((n, d)) for _ in range(draws))]
    return float(np.mean(vals)), float(np.std(vals))


def _embedding(emb: xr.Dataset, name: str) -> xr.DataArray:
    return emb[f"emb_{name}"]


def _cluster_one(x: np.ndarray, k_values, kmeans_seeds: int):
    """k-means (unit rows) per k and seed → silhouette (k, seed), inertia (k, seed), best labels (k, n)."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    n = len(x)
    sil = np.full((len(k_values), kmeans_seeds), np.nan)
    ine = np.full((len(k_values), kmeans_seeds), np.nan)
    lab = np.full((len(k_values), n), np.nan)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    if not np.all(np.isfinite(x)) or np.any(norm == 0):
        return sil, ine, lab
    u = x / norm
    for i, k in enumerate(k_values):
        if not 2 <= k < n:
            continue
        best = None
        for s in range(kmeans_seeds):
            km = KMeans(n_clusters=int(k), n_init=1, random_state=s).fit(u)
            ine[i, s] = km.inertia_
            if len(np.unique(km.labels_)) > 1:
                sil[i, s] = silhouette_score(x, km.labels_, metric="cosine")
            score = sil[i, s] if np.isfinite(sil[i, s]) else -np.inf
            if best is None or score > best:
                best, lab[i] = score, km.labels_
    return sil, ine, lab


def similarity_structure(emb: xr.Dataset, *, k_values=(2, 3, 4), kmeans_seeds: int = 5,
                         random_draws: int = 20, seed: int = 0) -> xr.Dataset:
    """Similarity, diversity, random reference, hierarchy and k-means of one checkpoint's embeddings.

    Parameters
    ----------
    emb : :func:`expert_embeddings` output (layer, expert, …).
    k_values : k of k-means (those ≥ the number of experts give NaN).
    kmeans_seeds : k-means restarts, one seed each (0 … kmeans_seeds − 1).
    random_draws, seed : Gaussian draws of the random reference and their seed.

    Returns
    -------
    xr.Dataset: similarity (layer, embedding, expert, expert_b), diversity, diversity_random(_std)
    (layer, embedding), linkage (layer, embedding, merge, linkage_field), silhouette / inertia
    (layer, embedding, k, kmeans_seed), labels (layer, embedding, k, expert).
    """
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import squareform

    L, E = emb.sizes["layer"], emb.sizes["expert"]
    K = len(k_values)
    sim = np.full((L, len(EMBEDDINGS), E, E), np.nan)
    div = np.full((L, len(EMBEDDINGS)), np.nan)
    rnd = np.full((L, len(EMBEDDINGS)), np.nan)
    rnd_sd = np.full((L, len(EMBEDDINGS)), np.nan)
    link = np.full((L, len(EMBEDDINGS), max(E - 1, 0), 4), np.nan)
    sil = np.full((L, len(EMBEDDINGS), K, kmeans_seeds), np.nan)
    ine = np.full_like(sil, np.nan)
    lab = np.full((L, len(EMBEDDINGS), K, E), np.nan)
    for j, name in enumerate(EMBEDDINGS):
        arr = _embedding(emb, name).values
        for i in range(L):
            x = arr[i]
            if not np.all(np.isfinite(x)):
                continue
            s = cosine_matrix(x)
            sim[i, j] = s
            div[i, j] = diversity(x)
            rnd[i, j], rnd_sd[i, j] = random_diversity(E, x.shape[1], draws=random_draws, seed=seed,
                                                       nonneg=name == "norms")
            if np.all(np.isfinite(s)) and E >= 2:
                d = np.clip(1.0 - s, 0.0, 2.0)
                np.fill_diagonal(d, 0.0)
                link[i, j] = linkage(squareform((d + d.T) / 2, checks=False), method="average")
            sil[i, j], ine[i, j], lab[i, j] = _cluster_one(x, k_values, kmeans_seeds)
    ds = xr.Dataset(
        {"similarity": (("layer", "embedding", "expert", "expert_b"), sim),
         "diversity": (("layer", "embedding"), div),
         "diversity_random": (("layer", "embedding"), rnd),
         "diversity_random_std": (("layer", "embedding"), rnd_sd),
         "linkage": (("layer", "embedding", "merge", "linkage_field"), link),
         "silhouette": (("layer", "embedding", "k", "kmeans_seed"), sil),
         "inertia": (("layer", "embedding", "k", "kmeans_seed"), ine),
         "labels": (("layer", "embedding", "k", "expert"), lab)},
        coords={"layer": emb.layer.values, "embedding": list(EMBEDDINGS), "expert": emb.expert.values,
                "expert_b": emb.expert.values, "k": np.asarray(k_values, dtype=np.int64),
                "kmeans_seed": np.arange(kmeans_seeds), "linkage_field": list(LINKAGE_FIELDS)},
    )
    return apply_outputs(ds, OUTPUTS, where="similarity_structure")


def layer_structure(path, layer: int, *, ffn_dim: int = 256, seed: int = 0, k_values=(2, 3, 4),
                    kmeans_seeds: int = 5, random_draws: int = 20) -> xr.Dataset:
    """One Dask job of the experts stage: :func:`expert_embeddings` and :func:`similarity_structure` of one
    (checkpoint, layer), merged → the dims of both with ``layer`` of length 1.

    Lives here, not in tasks/, so that a Dask worker unpickling it imports analyses/ only.
    """
    emb = expert_embeddings(path, layers=[layer], ffn_dim=ffn_dim, seed=seed)
    sim = similarity_structure(emb, k_values=tuple(k_values), kmeans_seeds=kmeans_seeds, random_draws=random_draws,
                               seed=seed)
    return xr.merge([emb, sim], combine_attrs="drop_conflicts")


def drift(embs: xr.Dataset) -> xr.Dataset:
    """Each expert's distance to its final weights, per embedding.

    Parameters
    ----------
    embs : embeddings with a ``checkpoint`` dim, ordered by training step (the last is "final").

    Returns
    -------
    xr.Dataset drift, drift_rel (checkpoint, layer, embedding, expert).
    """
    out_cos, out_rel = [], []
    for name in EMBEDDINGS:
        x = _embedding(embs, name)
        vec = [d for d in x.dims if d not in ("checkpoint", "layer", "expert")][0]
        final = x.isel(checkpoint=-1)
        dot = (x * final).sum(vec, skipna=False)
        nx, nf = np.sqrt((x**2).sum(vec, skipna=False)), np.sqrt((final**2).sum(vec, skipna=False))
        out_cos.append(1.0 - dot / (nx * nf))
        out_rel.append(np.sqrt(((x - final) ** 2).sum(vec, skipna=False)) / nf)
    emb_coord = xr.DataArray(list(EMBEDDINGS), dims="embedding", name="embedding")
    ds = xr.Dataset({
        "drift": xr.concat(out_cos, emb_coord).transpose("checkpoint", "layer", "embedding", "expert"),
        "drift_rel": xr.concat(out_rel, emb_coord).transpose("checkpoint", "layer", "embedding", "expert"),
    })
    return apply_outputs(ds, OUTPUTS, where="drift")


def mantel(a: np.ndarray, b: np.ndarray, *, n_perm: int = 999, seed: int = 0) -> tuple[float, float]:
    """Mantel test with Spearman ρ between two symmetric (n, n) matrices' upper triangles.

    Returns (ρ, p) with p = (1 + #{permutations π: ρ(a, b[π][:, π]) ≥ ρ}) / (1 + n_perm), one-sided
    (similar weights → more co-activation). NaN, NaN when either triangle is constant or not finite.
    """
    from scipy.stats import rankdata, spearmanr

    a, b = np.asarray(a, float), np.asarray(b, float)
    n = len(a)
    iu = np.triu_indices(n, 1)
    x, y = a[iu], b[iu]
    if n < 3 or not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))) or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan")
    r = float(spearmanr(x, y).statistic)
    if n_perm == 0:
        return r, 1.0
    rng = np.random.default_rng(seed)
    perms = np.stack([rng.permutation(n) for _ in range(n_perm)])  # (n_perm, n)
    # all permutations at once: Spearman ρ = Pearson r of the ranks (average ranks for ties, as spearmanr)
    yp = b[perms[:, iu[0]], perms[:, iu[1]]]  # (n_perm, pairs): upper triangle of b[π][:, π]
    rx = rankdata(x)
    rx = (rx - rx.mean()) / np.linalg.norm(rx - rx.mean())
    ry = rankdata(yp, axis=1)
    ry -= ry.mean(axis=1, keepdims=True)
    rho = (ry @ rx) / np.linalg.norm(ry, axis=1)
    hits = int(np.count_nonzero(rho >= r - 1e-12))
    return r, (1 + hits) / (1 + n_perm)


def mantel_against(similarity: xr.DataArray, routing_matrix: xr.DataArray, *, n_perm: int = 999,
                   seed: int = 0) -> xr.Dataset:
    """:func:`mantel` per (checkpoint, layer, embedding) of weight similarity vs a routing matrix.

    ``routing_matrix`` (checkpoint, layer, expert, expert_b), e.g. coactivation, symmetrised
    ((M + Mᵀ)/2, diagonal ignored); checkpoints/layers missing from it give NaN.
    """
    C, L, M = similarity.sizes["checkpoint"], similarity.sizes["layer"], similarity.sizes["embedding"]
    r = np.full((C, L, M), np.nan)
    p = np.full((C, L, M), np.nan)
    have_c = set(map(str, routing_matrix.checkpoint.values))
    have_l = set(int(v) for v in routing_matrix.layer.values)
    for ci, c in enumerate(similarity.checkpoint.values):
        for li, layer in enumerate(similarity.layer.values):
            if str(c) not in have_c or int(layer) not in have_l:
                continue
            m = np.asarray(routing_matrix.sel(checkpoint=c, layer=layer).values, float)
            m = (m + m.T) / 2
            for mi in range(M):
                s = similarity.isel(checkpoint=ci, layer=li, embedding=mi).values
                if s.shape == m.shape:
                    r[ci, li, mi], p[ci, li, mi] = mantel(s, m, n_perm=n_perm, seed=seed)
    ds = xr.Dataset({"mantel_r": (("checkpoint", "layer", "embedding"), r),
                     "mantel_p": (("checkpoint", "layer", "embedding"), p)},
                    coords={"checkpoint": similarity.checkpoint.values, "layer": similarity.layer.values,
                            "embedding": similarity.embedding.values})
    return apply_outputs(ds, OUTPUTS, where="mantel")
