"""Time within a sequence: how routing at token t relates to routing at t+1 … t+M.

Per (checkpoint, layer), over pairs of tokens (t, t+m) of the **same sample**
(a pair never straddles two samples; both tokens must have a written routing):

* top-1 repeat  P(top1_t = top1_{t+1});            chance 1/E
* set repeat    P(S_t ∩ S_{t+1} ≠ ∅);              chance 1 − C(E−k, k)/C(E, k)
* transition    P(top1_{t+1} = j | top1_t = i)     chance 1/E per cell
* lag-m autocorrelation of each expert's activation indicator x_t = [e ∈ S_t],
  m = 1..M (Pearson correlation of x_t and x_{t+m} over within-sample pairs);
  chance 0.

All pair counts come from one vectorised numpy kernel (:func:`pair_stats`,
bincounts over flattened indices, no loop over tokens). On dask every
(checkpoint, layer, token) block is handed the next M tokens as look-ahead
(``dask.array.overlap`` with a right-only depth) and counts the pairs that
*start* in it, so a sample split by a token chunk keeps each pair exactly once
and chunking never changes a result; the ``sample`` coordinate says whether
t and t+m share a sample. Confidence intervals resample samples (the sample of
token t owns the pair).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from storage.schema import FILL_ID

from . import plotting
from .bootstrap import add_interval, bootstrap_weights, interval, resample, sample_index
from .registry import (
    Analysis,
    attach_guard,
    cube_sizes,
    describe,
    finalise,
    json_number,
    refuse_if,
    register,
    routed_ids,
    safe_ratio,
    tidy,
)

NAME = "temporal"


def set_repeat_chance(num_experts: int, top_k: int) -> float:
    """P(S ∩ S' ≠ ∅) for two independent uniformly random k-subsets of E experts."""
    return 1.0 - math.comb(num_experts - top_k, top_k) / math.comb(num_experts, top_k)


def _pearson(n, sx, sy, sxy):
    """Pearson r of two binary series from their pair count and sums (NaN when either is constant)."""
    cov = n * sxy - sx * sy
    var = (n * sx - sx**2) * (n * sy - sy**2)
    return cov / np.sqrt(var.where(var > 0))


def _resample(per_sample: xr.Dataset, weights: np.ndarray) -> xr.Dataset:
    # resample() is a dot product, which xarray offers for DataArrays only
    return per_sample.map(lambda v: resample(v, weights))


def _layout(E: int, S: int, M: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the statistics packed (in this order) into one int64 vector per (checkpoint, layer)."""
    return {
        "pairs": (4, S),  # top1_pairs, top1_repeats, set_pairs, set_repeats per sample
        "transition": (E, E),
        "n": (M, S),
        "sx": (M, E, S),
        "sy": (M, E, S),
        "sxy": (M, E, S),
    }


def pair_stats(ids: np.ndarray, sample: np.ndarray, n_core: int, *, E: int, S: int, M: int) -> np.ndarray:
    """Sums over the token pairs (t, t+m), m = 1..M, of one block, packed per leading index.

    Parameters
    ----------
    ids : (..., T, k) expert ids of T consecutive tokens; ids outside 0..E-1
        count as unwritten.
    sample : (T,) sample code (0..S-1) of each token.
    n_core : pairs start only at the first ``n_core`` tokens; the others are
        the look-ahead that lets a pair reach into the next block.
    E, S, M : experts, samples, largest lag.

    Returns
    -------
    int64 (..., P): the arrays of :func:`_layout`, raveled and concatenated.
    Every count is a bincount over a flattened (leading, sample[, expert])
    index; the only Python loop is over the M lags.
    """
    lead = ids.shape[:-2]
    T, K = ids.shape[-2:]
    G = int(np.prod(lead, dtype=np.int64))
    ids = ids.reshape(G, T, K).astype(np.int64)
    ids = np.where((ids >= 0) & (ids < E), ids, -1)
    sample = np.asarray(sample, dtype=np.int64)
    valid = (ids >= 0).any(-1)
    g = np.arange(G, dtype=np.int64)[:, None]
    shapes = _layout(E, S, M)
    out = {name: np.zeros((G, *shp), dtype=np.int64) for name, shp in shapes.items()}

    def count(index, keep, size):
        return np.bincount(index[keep], minlength=G * size).reshape(G, size)

    for m in range(1, M + 1):
        t = np.arange(min(n_core, max(T - m, 0)))
        u = t + m
        same = sample[t] == sample[u]
        pv = valid[:, t] & valid[:, u] & same  # (G, n): a within-sample pair, both written
        base = g * S + sample[t]  # (G, n) flat (leading, sample) index
        it, iu = ids[:, t, :], ids[:, u, :]  # (G, n, K)
        shared = (it[..., :, None] == iu[..., None, :]).any(-1) & (it >= 0)  # slot of t also in S_(t+m)
        out["n"][:, m - 1] = count(base, pv, S)
        for name, codes, keep in (
            ("sx", it, pv[..., None] & (it >= 0)),
            ("sy", iu, pv[..., None] & (iu >= 0)),
            ("sxy", it, pv[..., None] & shared),
        ):
            flat = base[..., None] * E + codes
            out[name][:, m - 1] = count(flat, keep, S * E).reshape(G, S, E).transpose(0, 2, 1)
        if m == 1:
            a, b = it[..., 0], iu[..., 0]
            p1 = same & (a >= 0) & (b >= 0)
            out["pairs"][:, 0] = count(base, p1, S)
            out["pairs"][:, 1] = count(base, p1 & (a == b), S)
            out["pairs"][:, 2] = out["n"][:, 0]
            out["pairs"][:, 3] = count(base, pv & shared.any(-1), S)
            out["transition"][:] = count((g * E + a) * E + b, p1, E * E).reshape(G, E, E)
    packed = np.concatenate([out[name].reshape(G, -1) for name in shapes], axis=1)
    return packed.reshape(*lead, -1)


def _block_stats(ids, sample, index, *, T, E, S, M):
    # A block that is not the last one carries the next block's first M tokens
    # as look-ahead (dask overlap, right side only); pairs start in its core.
    n_core = ids.shape[-2] if (index.size == 0 or index[-1] == T - 1) else ids.shape[-2] - M
    return pair_stats(ids, sample, n_core, E=E, S=S, M=M)[:, :, None, :]


def _pair_sums(ids: xr.DataArray, sample: np.ndarray, *, E: int, S: int, M: int) -> xr.Dataset:
    """All pair sums of the cube, unpacked: Dataset of (checkpoint, layer, ...) arrays.

    In memory: one call of :func:`pair_stats`. On dask: each (checkpoint,
    layer, token) block gets the next M tokens appended (``overlap`` with a
    right-only depth), is reduced to packed sums, and the blocks are added
    up, so a sample split across token chunks keeps every pair exactly once.
    """
    ids = ids.transpose("checkpoint", "layer", "token", "k")
    T = ids.sizes["token"]
    shapes = _layout(E, S, M)
    if ids.chunks is None:
        packed = pair_stats(ids.values, sample, T, E=E, S=S, M=M)
    else:
        import dask.array as da

        data = ids.data
        tchunks = data.chunks[2]
        s_ext = da.overlap.overlap(da.from_array(sample, chunks=(tchunks,)), depth={0: (0, M)}, boundary="none")
        i_ext = da.overlap.overlap(da.arange(T, chunks=(tchunks,)), depth={0: (0, M)}, boundary="none")
        d_ext = da.overlap.overlap(data, depth={2: (0, M)}, boundary="none")
        if d_ext.chunks[2] != s_ext.chunks[0]:  # both see the same rechunking; refuse to pair misaligned blocks
            raise ValueError("temporal: token chunks of expert_ids and of the sample coordinate disagree")
        P = sum(int(np.prod(shp)) for shp in shapes.values())
        blocks = da.blockwise(
            _block_stats, "cltp", d_ext, "cltk", s_ext, "t", i_ext, "t",
            new_axes={"p": P}, adjust_chunks={"t": 1}, concatenate=True, dtype=np.int64,
            meta=np.empty((0, 0, 0, 0), dtype=np.int64), T=T, E=E, S=S, M=M,
        )
        packed = blocks.sum(axis=2)
    lead = ("checkpoint", "layer")
    dims = {
        "pairs": ("stat", "sample"),
        "transition": ("expert", "expert_next"),
        "n": ("lag", "sample"),
        "sx": ("lag", "expert", "sample"),
        "sy": ("lag", "expert", "sample"),
        "sxy": ("lag", "expert", "sample"),
    }
    out, offset = {}, 0
    for name, shp in shapes.items():
        size = int(np.prod(shp))
        part = packed[:, :, offset:offset + size].reshape(packed.shape[:2] + shp)
        out[name] = xr.Variable(lead + dims[name], part)
        offset += size
    ds = xr.Dataset(out, coords={c: ids[c] for c in lead})
    return ds


def temporal(
    routing: xr.Dataset, *, max_lag: int = 8, n_boot: int = 200, ci: float = 0.95, seed: int = 0
) -> xr.Dataset:
    """Repeat rates, top-1 transitions and activation autocorrelation along each sample.

    Parameters
    ----------
    routing : routing cube; uses ``expert_ids`` (checkpoint, layer, token, k)
        and the ``sample`` token coordinate (samples contiguous along token).
    max_lag : largest lag M of the autocorrelation (lags 1..M).
    n_boot, ci, seed : bootstrap over samples (replicates, level, RNG seed);
        ``n_boot=0`` leaves the intervals out.

    Returns
    -------
    xr.Dataset
        top1_repeat, set_repeat (checkpoint, layer) [+ _lo/_hi]: shares of adjacent pairs
        top1_repeat_independent (checkpoint, layer): Σ_e f_e·f'_e, the repeat
            expected if t+1 were drawn independently from the same top-1 usage
        top1_pairs, set_pairs (checkpoint, layer) int64: pairs counted
        transition_count (checkpoint, layer, expert, expert_next) int64
        transition (checkpoint, layer, expert, expert_next): row-normalised
        autocorrelation (checkpoint, layer, lag, expert)
        autocorrelation_mean (checkpoint, layer, lag) [+ _lo/_hi]: mean over experts

    Ids of -1 (unwritten) never form a pair; an id outside -1..E-1 raises
    ValueError (at compute time for lazy input).
    """
    E, k = cube_sizes(routing)
    max_lag = int(max_lag)
    if max_lag < 1:
        raise ValueError(f"temporal: max_lag={max_lag}; expected >= 1")
    if n_boot < 0:
        raise ValueError(f"temporal: n_boot={n_boot}; expected >= 0")
    ids = routed_ids(routing)
    codes, sample_ids = sample_index(routing)
    S = len(sample_ids)
    sums = _pair_sums(ids, codes.values, E=E, S=S, M=max_lag)
    sums = sums.assign_coords(
        sample=("sample", sample_ids), lag=("lag", np.arange(1, max_lag + 1, dtype=np.int32)),
        expert=("expert", np.arange(E, dtype=np.int32)), expert_next=("expert_next", np.arange(E, dtype=np.int32)),
    )
    stats = ["top1_pairs", "top1_repeats", "set_pairs", "set_repeats"]
    per_sample = xr.Dataset({name: sums["pairs"].isel(stat=i, drop=True) for i, name in enumerate(stats)})
    totals = per_sample.sum("sample")
    trans = sums["transition"]
    n_pairs = trans.sum(("expert", "expert_next"))
    independent = (trans.sum("expert_next") * trans.sum("expert").rename(expert_next="expert")).sum("expert")
    independent = safe_ratio(independent, n_pairs**2)
    ac_sample = sums[["n", "sx", "sy", "sxy"]]
    ac = ac_sample.sum("sample").astype(np.float64)
    autocorr = _pearson(ac["n"], ac["sx"], ac["sy"], ac["sxy"]).transpose("checkpoint", "layer", "lag", "expert")

    chance_set = set_repeat_chance(E, k)
    out = {
        "top1_repeat": describe(
            safe_ratio(totals["top1_repeats"], totals["top1_pairs"]), "top-1 repeat", "share of adjacent pairs",
            "P(top1_t = top1_(t+1)) over adjacent token pairs of the same sample", chance=1.0 / E,
            nan_where="no adjacent pair with written routing at this checkpoint and layer",
        ),
        "set_repeat": describe(
            safe_ratio(totals["set_repeats"], totals["set_pairs"]), "set repeat", "share of adjacent pairs",
            "P(S_t ∩ S_(t+1) ≠ ∅) over adjacent token pairs of the same sample", chance=chance_set,
            nan_where="no adjacent pair with written routing at this checkpoint and layer",
        ),
        "top1_repeat_independent": describe(
            independent, "top-1 repeat if independent", "share of adjacent pairs",
            "Σ_e f_e·f'_e with f, f' the top-1 shares of the first and second tokens of the pairs: the repeat "
            "rate expected from unequal expert usage alone, without any dependence along the sequence",
            chance=1.0 / E, nan_where="no adjacent pair with written routing at this checkpoint and layer",
        ),
        "top1_pairs": describe(totals["top1_pairs"], "adjacent top-1 pairs", "pairs",
                               "adjacent token pairs of one sample, both with a written top-1 expert"),
        "set_pairs": describe(totals["set_pairs"], "adjacent set pairs", "pairs",
                              "adjacent token pairs of one sample, both with at least one written slot"),
        "transition_count": describe(
            trans.astype(np.int64), "top-1 transitions", "pairs",
            "number of adjacent pairs with top1_t = expert and top1_(t+1) = expert_next",
        ),
        "transition": describe(
            safe_ratio(trans, trans.sum("expert_next")), "top-1 transition probability", "probability",
            "P(top1_(t+1) = expert_next | top1_t = expert); each row sums to 1", chance=1.0 / E,
            nan_where="expert is never the top-1 of a pair's first token",
        ),
        "autocorrelation": describe(
            autocorr, "activation autocorrelation", "Pearson r",
            "Pearson correlation of [e ∈ S_t] and [e ∈ S_(t+lag)] over token pairs lag apart in one sample",
            chance=0.0, nan_where="the expert is always or never selected over the pairs at this lag",
        ),
        "autocorrelation_mean": describe(
            autocorr.mean("expert", skipna=True), "mean activation autocorrelation", "Pearson r",
            "autocorrelation averaged over the experts where it is defined", chance=0.0,
            nan_where="no expert has a defined autocorrelation at this lag",
        ),
    }
    if n_boot > 0:
        weights = bootstrap_weights(per_sample.sizes["sample"], n_boot, seed)
        reps = _resample(per_sample, weights)
        scheme = "resampling samples (not tokens); a pair belongs to the sample of its first token"
        for name, num, den in (("top1_repeat", "top1_repeats", "top1_pairs"),
                               ("set_repeat", "set_repeats", "set_pairs")):
            lo, hi = interval(reps[num] / reps[den].where(reps[den] != 0), ci)
            add_interval(out, name, lo, hi, ci=ci, n_boot=n_boot, scheme=scheme)
        acr = _resample(ac_sample, weights).astype(np.float64)
        mean_reps = _pearson(acr["n"], acr["sx"], acr["sy"], acr["sxy"]).mean("expert", skipna=True)
        lo, hi = interval(mean_reps, ci)
        add_interval(out, "autocorrelation_mean", lo, hi, ci=ci, n_boot=n_boot, scheme=scheme)
    result = xr.Dataset(out)

    bad = ((ids >= E) | (ids < FILL_ID)).sum(("token", "k"))
    result = attach_guard(result, refuse_if(bad, f"temporal: expert_ids has slots with ids outside -1..{E - 1} "
                                                 f"(num_experts={E})"))
    return finalise(
        result, routing, name=NAME,
        definition="over token pairs (t, t+m) of the same sample, both written: top1_repeat = "
        "P(top1_t = top1_(t+1)); set_repeat = P(S_t ∩ S_(t+1) ≠ ∅); transition[i, j] = "
        "P(top1_(t+1) = j | top1_t = i); autocorrelation[m, e] = Pearson r of [e ∈ S_t] and [e ∈ S_(t+m)], "
        f"m = 1..{max_lag}. Pairs never cross a sample boundary.",
        normalisation="repeat rates: share of adjacent pairs; transition rows sum to 1; autocorrelation in [-1, 1]",
        chance=f"top1_repeat and transition cells: 1/E = {1 / E:.4g}; set_repeat: 1 − C(E−k,k)/C(E,k) = "
        f"{chance_set:.4g}; autocorrelation: 0 (i.i.d. routing). top1_repeat_independent gives the repeat "
        "expected from the observed (unequal) top-1 usage alone",
        params={"max_lag": max_lag, "n_boot": n_boot, "ci": ci, "seed": seed},
    )


# ----------------------------------------------------------------------------- figures


def checkpoint_styles(steps: Sequence[int]) -> list[dict]:
    """Line style per checkpoint that makes "final vs earliest" obvious.

    Earliest: grey, dashed, square markers; final: black, solid; the others
    thin and coloured by step (viridis).
    """
    colours, _ = plotting.ordered_colours(np.asarray(steps, dtype=float))
    styles = []
    for i in range(len(steps)):
        if i == 0 and len(steps) > 1:
            styles.append({"color": "0.45", "linestyle": "--", "marker": "s", "linewidth": 1.8})
        elif i == len(steps) - 1:
            styles.append({"color": "k", "linestyle": "-", "marker": "o", "linewidth": 1.8})
        else:
            styles.append({"color": colours[i], "linestyle": "-", "marker": "o", "linewidth": 0.9, "alpha": 0.7})
    return styles


def checkpoint_label(i: int, n: int, step: int) -> str:
    """Legend label of the i-th of n checkpoints: 'earliest (step s)', 'final (step s)' or 'step s'."""
    if i == 0 and n > 1:
        return f"earliest (step {step})"
    return f"final (step {step})" if i == n - 1 else f"step {step}"


def _band(ax, x, result, name, sel, style):
    lo, hi = f"{name}_lo", f"{name}_hi"
    if lo in result and hi in result:
        ax.fill_between(x, result[lo].sel(sel).values, result[hi].sel(sel).values, color=style["color"],
                        alpha=0.18, linewidth=0)


def figure(result: xr.Dataset, out_dir: Path, formats: Sequence[str] = ("png",)) -> list[Path]:
    """Repeat rates vs layer, transition heatmaps (earliest and final), autocorrelation vs lag."""
    result = result.compute()
    E, k = int(result.attrs["num_experts"]), int(result.attrs["top_k"])
    layers = result["layer"].values
    ckpts = result["checkpoint"].values
    steps = result["step"].values
    styles = checkpoint_styles(steps)
    paths = []

    with plotting.style():
        fig, axes = plotting.new_figure(1, 2, panel_size=(3.4, 2.7), sharex=True)
        for ax, (var, ylabel, chance, clabel) in zip(axes.flat, (
            ("top1_repeat", "top-1 repeat P(top1_t = top1_t+1)", 1.0 / E, "chance 1/E"),
            ("set_repeat", "set repeat P(S_t ∩ S_t+1 ≠ ∅)", set_repeat_chance(E, k), "chance"),
        )):
            for ci, ckpt in enumerate(ckpts):
                st = styles[ci]
                sel = {"checkpoint": ckpt}
                _band(ax, layers, result, var, sel, st)
                ax.plot(layers, result[var].sel(sel).values, markersize=3,
                        label=checkpoint_label(ci, len(ckpts), steps[ci]), **st)
            if var == "top1_repeat":
                ax.plot(layers, result["top1_repeat_independent"].isel(checkpoint=-1).values, color="k",
                        linestyle=":", linewidth=1, label="if independent (final)")
            plotting.chance_line(ax, chance, label=clabel)
            ax.set_ylim(0, 1.02)
            ax.set_xticks(layers)
            plotting.label_axes(ax, "layer (MoE layer index)", ylabel)
        axes.flat[0].legend(frameon=False, fontsize=6)
        fig.suptitle("Routing repeats between adjacent tokens of one sample\n(bands: 95 % bootstrap CI over "
                     "samples; grey dashed = earliest checkpoint, black = final)")
        paths += plotting.savefig(fig, out_dir, f"{NAME}_repeat", formats)

    # transition heatmaps: earliest and final checkpoint, one panel per layer
    show = [0, len(ckpts) - 1] if len(ckpts) > 1 else [0]
    L = len(layers)
    ncols = min(L, 6)
    rows_per = -(-L // ncols)
    trans = result["transition"]
    vmax = max(float(np.nanmax(trans.values)) if np.isfinite(trans.values).any() else 0.0, 2.0 / E)
    norm = plotting.mcolors.TwoSlopeNorm(vcenter=1.0 / E, vmin=0.0, vmax=vmax)
    cmap = plotting.plt.get_cmap(plotting.DIVERGING).with_extremes(bad="0.6")  # empty rows grey, not "chance"
    with plotting.style():
        side = min(max(1.8, 0.16 * E + 0.8), 3.2)
        fig, axes = plotting.new_figure(rows_per * len(show), ncols, panel_size=(side, side))
        im = None
        for r, ci in enumerate(show):
            for li, layer in enumerate(layers):
                ax = axes[r * rows_per + li // ncols, li % ncols]
                grid = trans.sel(checkpoint=ckpts[ci], layer=layer).values
                im = ax.imshow(grid, cmap=cmap, norm=norm, interpolation="nearest")
                ax.grid(False)
                ax.set_title(f"step {steps[ci]} · layer {layer}")
                if E <= 16:
                    ax.set_xticks(np.arange(E))
                    ax.set_yticks(np.arange(E))
                plotting.label_axes(ax, "top-1 at t+1", "top-1 at t")
            for j in range(L, rows_per * ncols):
                axes[r * rows_per + j // ncols, j % ncols].set_visible(False)
        cbar = fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8)
        cbar.set_label("P(top1_t+1 = column | top1_t = row)")
        cbar.ax.axhline(1.0 / E, color="k", linewidth=0.8)
        fig.suptitle(f"Top-1 transitions, earliest (top) and final checkpoint\n(white = chance 1/E = {1 / E:.3g}; "
                     "grey = expert never top-1)")
        paths += plotting.savefig(fig, out_dir, f"{NAME}_transition", formats)

    # autocorrelation vs lag, one panel per layer, one line per checkpoint
    lags = result["lag"].values
    with plotting.style():
        fig, axes = plotting.new_figure(rows_per, ncols, panel_size=(2.5, 2.1), sharex=True, sharey=True)
        for li, layer in enumerate(layers):
            ax = axes.flat[li]
            for ci, ckpt in enumerate(ckpts):
                st = styles[ci]
                sel = {"checkpoint": ckpt, "layer": layer}
                _band(ax, lags, result, "autocorrelation_mean", sel, st)
                ax.plot(lags, result["autocorrelation_mean"].sel(sel).values, markersize=2.5,
                        label=checkpoint_label(ci, len(ckpts), steps[ci]), **st)
            plotting.chance_line(ax, 0.0, label="chance")
            ax.set_title(f"layer {layer}")
            plotting.label_axes(ax, "lag m (tokens)", "mean autocorrelation (r)")
        plotting.hide_unused(axes, L)
        axes.flat[0].legend(frameon=False, fontsize=6)
        fig.suptitle("Autocorrelation of expert activation along the sequence, mean over experts\n"
                     "(bands: 95 % CI over samples; grey dashed = earliest checkpoint, black = final)")
        paths += plotting.savefig(fig, out_dir, f"{NAME}_autocorrelation", formats)
    return paths


def table(result: xr.Dataset) -> pd.DataFrame:
    """Rows (checkpoint, layer) with the repeat rates, their CIs and pair counts."""
    cols = ["top1_repeat", "top1_repeat_lo", "top1_repeat_hi", "top1_repeat_independent", "set_repeat",
            "set_repeat_lo", "set_repeat_hi", "top1_pairs", "set_pairs"]
    return tidy(result, cols)


def summary(result: xr.Dataset) -> dict:
    """Repeat rates (mean over layers) at the earliest and final checkpoint, against chance."""
    res = result[["top1_repeat", "set_repeat", "top1_repeat_independent", "autocorrelation_mean"]].compute()
    E, k = int(result.attrs["num_experts"]), int(result.attrs["top_k"])

    def at(i):
        return {
            "checkpoint": str(res["checkpoint"].values[i]),
            "step": int(res["step"].values[i]),
            "top1_repeat": json_number(res["top1_repeat"].isel(checkpoint=i).mean("layer")),
            "top1_repeat_independent": json_number(res["top1_repeat_independent"].isel(checkpoint=i).mean("layer")),
            "set_repeat": json_number(res["set_repeat"].isel(checkpoint=i).mean("layer")),
            "lag1_autocorrelation": json_number(res["autocorrelation_mean"].isel(checkpoint=i, lag=0).mean("layer")),
        }

    return {
        "chance_top1_repeat": 1.0 / E,
        "chance_set_repeat": set_repeat_chance(E, k),
        "earliest": at(0),
        "final": at(-1),
    }


ANALYSIS = register(
    Analysis(
        name=NAME,
        func=temporal,
        figure=figure,
        title="Routing along the sequence: repeats, transitions, autocorrelation",
        caption=(
            "How the routing of token t+1 (t+m) depends on the routing of token t, over token pairs inside one "
            "sample (pairs never cross a sample boundary). Repeat figure: share of adjacent pairs whose top-1 "
            "expert repeats (left; chance 1/E; dotted: the repeat expected from unequal expert usage alone) and "
            "whose expert sets share an expert (right; chance 1 − C(E−k,k)/C(E,k)), per layer, one line per "
            "checkpoint (grey dashed = earliest), bands = 95 % bootstrap CI over samples. Transition figure: "
            "P(top-1 at t+1 | top-1 at t) for the earliest and final checkpoint, white = chance 1/E. "
            "Autocorrelation figure: Pearson r of each expert's activation indicator at lag m, averaged over "
            "experts; chance 0."
        ),
        requires=("expert_ids",),
        params={"max_lag": 8, "n_boot": 200, "ci": 0.95, "seed": 0},
        table=table,
        summary=summary,
    )
)
