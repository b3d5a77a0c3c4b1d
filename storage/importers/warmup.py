"""Warm-up and dummy batches in serving logs: detect them so that imports can leave them out.

Serving engines run profiling batches before (and between) real requests: up
to a few thousand tokens of dummy input (all token id 0) whose routing never
changes, or fake routing with weights of exactly 1/k. Logged routing is full
of them (44–87 % of the rows of one public vLLM log) and they make one expert
look an order of magnitude over chance. Three signatures, each over a *run* of
at least ``min_run`` consecutive tokens along the trace (runs may span
samples: engines log a dummy batch as one request or as many):

``constant_routing``
    the same top-k expert *set* at every MoE layer for every token of the run
    and, where weights are logged, the same weights (float32 equality within
    1e-6). Real text never routes ``min_run`` tokens identically at every
    layer; identical input tokens do (causal attention over identical tokens
    gives identical hidden states), which is what a dummy batch is. Not
    applied when k >= E (every token then selects every expert).
``uniform_weights``
    every weight of every slot at every layer equals 1/k (k >= 2; with k = 1
    a renormalised weight is always 1).
``zero_token_ids``
    the token ids are known and all 0.

With several checkpoints (one cube, identical tokens), a token is a warm-up
token only if every checkpoint flags it (``zero_token_ids`` is the same for
all), so a router that collapses at one early checkpoint does not delete
tokens from the others.

:func:`detect` works on the spooled data of :class:`._core.Collector` layer by
layer, so memory stays bounded by one layer of ids. Imports exclude what it
finds unless ``keep_warmup = true``; either way the cube's attrs
``warmup_excluded`` say how many tokens, where, and why (the report lists it).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

DEFAULT_MIN_RUN = 32
MAX_LISTED_RUNS = 10


@dataclass
class Warmup:
    """What :func:`detect` found.

    mask : (tokens,) bool, True for a warm-up token (None when nothing was checked).
    runs : [first_token, last_token (inclusive), criteria] per flagged run, in token order.
    """

    mask: np.ndarray | None
    runs: list[tuple[int, int, list[str]]] = field(default_factory=list)
    min_run: int = DEFAULT_MIN_RUN

    @property
    def n_flagged(self) -> int:
        return 0 if self.mask is None else int(self.mask.sum())

    def describe(self, metas: Sequence, *, kept: bool) -> str:
        """JSON for the cube's ``warmup_excluded`` attr ('' when nothing was flagged)."""
        if not self.n_flagged:
            return ""
        starts = np.cumsum([0] + [m.n for m in metas])
        sample_of = lambda t: metas[int(np.searchsorted(starts, t, side="right")) - 1].key  # noqa: E731
        runs = [{"first_token": a, "last_token": b, "tokens": b - a + 1, "criteria": crit,
                 "first_sample": str(sample_of(a)), "last_sample": str(sample_of(b))}
                for a, b, crit in self.runs[:MAX_LISTED_RUNS]]
        whole = [m.key for m, s in zip(metas, starts[:-1]) if m.n and self.mask[s:s + m.n].all()]
        return json.dumps({
            "tokens": self.n_flagged,
            "of_tokens": int(self.mask.size),
            "share": round(self.n_flagged / max(self.mask.size, 1), 4),
            "excluded": not kept,
            "note": ("detected and KEPT (keep_warmup = true)" if kept else
                     "excluded from the cube (set [trace.options] keep_warmup = true to keep them)"),
            "whole_samples": len(whole),
            "runs": len(self.runs),
            "first_runs": runs,
            "min_run": self.min_run,
            "criteria": "constant_routing: same top-k set (and weights) at every layer; uniform_weights: every "
                        "weight 1/k; zero_token_ids: token id 0",
        })


def _runs(flag: np.ndarray, min_run: int) -> list[tuple[int, int]]:
    """[(first, last)] inclusive index ranges of the runs of True in ``flag`` at least ``min_run`` long."""
    if not flag.size:
        return []
    f = np.r_[False, flag, False].astype(np.int8)
    edges = np.flatnonzero(np.diff(f))
    starts, stops = edges[0::2], edges[1::2]
    keep = (stops - starts) >= min_run
    return [(int(a), int(b) - 1) for a, b in zip(starts[keep], stops[keep])]


def _run_mask(flag: np.ndarray, min_run: int) -> np.ndarray:
    out = np.zeros(flag.shape, dtype=bool)
    for a, b in _runs(flag, min_run):
        out[a:b + 1] = True
    return out


def _checkpoint_flags(collector, min_run: int, num_experts: int | None) -> dict[str, np.ndarray]:
    """Per-criterion token masks (runs already applied) of one checkpoint's spooled routing."""
    T, k = collector.n_tokens, collector.k
    variables = collector.variables or ()
    out = {}
    if "expert_ids" not in variables or not T or k is None:
        return out
    E = num_experts or collector.num_experts or (collector.max_id + 1)
    has_w = "expert_weights" in variables
    same = np.ones(T, dtype=bool) if k < E else None  # same[t]: token t routes like token t-1 at every layer
    uniform = np.ones(T, dtype=bool) if (has_w and k >= 2) else None
    if same is not None:
        same[0] = False
    for layer in collector.layers:
        if same is not None:
            ids = np.sort(np.asarray(collector.read("expert_ids", layer)), axis=1)
            # rows of -1 (a token the source has no routing for here) are unwritten, not a routing
            same[1:] &= (ids[1:] == ids[:-1]).all(axis=1) & (ids[1:, 0] >= 0)
            del ids
        if has_w:
            w = np.asarray(collector.read("expert_weights", layer), dtype=np.float32)
            if same is not None:
                # weights sit in slot order (by weight), so equal sets route equal weights slot by slot
                same[1:] &= (np.abs(w[1:] - w[:-1]) <= 1e-6).all(axis=1)
            if uniform is not None:
                uniform &= (np.abs(w - 1.0 / k) <= 1e-6).all(axis=1)
            del w
    if same is not None:
        # a run of n identical tokens shows as n - 1 'same as previous' flags: include the run's first token
        flag = same.copy()
        flag[:-1] |= same[1:]
        out["constant_routing"] = _run_mask(flag, min_run)
    if uniform is not None:
        out["uniform_weights"] = _run_mask(uniform, min_run)
    return out


def detect(collectors: Sequence, *, min_run: int = DEFAULT_MIN_RUN, num_experts: int | None = None) -> Warmup:
    """Warm-up / dummy tokens of one cube's collectors (one per checkpoint, identical tokens).

    Parameters
    ----------
    collectors : :class:`._core.Collector` after ``feed``, one per checkpoint.
    min_run : shortest run of consecutive tokens that counts as a warm-up batch.
    num_experts : E when known (the constant-routing test is off when k >= E).

    Returns
    -------
    :class:`Warmup` with the (tokens,) mask and the flagged runs.
    """
    min_run = int(min_run)
    if min_run < 2:
        raise ValueError(f"warmup_min_run={min_run}; expected >= 2 (a single token is no batch)")
    collectors = [c for c in collectors if c is not None]
    if not collectors:
        return Warmup(mask=None, min_run=min_run)
    T = collectors[0].n_tokens
    if any(c.n_tokens != T for c in collectors):
        return Warmup(mask=None, min_run=min_run)  # checkpoints see different tokens: write_cube refuses them
    per_ckpt = [_checkpoint_flags(c, min_run, num_experts) for c in collectors]
    names = sorted(set().union(*per_ckpt)) if per_ckpt else []
    flags = {}
    for name in names:
        m = np.ones(T, dtype=bool)
        for f in per_ckpt:
            m &= f.get(name, np.zeros(T, dtype=bool))
        flags[name] = m
    metas = collectors[0].metas
    if any(m.token_id is not None for m in metas):
        tid = np.concatenate([np.full(m.n, -1, np.int64) if m.token_id is None else np.asarray(m.token_id, np.int64)
                              for m in metas])
        flags["zero_token_ids"] = _run_mask(tid == 0, min_run)
    mask = np.zeros(T, dtype=bool)
    for m in flags.values():
        mask |= m
    runs = [(a, b, [n for n, m in flags.items() if m[a:b + 1].any()]) for a, b in _runs(mask, 1)]
    return Warmup(mask=mask, runs=runs, min_run=min_run)


def drop_tokens(tokens, keep_idx: np.ndarray):
    """The token table restricted to rows ``keep_idx`` (sorted), renumbered: token 0.., samples 0.. in order.

    A sample whose tokens are all dropped disappears; one partly dropped keeps
    its remaining tokens with their original ``position``.
    """
    import pandas as pd

    out = tokens.isel(token=np.asarray(keep_idx, dtype=np.int64))
    codes, _ = pd.factorize(np.asarray(out["sample"].values))
    return out.assign_coords(
        token=("token", np.arange(out.sizes["token"], dtype=np.int64)),
        sample=("token", codes.astype(np.int32), out["sample"].attrs),
    )
