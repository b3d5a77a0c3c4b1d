"""Co-activation: which experts are selected together for the same token.

C[c, l, a, b] = count(a ∈ S and b ∈ S) / count(a ∈ S) over the tokens of
checkpoint c, layer l, counting **every** pair of S (not only adjacent ranks).
Under uniform random routing of k-subsets, C[a, b] = (k − 1)/(E − 1) for a ≠ b.
Row a of C sums to k − 1 (every token holding a holds k − 1 other experts), so
π[a, ·] = C[a, ·]/(k − 1) is a's *partner distribution*; its total variation
distance from uniform over the E − 1 other experts, averaged over experts with
weight count(a), is the one-number summary ``partner_tv`` (0 when partners
are chosen at random).
"""

from __future__ import annotations


import numpy as np
import pandas as pd
import xarray as xr

from .figures import hook as figure_hook
from .outputs import Output
from .bootstrap import add_interval, bootstrap_weights, interval, resample
from .token_pass import Samples, per_sample_sums
from .registry import Analysis, cube_sizes, finalise, json_number, register, safe_ratio, tidy, token_mask, token_var

NAME = "coactivation"


def coactivation_chance(num_experts: int, top_k: int) -> float:
    """C[a, b] (a ≠ b) under uniform random k-subsets: (k − 1)/(E − 1)."""
    return (top_k - 1) / (num_experts - 1)


def _off_diagonal(E: int) -> xr.DataArray:
    return xr.DataArray(~np.eye(E, dtype=bool), dims=("expert", "expert_b"))


def _codes(ids: xr.DataArray, keep: xr.DataArray | None, E: int) -> xr.DataArray:
    """Packed pair codes (:func:`_pair_codes`) of the cube, one kernel call per block.

    Parameters
    ----------
    ids : expert_ids (checkpoint, layer, token, k).
    keep : (token,) bool, the tokens counted (None: all).
    E : number of experts.

    Returns
    -------
    int32 (checkpoint, layer, token, slot_pair), lazy when ``ids`` is.
    """
    import dask.array as da

    ids = ids.transpose("checkpoint", "layer", "token", "k")
    k = ids.sizes["k"]
    mask = None if keep is None else np.asarray(keep.values, dtype=bool)
    dims = ("checkpoint", "layer", "token", "slot_pair")
    coords = {d: ids[d] for d in ("checkpoint", "layer") if d in ids.coords}
    if not isinstance(ids.data, da.Array):
        return xr.DataArray(_pair_codes(np.asarray(ids.values), mask, num_experts=E), dims=dims, coords=coords)
    args = [ids.data, "cltk"]
    if mask is not None:
        args += [da.from_array(mask, chunks=(ids.data.chunks[2],)), "t"]
    codes = da.blockwise(
        _pair_codes, "cltp", *args, new_axes={"p": k * (k + 1) // 2}, concatenate=True, dtype=np.int32,
        num_experts=E,
    )
    return xr.DataArray(codes, dims=dims, coords=coords)


def _pair_codes(ids: np.ndarray, keep: np.ndarray | None = None, *, num_experts: int) -> np.ndarray:
    """Packed pair code of every pair of slots i <= j of each token.

    Parameters
    ----------
    ids : (..., token, k) expert ids, -1 unwritten.
    keep : (token,) bool; the other tokens count as unwritten.
    num_experts : E.

    Returns
    -------
    int32 (..., k(k+1)/2), slot pairs in ``np.triu_indices(k)`` order: for
    slots i < j the index of the unordered pair {id_i, id_j} in the packed
    upper triangle (a <= b) of the E × E matrix (:func:`_packed_index`); for
    i = j the index of (id_i, id_i), so the diagonal counts the tokens holding
    each expert. -1 (no bin) marks unwritten slots and repeated ids in two
    slots; ids outside -1..E-1 (which :func:`analyses.registry.checked_cube`
    refuses before) fall in no bin either.
    """
    E = num_experts
    k = ids.shape[-1]
    single, double = _code_tables(E)
    # table row = clip(id, -2, E) + 2: 0 and E + 2 out of range, 1 unwritten, 2..E + 1 the experts
    u = ids.astype(np.intp)
    np.clip(u, -2, E, out=u)
    u += 2
    if keep is not None:
        u[..., ~keep, :] = 1  # tokens left out read as unwritten
    out = np.empty(ids.shape[:-1] + (k * (k + 1) // 2,), dtype=np.int32)
    for p, (i, j) in enumerate(zip(*np.triu_indices(k))):  # a handful of slot pairs, not tokens
        if i == j:
            out[..., p] = single[u[..., i]]
        else:
            out[..., p] = double[u[..., i] * (E + 3) + u[..., j]]
    return out


def _packed_index(a: np.ndarray, b: np.ndarray, E: int) -> np.ndarray:
    """Index of the unordered expert pair {a, b} in the packed upper triangle of an E × E matrix."""
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    return lo * E - lo * (lo - 1) // 2 + (hi - lo)


def _code_tables(E: int) -> tuple[np.ndarray, np.ndarray]:
    """Look-up tables of :func:`_pair_codes`, indexed by clip(id, -2, E) + 2.

    single (E + 3,): code of one slot (its diagonal cell; -1 when unwritten or
    out of range); double ((E + 3)²,): code of two slots, -1 unless both hold
    distinct in-range experts.
    """
    e = np.arange(E)
    single = np.full(E + 3, -1, dtype=np.int32)
    single[2:E + 2] = _packed_index(e, e, E)
    double = np.full((E + 3, E + 3), -1, dtype=np.int32)
    a, b = np.meshgrid(e, e, indexing="ij")
    double[2:E + 2, 2:E + 2] = np.where(a != b, _packed_index(a, b, E), -1)
    return single, double.ravel()


def _unpack_index(E: int) -> tuple[xr.DataArray, xr.DataArray]:
    """Indexers from the packed upper triangle (:func:`_packed_index`) to (expert, expert_b) and to the diagonal."""
    a, b = np.meshgrid(np.arange(E), np.arange(E), indexing="ij")
    full = _packed_index(a, b, E)
    return (xr.DataArray(full, dims=("expert", "expert_b")),
            xr.DataArray(np.diagonal(full).copy(), dims="expert"))


def _unpack(packed: xr.DataArray, index: xr.DataArray, inner: tuple[str, ...] = ()) -> xr.DataArray:
    """(..., pair, ...) packed counts -> (..., *index.dims, ...) with integer expert coordinates.

    ``inner`` names dims kept innermost in memory (``boot`` for replicates):
    the cells are then laid out as (E, E) matrices of plain counts would be, so
    float sums over them add in the same order and give the same bits.
    """
    out = xr.apply_ufunc(
        np.take, packed, kwargs={"indices": index.values, "axis": -1 - len(inner)},
        input_core_dims=[["pair", *inner]], output_core_dims=[[*index.dims, *inner]], dask="parallelized",
        output_dtypes=[packed.dtype], dask_gufunc_kwargs={"output_sizes": dict(index.sizes)},
    )
    order = [e for d in packed.dims for e in (index.dims if d == "pair" else (d,))]
    out = out.transpose(*order)  # a view: the memory order stays
    return out.assign_coords({d: np.arange(out.sizes[d], dtype=np.int32) for d in index.dims})


def partner_tv(both: xr.DataArray, active: xr.DataArray) -> xr.DataArray:
    """Count-weighted mean over experts a of TV(π[a, ·], uniform over the other E − 1 experts).

    Parameters
    ----------
    both : (..., expert, expert_b) pair counts, diagonal ignored.
    active : (..., expert) tokens holding each expert (the weights).

    Returns
    -------
    (...) in [0, 1 − 1/(E − 1)]; NaN where no expert has a partner.
    """
    E = both.sizes["expert"]
    both = both.where(_off_diagonal(E), 0).astype(np.float64)
    row = both.sum("expert_b")
    pi = both / row.where(row > 0)
    tv = 0.5 * abs(pi - 1.0 / (E - 1)).where(_off_diagonal(E), 0.0).sum("expert_b", skipna=False)
    w = active.astype(np.float64).where(row > 0, 0.0)
    return safe_ratio((tv.fillna(0.0) * w).sum("expert"), w.sum("expert"))


def _chance(context) -> float:
    return coactivation_chance(context["num_experts"], context["top_k"])


_NAN_COACT = "diagonal (a = b), or expert a never selected at this checkpoint and layer"
OUTPUTS = {
    "coactivation": Output(
        "co-activation", "share of a's tokens",
        "count(a ∈ S and b ∈ S) / count(a ∈ S): share of the tokens routed to expert a (row) that are "
        "also routed to expert b (column), over all pairs of the token's top-k set (OLMoE counts only "
        "adjacent ranks: coactivation_olmoe)", chance=_chance, nan_where=_NAN_COACT),
    "coactivation_ratio": Output(
        "co-activation ratio to chance", "ratio",
        "coactivation / ((k − 1)/(E − 1)); 1 = as often as under random routing", chance=1.0, nan_where=_NAN_COACT),
    "pair_count": Output(
        "tokens holding both experts", "tokens",
        "number of tokens whose top-k set holds both expert and expert_b (diagonal: tokens holding expert)"),
    "active_count": Output("tokens holding the expert", "tokens", "number of tokens whose top-k set holds the expert"),
    "partner_tv": Output(
        "partner non-randomness (TV)", "total variation distance",
        "mean over experts a, weighted by count(a ∈ S), of ½ Σ_(b≠a) |C[a,b]/Σ_b' C[a,b'] − 1/(E−1)|: how far "
        "a's partners are from a uniform choice among the other experts (0 = random partners)",
        chance=0.0, nan_where="no token with two written slots at this checkpoint and layer"),
    "coactivation_olmoe": Output(
        "co-activation, OLMoE's definition (adjacent ranks)", "share of a's tokens",
        "OLMoE's run_moe_analysis.py: count(a and b in adjacent ranks of the token's ranked top-k list, either "
        "order) / count(a ∈ S). Only pairs of consecutive ranks count (k − 1 of a token's k(k − 1)/2 pairs), so a "
        "row sums to between 1 and 2, not k − 1; equal to coactivation when k = 2; no interval",
        nan_where=_NAN_COACT),
}


def coactivation(
    routing: xr.Dataset, *, canonical_only: bool = False, n_boot: int = 200, ci: float = 0.95, seed: int = 0
) -> xr.Dataset:
    """Co-activation matrix per (checkpoint, layer) and its departure from random partners.

    Parameters
    ----------
    routing : routing cube; uses ``expert_ids`` (checkpoint, layer, token, k)
        and the ``sample`` coordinate (bootstrap units).
    canonical_only : count only tokens whose ``canonical`` flag is set.
    n_boot, ci, seed : bootstrap over samples; ``n_boot=0`` leaves the intervals out.

    Returns
    -------
    xr.Dataset
        coactivation (checkpoint, layer, expert, expert_b) [+ _lo/_hi]:
            count(a, b ∈ S) / count(a ∈ S); NaN on the diagonal
        coactivation_ratio (same dims): coactivation / ((k − 1)/(E − 1))
        pair_count (same dims) int64: tokens holding both a and b (diagonal:
            tokens holding a)
        active_count (checkpoint, layer, expert) int64: tokens holding a
        partner_tv (checkpoint, layer) [+ _lo/_hi]: weighted mean TV of the
            partner distributions from uniform

    Raises
    ------
    ValueError
        top_k < 2 (no pairs), or (at compute time for lazy input) ids outside -1..E-1.
    """
    E, k = cube_sizes(routing)
    if k < 2:
        raise ValueError(f"coactivation: the routing cube has top_k={k}; co-activation needs top_k >= 2")
    if n_boot < 0:
        raise ValueError(f"coactivation: n_boot={n_boot}; expected >= 0")
    P = E * (E + 1) // 2
    reps, adjacent_packed = _packed_sums(routing, canonical_only, n_boot=n_boot, seed=seed)
    packed = reps.isel(boot=0, pair=slice(0, P), drop=True)
    unpack, diag = _unpack_index(E)
    # pair_count already holds tokens(a) on its diagonal; every use of ``both`` ignores the diagonal
    both = pair_count = _unpack(packed, unpack)
    active = _unpack(packed, diag)

    chance = coactivation_chance(E, k)
    off = _off_diagonal(E)
    coact = safe_ratio(both, active).where(off).transpose("checkpoint", "layer", "expert", "expert_b")
    both_adj = _unpack(adjacent_packed, unpack)
    if both_adj.chunks is not None:
        both_adj = both_adj.chunk({"checkpoint": -1, "layer": -1})
    out = {
        "coactivation": coact,
        "coactivation_ratio": coact / chance,
        "pair_count": pair_count,
        "active_count": active,
        "partner_tv": partner_tv(both, active),
        "coactivation_olmoe": safe_ratio(both_adj, active).where(off).transpose(
            "checkpoint", "layer", "expert", "expert_b"),
    }
    if n_boot > 0:
        # the replicates of the E(E+1)/2 packed counts, unfolded: half the work of resampling (E, E)
        packed_r = reps.isel(boot=slice(1, None), pair=slice(0, P)).assign_coords(boot=np.arange(n_boot))
        both_r, active_r = _unpack(packed_r, unpack, ("boot",)), _unpack(packed_r, diag, ("boot",))
        scheme = "resampling samples (not tokens)"
        # the diagonal is undefined in every replicate: keep it out of the quantiles, mask it after
        lo, hi = interval(safe_ratio(both_r, active_r).where(off, 0.0), ci)
        lo, hi = lo.where(off), hi.where(off)
        add_interval(out, "coactivation", lo, hi, ci=ci, n_boot=n_boot, scheme=scheme)
        lo, hi = interval(partner_tv(both_r, active_r), ci)
        add_interval(out, "partner_tv", lo, hi, ci=ci, n_boot=n_boot, scheme=scheme)
    return finalise(
        xr.Dataset(out), routing, name=NAME, outputs=OUTPUTS,
        definition="C[c,l,a,b] = count(a ∈ S_t and b ∈ S_t) / count(a ∈ S_t) over tokens t, all pairs of the "
        "top-k set S (not only adjacent ranks; coactivation_olmoe is OLMoE's adjacent-rank count, equal when "
        "k = 2); partner_tv = count-weighted mean over a of the total variation "
        "distance between a's partner distribution C[a,·]/Σ_b C[a,b] and uniform over the other E−1 experts. "
        "Ids of -1 (unwritten) are excluded.",
        normalisation="row-normalised by the tokens holding expert a; rows sum to k−1 (off-diagonal)",
        chance=f"coactivation: (k−1)/(E−1) = {chance:.4g}; coactivation_ratio: 1; partner_tv: 0 (plus a small "
        "finite-sample bias)",
        params={"canonical_only": canonical_only, "n_boot": n_boot, "ci": ci, "seed": seed},
    )


def _packed_sums(routing: xr.Dataset, canonical_only: bool, *, n_boot: int, seed: int):
    """The packed pair counts of :func:`coactivation`, summed over samples and resampled, in one token pass.

    Returns
    -------
    reps : (checkpoint, layer, boot, pair) the packed counts (pair 0..P-1, P = E(E+1)/2) of
        the plain sums (boot 0) and of every bootstrap replicate (boot 1..n_boot)
    adjacent_packed : (checkpoint, layer, pair) the packed counts of adjacent-rank pairs only (OLMoE's)
    """
    E, k = cube_sizes(routing)
    P = E * (E + 1) // 2
    codes = _codes(token_var(routing, "expert_ids"), token_mask(routing, canonical_only), E)
    # OLMoE's variant counts only pairs of adjacent ranks (slots i, i+1): those slot pairs' codes again,
    # shifted past bin P, ride in the same bincount instead of a second pass over the tokens
    adjacent = [p for p, (i, j) in enumerate(zip(*np.triu_indices(k))) if j == i + 1]
    adj = codes.isel(slot_pair=adjacent)
    codes = xr.concat([codes, adj.where(adj < 0, adj + P)], dim="slot_pair")
    # one token pass: bins 0..P-1 are the packed pair counts (diagonal = tokens holding a), bins P..2P-1 the
    # packed counts of adjacent-rank pairs
    sums_all = per_sample_sums(
        xr.ones_like(codes, dtype=np.int8), Samples.of(routing), dim=("token", "slot_pair"),
        by={"pair": (codes, 2 * P)},
    ).transpose("checkpoint", "layer", "sample", "pair")
    adjacent_packed = sums_all.isel(pair=slice(P, None)).sum("sample").assign_coords(pair=np.arange(P))
    sums_s = sums_all.isel(pair=slice(0, P))
    n_samples = sums_s.sizes["sample"]
    weights = np.ones((1, n_samples), dtype=np.int64)
    if n_boot > 0:
        weights = np.concatenate([weights, bootstrap_weights(n_samples, n_boot, seed)])
    # one product over the per-sample counts: the plain sums (weights 1, first row), then every replicate
    reps = resample(sums_s, weights)
    if reps.chunks is not None:
        reps = reps.chunk({"checkpoint": -1, "layer": -1})  # E²/2 · (n_boot + 1) numbers per (checkpoint, layer)
    return reps, adjacent_packed


def cluster_order(coact: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Leaf order and linkage of average-linkage clustering on 1 − symmetric co-activation.

    ``coact`` is one (E, E) co-activation matrix (diagonal ignored, NaN rows
    treated as never co-active). Returns ``(order, Z)``; Z is None for E < 3.
    """
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    E = coact.shape[0]
    if E < 3:
        return np.arange(E), None
    c = np.nan_to_num(np.asarray(coact, dtype=float), nan=0.0)
    sym = (c + c.T) / 2.0
    dist = np.clip(1.0 - sym, 0.0, None)
    np.fill_diagonal(dist, 0.0)
    Z = linkage(squareform(dist, checks=False), method="average")
    return leaves_list(Z), Z


def table(result: xr.Dataset) -> pd.DataFrame:
    """Rows (checkpoint, layer, expert, expert_b) with C, its CI and ratio; partner_tv repeated per layer."""
    df = tidy(result, ["coactivation", "coactivation_lo", "coactivation_hi", "coactivation_ratio", "coactivation_olmoe",
                       "pair_count"])
    tv = tidy(result, ["partner_tv", "partner_tv_lo", "partner_tv_hi"]).drop(columns=["step"], errors="ignore")
    return df.merge(tv, on=["checkpoint", "layer"], how="left")


def summary(result: xr.Dataset) -> dict:
    """partner_tv (mean over layers) at the earliest and final checkpoint, and the final's most over-chance pairs."""
    res = result[["partner_tv", "coactivation_ratio"]].compute()
    E, k = int(result.attrs["num_experts"]), int(result.attrs["top_k"])

    def at(i):
        return {
            "checkpoint": str(res["checkpoint"].values[i]),
            "step": int(res["step"].values[i]),
            "partner_tv": json_number(res["partner_tv"].isel(checkpoint=i).mean("layer")),
            "max_coactivation_ratio": json_number(res["coactivation_ratio"].isel(checkpoint=i).max()),
        }

    ratio = res["coactivation_ratio"].isel(checkpoint=-1).to_series().dropna().sort_values(ascending=False)
    top = [{"layer": int(lay), "expert": int(a), "expert_b": int(b), "ratio": json_number(v)}
           for (lay, a, b), v in ratio.head(5).items()]
    return {"chance": coactivation_chance(E, k), "earliest": at(0), "final": at(-1), "top_pairs_final": top}


ANALYSIS = register(
    Analysis(
        name=NAME,
        func=coactivation,
        figure=figure_hook(NAME),
        title="Expert co-activation",
        caption=(
            "C[a,b]: of the tokens routed to expert a (row), the share also routed to expert b (column), over all "
            "pairs of each token's top-k set (OLMoE counts only adjacent ranks: variable coactivation_olmoe). One "
            "row of heatmaps per MoE layer: the final checkpoint beside the "
            "earliest one, experts in the same order (average-linkage clustering of 1 − symmetric co-activation "
            "at the final checkpoint; dendrogram on the left). The diverging scale is centred on the chance "
            "level (k−1)/(E−1) under uniform random routing (white); red pairs are chosen together more often "
            "than chance. Second figure: partner TV, the count-weighted mean total-variation distance of each "
            "expert's partner distribution from uniform (0 = random partners), per layer and checkpoint, with "
            "95 % bootstrap CIs over samples."
        ),
        requires=("expert_ids",),
        table=table, summary=summary,
        outputs=OUTPUTS,
    )
)
