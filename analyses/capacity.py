"""Capacity drops: how many routing slots expert capacity threw away, per layer, position and expert.

A capacity-limited router (Switch Transformers) serves the tokens of a sequence
in position order until an expert holds ``expert_capacity`` of them; later
tokens sent to that expert are dropped (the expert does not run, the layer
passes the token through its residual). The capture records the router's
choice in ``expert_ids`` and ``capacity_dropped`` = 1 for such a slot (0 when
the expert ran, -1 unwritten). This analysis reports the share of written
slots that were dropped per (checkpoint, layer), by bucket of the token
position inside its sample (drops concentrate late) and by the expert the
router chose (drops concentrate on popular experts), with bootstrap intervals
over samples. For top-1 routing a slot is a token.

Cubes without ``capacity_dropped`` (routers without a capacity limit) are
skipped by the registry with a stated reason (``registry.skip_reason``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr

from . import bootstrap as bs
from .figures import hook as figure_hook
from .registry import Analysis, cube_sizes, finalise, json_number, register, safe_ratio, tidy, token_var
from .outputs import Output
from .usage import position_buckets

NAME = "capacity"
CHANCE = 0.0  # perfectly balanced routing with capacity factor >= 1 fills no expert beyond capacity

_NAN_WHY = "no written slot at this checkpoint and layer"
# suffix -> (words added to long_name, words added to description): per layer, per position bucket, per expert
_GROUPS = {"": ("", ""), "_by_position": (" by position bucket", " in the position bucket"),
           "_by_expert": (" by chosen expert", " whose chosen expert is this one")}
OUTPUTS = {
    name: spec
    for suffix, (what, where) in _GROUPS.items()
    for name, spec in (
        (f"drop_rate{suffix}", Output(
            f"capacity drop rate{what}", "share of routing slots",
            f"routing slots{where} that expert capacity dropped (capacity_dropped = 1) over written slots{where}",
            chance=CHANCE, nan_where=_NAN_WHY + (where and f" (or none{where})"))),
        (f"dropped{suffix}", Output(f"dropped slots{what}", "routing slots",
                                    f"routing slots{where} with capacity_dropped = 1")),
        (f"slots{suffix}", Output(f"written slots{what}", "routing slots",
                                  f"routing slots{where} with capacity_dropped >= 0 and a valid expert id")),
    )
}


def capacity(
    routing: xr.Dataset,
    *,
    position_bins: int = 8,
    n_boot: int = 200, ci: float = 0.95, seed: int = 0,
) -> xr.Dataset:
    """Share of routing slots dropped by expert capacity, per (checkpoint, layer), position bucket and expert.

    Parameters
    ----------
    routing : routing cube with ``capacity_dropped`` and ``expert_ids``
        (checkpoint, layer, token, k) and the ``position`` / ``sample`` token coordinates.
    position_bins : equal-width buckets of the token position (``usage.position_buckets``).
    n_boot, ci, seed : bootstrap over samples (not tokens); ``n_boot=0`` leaves
        the interval variables out.

    Returns
    -------
    xr.Dataset with
        drop_rate (checkpoint, layer) : dropped / written slots
        dropped, slots (checkpoint, layer) : dropped and written slots
        drop_rate_by_position (checkpoint, layer, position_bin) : the same per position bucket
        dropped_by_position, slots_by_position (checkpoint, layer, position_bin)
        drop_rate_by_expert (checkpoint, layer, expert) : dropped / written slots that chose the expert
        dropped_by_expert, slots_by_expert (checkpoint, layer, expert)
    and ``<rate>_lo`` / ``<rate>_hi`` bootstrap bounds; ``position_bin`` carries
    ``position_start`` / ``position_end`` (bucket holds start <= position < end).

    A slot is written when ``capacity_dropped`` >= 0 and its expert id is valid
    (>= 0); it is dropped when ``capacity_dropped`` == 1.
    """
    E, _ = cube_sizes(routing)
    n_boot, position_bins = int(n_boot), int(position_bins)
    ids = token_var(routing, "expert_ids")
    flag = token_var(routing, "capacity_dropped")
    written = (flag >= 0) & (ids >= 0)
    parts = xr.Dataset({"dropped": (written & (flag == 1)).astype(np.int64), "slots": written.astype(np.int64)})
    pos_codes, edges = position_buckets(routing, position_bins)
    n_pos = len(edges) - 1
    samples = bs.Samples.of(routing)  # once: every token pass below shares it
    # three per-sample sums in one token pass each (per_sample_sums: one bincount per block for both variables)
    ps = bs.per_sample_sums(parts, samples, dim=("token", "k"))
    ps_pos = bs.per_sample_sums(parts, samples, dim=("token", "k"), by={"position_bin": (pos_codes, n_pos)})
    ps_exp = bs.per_sample_sums(parts, samples, dim=("token", "k"), by={"expert": (ids, E)})

    out = {}
    weights = bs.bootstrap_weights(ps.sizes[bs.SAMPLE], n_boot, seed) if n_boot > 0 else None
    for suffix, sums in (("", ps), ("_by_position", ps_pos), ("_by_expert", ps_exp)):
        total = sums.sum(bs.SAMPLE)
        out[f"drop_rate{suffix}"] = safe_ratio(total["dropped"], total["slots"])
        out[f"dropped{suffix}"] = total["dropped"]
        out[f"slots{suffix}"] = total["slots"]
        if n_boot > 0:
            lo, hi = bs.ratio_interval(sums["dropped"], sums["slots"], weights, ci=ci)
            bs.add_interval(out, f"drop_rate{suffix}", lo, hi, ci=ci, n_boot=n_boot)

    result = xr.Dataset(out).assign_coords(
        position_start=("position_bin", edges[:-1]), position_end=("position_bin", edges[1:]))
    return finalise(
        result, routing, name=NAME, outputs=OUTPUTS,
        definition="share of written routing slots (capacity_dropped >= 0, expert id >= 0) that expert capacity "
        "dropped (capacity_dropped = 1: the router chose the expert but it was full, so the token skipped the "
        "layer's experts); per (checkpoint, layer), per bucket of the token position inside its sample, and per "
        "expert the router chose (dropped over slots that chose it). For top-1 routing a slot is a token. "
        f"Intervals: {100 * ci:g} % percentile bootstrap over samples ({n_boot} replicates), numerator and "
        "denominator resampled together.",
        normalisation="dropped slots / written slots of the same group",
        chance="0: under perfectly balanced routing with capacity factor >= 1 no expert exceeds its capacity, "
        "so no slot is dropped; any drop measures imbalance within a sequence",
        params={"position_bins": position_bins, "n_boot": n_boot, "ci": float(ci), "seed": int(seed)},
    )


def table(result: xr.Dataset) -> pd.DataFrame:
    """Rows (checkpoint, layer, position_bin): drop rate and counts per position bucket, pooled rate alongside."""
    cols = [c for c in ("drop_rate_by_position", "drop_rate_by_position_lo", "drop_rate_by_position_hi",
                        "dropped_by_position", "slots_by_position") if c in result]
    df = tidy(result, cols)
    pooled = tidy(result, [c for c in ("drop_rate", "drop_rate_lo", "drop_rate_hi") if c in result])
    return df.merge(pooled.drop(columns=["step"]), on=["checkpoint", "layer"], how="left")


def summary(result: xr.Dataset) -> dict:
    """Drop rate pooled over layers at the final checkpoint, its worst layer, and the late/early position ratio."""
    order = np.argsort(result["step"].values, kind="stable")
    last = int(order[-1])
    r = result.isel(checkpoint=last).compute()
    dropped, slots = r["dropped"], r["slots"]
    rate = r["drop_rate"]
    worst = int(np.nanargmax(rate.values)) if np.isfinite(rate.values).any() else None
    by_pos = r["drop_rate_by_position"].values
    out = {
        "last_checkpoint": str(result["checkpoint"].values[last]),
        "drop_rate_last": json_number(dropped.sum() / slots.sum()) if int(slots.sum()) else None,
        "worst_layer": int(r["layer"].values[worst]) if worst is not None else None,
        "worst_layer_drop_rate": json_number(rate.values[worst]) if worst is not None else None,
    }
    with np.errstate(all="ignore"):
        out["first_bucket_drop_rate"] = json_number(np.nanmean(by_pos[:, 0])) if np.isfinite(by_pos[:, 0]).any() \
            else None
        out["last_bucket_drop_rate"] = json_number(np.nanmean(by_pos[:, -1])) if np.isfinite(by_pos[:, -1]).any() \
            else None
    return out


ANALYSIS = register(
    Analysis(
        name=NAME,
        func=capacity,
        figure=figure_hook(NAME),
        title="Capacity drops by layer, position and expert",
        caption=(
            "Share of routing slots that expert capacity dropped (the router chose an expert that was already "
            "full for this sequence, so the token skipped the layer's experts). Left: drop rate per MoE layer, "
            "one line per checkpoint. Middle: drop rate by bucket of the token position inside its sample, one "
            "line per layer at the final checkpoint; drops rise with position because capacity is filled in "
            "position order. Right: drop rate by the expert the router chose (final checkpoint, layers as rows); "
            "popular experts drop most. Bands / whiskers: 95 % bootstrap intervals over samples. Chance (dashed) "
            "is 0: perfectly balanced routing with capacity factor >= 1 drops nothing."
        ),
        requires=("expert_ids", "capacity_dropped"),
        outputs=OUTPUTS,
        table=table, summary=summary,
    )
)
