"""Accounting of the routing slots that expert capacity dropped (Switch Transformers).

A capacity-limited router serves the tokens of a sequence in position order
until an expert has taken ``expert_capacity`` of them; later tokens sent to that
expert are dropped: no expert runs for them and the layer passes them through
its residual. The capture records the router's choice in ``expert_ids``, weight
0 in ``expert_weights`` and 1 in ``capacity_dropped`` (see ``storage.schema``).
Because drops follow position order, they concentrate late in long sequences and
on popular experts: this module counts them by layer, position and expert.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

__all__ = ["drop_accounting"]


def drop_accounting(routing: xr.Dataset) -> xr.Dataset:
    """Dropped routing slots by layer and position, and by layer and chosen expert.

    Parameters
    ----------
    routing : routing cube with ``capacity_dropped`` (checkpoint, layer, token, k),
        ``expert_ids`` (same dims) and the ``position`` coordinate along ``token``.
        Slots not written (-1) are ignored.

    Returns
    -------
    xr.Dataset with
        ``dropped_by_position`` (checkpoint, layer, position) int64: dropped slots;
        ``slots_by_position`` (checkpoint, layer, position) int64: written slots;
        ``drop_rate_by_position`` (checkpoint, layer, position) float64: their ratio (NaN without slots);
        ``dropped_by_expert`` (checkpoint, layer, expert) int64: dropped slots per chosen expert;
        ``drop_rate`` (checkpoint, layer) float64: dropped / written slots.

    Raises
    ------
    ValueError when the cube has no ``capacity_dropped`` (its router has no capacity limit).
    """
    if "capacity_dropped" not in routing:
        raise ValueError("routing cube has no 'capacity_dropped' variable: its routers are not capacity-limited "
                         "(only Switch Transformers-style captures record drops)")
    dropped = np.asarray(routing["capacity_dropped"].values)  # (C, L, T, K)
    ids = np.asarray(routing["expert_ids"].values)
    position = np.asarray(routing["position"].values).astype(np.int64)
    written = dropped >= 0
    is_drop = dropped == 1
    C, L, T, K = dropped.shape
    P = int(position.max()) + 1 if T else 0
    E = int(routing.sizes.get("expert", int(ids.max()) + 1 if ids.size else 0))
    by_pos = np.zeros((C, L, P), dtype=np.int64)
    slots_pos = np.zeros((C, L, P), dtype=np.int64)
    by_exp = np.zeros((C, L, E), dtype=np.int64)
    for c in range(C):
        for layer in range(L):
            d = is_drop[c, layer].sum(axis=-1)
            w = written[c, layer].sum(axis=-1)
            by_pos[c, layer] = np.bincount(position, weights=d, minlength=P).astype(np.int64)
            slots_pos[c, layer] = np.bincount(position, weights=w, minlength=P).astype(np.int64)
            chosen = ids[c, layer][is_drop[c, layer]]
            by_exp[c, layer] = np.bincount(chosen.astype(np.int64), minlength=E)[:E]
    with np.errstate(invalid="ignore", divide="ignore"):
        rate_pos = np.where(slots_pos > 0, by_pos / np.maximum(slots_pos, 1), np.nan)
        total = slots_pos.sum(-1)
        rate = np.where(total > 0, by_pos.sum(-1) / np.maximum(total, 1), np.nan)
    coords = {"checkpoint": routing["checkpoint"].values, "layer": routing["layer"].values,
              "position": np.arange(P), "expert": np.arange(E)}
    out = xr.Dataset(
        {
            "dropped_by_position": (("checkpoint", "layer", "position"), by_pos),
            "slots_by_position": (("checkpoint", "layer", "position"), slots_pos),
            "drop_rate_by_position": (("checkpoint", "layer", "position"), rate_pos),
            "dropped_by_expert": (("checkpoint", "layer", "expert"), by_exp),
            "drop_rate": (("checkpoint", "layer"), rate),
        },
        coords=coords,
    )
    out.attrs["definition"] = ("routing slots dropped by expert capacity (capacity_dropped == 1) over written slots; "
                               "by token position within the sample and by the expert the router chose")
    return out
