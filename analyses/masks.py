"""Pruned-weight masks and the clustering of their rows by Hamming distance (seed 003).

Any pruned linear layer qualifies; no MoE is needed. A mask is boolean (rows =
output features, columns = input features), ``True`` where the weight is *kept*.

Pruning criteria computed here (unstructured, at ``sparsity`` = fraction pruned):

* :func:`magnitude_mask`: prune the ``int(sparsity · rows · cols)`` smallest |W| of the
  whole matrix (stable sort; as the Wanda repository's magnitude baseline, per matrix);
* :func:`wanda_mask`: score S_ij = |W_ij| · ‖X_j‖₂ (Sun et al. 2023), X the calibration
  inputs of the layer; in every output row prune the ``int(sparsity · cols)`` lowest scores
  (stable sort, as ``prune_wanda`` of the paper's code).

SparseGPT is not implemented. Masks supplied by the user are read by :func:`load_mask`.

Masks are stored bit-packed along columns (``numpy.packbits``, big bit order), and
Hamming distances are XOR + popcount on the packed bytes viewed as uint64
(``numpy.bitwise_count``): :func:`hamming_to_row`, :func:`hamming_matrix`.

:func:`cluster_rows` runs seed 003's multi-seed analysis on one mask: per seed s a
random row r_s (``numpy.random.default_rng(s)``), its ``n`` nearest *other* rows by
Hamming distance (ties by row index), k-means (``sklearn``, ``random_state = s``,
``n_init = 10``) on those n rows as 0/1 vectors for every k, and the seed's metrics:

* ``within``: mean Euclidean distance of a row to its cluster centre;
* ``between``: mean pairwise Euclidean distance between cluster centres;
* ``separation_ratio`` = between / within (the seed's verdict bands: > 2 excellent,
  > 1 good, > 0.5 moderate, else poor). For rows with no structure it is not ≈ 1 but
  ≈ √(2k/n) (centres of random clusters differ only by sampling noise), so we also give
* ``hamming_ratio``: mean Hamming distance between rows of different clusters / mean
  Hamming distance between rows of the same cluster, ≈ 1 without structure;
* ``inertia`` (k-means), ``size_std`` (std of cluster sizes), and per seed the
  Hamming distance of the n rows to r_s: ``hamming_min``, ``hamming_max``, ``hamming_range``.

Dims: seed, k, cluster, row, byte, method, component, layer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from analyses.outputs import Output, apply_outputs

VERSION = "masks-1"
METHODS = ("magnitude", "wanda")
VERDICTS = ((2.0, "excellent"), (1.0, "good"), (0.5, "moderate"))

OUTPUTS = {
    "within": Output("mean within-cluster distance", "1",
                     "mean Euclidean distance of a row (0/1 vector) to its k-means centre"),
    "between": Output("mean between-centre distance", "1", "mean pairwise Euclidean distance between centres"),
    "separation_ratio": Output("separation ratio", "1", "between / within (seed 003); verdict bands > 2 "
                               "excellent, > 1 good, > 0.5 moderate, else poor", chance="≈ sqrt(2k/n)",
                               nan_where="a cluster collapsed onto its centre (within = 0)"),
    "hamming_ratio": Output("Hamming between/within ratio", "1",
                            "mean Hamming distance across clusters / mean Hamming distance within clusters",
                            chance=1.0, nan_where="no pair of rows shares a cluster"),
    "inertia": Output("k-means inertia", "1", "sum of squared Euclidean distances of rows to their centre"),
    "size_std": Output("spread of cluster sizes", "rows", "standard deviation of the k cluster sizes"),
    "hamming_min": Output("min Hamming distance to the selected row", "bits", "over the n nearest rows"),
    "hamming_max": Output("max Hamming distance to the selected row", "bits", "over the n nearest rows"),
    "hamming_range": Output("Hamming range", "bits", "hamming_max − hamming_min"),
    "feature": Output("selected row", "1", "index of the randomly selected row of each seed"),
}


# ------------------------------------------------------------------ pruning criteria


def _check_sparsity(sparsity: float) -> None:
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")


def magnitude_mask(weight: np.ndarray, sparsity: float) -> np.ndarray:
    """Keep-mask of magnitude pruning over the whole matrix.

    (rows, cols) → bool (rows, cols); the ``int(sparsity · size)`` smallest |W| are pruned.
    """
    _check_sparsity(sparsity)
    w = np.abs(np.asarray(weight, dtype=np.float32))
    n = int(w.size * sparsity)
    keep = np.ones(w.size, dtype=bool)
    keep[np.argsort(w.ravel(), kind="stable")[:n]] = False
    return keep.reshape(w.shape)


def wanda_mask(weight: np.ndarray, input_norm: np.ndarray, sparsity: float) -> np.ndarray:
    """Keep-mask of Wanda: |W_ij|·‖X_j‖₂, the lowest ``int(sparsity · cols)`` of each row pruned.

    Parameters
    ----------
    weight : (rows = out features, cols = in features).
    input_norm : (cols,) ‖X_j‖₂ of the calibration inputs (over all calibration tokens), or (rows, cols)
        when rows see different inputs (experts stacked: each row gets its expert's norms).
    """
    _check_sparsity(sparsity)
    w = np.asarray(weight, dtype=np.float32)
    x = np.asarray(input_norm, dtype=np.float32)
    x = x.reshape(1, -1) if x.ndim == 1 else x  # (rows, cols): each row its own inputs (stacked experts)
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"wanda: input norm has {x.shape[1]} features, the weight {w.shape[1]} columns")
    score = np.abs(w) * x
    n = int(w.shape[1] * sparsity)
    keep = np.ones(w.shape, dtype=bool)
    idx = np.argsort(score, axis=1, kind="stable")[:, :n]
    np.put_along_axis(keep, idx, False, axis=1)
    return keep


def load_mask(path: str | Path, key: str | None = None) -> np.ndarray:
    """A user mask from safetensors (tensor ``key``, default the only one), ``.npy`` or ``.pt``.

    ``.pt`` files are read with ``torch.load(weights_only=True)`` (never unpickled freely); a
    nonzero entry means *kept*. Raises ValueError naming the file when it is not a 2-D mask.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ".npy":
        arr = np.load(p, allow_pickle=False)
    elif suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as fh:
            keys = list(fh.keys())
            if key is None:
                if len(keys) != 1:
                    raise ValueError(f"{p}: holds {len(keys)} tensors {keys[:5]}; name one with 'key'")
                key = keys[0]
            if key not in keys:
                raise ValueError(f"{p}: no tensor {key!r}")
            arr = fh.get_tensor(key).float().numpy()
    elif suffix in (".pt", ".pth", ".bin"):
        import torch

        obj = torch.load(p, map_location="cpu", weights_only=True)
        if isinstance(obj, dict):
            if key is None and len(obj) == 1:
                key = next(iter(obj))
            if key not in obj:
                raise ValueError(f"{p}: holds {sorted(obj)[:5]}; name the mask with 'key'")
            obj = obj[key]
        arr = obj.float().numpy() if hasattr(obj, "numpy") else np.asarray(obj)
    else:
        raise ValueError(f"{p}: masks are read from .safetensors, .npy or .pt files")
    if arr.ndim != 2:
        raise ValueError(f"{p}: a mask must be 2-D (rows × cols), got shape {arr.shape}")
    return arr != 0


_EXPERT_KIND = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


def component_matrix(path, component: str, layer: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The weight of one component and layer, streamed from safetensors.

    ``experts.<gate_proj|up_proj|down_proj>``: every routed expert's matrix stacked along rows
    (expert-major), returned with the expert of each row; otherwise the one
    ``…layers.<layer>.…<component>.weight`` (rows = out features), expert None.
    Raises ValueError naming the checkpoint, component and layer when absent or ambiguous.
    """
    from storage.weights import iter_expert_tensors, iter_linear_weights

    if component.startswith("experts."):
        kind = _EXPERT_KIND.get(component.split(".", 1)[1])
        if kind is None:
            raise ValueError(f"component {component!r}: experts components are experts.gate_proj/up_proj/down_proj")
        blocks = {t.expert: t.array for t in iter_expert_tensors(path, layers={int(layer)}, kinds=(kind,))}
        if not blocks:
            raise ValueError(f"{path}: no routed-expert {kind} weights in layer {layer}")
        order = sorted(blocks)
        mat = np.concatenate([blocks[e] for e in order], axis=0)
        return mat, np.repeat(np.asarray(order, dtype=np.int64), [blocks[e].shape[0] for e in order])
    found = list(iter_linear_weights(path, component, layers={int(layer)}))
    if len(found) != 1:
        names = [n for _, n, _ in found]
        raise ValueError(f"{path}: component {component!r} in layer {layer} matches {len(found)} weights {names[:4]}; "
                         "need exactly one")
    return found[0][2], None


# ------------------------------------------------------------------ packed bits


def pack_rows(mask: np.ndarray) -> np.ndarray:
    """bool (rows, cols) → uint8 (rows, ceil(cols / 8)), bits packed along columns."""
    return np.packbits(np.asarray(mask, dtype=bool), axis=1)


def unpack_rows(packed: np.ndarray, cols: int) -> np.ndarray:
    """Inverse of :func:`pack_rows` → bool (rows, cols)."""
    return np.unpackbits(np.asarray(packed, dtype=np.uint8), axis=1, count=cols).astype(bool)


def _words(packed: np.ndarray) -> np.ndarray:
    """uint8 (rows, bytes) → uint64 (rows, words), zero-padded: 8× fewer XORs and popcounts."""
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    pad = (-packed.shape[1]) % 8
    if pad:
        packed = np.pad(packed, ((0, 0), (0, pad)))
    return packed.view(np.uint64)


def hamming_to_row(packed: np.ndarray, row: int) -> np.ndarray:
    """Hamming distance of every row to row ``row``: XOR + popcount on packed bits → int64 (rows,)."""
    w = _words(packed)
    return np.bitwise_count(w ^ w[row]).sum(axis=1, dtype=np.int64)


def hamming_matrix(packed: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances of packed rows → int64 (rows, rows)."""
    w = _words(packed)
    return np.stack([np.bitwise_count(w ^ w[i]).sum(axis=1, dtype=np.int64) for i in range(len(w))])


def top_similar(packed: np.ndarray, row: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` rows nearest to ``row`` by Hamming distance, itself excluded (ties: lower index first).

    Returns (indices (n,), distances (n,)).
    """
    d = hamming_to_row(packed, row)
    d_other = d.copy()
    d_other[row] = np.iinfo(np.int64).max
    n = min(int(n), len(d) - 1)
    idx = np.argsort(d_other, kind="stable")[:n]  # stable: ties by row index
    return idx, d[idx]


# ------------------------------------------------------------------ clustering metrics


def cluster_metrics(x: np.ndarray, labels: np.ndarray, centers: np.ndarray, k: int,
                    hamming: np.ndarray | None = None) -> dict:
    """Seed 003's metrics of one clustering of rows ``x`` (n, d) as 0/1 floats."""
    x = np.asarray(x, dtype=np.float64)
    within = float(np.linalg.norm(x - centers[labels], axis=1).mean())
    ci, cj = np.triu_indices(len(centers), 1)
    between = float(np.linalg.norm(centers[ci] - centers[cj], axis=1).mean()) if len(ci) else float("nan")
    sizes = np.bincount(labels, minlength=k)
    if hamming is None:
        hamming = (x[:, None, :] != x[None, :, :]).sum(-1)
    same = labels[:, None] == labels[None, :]
    off = ~np.eye(len(x), dtype=bool)
    w_h = hamming[same & off]
    b_h = hamming[~same]
    return {
        "within": within, "between": between,
        "separation_ratio": between / within if within > 0 else float("nan"),
        "hamming_ratio": float(b_h.mean() / w_h.mean()) if len(w_h) and len(b_h) and w_h.mean() > 0 else float("nan"),
        "inertia": float(((x - centers[labels]) ** 2).sum()), "size_std": float(sizes.std()),
    }


def kmeans_rows(x: np.ndarray, k: int, seed: int):
    """sklearn k-means (n_init 10, random_state ``seed``) on 0/1 rows → (labels, centres)."""
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=int(k), n_init=10, random_state=int(seed)).fit(np.asarray(x, dtype=np.float64))
    return km.labels_.astype(np.int64), km.cluster_centers_


def cluster_rows(packed: np.ndarray, cols: int, *, n: int = 128, k_values=(4, 8, 16), seeds: int = 10,
                 keep_rows: bool = False) -> xr.Dataset:
    """Seed 003's multi-seed Hamming clustering of one packed mask.

    Parameters
    ----------
    packed : uint8 (rows, bytes) from :func:`pack_rows`.
    cols : number of columns (bits) per row.
    n : nearest rows per seed (clamped to rows − 1; the result's attr ``n`` says which was used).
    k_values : k of k-means (those > n give NaN).
    seeds : seeds 0 … seeds − 1.
    keep_rows : also return ``rows`` (seed, member) and ``labels`` (seed, k, member) for the figures.

    Returns
    -------
    xr.Dataset: within, between, separation_ratio, hamming_ratio, inertia, size_std (seed, k);
    hamming_min/max/range, feature (seed).
    """
    R = packed.shape[0]
    n = min(int(n), R - 1)
    K = len(k_values)
    names = ("within", "between", "separation_ratio", "hamming_ratio", "inertia", "size_std")
    vals = {m: np.full((seeds, K), np.nan) for m in names}
    hmin, hmax, feat = np.zeros(seeds), np.zeros(seeds), np.zeros(seeds, dtype=np.int64)
    rows_sel = np.zeros((seeds, n), dtype=np.int64)
    labels = np.full((seeds, K, n), -1, dtype=np.int64)
    for s in range(seeds):
        r = int(np.random.default_rng(s).integers(R))
        idx, dist = top_similar(packed, r, n)
        feat[s], rows_sel[s] = r, idx
        hmin[s], hmax[s] = dist.min(), dist.max()
        sub = packed[idx]
        x = unpack_rows(sub, cols)
        ham = hamming_matrix(sub)
        for i, k in enumerate(k_values):
            if not 1 <= k <= n:
                continue
            lab, cen = kmeans_rows(x, k, s)
            labels[s, i] = lab
            for m, v in cluster_metrics(x, lab, cen, k, ham).items():
                vals[m][s, i] = v
    data = {m: (("seed", "k"), v) for m, v in vals.items()}
    data.update(hamming_min=("seed", hmin), hamming_max=("seed", hmax), hamming_range=("seed", hmax - hmin),
                feature=("seed", feat))
    ds = xr.Dataset(data, coords={"seed": np.arange(seeds), "k": np.asarray(k_values, dtype=np.int64)},
                    attrs={"n": n, "rows": int(R), "cols": int(cols)})
    ds = apply_outputs(ds, OUTPUTS, where="cluster_rows")
    if keep_rows:
        ds = ds.assign(rows=(("seed", "member"), rows_sel), labels=(("seed", "k", "member"), labels))
    return ds


def verdict(ratio: float) -> str:
    """Seed 003's verdict band of a separation ratio."""
    if not np.isfinite(ratio):
        return "n/a"
    for lo, word in VERDICTS:
        if ratio > lo:
            return word
    return "poor"


def comparative_table(results: xr.Dataset):
    """Tidy table (method, component, layer, k) of mean ± std over seeds, with the verdict band.

    ``results`` has dims (method, component, layer, seed, k) as written by the masks stage.
    """
    import pandas as pd

    rows = []
    for m in results.method.values:
        for c in results.component.values:
            for layer in results.layer.values:
                cell = results.sel({"method": m, "component": c, "layer": layer})
                if not np.isfinite(cell["separation_ratio"].values).any():
                    continue
                for k in results.k.values:
                    sel = cell.sel(k=k)
                    sr = sel["separation_ratio"].values
                    row = {"method": str(m), "component": str(c), "layer": int(layer), "k": int(k)}
                    for v in ("separation_ratio", "hamming_ratio", "within", "between", "inertia", "size_std"):
                        row[f"{v}_mean"] = float(np.nanmean(sel[v].values))
                        row[f"{v}_std"] = float(np.nanstd(sel[v].values))
                    for v in ("hamming_min", "hamming_max", "hamming_range"):
                        row[f"{v}_mean"] = float(np.nanmean(cell[v].values))
                    row["verdict"] = verdict(float(np.nanmean(sr)))
                    rows.append(row)
    return pd.DataFrame(rows)


def json_summary(results: xr.Dataset, attrs: dict | None = None) -> dict:
    """Seed 003's metrics_summary.json: configuration, aggregated metrics, individual runs per seed."""
    out = {"configuration": {"n_similar": int(results.attrs.get("n", 0)), "k_values": [int(k) for k in results.k.values],
                             "seeds": int(results.sizes["seed"]), **(attrs or {})}, "matrices": []}
    for m in results.method.values:
        for c in results.component.values:
            for layer in results.layer.values:
                cell = results.sel({"method": m, "component": c, "layer": layer})
                if not np.isfinite(cell["separation_ratio"].values).any():
                    continue
                entry = {"method": str(m), "component": str(c), "layer": int(layer), "aggregated": {}, "executions": []}
                for k in results.k.values:
                    sel = cell.sel(k=k)
                    entry["aggregated"][f"k_{int(k)}"] = {
                        v: {"mean": float(np.nanmean(sel[v].values)), "std": float(np.nanstd(sel[v].values))}
                        for v in ("separation_ratio", "hamming_ratio", "within", "between", "inertia", "size_std")}
                    entry["aggregated"][f"k_{int(k)}"]["verdict"] = verdict(float(np.nanmean(sel["separation_ratio"].values)))
                for s in results.seed.values:
                    one = cell.sel(seed=s)
                    entry["executions"].append({
                        "seed": int(s), "feature": int(one["feature"].values),
                        "hamming_min": float(one["hamming_min"].values), "hamming_max": float(one["hamming_max"].values),
                        "per_k": {f"k_{int(k)}": {v: float(one[v].sel(k=k).values) for v in
                                                   ("separation_ratio", "hamming_ratio", "within", "between", "inertia",
                                                    "size_std")} for k in results.k.values},
                    })
                out["matrices"].append(entry)
    return out
