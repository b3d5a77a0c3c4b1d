"""Router confidence: how peaked the routing distribution is, per layer and domain.

Per token: the entropy of the router's probabilities over all E experts
(normalised by ln E; needs ``router_logits``), the entropy of the k weights the
experts receive (renormalised, normalised by ln k), the top-1 − top-2 weight
margin, and the selection boundary s_(k) − s_(k+1) on the raw router logits
(needs ``router_logits``). Each is averaged over the tokens of a (checkpoint,
layer, domain) group, with a bootstrap interval over samples.

Not per token: the *marginal* entropy, the entropy of the usage distribution
itself (share of routing slots per expert) normalised by ln E. A layer can have
confident tokens (low per-token entropy) and still use every expert equally
(marginal entropy 1); the two are reported side by side and labelled apart.

Histograms of the per-token entropies (``*_hist``, dim ``bin``) show the
shape behind the means.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import xarray as xr

from . import bootstrap as bs
from .figures import hook as figure_hook
from .outputs import Output
from .registry import (
    Analysis, cube_sizes, finalise, json_number, over_slots, register, safe_ratio, tidy, token_var, view_ids,
    view_mask
)

NAME = "confidence"
METRICS = ("entropy", "topk_entropy", "margin", "boundary", "marginal_entropy")
HISTOGRAMS = ("entropy", "topk_entropy")


def _xlogx(p: xr.DataArray, logp: xr.DataArray) -> xr.DataArray:
    # 0·log 0 = 0: masked experts (logit −inf) must not turn the sum into NaN
    return p * logp.where(p > 0, 0.0)


def is_sigmoid_router(routing: xr.Dataset) -> bool:
    """True when the cube's ``router_semantics`` says the router scores with a sigmoid."""
    return "sigmoid" in str(routing.attrs.get("router_semantics", "")).lower()


def token_entropy(logits: xr.DataArray, *, sigmoid: bool = False) -> xr.DataArray:
    """Entropy (nats) of the router distribution p per token.

    Parameters
    ----------
    logits : (..., expert), any float dtype; computed in float32.
    sigmoid : p = σ(x) / Σ σ(x) instead of softmax(x).

    Returns
    -------
    (...) float32; NaN where any logit is NaN (unwritten).
    """
    x = logits.astype(np.float32)
    if sigmoid:
        s = 1.0 / (1.0 + np.exp(-x))
        p = s / s.sum("expert", skipna=False)
        logp = np.log(p)
    else:
        # skipna=False: unwritten (NaN) logits must give NaN, not log(0)
        z = x - x.max("expert", skipna=False)
        logp = z - np.log(np.exp(z).sum("expert", skipna=False))
        p = np.exp(logp)
    h = -_xlogx(p, logp).sum("expert", skipna=False)
    return h.where(x.notnull().all("expert"))


def router_probabilities(logits: xr.DataArray, *, sigmoid: bool = False) -> xr.DataArray:
    """The router's probabilities over all experts, (..., expert) float32.

    Softmax of the logits, or for sigmoid routers the sigmoid scores
    renormalised to sum 1. NaN where any logit of the token is NaN.
    """
    x = logits.astype(np.float32)
    if sigmoid:
        s = 1.0 / (1.0 + np.exp(-x))
        return s / s.sum("expert", skipna=False)
    z = np.exp(x - x.max("expert", skipna=False))
    return z / z.sum("expert", skipna=False)


def _boundary(x: np.ndarray, k: int) -> np.ndarray:
    E = x.shape[-1]
    part = np.partition(x, (E - k - 1, E - k), axis=-1)
    gap = part[..., E - k] - part[..., E - k - 1]  # k-th largest − (k+1)-th largest
    bad = np.isnan(x).any(-1) | ~np.isfinite(gap)
    return np.where(bad, np.nan, gap).astype(np.float32)


def selection_boundary(logits: xr.DataArray, k: int) -> xr.DataArray:
    """s_(k) − s_(k+1) per token on the raw logits: the gap at the top-k cut.

    Parameters
    ----------
    logits : (..., expert) raw router logits (before softmax / sigmoid).
    k : experts selected per token (needs k < E).

    Returns
    -------
    (...) float32 in logit units (for a softmax router, ln p_(k) / p_(k+1));
    NaN where a logit is NaN or the gap is not finite (masked experts).
    """
    E = logits.sizes["expert"]
    if not 1 <= k < E:
        raise ValueError(f"selection_boundary: k={k} with {E} experts; needs 1 <= k < E")
    if logits.chunks is not None:
        logits = logits.chunk({"expert": -1})
    return xr.apply_ufunc(
        _boundary, logits.astype(np.float32), kwargs={"k": int(k)}, input_core_dims=[["expert"]],
        dask="parallelized", output_dtypes=[np.float32],
    )


def marginal_entropy(count: xr.DataArray, dim: str = "expert") -> xr.DataArray:
    """H(u) / ln E of the usage distribution u = count / Σ count over ``dim`` (NaN when Σ count = 0)."""
    E = count.sizes[dim]
    u = safe_ratio(count, count.sum(dim))
    h = -(u * np.log(u.where(u > 0, 1.0))).sum(dim, skipna=False)
    return h / math.log(E) if E > 1 else h * np.nan


def _hist_codes(v: xr.DataArray, n_bins: int) -> xr.DataArray:
    # [0, 1] in n_bins equal bins, 1.0 in the last; NaN (undefined) -> -1 = no bin
    code = np.floor(v.clip(0.0, 1.0) * n_bins).clip(max=n_bins - 1)
    return code.fillna(-1).astype(np.int64)


_METRIC_INFO = {  # per-token metric -> long_name, units, description (templates: see OUTPUTS)
    "entropy": ("per-token router entropy", "fraction of ln E",
                "mean over tokens of H(p)/ln E, p = router probabilities over all experts ({probabilities})"),
    "topk_entropy": ("per-token top-k weight entropy", "fraction of ln k",
                     "mean over tokens of H(w/Σw)/ln k over the k weights the experts receive"),
    "margin": ("top-1 − top-2 weight margin", "weight (as received by the experts)",
               "mean over tokens of w_1 − w_2, the received weights of the first two slots"),
    "boundary": ("selection boundary s_(k) − s_(k+1)", "logit",
                 "mean over tokens of the gap between the k-th and (k+1)-th largest raw router logits (before "
                 "softmax/sigmoid; for a softmax router = ln p_(k)/p_(k+1)); selection biases not in the logits are "
                 "not included"),
}
_MARGINAL = ("marginal entropy of expert usage", "fraction of ln E",
             "H(u)/ln E of the group's usage distribution u (share of routing slots per expert) — the entropy of "
             "the average routing, not a per-token entropy")
OUTPUTS = {
    "tokens": Output("routed tokens", "tokens", "tokens of the group with at least one valid slot"),
    **{name: Output(long_name, units, desc, nan_where="{metric_nan}")
       for name, (long_name, units, desc) in _METRIC_INFO.items()},
    **{f"{name}_all": Output(f"{long_name} (all domains)", units, desc + ", every domain pooled",
                             nan_where="{metric_nan}")
       for name, (long_name, units, desc) in _METRIC_INFO.items()},
    "marginal_entropy": Output(*_MARGINAL, chance=1.0, nan_where="no routed token in the group"),
    "marginal_entropy_all": Output(f"{_MARGINAL[0]} (all domains)", _MARGINAL[1], _MARGINAL[2] + ", every domain "
                                   "pooled", chance=1.0, nan_where="no routed token in the group"),
    **{f"{name}_hist": Output(f"histogram of {long_name}", "share of tokens",
                              f"share of the tokens (domains pooled) whose {long_name} ({units}) lies in the bin",
                              nan_where="no token has the metric defined at this checkpoint and layer")
       for name, (long_name, units, _) in _METRIC_INFO.items() if name in HISTOGRAMS},
}


def confidence(
    routing: xr.Dataset,
    *,
    view: str = "all", hist_bins: int = 20,
    n_boot: int = 200, ci: float = 0.95, seed: int = 0,
) -> xr.Dataset:
    """Per-token and marginal router confidence per (checkpoint, layer, domain), with bootstrap CIs.

    Parameters
    ----------
    routing : routing cube; uses ``expert_ids`` and ``expert_weights``
        (checkpoint, layer, token, k) and, when present, ``router_logits``
        (checkpoint, layer, token, expert).
    view : token view averaged over (``all``, ``canonical``, ``last_canonical``).
    hist_bins : bins of the entropy histograms over [0, 1].
    n_boot, ci, seed : bootstrap over samples (resampled within each domain);
        ``n_boot=0`` leaves the interval variables out.

    Returns
    -------
    xr.Dataset with dims (checkpoint, layer, domain) for
        entropy           mean_t H(p_t) / ln E   (only with router_logits)
        topk_entropy      mean_t H(w̃_t) / ln k  (w̃ = received weights renormalised)
        margin            mean_t (w_t,1 − w_t,2)
        boundary          mean_t (s_(k) − s_(k+1)) on raw logits (only with router_logits, k < E)
        marginal_entropy  H(usage) / ln E of the group's usage distribution (not per token)
        tokens            tokens of the group with at least one valid slot
    ``<metric>_all`` (checkpoint, layer) pooling every domain; ``<metric>_lo`` /
    ``<metric>_hi`` and ``<metric>_all_lo`` / ``_hi`` the bootstrap intervals;
    ``entropy_hist`` / ``topk_entropy_hist`` (checkpoint, layer, bin): share of
    the tokens whose normalised entropy falls in the bin (coords bin_start, bin_end).

    A token counts when it has a valid (id ≥ 0) slot; the entropy and boundary
    also need all its logits written.
    """
    E, k = cube_sizes(routing)
    n_boot, hist_bins = int(n_boot), int(hist_bins)
    if hist_bins < 1:
        raise ValueError(f"confidence: hist_bins={hist_bins}; expected >= 1")
    ids = view_ids(routing, view)
    per_token, token_ok = per_token_metrics(routing, ids, view)
    parts = {"tokens": token_ok.astype(np.int64)}
    for name, v in per_token.items():
        ok = v.notnull()
        parts[f"{name}_sum"] = v.where(ok, 0.0).astype(np.float64)
        parts[f"{name}_n"] = ok.astype(np.int64)
    samples = bs.Samples.of(routing)  # once: every token pass below shares it
    groups = bs.sample_groups(routing, "domain", samples)
    ps = bs.per_sample_sums(xr.Dataset(parts), samples, dim="token")
    ps_count = bs.per_sample_sums(xr.ones_like(ids, dtype=np.int64), samples, dim=("token", "k"),
                                  by={"expert": (ids, E)})
    sums = bs.group_sums(ps, groups)
    count = bs.group_sums(ps_count, groups).transpose(..., "domain", "expert")
    out = {"tokens": sums["tokens"]}
    for name in per_token:
        s, n = sums[f"{name}_sum"], sums[f"{name}_n"]
        out[name] = safe_ratio(s, n)
        out[f"{name}_all"] = safe_ratio(s.sum("domain"), n.sum("domain"))
    out["marginal_entropy"] = marginal_entropy(count)
    out["marginal_entropy_all"] = marginal_entropy(count.sum("domain"))
    out.update(_histograms(per_token, samples, hist_bins))
    if n_boot > 0:
        _add_intervals(out, ps, ps_count, groups, list(per_token), n_boot=n_boot, ci=ci, seed=seed)
    result = xr.Dataset(out)
    edges = np.linspace(0.0, 1.0, hist_bins + 1)
    if "bin" in result.dims:
        result = result.assign_coords(bin_start=("bin", edges[:-1]), bin_end=("bin", edges[1:]))
    return finalise(
        result, routing, name=NAME, outputs=OUTPUTS,
        context={"metric_nan": "no token of the group has the metric defined" + (" (top_k = 1)" if k < 2 else ""),
                 "probabilities": "sigmoid scores renormalised to sum 1" if is_sigmoid_router(routing)
                 else "softmax of logits"},
        definition=_DEFINITION.format(ci_percent=100 * ci, n_boot=n_boot), normalisation=_NORMALISATION,
        chance=_CHANCE,
        params={"view": view, "hist_bins": hist_bins, "n_boot": n_boot, "ci": float(ci), "seed": int(seed)},
    )


_DEFINITION = (
    "per token: H(p)/ln E (p = router probabilities over all E experts, float32), H(w/Σw)/ln k over the received "
    "top-k weights, w_1 − w_2, and s_(k) − s_(k+1) on the raw logits; each averaged over the tokens of the "
    "(checkpoint, layer, domain) group. Marginal entropy: H(u)/ln E of the group's usage distribution u (not per "
    "token). Histograms: share of tokens per bin of the normalised per-token entropies. Ids of -1 (unwritten) are "
    "excluded. Intervals: {ci_percent:g} % percentile bootstrap over samples resampled within each domain ({n_boot} "
    "replicates).")
_NORMALISATION = ("entropies divided by their maximum (ln E, ln k): 1 = uniform, 0 = one-hot; margin in units of "
                  "the received weights; boundary in logit units")
_CHANCE = ("marginal entropy: 1 under uniform random routing (slightly less for finite samples); per-token "
           "entropies have no chance level (uniform p gives 1, the maximum; uniform random routing does not fix the "
           "weights), nor do margin and boundary")


def _histograms(per_token: dict, samples, hist_bins: int) -> dict[str, xr.DataArray]:
    """``<metric>_hist`` (checkpoint, layer, bin): share of the tokens (domains pooled) per bin of [0, 1]."""
    out = {}
    for name in HISTOGRAMS:
        if name in per_token:
            codes = _hist_codes(per_token[name], hist_bins)
            hist = bs.per_sample_sums(
                xr.ones_like(codes, dtype=np.int64), samples, dim="token", by={"bin": (codes, hist_bins)}
            ).sum("sample")
            out[f"{name}_hist"] = safe_ratio(hist, hist.sum("bin"))
    return out


def per_token_metrics(routing: xr.Dataset, ids: xr.DataArray, view: str) -> tuple[dict[str, xr.DataArray], xr.DataArray]:
    """The per-token metrics of :func:`confidence` and the tokens that count.

    Parameters
    ----------
    routing : the routing cube (``expert_weights``, ``router_logits`` when present).
    ids : ``expert_ids`` (checkpoint, layer, token, k) of the view (others -1).
    view : the token view (masks the logits).

    Returns
    -------
    per_token : name -> (checkpoint, layer, token) float, NaN where undefined:
        entropy and boundary (with router_logits; boundary needs k < E), topk_entropy, margin
    token_ok : (checkpoint, layer, token) bool, a valid slot with a weight
    """
    E, k = cube_sizes(routing)
    w = token_var(routing, "expert_weights").astype(np.float32)
    slot_ok = (ids >= 0) & w.notnull()
    token_ok = over_slots(slot_ok, "any")
    per_token = {}
    if "router_logits" in routing:
        logits = token_var(routing, "router_logits")
        mask = view_mask(routing, view)
        if mask is not None:
            logits = logits.where(mask)
        per_token["entropy"] = token_entropy(logits, sigmoid=is_sigmoid_router(routing)) / math.log(E)
        if k < E:
            per_token["boundary"] = selection_boundary(logits, k)
    if k >= 2:
        wv = w.where(slot_ok, 0.0)
        total = over_slots(wv)  # wv holds no NaN: the same as a skipna sum
        q = wv / total.where(total > 0)
        hk = -over_slots(_xlogx(q, np.log(q.where(q > 0, 1.0)))) / math.log(k)
        per_token["topk_entropy"] = hk.where(token_ok & (total > 0))
        first, second = (w.isel(k=i, drop=True) for i in (0, 1))
        both = slot_ok.isel(k=0, drop=True) & slot_ok.isel(k=1, drop=True)
        per_token["margin"] = (first - second).where(both)
    else:
        # one slot: no second weight and ln k = 0, so both are undefined
        per_token["topk_entropy"] = xr.full_like(token_ok, np.nan, dtype=np.float32)
        per_token["margin"] = xr.full_like(token_ok, np.nan, dtype=np.float32)
    if "boundary" in per_token:
        per_token["boundary"] = per_token["boundary"].where(token_ok)
    return per_token, token_ok


def _add_intervals(out: dict, ps, ps_count, groups, metrics, *, n_boot: int, ci: float, seed: int) -> None:
    """Add the ``_lo`` / ``_hi`` bounds of every metric (per domain and pooled) to ``out``."""
    weights = bs.bootstrap_weights(ps.sizes["sample"], n_boot, seed, strata=groups)
    reps = bs.resample(ps, weights, groups=groups)
    for name in metrics:
        s, n = reps[f"{name}_sum"], reps[f"{name}_n"]
        for var, num, den in ((name, s, n), (f"{name}_all", s.sum("domain"), n.sum("domain"))):
            lo, hi = bs.interval(safe_ratio(num, den), ci)
            bs.add_interval(out, var, lo, hi, ci=ci, n_boot=n_boot, scheme=bs.STRATIFIED)
    creps = bs.resample(ps_count, weights, groups=groups)
    for var, c in (("marginal_entropy", creps), ("marginal_entropy_all", creps.sum("domain"))):
        lo, hi = bs.interval(marginal_entropy(c), ci)
        bs.add_interval(out, var, lo, hi, ci=ci, n_boot=n_boot, scheme=bs.STRATIFIED)


def table(result: xr.Dataset) -> pd.DataFrame:
    """Rows (checkpoint, layer, domain) plus pooled rows with domain 'all'; metrics and their bounds as columns."""
    cols = [f"{m}{suffix}" for m in METRICS for suffix in ("", "_lo", "_hi") if f"{m}{suffix}" in result]
    df = tidy(result, cols + ["tokens"])
    pooled = xr.Dataset({f"{m}{suffix}": result[f"{m}_all{suffix}"] for m in METRICS
                         for suffix in ("", "_lo", "_hi") if f"{m}{suffix}" in cols})
    pooled["tokens"] = result["tokens"].sum("domain")
    pooled = pooled.expand_dims(domain=["all"]).transpose("checkpoint", "layer", "domain")
    dfa = tidy(pooled.assign_coords(step=result["step"]), cols + ["tokens"])
    return pd.concat([df, dfa[df.columns]], ignore_index=True)


def summary(result: xr.Dataset) -> dict:
    """Mean over layers of each pooled metric at the earliest and the final checkpoint."""
    order = np.argsort(result["step"].values, kind="stable")
    first, last = int(order[0]), int(order[-1])
    out = {"first_checkpoint": str(result["checkpoint"].values[first]),
           "last_checkpoint": str(result["checkpoint"].values[last])}
    for m in METRICS:
        if f"{m}_all" in result:
            v = result[f"{m}_all"].compute()
            out[f"{m}_first"] = json_number(v.isel(checkpoint=first).mean("layer"))
            out[f"{m}_last"] = json_number(v.isel(checkpoint=last).mean("layer"))
    return out


ANALYSIS = register(
    Analysis(
        name=NAME,
        func=confidence,
        figure=figure_hook(NAME),
        title="Router confidence by layer",
        caption=(
            "How decided the routers are, per MoE layer (x). Rows: per-token router entropy H(p)/ln E over all "
            "experts (needs router logits; 1 = uniform over experts, 0 = all mass on one), entropy of the k "
            "received weights H(w̃)/ln k (1 = equal weights), the top-1 − top-2 weight margin, the selection "
            "boundary s_(k) − s_(k+1) on the raw logits (how far the last selected expert is from the first "
            "rejected one), and the marginal entropy H(usage)/ln E — the entropy of the average routing, not of "
            "single tokens: 1 when every expert gets the same share, which uniform random routing gives (dashed). "
            "Columns: all domains pooled, then each domain. One line per checkpoint, coloured by training step "
            "(colour bar), bands = 95 % bootstrap intervals over samples. Per-token entropies have no chance "
            "level (uniform probabilities give the maximum, 1). Second figure: histograms of the per-token "
            "entropies per layer."
        ),
        requires=("expert_ids", "expert_weights"),
        optional=("router_logits",),
        table=table, summary=summary,
        outputs=OUTPUTS,
    )
)
