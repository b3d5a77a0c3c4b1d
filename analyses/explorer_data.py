"""The numbers behind the run explorer (``report/explorer.html``), as plain JSON-ready dicts.

Pure functions over the routing cube and finished analysis cubes; the page
itself is built by :mod:`analyses.figures.explorer` and served lazily by
``moe-atlas serve`` (:mod:`moe_atlas.cmd_serve`). Nothing here draws.

What the explorer shows and where each number comes from
--------------------------------------------------------
* **Routing map** (checkpoint, layer, view, group, expert): the ``usage``
  analysis cube (value and its bootstrap interval) for the domain groups, and
  ``usage_all`` for "all domains"; per-condition groups (and every group when
  the run has no ``usage`` cube) are slot shares counted here in one pass
  over the cube, with intervals from the same bootstrap over samples
  (:func:`group_intervals`). Chance is 1/E.
* **Tokens** of one sample: top-k ids and weights per (checkpoint, layer),
  lens log-prob per (checkpoint, layer), NLL per checkpoint, and the aligned
  token of the pair's other condition (``aligned_token``).
* **Transition matrix** P(top1_t+1 = j | top1_t = i) per (checkpoint, layer):
  the ``temporal`` cube's ``transition`` when it exists, else counted here the
  same way (adjacent tokens of one sample, both written).
* **Top tokens** of each (checkpoint, layer, expert): the token strings whose
  routing slots (any of the k) most often go to the expert.

Runs with more than ``max_tokens`` tokens embed a subset of whole samples
(round robin over domains, paired samples a stratum of their own, pairs kept
together); the page says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import xarray as xr

from storage.schema import FILL_ID

ALL = "all domains"
VIEWS = ("all", "canonical", "last_canonical")
MAX_TOKENS = 6000  # embedded tokens of a standalone page (demo: ≈ 4.3 MB with BokehJS inlined; beyond it whole samples are sampled)
TOP_TOKENS = 8
N_BOOT, CI = 200, 0.95  # intervals computed here (groups the usage cube lacks): as the usage analysis' defaults
MAX_BOOT_SAMPLES = 5000  # a group with more samples gets no interval computed here


def _round(x, digits: int = 4):
    """``x`` as nested lists with floats rounded to ``digits`` decimals, NaN/inf as None (JSON null)."""
    a = np.asarray(x, dtype=float)
    out = np.round(a, digits).astype(object)
    out[~np.isfinite(a)] = None
    return out.tolist()


def _col(routing: xr.Dataset, name: str, default, dtype=None) -> np.ndarray:
    if name in routing.coords or name in routing:
        a = np.asarray(routing[name].values)
    else:
        a = np.full(routing.sizes["token"], default)
    if dtype == "str":
        return np.asarray([str(v) for v in a], dtype=object)
    return a.astype(dtype) if dtype else a


def token_columns(routing: xr.Dataset) -> dict[str, np.ndarray]:
    """The token coordinates the explorer uses, loaded once (labels as Python ``str``)."""
    return {
        "sample": _col(routing, "sample", 0, np.int64),
        "position": _col(routing, "position", 0, np.int64),
        "token_id": _col(routing, "token_id", -1, np.int64),
        "token_text": _col(routing, "token_text", "", "str"),
        "domain": _col(routing, "domain", "", "str"),
        "condition": _col(routing, "condition", "", "str"),
        "pair": _col(routing, "pair", "", "str"),
        "canonical": _col(routing, "canonical", True, bool),
        "last_canonical": _col(routing, "last_canonical", False, bool),
        "aligned_token": _col(routing, "aligned_token", -1, np.int64),
    }


def view_masks(cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Token membership of each view of :data:`VIEWS` (as in :mod:`analyses.usage`)."""
    return {"all": np.ones(len(cols["sample"]), bool), "canonical": cols["canonical"],
            "last_canonical": cols["last_canonical"]}


def groups_of(cols: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
    """(label, token mask) of each map group: all domains, each domain, each non-empty condition."""
    out = [(ALL, np.ones(len(cols["sample"]), bool))]
    out += [(f"domain: {d}", cols["domain"] == d) for d in sorted(set(cols["domain"]))]
    out += [(f"condition: {c}", cols["condition"] == c) for c in sorted(set(cols["condition"]) - {""})]
    return out


def routing_counts(routing: xr.Dataset, cols: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """One pass over ``expert_ids``, one checkpoint at a time.

    Returns
    -------
    dict with
    ``slots`` (checkpoint, layer, view, group, expert): routing slots of the group's tokens in the view;
    ``valid`` (checkpoint, layer, view, group): written slots of those tokens;
    ``transition_count`` (checkpoint, layer, expert, expert_next): adjacent same-sample top-1 pairs;
    ``token_expert`` (checkpoint, layer, token_id, expert) as a dict {(c, l): (token_id, expert) -> count}
    flattened to ``pair_keys``/``pair_counts`` per (c, l).
    """
    cols = cols if cols is not None else token_columns(routing)
    E = int(routing.attrs.get("num_experts", routing.sizes.get("expert", 0)))
    C, L = routing.sizes["checkpoint"], routing.sizes["layer"]
    views = view_masks(cols)
    groups = groups_of(cols)
    V, G = len(VIEWS), len(groups)
    # token class = (view membership pattern is not a partition): count per (view, group) by bincount on group id
    slots = np.zeros((C, L, V, G, E))
    valid = np.zeros((C, L, V, G))
    trans = np.zeros((C, L, E, E))
    same = cols["sample"][1:] == cols["sample"][:-1]
    tok = np.maximum(cols["token_id"], 0)
    n_tok = int(tok.max()) + 1 if tok.size else 1
    top = {}
    for c in range(C):
        ids = np.asarray(routing["expert_ids"].isel(checkpoint=c).values).astype(np.int64)  # (layer, token, k)
        ok = (ids >= 0) & (ids < E)
        for vi, v in enumerate(VIEWS):
            for gi, (_, gmask) in enumerate(groups):
                m = views[v] & gmask
                sel, good = ids[:, m], ok[:, m]
                valid[c, :, vi, gi] = good.sum(axis=(1, 2))
                for li in range(L):
                    slots[c, li, vi, gi] = np.bincount(sel[li][good[li]], minlength=E)[:E]
        for li in range(L):
            t1 = ids[li, :, 0]
            both = same & (t1[:-1] >= 0) & (t1[1:] >= 0) & (t1[:-1] < E) & (t1[1:] < E)
            trans[c, li] = np.bincount(t1[:-1][both] * E + t1[1:][both], minlength=E * E)[: E * E].reshape(E, E)
            flat = (tok[:, None] * E + ids[li]).ravel()[ok[li].ravel()]
            top[c, li] = np.bincount(flat, minlength=n_tok * E).reshape(n_tok, E)
    return {"slots": slots, "valid": valid, "transition_count": trans, "token_expert": top,
            "groups": [g for g, _ in groups]}


def top_tokens(counts: np.ndarray, text_of: dict[int, str], n: int = TOP_TOKENS) -> list[list[list]]:
    """Per expert, the ``n`` token ids with most slots: ``[[text, count], ...]`` per expert (ties: lower id)."""
    out = []
    for e in range(counts.shape[1]):
        col = counts[:, e]
        order = np.lexsort((np.arange(col.size), -col))[:n]
        out.append([[text_of.get(int(t), f"#{t}"), int(col[t])] for t in order if col[t] > 0])
    return out


def choose_samples(cols: dict[str, np.ndarray], max_tokens: int = MAX_TOKENS) -> tuple[list[int], bool]:
    """Whole samples to embed: all when the run has ≤ ``max_tokens`` tokens, else a round robin over strata.

    A stratum is a domain, with its paired samples a stratum of their own (so a
    sampled page still shows pairs side by side). A chosen sample brings its
    pair partner (same ``pair``, other condition).
    Returns (sample ids in cube order, whether a subset was taken).
    """
    samples, first, length = np.unique(cols["sample"], return_index=True, return_counts=True)
    order = np.argsort(first, kind="stable")
    samples, first, length = samples[order], first[order], length[order]
    if length.sum() <= max_tokens:
        return [int(s) for s in samples], False
    dom = cols["domain"][first]
    pair = cols["pair"][first]
    by_pair: dict[str, list[int]] = {}
    for i, p in enumerate(pair):
        if p:
            by_pair.setdefault(p, []).append(i)
    stratum = [(d, bool(p)) for d, p in zip(dom, pair)]
    queues = {k: [i for i in range(len(samples)) if stratum[i] == k] for k in dict.fromkeys(stratum)}
    chosen: set[int] = set()
    budget = max_tokens
    while budget > 0 and any(queues.values()):
        for d in list(queues):
            while queues[d] and queues[d][0] in chosen:
                queues[d].pop(0)
            if not queues[d]:
                continue
            i = queues[d].pop(0)
            group = by_pair.get(pair[i], [i]) if pair[i] else [i]
            cost = int(length[group].sum())
            if cost <= budget or not chosen:
                chosen.update(group)
                budget -= cost
    return [int(samples[i]) for i in sorted(chosen)], True


def sample_index(cols: dict[str, np.ndarray]) -> list[dict]:
    """One entry per sample: id, domain, condition, pair, tokens, partner sample (-1 when unpaired)."""
    samples, first, length = np.unique(cols["sample"], return_index=True, return_counts=True)
    order = np.argsort(first, kind="stable")
    out = []
    key = {}
    for s, f, n in zip(samples[order], first[order], length[order]):
        entry = {"sample": int(s), "domain": cols["domain"][f], "condition": cols["condition"][f],
                 "pair": cols["pair"][f], "tokens": int(n), "partner": -1}
        if entry["pair"]:
            key.setdefault(entry["pair"], []).append(entry)
        out.append(entry)
    for members in key.values():
        if len(members) == 2:
            members[0]["partner"], members[1]["partner"] = members[1]["sample"], members[0]["sample"]
    return out


def sample_record(routing: xr.Dataset, sample: int, cols: dict[str, np.ndarray] | None = None) -> dict:
    """Everything the token views show of one sample.

    Returns
    -------
    dict: ``sample``, ``domain``, ``condition``, ``pair``, ``text`` (token strings), ``position``,
    ``ids`` and ``weights`` as nested lists (checkpoint, layer, token, k) (weights None when not captured),
    ``lens`` (checkpoint, layer, token) or None, ``nll`` (checkpoint, token) or None,
    ``aligned`` (token): (partner sample, index of the aligned token in it) or None.
    """
    cols = cols if cols is not None else token_columns(routing)
    idx = np.flatnonzero(cols["sample"] == sample)
    if not idx.size:
        raise KeyError(f"sample {sample} is not in the routing cube")
    sub = routing.isel(token=idx)
    ids = np.asarray(sub["expert_ids"].values).astype(int)
    rec = {
        "sample": int(sample), "domain": cols["domain"][idx[0]], "condition": cols["condition"][idx[0]],
        "pair": cols["pair"][idx[0]], "text": [str(t) for t in cols["token_text"][idx]],
        "position": [int(p) for p in cols["position"][idx]],
        "ids": ids.tolist(),
        "weights": _round(np.asarray(sub["expert_weights"].values), 2) if "expert_weights" in sub else None,
        "lens": _round(np.asarray(sub["lens_logprob"].values), 2) if "lens_logprob" in sub else None,
        "nll": _round(np.asarray(sub["nll"].values), 3) if "nll" in sub else None,
    }
    aligned = cols["aligned_token"][idx]
    out = []
    for a in aligned:
        if a < 0:
            out.append(None)
            continue
        partner = int(cols["sample"][a])
        start = int(np.flatnonzero(cols["sample"] == partner)[0])
        out.append([partner, int(a) - start])
    rec["aligned"] = out
    return rec


def group_intervals(routing: xr.Dataset, cols: dict[str, np.ndarray], groups: Sequence[tuple[str, np.ndarray]], *,
                    n_boot: int = N_BOOT, ci: float = CI, seed: int = 0,
                    max_samples: int = MAX_BOOT_SAMPLES) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap interval of each group's usage share, resampling the group's samples (not tokens).

    The scheme of the ``usage`` analysis (:mod:`analyses.bootstrap`): per-sample slot counts, ``n_boot``
    replicates of the group's samples drawn with replacement (the same draws at every checkpoint, layer
    and view), the share Σ slots / Σ written slots per replicate, its percentile interval.

    Parameters
    ----------
    routing : the routing cube (checkpoint, layer, token, k).
    cols : :func:`token_columns` of it.
    groups : (label, token mask) pairs, as from :func:`groups_of`.
    max_samples : groups with more samples get no interval (NaN): the explorer stays cheap on big runs.

    Returns
    -------
    (lo, hi), each (checkpoint, layer, view, group, expert) float; NaN where not computed or undefined.
    """
    from .bootstrap import bootstrap_weights, ratio_interval

    E = int(routing.attrs.get("num_experts", routing.sizes.get("expert", 0)))
    C, L = routing.sizes["checkpoint"], routing.sizes["layer"]
    views = view_masks(cols)
    lo = np.full((C, L, len(VIEWS), len(groups), E), np.nan)
    hi = lo.copy()
    plan = []
    for gi, (_, gmask) in enumerate(groups):
        samples, code = np.unique(cols["sample"][gmask], return_inverse=True)
        if 0 < len(samples) <= max_samples:
            plan.append((gi, gmask, code, len(samples), bootstrap_weights(len(samples), n_boot, seed)))
    for c in range(C if plan else 0):
        ids_c = np.asarray(routing["expert_ids"].isel(checkpoint=c).values).astype(np.int64)  # (layer, token, k)
        for gi, gmask, code, S, w in plan:
            for vi, v in enumerate(VIEWS):
                m = views[v][gmask]
                ids = ids_c[:, gmask][:, m]
                good = (ids >= 0) & (ids < E)
                s_of = np.broadcast_to(code[m][:, None], ids.shape[1:])
                num = np.stack([np.bincount(s_of[good[li]] * E + ids[li][good[li]], minlength=S * E).reshape(S, E)
                                for li in range(L)])
                r_lo, r_hi = ratio_interval(xr.DataArray(num, dims=("layer", "sample", "expert")),
                                            xr.DataArray(num.sum(-1), dims=("layer", "sample")), w, ci=ci)
                lo[c, :, vi, gi] = r_lo.transpose("layer", "expert").values
                hi[c, :, vi, gi] = r_hi.transpose("layer", "expert").values
    return lo, hi


def _usage_from_cube(usage: xr.Dataset, groups: Sequence[str], views: Sequence[str], fallback: dict) -> dict:
    """value/lo/hi (checkpoint, layer, view, group, expert) with the usage cube's numbers where it has them."""
    value = fallback["value"].copy()
    lo = np.full_like(value, np.nan)
    hi = np.full_like(value, np.nan)
    doms = [str(d) for d in usage["domain"].values] if "domain" in usage.dims else []
    uviews = [str(v) for v in usage["view"].values] if "view" in usage.dims else []
    for vi, v in enumerate(views):
        if v not in uviews:
            continue
        for gi, g in enumerate(groups):
            if g == ALL and "usage_all" in usage:
                src = usage.sel(view=v)
                names = ("usage_all", "usage_all_lo", "usage_all_hi")
            elif g.startswith("domain: ") and g[8:] in doms and "usage" in usage:
                src = usage.sel(view=v, domain=g[8:])
                names = ("usage", "usage_lo", "usage_hi")
            else:
                continue
            for arr, name in zip((value, lo, hi), names):
                if name in src:
                    arr[:, :, vi, gi] = np.asarray(src[name].transpose("checkpoint", "layer", "expert").values)
    return {"value": value, "lo": lo, "hi": hi}


def explorer_data(routing: xr.Dataset, *, usage: xr.Dataset | None = None, temporal: xr.Dataset | None = None,
                  max_tokens: int = MAX_TOKENS, embed: bool = True) -> dict:
    """The explorer's data: routing map, transitions, top tokens, the sample list and (``embed``) the samples.

    Parameters
    ----------
    routing : the routing cube (checkpoint, layer, token, k), complete checkpoints only.
    usage : the ``usage`` analysis cube (checkpoint, layer, view, domain, expert) or None.
    temporal : the ``temporal`` analysis cube (checkpoint, layer, expert, expert_next) or None.
    max_tokens : embed whole samples up to this many tokens (see :func:`choose_samples`).
    embed : include the sample records (False for ``moe-atlas serve``, which sends them on request).

    Returns
    -------
    JSON-ready dict; ``map`` arrays are nested lists (checkpoint, layer, view, group, expert),
    ``transition`` (checkpoint, layer, expert, expert_next), ``top_tokens`` (checkpoint, layer, expert, n).
    """
    cols = token_columns(routing)
    E = int(routing.attrs.get("num_experts", routing.sizes.get("expert", 0)))
    counts = routing_counts(routing, cols)
    groups = counts["groups"]
    with np.errstate(invalid="ignore", divide="ignore"):
        own = counts["slots"] / counts["valid"][..., None]
    chance = 1.0 / E if E else float("nan")
    if usage is not None and "checkpoint" in usage.dims:
        usage = usage.sel(checkpoint=[c for c in routing.checkpoint.values if c in usage.checkpoint.values])
        m = _usage_from_cube(usage, groups, VIEWS, {"value": own}) if usage.sizes["checkpoint"] == \
            routing.sizes["checkpoint"] else {"value": own, "lo": np.full_like(own, np.nan), "hi": np.full_like(own, np.nan)}
        map_source = ("usage analysis cube (intervals: its bootstrap over samples); condition groups counted here, "
                      f"intervals by the same bootstrap ({N_BOOT} resamples of samples, {CI:.0%})")
    else:
        m = {"value": own, "lo": np.full_like(own, np.nan), "hi": np.full_like(own, np.nan)}
        map_source = (f"counted from the routing cube (no usage analysis in this run); intervals: {N_BOOT} bootstrap "
                      f"resamples of each group's samples, {CI:.0%}")
    missing = [gi for gi in range(len(groups)) if np.isnan(m["lo"][:, :, :, gi]).all()]
    if missing:
        all_groups = groups_of(cols)
        lo, hi = group_intervals(routing, cols, [all_groups[gi] for gi in missing])
        m["lo"][:, :, :, missing], m["hi"][:, :, :, missing] = lo, hi
    with np.errstate(invalid="ignore", divide="ignore"):
        tc = counts["transition_count"]
        trans = tc / tc.sum(axis=-1, keepdims=True)
    trans_source = "counted from the routing cube"
    if temporal is not None and "transition" in temporal and list(temporal.checkpoint.values) == list(
            routing.checkpoint.values):
        trans = np.asarray(temporal["transition"].transpose("checkpoint", "layer", "expert", "expert_next").values)
        trans_source = "temporal analysis cube"
    text_of = {}
    for t, s in zip(cols["token_id"], cols["token_text"]):
        text_of.setdefault(int(t), s)
    C, L = routing.sizes["checkpoint"], routing.sizes["layer"]
    tops = [[top_tokens(counts["token_expert"][c, li], text_of) for li in range(L)] for c in range(C)]
    index = sample_index(cols)
    chosen, sampled = choose_samples(cols, max_tokens)
    total = len(cols["sample"])
    data = {
        "checkpoints": [str(c) for c in routing.checkpoint.values],
        "steps": [int(s) for s in routing["step"].values] if "step" in routing.coords else list(range(C)),
        "layers": [int(x) for x in routing.layer.values],
        "num_experts": E, "top_k": int(routing.attrs.get("top_k", routing.sizes.get("k", 1))),
        "views": list(VIEWS), "groups": groups, "chance": chance,
        "map": {k: _round(v) for k, v in m.items()}, "map_source": map_source,
        "transition": _round(trans), "transition_source": trans_source,
        "top_tokens": tops,
        "samples_index": [e for e in index if e["sample"] in set(chosen)] if embed else index,
        "tokens_total": total, "samples_total": len(index),
        "sampled": bool(sampled and embed),
        "tokens_embedded": int(sum(e["tokens"] for e in index if e["sample"] in set(chosen))) if embed else 0,
        "samples": {},
    }
    if embed:
        data["samples"] = {str(s): sample_record(routing, s, cols) for s in chosen}
    return data


__all__ = ["ALL", "MAX_TOKENS", "VIEWS", "choose_samples", "explorer_data", "group_intervals", "groups_of",
           "routing_counts", "sample_index", "sample_record", "token_columns", "top_tokens", "view_masks"]

# the fill id is never an expert
assert FILL_ID < 0
