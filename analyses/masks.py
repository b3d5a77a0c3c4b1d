"""Pruned-weight masks and the clustering of their rows by Hamming distance (seed 003).

Any pruned linear layer qualifies; no MoE is needed. A mask is boolean (rows =
output features, columns = input features), ``True`` where the weight is *kept*.

Pruning criteria computed here (unstructured, at ``sparsity`` = fraction pruned):

* :func:`magnitude_mask`: prune the ``int(sparsity · rows · cols)`` smallest |W| of the
  whole matrix (stable sort; as the Wanda repository's magnitude baseline, per matrix);
* :func:`wanda_mask`: score S_ij = |W_ij| · ‖X_j‖₂ (Sun et al. 2023), X the calibration
  inputs of the layer; in every output row prune the ``int(sparsity · cols)`` lowest scores
  (stable sort, as ``prune_wanda`` of the paper's code).

* :func:`sparsegpt_prune` / :func:`sparsegpt_mask`: SparseGPT (Frantar & Alistarh 2023), unstructured,
  as ``SparseGPT.fasterprune`` of the paper's code with ``prunen = 0``: Hessian H = XᵀX of the
  calibration inputs (dead inputs: H_jj = 1, W_:j = 0), damped by ``percdamp``·mean(diag H);
  U = upper Cholesky factor of H⁻¹; columns are processed left to right in blocks of ``blocksize``;
  at the start of each block the mask of the block is chosen over all its rows and columns by the
  OBS saliency w²/U_jj² (= w²/[H_F⁻¹]_jj, F the columns not yet processed), pruning the
  ``int(sparsity · rows · block)`` lowest (stable sort; the paper's code prunes every score ≤ that
  order statistic, one more on ties); each pruned weight's error is spread over the columns to its
  right by the OBS update δ_F = −(w_j / U_jj) · U_j,F, and the updated weights decide the later
  blocks' masks. Computed in float64. Weight reconstruction is returned but only the mask is stored.

Masks supplied by the user are read by :func:`load_mask`.

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

VERSION = "masks-2"
METHODS = ("magnitude", "wanda", "sparsegpt")
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


def sparsegpt_prune(weight: np.ndarray, hessian: np.ndarray, sparsity: float, *, blocksize: int = 128,
                    percdamp: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """SparseGPT: keep-mask and the reconstructed weights (Frantar & Alistarh 2023; see the module docstring).

    Parameters
    ----------
    weight : (rows = out features, cols = in features).
    hessian : (cols, cols) XᵀX of the layer's calibration inputs (any positive scale: it cancels).
    sparsity : fraction pruned in [0, 1), chosen per block of ``blocksize`` columns over all rows.

    Returns
    -------
    keep : bool (rows, cols), True = kept; weights : float64 (rows, cols), pruned entries 0, the kept
    ones updated by the OBS corrections.
    """
    _check_sparsity(sparsity)
    w = np.array(weight, dtype=np.float64)
    h = np.array(hessian, dtype=np.float64)
    rows, cols = w.shape
    if h.shape != (cols, cols):
        raise ValueError(f"sparsegpt: Hessian is {h.shape}, the weight has {cols} columns")
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h[np.diag_indices(cols)] += percdamp * np.mean(np.diag(h))
    # U upper with H⁻¹ = UᵀU: row j of U is H_F⁻¹'s first row / sqrt(its first entry), F = j … cols − 1
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    pruned = np.zeros(w.shape, dtype=bool)
    for i1 in range(0, cols, int(blocksize)):
        i2 = min(i1 + int(blocksize), cols)
        d = np.diag(u)[i1:i2]
        score = (w[:, i1:i2] / d) ** 2
        n = int(score.size * sparsity)
        block = np.zeros(score.size, dtype=bool)
        block[np.argsort(score.ravel(), kind="stable")[:n]] = True
        pruned[:, i1:i2] = block.reshape(score.shape)
        for j in range(i1, i2):
            err = np.where(pruned[:, j], w[:, j], 0.0) / u[j, j]  # (w − q) / U_jj, q = 0 where pruned
            w[:, j:] -= np.outer(err, u[j, j:])  # column j of a pruned row becomes exactly 0
            w[pruned[:, j], j] = 0.0
    return ~pruned, w


def sparsegpt_mask(weight: np.ndarray, hessian: np.ndarray, sparsity: float, **kw) -> np.ndarray:
    """Keep-mask of :func:`sparsegpt_prune` → bool (rows, cols)."""
    return sparsegpt_prune(weight, hessian, sparsity, **kw)[0]


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


def compute_masks(weights: dict, methods, sparsity: float, *, norms: dict | None = None,
                  grams: dict | None = None) -> dict:
    """Keep-masks of every method for every (component, layer) weight.

    Parameters
    ----------
    weights : {(component, layer): (weight (rows, cols), row_expert (rows,) or None)} from
        :func:`component_matrix`; stacked experts (row_expert given) are pruned expert by expert,
        each expert's matrix being a layer of its own.
    methods : among :data:`METHODS`.
    norms : {(component, layer): ‖X_j‖₂ (cols,) or (expert, cols)} for "wanda".
    grams : {(component, layer): XᵀX (cols, cols) or (expert, cols, cols)} for "sparsegpt".

    Returns
    -------
    {(method, component, layer): (keep bool (rows, cols), row_expert)}.
    """
    out = {}
    for (c, layer), (w, row_expert) in weights.items():
        groups = [(None, np.arange(len(w)))] if row_expert is None else [
            (int(e), np.flatnonzero(row_expert == e)) for e in np.unique(row_expert)]
        for method in methods:
            keep = np.ones(w.shape, dtype=bool)
            for e, rows in groups:
                if method == "magnitude":
                    keep[rows] = magnitude_mask(w[rows], sparsity)
                elif method == "wanda":
                    x = norms[(c, layer)]
                    keep[rows] = wanda_mask(w[rows], x if e is None else x[e], sparsity)
                elif method == "sparsegpt":
                    h = grams[(c, layer)]
                    keep[rows] = sparsegpt_mask(w[rows], h if e is None else h[e], sparsity)
                else:
                    raise ValueError(f"masks: unknown pruning method {method!r} (one of {', '.join(METHODS)})")
            out[(method, c, layer)] = (keep, row_expert)
    return out


def mask_variable(method: str, component: str, layer: int) -> str:
    """Name of a mask's variable in masks.zarr: ``mask__<method>__<component>__<layer>``, dots → _."""
    return f"mask__{method}__{component}__{layer}".replace(".", "_")


def masks_dataset(mats: dict, attrs: dict) -> xr.Dataset:
    """Bit-packed masks → one Dataset, a variable per (method, component, layer) with its own row/byte dims.

    ``mats`` as returned by :func:`compute_masks`; each variable's attrs hold method, component,
    layer, cols and kept_fraction; stacked experts get an ``expert_<var>`` coordinate per row.
    """
    ds = xr.Dataset(attrs={"packing": "numpy.packbits along columns (big bit order); 1 = weight kept",
                           "magnitude": "the int(sparsity·size) smallest |W| of each matrix (each expert's) pruned",
                           "wanda": "per output row, the int(sparsity·cols) lowest |W|·‖X_j‖₂ pruned",
                           "sparsegpt": "SparseGPT (Frantar & Alistarh 2023), blocksize 128, percdamp 0.01, "
                                        "per block the int(sparsity·rows·block) lowest w²/[H_F⁻¹]_jj pruned; "
                                        "see analyses/masks.py", **attrs})
    for (method, c, layer), (keep, row_expert) in mats.items():
        v = mask_variable(method, c, layer)
        ds[v] = xr.DataArray(pack_rows(keep), dims=(f"row_{v}", f"byte_{v}"),
                             attrs={"method": method, "component": c, "layer": int(layer),
                                    "cols": int(keep.shape[1]), "kept_fraction": float(keep.mean())})
        if row_expert is not None:
            ds = ds.assign_coords({f"expert_{v}": (f"row_{v}", np.asarray(row_expert))})
    return ds


def combine_clusters(keys: list, results: list, attrs: dict) -> xr.Dataset:
    """:func:`cluster_rows` results of each (method, component, layer) key → one Dataset with those dims."""
    cells = []
    for (method, c, layer), r in zip(keys, results):
        cell = r.assign(n_used=((), float(r.attrs["n"]))).expand_dims(method=[method], component=[c],
                                                                       layer=[int(layer)])
        cell.attrs = {}
        cells.append(cell)
    res = xr.combine_by_coords(cells, fill_value=np.nan, join="outer", combine_attrs="drop")
    res.attrs.update(attrs)
    return res


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
