"""Reading an aggregate-counts cube (``storage.schema.COUNT_VARIABLES``) for the analyses that accept one.

A counts cube holds, per (checkpoint, layer, domain, expert), the number of
routing slots the source counted (OLMoE's published ``expert_counts`` pickles).
There are no tokens and no samples, so usage, balance and domain lift can be
computed exactly, while everything that resamples or relabels samples
(bootstrap intervals, randomisation tests, shuffled-label floors) or reads
token ids is not available: the analyses say so in their attrs and leave
those variables out or NaN (with ``nan_where``), never invent them.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

NO_SAMPLES = (
    "not available for an aggregate-counts cube: it holds slot counts per layer × domain × expert, no samples "
    "to resample or relabel and no tokens"
)


def slot_counts(routing: xr.Dataset) -> xr.DataArray:
    """The slot counts (checkpoint, layer, domain, expert) int64.

    A cell of -1 (not recorded) would count as a negative number of slots:
    :func:`analyses.registry.checked_cube` refuses such a cube where the analysis
    opens it, naming the cell.
    """
    counts = routing["slot_counts"].reset_coords(drop=True).astype(np.int64)
    return counts.where(counts >= 0, 0)


def implied_tokens(counts: xr.DataArray, top_k: int) -> xr.DataArray:
    """Tokens behind ``counts`` summed over ``expert``: every token fills exactly ``top_k`` slots."""
    return (counts.sum("expert") // int(top_k)).astype(np.int64)
