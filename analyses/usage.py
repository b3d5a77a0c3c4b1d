"""Expert usage: which experts get the routing slots, per layer, domain, token view and position.

usage[c, l, v, d, e] = (slots of domain d's tokens in view v going to e) /
(all valid slots of those tokens) at checkpoint c, layer l. Every token fills k
slots, so the denominator is k·tokens and uniform routing gives 1/E.

Token views (dim ``view``, parameter ``views``): ``all`` every token;
``canonical`` the non-whitespace tokens (``canonical`` coordinate);
``last_canonical`` the last canonical token of each sample (one token per
sample, the view a classifier head or a next-token decision reads); and, when
an imported serving log labels both, ``prefill`` and ``decode`` (``phase``).
On an aggregate-counts cube (OLMoE's expert_counts) only view ``all`` exists
and there are no intervals.

Every number is first reduced to per-sample sums (one flox pass over the
cube); group totals and bootstrap replicates are sums over samples of those,
so the 95 % intervals (``<var>_lo`` / ``<var>_hi``) resample samples within
each domain (:mod:`analyses.bootstrap`) at no extra pass over the tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import pandas as pd
import xarray as xr

from storage.schema import PHASES, is_counts_cube, phases_present

from . import bootstrap as bs
from .figures import hook as figure_hook
from .outputs import Output, per_expert
from .registry import (
    VIEWS, Analysis, cube_sizes, finalise, json_number, over_slots, register, safe_ratio, tidy, token_var,
    view_classes, view_ids
)

NAME = "usage"


def check_views(views: Sequence[str]) -> list[str]:
    """``views`` as a list, refusing unknown or repeated names."""
    views = [views] if isinstance(views, str) else list(views)
    bad = [v for v in views if v not in VIEWS]
    if not views or bad or len(set(views)) != len(views):
        raise ValueError(f"views {views}: expected distinct names among {VIEWS}")
    return views


def ids_by_view(routing: xr.Dataset, views: Sequence[str]) -> xr.DataArray:
    """``expert_ids`` stacked over token views: (checkpoint, layer, view, token, k), tokens outside a view = -1."""
    ids = xr.concat([view_ids(routing, v) for v in views], dim="view")
    return ids.assign_coords(view=("view", np.asarray(views, dtype=object))).transpose(
        "checkpoint", "layer", "view", "token", "k"
    )


def with_phase_views(
    routing: xr.Dataset, classes: xr.DataArray, member: xr.DataArray, phase_views: Sequence[str]
) -> tuple[xr.DataArray, xr.DataArray]:
    """Token classes and view membership extended by per-phase views ('prefill', 'decode').

    Each token class of :func:`analyses.registry.view_classes` is split by the
    token's ``phase`` (unknown, then :data:`storage.schema.PHASES`): class c
    becomes c + n·p. The existing views keep every phase of their classes; a
    phase view is every class of its phase. The token pass stays one pass.

    Returns codes (token,) int8 and member (view, view_class) int64 with the
    phase views appended to ``view``.
    """
    n = member.sizes["view_class"]
    phase = np.asarray(routing["phase"].values, dtype=object)
    pcode = np.zeros(phase.shape, dtype=np.int8)
    for i, p in enumerate(PHASES, start=1):
        pcode[phase == p] = i
    codes = (np.asarray(classes.values, dtype=np.int8) + n * pcode).astype(np.int8)
    P = len(PHASES) + 1
    rows = [np.tile(np.asarray(member.values[v]), P) for v in range(member.sizes["view"])]
    for p in phase_views:
        row = np.zeros(n * P, dtype=np.int64)
        i = PHASES.index(p) + 1
        row[n * i:n * (i + 1)] = 1
        rows.append(row)
    views = [str(v) for v in member["view"].values] + list(phase_views)
    return (
        xr.DataArray(codes, dims="token"),
        xr.DataArray(np.stack(rows).astype(np.int64), dims=("view", "view_class"),
                     coords={"view": np.asarray(views, dtype=object)}),
    )


def position_buckets(routing: xr.Dataset, n_bins: int) -> tuple[xr.DataArray, np.ndarray]:
    """Bucket code per token from its ``position`` coordinate, and the bucket edges.

    Equal-width integer buckets over 0..max position (fewer than ``n_bins``
    when positions are fewer). Returns codes (token,) int64 and edges
    (n + 1,): bucket i holds positions edges[i] <= p < edges[i+1].
    """
    if n_bins < 1:
        raise ValueError(f"position_bins={n_bins}; expected >= 1")
    if "position" not in routing.coords:
        raise ValueError("routing cube: token coordinate 'position' is missing (needed by the activation timeline)")
    pos = np.asarray(routing["position"].values, dtype=np.int64)
    top = int(pos.max()) + 1 if pos.size else 1
    edges = np.unique(np.round(np.linspace(0, top, n_bins + 1)).astype(np.int64))
    codes = np.clip(np.searchsorted(edges, pos, side="right") - 1, 0, len(edges) - 2)
    return xr.DataArray(codes, dims="token"), edges


_NAN_DOMAIN = "a domain has no routed token in this view at this checkpoint and layer"
_NAN_POOLED = "no routed token in this view at this checkpoint and layer"
OUTPUTS = {
    "count": Output("routing slots", "slots",
                    "number of routing slots (token × top-k position) of the group assigned to the expert"),
    "tokens": Output("routed tokens", "tokens", "tokens of the group with at least one valid slot"),
    "usage": Output("expert usage", "share of routing slots",
                    "count / (k · tokens) of the domain and view: share of the group's routing slots going to the "
                    "expert", chance=per_expert, nan_where=_NAN_DOMAIN),
    "usage_all": Output("expert usage (all domains)", "share of routing slots",
                        "share of the view's routing slots going to the expert, every domain pooled",
                        chance=per_expert, nan_where=_NAN_POOLED),
    "usage_by_position": Output(
        "expert usage by token position", "share of routing slots",
        "share of the routing slots of tokens whose position lies in the bucket going to the expert "
        "(every token, domains pooled)", chance=per_expert,
        nan_where="no routed token in this position bucket at this checkpoint and layer"),
    "position_slots": Output("routing slots per position bucket", "slots",
                             "valid routing slots of the tokens whose position lies in the bucket"),
    "weighted_usage": Output("weighted expert usage", "share of routing weight",
                             "Σ of the weights the expert receives / Σ of all weights, within the domain and view",
                             chance=per_expert, nan_where=_NAN_DOMAIN),
    "weighted_usage_all": Output("weighted expert usage (all domains)", "share of routing weight",
                                 "Σ of the weights the expert receives / Σ of all weights, every domain pooled",
                                 chance=per_expert, nan_where=_NAN_POOLED),
}
# an aggregate-counts cube (view 'all' only): the same variables, counted by the source
COUNTS_OUTPUTS = {
    "count": replace(OUTPUTS["count"], description="number of routing slots (token × top-k position) of the "
                     "domain assigned to the expert, as the source counted them"),
    "tokens": replace(OUTPUTS["tokens"], description="slots / k: tokens of the domain implied by the counts (every "
                      "token fills k slots)"),
    "usage": replace(OUTPUTS["usage"], description="count / Σ_e count of the domain: share of the domain's routing "
                     "slots going to the expert",
                     nan_where="the domain has no counted slot at this checkpoint and layer"),
    "usage_all": replace(OUTPUTS["usage_all"], description="share of all counted routing slots going to the expert, "
                         "every domain pooled", nan_where="no counted slot at this checkpoint and layer"),
}


def usage(
    routing: xr.Dataset,
    *,
    views: Sequence[str] = VIEWS, position_bins: int = 8,
    n_boot: int = 200, ci: float = 0.95, seed: int = 0,
) -> xr.Dataset:
    """Share of routing slots per expert, by checkpoint, layer, token view and domain, with bootstrap CIs.

    Parameters
    ----------
    routing : routing cube; uses ``expert_ids`` (checkpoint, layer, token, k),
        ``expert_weights`` (same dims) when present, and the token coordinates
        ``sample``, ``domain``, ``canonical``, ``position``.
    views : token views to compute (dim ``view``), among ``all``,
        ``canonical``, ``last_canonical``. When the ``phase`` coordinate
        labels more than one inference phase, the views ``prefill`` and
        ``decode`` (the tokens of that phase) are appended.
    position_bins : number of token-position buckets of the activation timeline.
    n_boot : bootstrap replicates (resampling samples within each domain);
        0 leaves the ``_lo``/``_hi`` variables out.
    ci : level of the percentile intervals.
    seed : seed of the bootstrap draws.

    Returns
    -------
    xr.Dataset
        count (checkpoint, layer, view, domain, expert) int64 : slots going to e
        tokens (checkpoint, layer, view, domain) int64 : tokens with >= 1 valid slot
        usage (checkpoint, layer, view, domain, expert) : count / Σ_e count
        usage_all (checkpoint, layer, view, expert) : the same, every domain pooled
        weighted_usage, weighted_usage_all : Σ w(e) / Σ w (only with weights)
        usage_by_position (checkpoint, layer, position_bin, expert) : usage of
            the tokens whose position falls in the bucket (view ``all``, domains
            pooled); coordinates position_start, position_end (exclusive)
        position_slots (checkpoint, layer, position_bin) : valid slots per bucket
        <var>_lo, <var>_hi for usage, usage_all, weighted_usage(_all),
            usage_by_position : bootstrap percentile interval

    Ids of -1 (unwritten) are excluded; an id outside -1..E-1 raises ValueError
    (when the result is computed, for lazy input).
    """
    E, k = cube_sizes(routing)
    views = check_views(views)
    n_boot = int(n_boot)
    if is_counts_cube(routing):
        return _usage_from_counts(routing, E=E, k=k, views=views, position_bins=position_bins, n_boot=n_boot,
                                  ci=ci, seed=seed)
    samples = bs.Samples.of(routing)  # once: every token pass below shares it
    groups = bs.sample_groups(routing, "domain", samples)
    classes, member, phase_views = _token_classes(routing, views)
    ps, ps_tokens, ps_pos, edges = _per_sample(routing, samples, classes, member, int(position_bins))
    out = _usage_estimates(ps, ps_tokens, ps_pos, groups, member)
    if n_boot > 0:
        _add_intervals(out, ps, ps_pos, groups, member, n_boot=n_boot, ci=ci, seed=seed)
    result = xr.Dataset(out).assign_coords(
        position_start=("position_bin", edges[:-1]), position_end=("position_bin", edges[1:])
    )
    phases = (f"; per inference phase ({', '.join(phase_views)}: the tokens whose 'phase' coordinate says so), "
              "added because the cube labels more than one phase" if phase_views else "")
    return finalise(
        result, routing, name=NAME, outputs=OUTPUTS,
        definition=_DEFINITION.format(phases=phases, ci_percent=100 * ci, n_boot=n_boot),
        normalisation="share of routing slots (divide by k·tokens); sums to 1 over experts. The other common "
        "normalisation, per-token share (uniform k/E), is usage × k.",
        chance=1.0 / E,
        params={"views": views, "position_bins": int(position_bins), "n_boot": n_boot, "ci": float(ci),
                "seed": int(seed)},
    )


_ORDER = ("checkpoint", "layer", "view", "domain", "expert")
_DEFINITION = (
    "usage[c,l,v,d,e] = #slots of domain d's tokens in view v routed to expert e / #valid slots of those tokens "
    "(checkpoint c, layer l); weighted_usage uses the received weights w instead of 1; usage_by_position pools the "
    "tokens whose position lies in a bucket (view all). Views: all tokens, canonical (non-whitespace) tokens, the "
    "last canonical token of each sample{phases}. Ids of -1 (unwritten) are excluded. Intervals: {ci_percent:g} % "
    "percentile bootstrap over samples resampled within each domain ({n_boot} replicates; none when 0).")


def _token_classes(routing: xr.Dataset, views: Sequence[str]) -> tuple[xr.DataArray, xr.DataArray, list[str]]:
    """Token classes (token,) and view membership (view, view_class) of ``views`` plus the phase views, and those."""
    classes, member = view_classes(routing, views)
    present = phases_present(routing)
    phase_views = present if len(present) > 1 else []  # one phase only: its view would repeat 'all'
    if phase_views:
        classes, member = with_phase_views(routing, classes, member, phase_views)
    return classes, member, phase_views


def _per_sample(routing: xr.Dataset, samples, classes, member, position_bins: int):
    """The token passes of :func:`usage`: per-sample sums grouped by token class (and expert, position bucket).

    One pass over the tokens, grouped by token class (views are unions of classes) and
    expert: everything after is sums over samples and classes.

    Returns
    -------
    ps : Dataset count [, wsum] (checkpoint, layer, sample, view_class, expert)
    ps_tokens : (checkpoint, layer, sample, view_class) routed tokens
    ps_pos : (checkpoint, layer, sample, position_bin, expert) slots
    edges : (position_bin + 1,) the position buckets' edges
    """
    E, _ = cube_sizes(routing)
    ids_all = view_ids(routing, "all")
    parts = {"count": xr.ones_like(ids_all, dtype=np.int64)}
    if "expert_weights" in routing:
        parts["wsum"] = token_var(routing, "expert_weights").astype(np.float64).where(ids_all >= 0, 0.0)
    by_class = {"view_class": (classes, member.sizes["view_class"])}
    ps = bs.per_sample_sums(xr.Dataset(parts), samples, dim=("token", "k"), by={**by_class, "expert": (ids_all, E)})
    ps_tokens = bs.per_sample_sums(over_slots(ids_all >= 0, "any").astype(np.int64), samples, dim="token", by=by_class)
    pos_codes, edges = position_buckets(routing, position_bins)
    ps_pos = bs.per_sample_sums(
        xr.ones_like(ids_all, dtype=np.int64), samples, dim=("token", "k"),
        by={"position_bin": (pos_codes, len(edges) - 1), "expert": (ids_all, E)},
    )
    return ps, ps_tokens, ps_pos, edges


def _by_view(x: xr.DataArray, member: xr.DataArray) -> xr.DataArray:
    """Token classes combined into views: (..., view_class, ...) -> (checkpoint, layer, view, ...).

    Group sums and bootstrap replicates are linear in the per-sample sums, so the
    classes are combined only on their (small) results.
    """
    return xr.dot(member, x, dim="view_class").transpose("checkpoint", "layer", "view", ...)


def _usage_estimates(ps, ps_tokens, ps_pos, groups, member) -> dict[str, xr.DataArray]:
    """The point estimates of :func:`usage` from its per-sample sums."""
    count = _by_view(bs.group_sums(ps["count"], groups), member).transpose(*_ORDER)
    pos_count = bs.group_sums(ps_pos)
    out = {
        "count": count,
        "tokens": _by_view(bs.group_sums(ps_tokens, groups), member).transpose(*_ORDER[:-1]),
        "usage": safe_ratio(count, count.sum("expert")),
        "usage_all": safe_ratio(count.sum("domain"), count.sum(("domain", "expert"))),
        "usage_by_position": safe_ratio(pos_count, pos_count.sum("expert")),
        "position_slots": pos_count.sum("expert"),
    }
    if "wsum" in ps:
        wsum = _by_view(bs.group_sums(ps["wsum"], groups), member).transpose(*_ORDER)
        out["weighted_usage"] = safe_ratio(wsum, wsum.sum("expert"))
        out["weighted_usage_all"] = safe_ratio(wsum.sum("domain"), wsum.sum(("domain", "expert")))
    return out


def _add_intervals(out: dict, ps, ps_pos, groups, member, *, n_boot: int, ci: float, seed: int) -> None:
    """Add ``<var>_lo`` / ``<var>_hi`` of :func:`usage` to ``out``: replicates stratified by domain, pooled from the same ones."""
    weights = bs.bootstrap_weights(ps.sizes["sample"], n_boot, seed, strata=groups)
    sources = [("usage", ps["count"])] + ([("weighted_usage", ps["wsum"])] if "wsum" in ps else [])
    for name, per_sample in sources:
        reps = _by_view(bs.resample(per_sample, weights, groups=groups), member)  # (c, l, view, boot, expert, domain)
        pooled = reps.sum("domain")  # the same stratified replicates, pooled
        for var, r in ((name, reps), (f"{name}_all", pooled)):
            lo, hi = bs.interval(safe_ratio(r, r.sum("expert")), ci)
            bs.add_interval(out, var, lo, hi, ci=ci, n_boot=n_boot, scheme=bs.STRATIFIED)
    reps = bs.resample(ps_pos, weights)
    lo, hi = bs.interval(safe_ratio(reps, reps.sum("expert")), ci)
    bs.add_interval(out, "usage_by_position", lo, hi, ci=ci, n_boot=n_boot, scheme=bs.STRATIFIED)


def _usage_from_counts(routing: xr.Dataset, *, E: int, k: int, views, position_bins, n_boot, ci, seed) -> xr.Dataset:
    """:func:`usage` on an aggregate-counts cube: exact shares from the slot counts, view ``all`` only.

    Returns count, tokens (= slots / k), usage, usage_all with dims as in
    :func:`usage` (view = ['all']); no weighted usage, no position timeline
    and no intervals (attrs ``intervals`` says why).
    """
    from .counts import NO_SAMPLES, implied_tokens, slot_counts

    if list(views) != ["all"] and "all" not in views:
        raise ValueError(f"usage: views {list(views)} need per-token routing; an aggregate-counts cube has only "
                         "view 'all'")
    counts = slot_counts(routing)
    count = counts.expand_dims(view=np.asarray(["all"], dtype=object), axis=2).transpose(
        "checkpoint", "layer", "view", "domain", "expert")
    out = {
        "count": count,
        "tokens": implied_tokens(count, k),
        "usage": safe_ratio(count, count.sum("expert")),
        "usage_all": safe_ratio(count.sum("domain"), count.sum(("domain", "expert"))),
    }
    result = finalise(
        xr.Dataset(out), routing, name=NAME, outputs=COUNTS_OUTPUTS,
        definition="usage[c,l,d,e] = slots of domain d counted for expert e / all slots counted for d "
        "(checkpoint c, layer l), from an aggregate-counts cube (view 'all' only).",
        normalisation="share of routing slots; sums to 1 over experts. Per-token share (uniform k/E) is usage × k.",
        chance=1.0 / E,
        params={"views": ["all"], "position_bins": int(position_bins), "n_boot": int(n_boot), "ci": float(ci),
                "seed": int(seed)},
    )
    result.attrs["intervals"] = f"bootstrap intervals {NO_SAMPLES}"
    result.attrs["counts_only"] = 1
    return result


def _ordered_checkpoints(result: xr.Dataset) -> list[int]:
    return list(np.argsort(result["step"].values, kind="stable"))


def table(result: xr.Dataset) -> pd.DataFrame:
    """Rows (checkpoint, layer, view, domain, expert) plus pooled rows with domain 'all'."""
    per_domain = [v for v in ("count", "usage", "usage_lo", "usage_hi", "weighted_usage", "weighted_usage_lo",
                              "weighted_usage_hi") if v in result]
    df = tidy(result, per_domain)
    keys = ["checkpoint", "layer", "view", "domain"]
    tokens = result["tokens"].compute().to_dataframe().reset_index()[keys + ["tokens"]]
    df = df.merge(tokens, on=keys, how="left")
    pooled = xr.Dataset({"count": result["count"].sum("domain"), "tokens": result["tokens"].sum("domain")})
    for v in per_domain[1:]:
        pooled[v] = result[v.replace("usage", "usage_all", 1)]  # usage_lo -> usage_all_lo, weighted_usage -> ...
    pooled = pooled.expand_dims(domain=["all"]).transpose("checkpoint", "layer", "view", "domain", "expert")
    dfa = tidy(pooled.assign_coords(step=result["step"]), per_domain + ["tokens"])
    return pd.concat([df, dfa[df.columns]], ignore_index=True)


def summary(result: xr.Dataset) -> dict:
    """Headline numbers at the final checkpoint: spread of pooled usage around 1/E per view."""
    ci = _ordered_checkpoints(result)[-1]
    E = result.sizes["expert"]
    out = {"checkpoint": str(result["checkpoint"].values[ci]), "chance": 1.0 / E}
    for view in result["view"].values:
        last = result["usage_all"].isel(checkpoint=ci).sel(view=view).compute()
        cv = last.std("expert") / last.mean("expert")
        out[str(view)] = {
            "max_usage": json_number(last.max()),
            "min_usage": json_number(last.min()),
            "max_ratio_to_chance": json_number(last.max() * E),
            "mean_cv_over_experts": json_number(cv.mean()),
            "tokens": json_number(result["tokens"].isel(checkpoint=ci).sel(view=view).sum("domain").max()),
        }
    return out


ANALYSIS = register(
    Analysis(
        name=NAME,
        func=usage,
        figure=figure_hook(NAME),
        title="Expert usage by layer, domain, token view and position",
        caption=(
            "Share of each group's routing slots that go to each expert (count / (k·tokens); rows sum to 1). "
            "Heatmaps (earliest and final checkpoint, all tokens): rows are MoE layers, columns experts, one panel "
            "per domain plus all domains pooled; the diverging colour scale is centred on the uniform-routing "
            "chance level 1/E (white): red = used more than uniform, blue less. Domain heatmaps: domain × expert "
            "per layer at the final checkpoint. Utilization bars: pooled usage per expert and layer for every "
            "token view (all tokens, canonical non-whitespace tokens, the last canonical token of each sample), "
            "dashed line at 1/E, error bars = 95 % bootstrap intervals over samples (resampled within domains). "
            "Activation timeline: usage by token-position bucket (bands = bootstrap intervals)."
        ),
        requires=("expert_ids",),
        accepts_counts=True,
        optional=("expert_weights",),
        table=table, summary=summary,
        outputs=OUTPUTS,
    )
)
