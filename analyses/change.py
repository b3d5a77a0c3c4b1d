"""Routing change across checkpoints: how far each checkpoint's routing is from
the final one and from the previous one, on identical input tokens.

Set-based (primary): |S_c ∩ S_ref| / k per token, averaged. Rank-aware
(secondary): share of slots i with id_c[i] = id_ref[i]. Checkpoints are ordered
by ``step``.
"""

from __future__ import annotations


import numpy as np
import pandas as pd
import xarray as xr

from storage.schema import FILL_ID

from . import bootstrap as bs
from .figures import hook as figure_hook
from .outputs import Output, k_of_experts, per_expert
from .registry import (
    Analysis, attach_guard, checkpoint_steps, cube_sizes, finalise, json_number, refuse_if, register, safe_ratio,
    tidy, token_var, view_mask
)

NAME = "change"


def set_intersection(a: xr.DataArray, b: xr.DataArray) -> xr.DataArray:
    """|S_a ∩ S_b| per token: (..., k) ids -> (...) int; -1 slots never match.

    Ids within one token's slots are distinct, so counting equal (slot, slot)
    pairs counts the shared experts.
    """
    eq = (a == b.rename({"k": "k_b"})) & (a >= 0)
    return eq.sum(("k", "k_b"))


def cosine(a: xr.DataArray, b: xr.DataArray, dim: str = "expert") -> xr.DataArray:
    """Cosine similarity of ``a`` and ``b`` along ``dim``; NaN where either is all zero or NaN."""
    # float: squared slot counts of a large cube overflow int64 (Σa² · Σb² passes 2^63 near 10^5 per expert)
    a, b = a.astype(np.float64), b.astype(np.float64)
    num = (a * b).sum(dim, skipna=False)
    den = np.sqrt((a * a).sum(dim, skipna=False) * (b * b).sum(dim, skipna=False))
    return safe_ratio(num, den)


# summed per sample (the metrics' numerators; their denominator, slots, is the sum of the usage counts)
_PER_SAMPLE = ("inter_final", "inter_prev", "pos_final", "pos_prev")
_TOTALS = ("tokens", "mismatch")  # only needed per (checkpoint, layer)
_QUANTITIES = _PER_SAMPLE + _TOTALS
_BLOCK_ELEMENTS = 2**22  # (checkpoint × token × k) ids per kernel call: bounds its temporaries


def _checkpoints_together(raw: xr.DataArray) -> xr.DataArray:
    """expert_ids (checkpoint, layer, token, k) with every checkpoint of a (layer, token-chunk) in one block.

    The final and previous checkpoints are then at hand in each block, with no
    shifted copies of the cube in the graph; token chunks are split where a
    block would pass :data:`_BLOCK_ELEMENTS` ids. In-memory input is returned as is.
    """
    raw = raw.transpose("checkpoint", "layer", "token", "k")
    if raw.chunks is None:
        return raw
    C, k = raw.sizes["checkpoint"], raw.sizes["k"]
    limit = max(1, _BLOCK_ELEMENTS // (C * k))
    tokens = raw.data.chunks[2] if max(raw.data.chunks[2]) <= limit else limit
    return raw.copy(data=raw.data.rechunk((-1, raw.data.chunks[1], tokens, -1)))


def _per_token(raw: xr.DataArray, mask: xr.DataArray | None) -> xr.DataArray:
    """Every per-token count of :func:`change`, from one kernel call per block.

    Parameters
    ----------
    raw : expert_ids (checkpoint, layer, token, k), checkpoints sorted by step,
        on dask chunked by :func:`_checkpoints_together`.
    mask : (token,) bool, the token view (None: every token).

    Returns
    -------
    int16 (checkpoint, layer, quantity, token), quantity = :data:`_QUANTITIES`
    (see :func:`_token_counts`); lazy when ``raw`` is.
    """
    import dask.array as da

    dims = ("checkpoint", "layer", "quantity", "token")
    coords = {d: raw[d] for d in ("checkpoint", "layer") if d in raw.coords}
    coords["quantity"] = list(_QUANTITIES)
    values = np.asarray(mask.values, dtype=bool) if mask is not None else None
    if not isinstance(raw.data, da.Array):
        return xr.DataArray(_token_counts(np.asarray(raw.values), values), dims=dims, coords=coords)
    args = [raw.data, "cltk"]
    if values is not None:
        args += [da.from_array(values, chunks=(raw.data.chunks[2],)), "t"]
    out = da.blockwise(
        _token_counts, "clqt", *args, new_axes={"q": len(_QUANTITIES)}, concatenate=True, dtype=np.int16,
    )
    return xr.DataArray(out, dims=dims, coords=coords)


def _token_counts(raw: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Per-token counts for :func:`change` (the kernel of :func:`_per_token`).

    Parameters
    ----------
    raw : (checkpoint, ..., token, k) expert ids, -1 unwritten; checkpoints sorted by step.
    mask : (token,) bool view mask; tokens outside it count as unwritten.

    Returns
    -------
    int16 (checkpoint, ..., quantity, token), quantity = :data:`_QUANTITIES`:
    inter_final / inter_prev (|S_c ∩ S_ref|: equal (slot, slot) pairs, a -1
    slot never matches), pos_final / pos_prev (valid slots with the
    reference's id at the same rank), tokens (1 when a slot is valid),
    mismatch (slots valid here and not in the final checkpoint or vice
    versa). The previous checkpoint of the first one is all -1. Ids outside
    -1..E-1 never get here (``registry.checked_cube``).
    """
    k = raw.shape[-1]
    # one contiguous (checkpoint, ..., token) array per slot: sums over the handful of slots are then
    # whole-array adds, and the reference checkpoints broadcast along the outer axis (both fast in numpy)
    slots = [np.ascontiguousarray(raw[..., i]) for i in range(k)]
    ids = slots if mask is None else [np.where(mask, s, FILL_ID) for s in slots]
    valid = [i >= 0 for i in ids]
    final = [i[-1:] for i in ids]
    prev = [np.concatenate([np.full_like(i[:1], FILL_ID), i[:-1]]) for i in ids]
    out = np.zeros(raw.shape[:-2] + (len(_QUANTITIES), raw.shape[-2]), dtype=np.int16)
    q = {name: out[..., i, :] for i, name in enumerate(_QUANTITIES)}
    for i in range(k):
        q["tokens"] |= valid[i]
        q["mismatch"] += valid[i] != valid[i][-1:]
        for name, ref in (("final", final), ("prev", prev)):
            q[f"pos_{name}"] += (ids[i] == ref[i]) & valid[i]
            for j in range(k):
                q[f"inter_{name}"] += (ids[i] == ref[j]) & valid[i]
    return out


def _metrics(sums: xr.Dataset, has_prev: xr.DataArray) -> dict[str, xr.DataArray]:
    """Every change metric from (resampled or plain) sums over samples: the same formula for estimate and CI."""
    count = sums["count"]
    return {
        "saturation": safe_ratio(sums["inter_final"], sums["slots"]),
        "overlap_prev": safe_ratio(sums["inter_prev"], sums["slots"]).where(has_prev),
        "switch_fraction": 1.0 - safe_ratio(sums["inter_prev"], sums["slots"]).where(has_prev),
        "position_match_final": safe_ratio(sums["pos_final"], sums["slots"]),
        "position_match_prev": safe_ratio(sums["pos_prev"], sums["slots"]).where(has_prev),
        # LibMoE's average_switch_fraction is rank-aware: the complement of position_match_prev
        "switch_fraction_libmoe": 1.0 - safe_ratio(sums["pos_prev"], sums["slots"]).where(has_prev),
        "drift_final": cosine(count, count.isel(checkpoint=-1, drop=True)),
        "drift_prev": cosine(count, count.shift(checkpoint=1)).where(has_prev),
    }


def _not_k_of_experts(context) -> float:
    return 1.0 - k_of_experts(context)


def _not_per_expert(context) -> float:
    return 1.0 - per_expert(context)


_NAN_FIRST = "first checkpoint (no previous one); or no valid slot at this layer"
_NAN_ANY = "no valid slot at this layer"
OUTPUTS = {
    "saturation": Output("saturation vs final checkpoint", "fraction of k",
                         "mean over tokens of |S_c ∩ S_final| / k: share of the final checkpoint's expert set "
                         "already selected at this checkpoint", chance=k_of_experts, nan_where=_NAN_ANY),
    "overlap_prev": Output("overlap with previous checkpoint", "fraction of k",
                           "mean over tokens of |S_c ∩ S_(c-1)| / k", chance=k_of_experts, nan_where=_NAN_FIRST),
    "switch_fraction": Output("switch fraction", "fraction of k",
                              "1 − overlap_prev: share of selected experts that changed since the previous "
                              "checkpoint (set-based; LibMoE's rank-aware switch fraction is switch_fraction_libmoe)",
                              chance=_not_k_of_experts, nan_where=_NAN_FIRST),
    "position_match_final": Output("position match vs final checkpoint", "share of slots",
                                   "share of slots i (rank-aware) with id_c[i] = id_final[i]", chance=per_expert,
                                   nan_where=_NAN_ANY),
    "position_match_prev": Output("position match vs previous checkpoint", "share of slots",
                                  "share of slots i (rank-aware) with id_c[i] = id_(c-1)[i]", chance=per_expert,
                                  nan_where=_NAN_FIRST),
    "switch_fraction_libmoe": Output(
        "switch fraction, LibMoE's definition (rank-aware)", "share of slots",
        "1 − position_match_prev: LibMoE's average_switch_fraction, the share of slots i whose expert id_c[i] "
        "differs from id_(c-1)[i] at the same rank (a reordered but unchanged set counts as switched), not the "
        "set-based switch_fraction; equal to LibMoE's per-token mean when every compared token has all k slots",
        chance=_not_per_expert, nan_where=_NAN_FIRST),
    "drift_final": Output("usage drift vs final checkpoint (cosine)", "cosine similarity",
                          "cosine similarity of the per-expert usage vectors (slot counts) of this and the final "
                          "checkpoint; 1 = same usage profile", chance=1.0, nan_where=_NAN_ANY),
    "drift_prev": Output("usage drift vs previous checkpoint (cosine)", "cosine similarity",
                         "cosine similarity of the per-expert usage vectors of this and the previous checkpoint",
                         chance=1.0, nan_where=_NAN_FIRST),
    "tokens": Output("tokens compared", "tokens", "tokens with at least one valid slot"),
}


_DEFINITION = (
    "per (checkpoint c, layer): saturation = mean_t |S_c ∩ S_final|/k, overlap_prev = mean_t |S_c ∩ S_(c-1)|/k, "
    "switch_fraction = 1 − overlap_prev, position_match_* = share of slots with the same expert at the same rank, "
    "drift_* = cosine similarity of per-expert usage vectors; checkpoints ordered by step, -1 slots excluded. "
    "Intervals: {ci_percent:g} % percentile bootstrap over samples resampled within each domain, the same resampled "
    "samples at every checkpoint ({n_boot} replicates).")
_CHANCE = (
    "saturation and overlap_prev: k/E = {set:.4g}; switch_fraction: 1 − k/E = {not_set:.4g}; position_match_*: "
    "1/E = {pos:.4g}; drift_*: 1 (two uniform usage vectors are parallel, so drift near 1 does not mean the same "
    "tokens go to the same experts)")


def change(
    routing: xr.Dataset, *, view: str = "all", n_boot: int = 200, ci: float = 0.95, seed: int = 0
) -> xr.Dataset:
    """Saturation, overlap, position match and usage drift across checkpoints, per (checkpoint, layer).

    Parameters
    ----------
    routing : routing cube with ``expert_ids`` (checkpoint, layer, token, k) and
        at least two checkpoints, all completely captured (``complete`` = 1
        where the cube has that variable) with the same slots written (same
        -1 pattern): change is only defined on identical inputs.
    view : token view (``all``, ``canonical``, ``last_canonical``).
    n_boot, ci, seed : bootstrap over samples (resampled within each domain,
        the same resampled samples at every checkpoint, so comparisons are
        paired); ``n_boot=0`` leaves the interval variables out.

    Returns
    -------
    xr.Dataset with dims (checkpoint, layer), checkpoints sorted by step:
        saturation            Σ_t |S_c ∩ S_final| / Σ_t |S_c|   (= mean_t ·/k)
        overlap_prev          Σ_t |S_c ∩ S_{c-1}| / Σ_t |S_c|   (NaN at the first checkpoint)
        switch_fraction       1 − overlap_prev
        position_match_final  share of valid slots with id_c[i] = id_final[i]
        position_match_prev   the same against the previous checkpoint
        drift_final           cosine(count_c, count_final) of per-expert slot counts (= usage vectors)
        drift_prev            cosine(count_c, count_{c-1})   (NaN at the first checkpoint)
        tokens                tokens compared
        <metric>_lo, <metric>_hi  bootstrap percentile intervals of every metric

    Raises
    ------
    ValueError
        Fewer than two checkpoints, duplicate checkpoint names, or (at compute
        time for lazy input) a checkpoint with ``complete`` = 0, a token/slot
        written in one checkpoint and not in another, or ids outside -1..E-1.
    """
    E, k = cube_sizes(routing)
    routing = _sorted_by_step(routing)
    C = routing.sizes["checkpoint"]
    n_boot = int(n_boot)

    raw = _checkpoints_together(token_var(routing, "expert_ids"))
    mask = view_mask(routing, view)
    ids = raw if mask is None else raw.where(mask, FILL_ID).astype(raw.dtype)
    has_prev = xr.DataArray(np.arange(C) > 0, dims="checkpoint", coords={"checkpoint": ids["checkpoint"]})

    # one kernel per (layer, token-chunk) block gives every per-token quantity (the guards' counts
    # too); a bincount per block sums them per sample, another the usage counts
    samples = bs.Samples.of(routing)  # once: every token pass below shares it
    per_token = _per_token(raw, mask)
    ps = bs.per_sample_sums(per_token.sel(quantity=list(_PER_SAMPLE)), samples, dim="token").to_dataset("quantity")
    ps["count"] = bs.per_sample_sums(
        xr.ones_like(ids, dtype=np.int8), samples, dim=("token", "k"), by={"expert": (ids, E)}
    )
    # valid slots = slots with an expert (an id >= E refuses the whole result below)
    ps["slots"] = ps["count"].sum("expert")
    totals = per_token.sel(quantity=list(_TOTALS)).sum("token")
    if totals.chunks is not None:
        totals = totals.chunk({"checkpoint": -1, "layer": -1})  # a few numbers per (checkpoint, layer)
    values = _metrics(bs.group_sums(ps), has_prev)

    out = {**values, "tokens": totals.sel(quantity="tokens", drop=True)}
    if n_boot > 0:
        weights = bs.bootstrap_weights(ps.sizes["sample"], n_boot, seed, strata=bs.sample_groups(routing, "domain", samples))
        reps = _metrics(bs.resample(ps, weights), has_prev)
        for name in values:
            lo, hi = bs.interval(reps[name], ci)
            bs.add_interval(out, name, lo, hi, ci=ci, n_boot=n_boot, scheme=bs.STRATIFIED)
    # Change metrics are only meaningful on identical inputs: the single token
    # axis guarantees the tokens, the guard that every checkpoint wrote them.
    result = attach_guard(xr.Dataset(out), _identical_inputs_guard(routing, totals))
    return finalise(
        result, routing, name=NAME, outputs=OUTPUTS,
        definition=_DEFINITION.format(ci_percent=100 * ci, n_boot=n_boot),
        normalisation="set overlaps divided by k (Σ|S_c| when slots are missing); position match per slot; "
        "drift is a cosine (scale-free, so usage shares and slot counts give the same value)",
        chance=_CHANCE.format(set=k / E, not_set=1 - k / E, pos=1.0 / E),
        params={"view": view, "n_boot": n_boot, "ci": float(ci), "seed": int(seed)},
    )


def _sorted_by_step(routing: xr.Dataset) -> xr.Dataset:
    """``routing`` with its checkpoints sorted by step; ValueError for fewer than 2 or repeated names."""
    C = routing.sizes.get("checkpoint", 0)
    if C < 2:
        raise ValueError(
            f"change: the routing cube has {C} checkpoint(s) on dim 'checkpoint'; at least 2 are needed"
        )
    names = np.asarray(routing["checkpoint"].values)
    if len(set(names.tolist())) != len(names):
        raise ValueError(f"change: checkpoint names are not unique: {names.tolist()}")
    order = np.argsort(checkpoint_steps(routing), kind="stable")
    return routing if np.array_equal(order, np.arange(C)) else routing.isel(checkpoint=order)


def _identical_inputs_guard(routing: xr.Dataset, totals: xr.DataArray) -> xr.DataArray:
    """A :func:`refuse_if` guard: no slot written in one checkpoint and not in the final one, every checkpoint complete."""
    guard = refuse_if(
        totals.sel(quantity="mismatch", drop=True),
        f"change: expert_ids has slots written (id >= 0) in one checkpoint and unwritten (-1) in the final "
        f"checkpoint {routing['checkpoint'].values[-1]!s} or vice versa; identical inputs are required (capture "
        "every checkpoint completely, or select the complete ones); mismatching slots",
    )
    if "complete" in routing:
        guard = guard + refuse_if(
            (routing["complete"] != 1).astype(np.int64),
            "change: identical inputs are required, but the routing cube marks checkpoint(s) as not completely "
            "captured ('complete' = 0; capture them or select the complete ones)",
        )
    return guard


_PANELS = (
    ("saturation", "saturation vs final\n|S_c ∩ S_final| / k", "set"),
    ("overlap_prev", "overlap with previous\n|S_c ∩ S_c−1| / k", "set"),
    ("position_match_final", "position match vs final\n(share of slots)", "pos"),
    ("position_match_prev", "position match vs previous\n(share of slots)", "pos"),
    ("drift_final", "usage drift vs final\ncosine(usage_c, usage_final)", "drift"),
    ("drift_prev", "usage drift vs previous\ncosine(usage_c, usage_c−1)", "drift"),
)
METRICS = tuple(p[0] for p in _PANELS) + ("switch_fraction", "switch_fraction_libmoe")


def table(result: xr.Dataset) -> pd.DataFrame:
    """Rows (checkpoint, layer) with every metric and its interval as columns."""
    cols = [f"{m}{s}" for m in METRICS for s in ("", "_lo", "_hi") if f"{m}{s}" in result]
    return tidy(result, cols + ["tokens"])


def summary(result: xr.Dataset) -> dict:
    """Saturation, switch fraction and drift per step (mean over layers), and the first step reaching 90 % saturation."""
    res = result[["saturation", "switch_fraction", "drift_final", "drift_prev"]].compute()
    steps = [int(s) for s in res["step"].values]
    mean = {name: res[name].mean("layer").values for name in res.data_vars}
    reached = [s for s, v in zip(steps, mean["saturation"]) if np.isfinite(v) and v >= 0.9]
    E, k = int(result.attrs["num_experts"]), int(result.attrs["top_k"])
    out = {"chance_saturation": k / E}
    for name, values in mean.items():
        out[f"{name}_by_step"] = {str(s): json_number(v) for s, v in zip(steps, values)}
    out["first_step_saturation_ge_0.9"] = reached[0] if reached else None
    return out


ANALYSIS = register(
    Analysis(
        name=NAME,
        func=change,
        figure=figure_hook(NAME),
        title="Routing change across checkpoints",
        caption=(
            "How routing settles during training, on the same input tokens at every checkpoint (x: training "
            "step; one line per MoE layer; top row against the final checkpoint, bottom row against the previous "
            "one). Saturation: mean share of the final checkpoint's top-k expert set already selected (reaches 1 "
            "at the final checkpoint). Overlap with previous: mean share of the expert set kept since the "
            "previous checkpoint (switch fraction = 1 − overlap, set-based; LibMoE's rank-aware switch fraction "
            "= 1 − position match vs previous: variable switch_fraction_libmoe). Position match: rank-aware "
            "share of slots "
            "holding the same expert. Usage drift: cosine similarity of the per-expert usage vectors — it "
            "compares the usage profile only, not which tokens go where. Dashed lines: chance under uniform "
            "random routing, k/E for set overlaps, 1/E for position match, 1 for drift (uniform usage vectors "
            "are parallel). Bands: 95 % bootstrap intervals over samples (the same resampled samples at every "
            "checkpoint)."
        ),
        requires=("expert_ids",),
        min_checkpoints=2,  # a one-checkpoint import is skipped with this reason, not an error
        table=table, summary=summary,
        outputs=OUTPUTS,
    )
)
