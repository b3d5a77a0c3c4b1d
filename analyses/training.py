"""Training runs: router-weight diagnostics, run-vs-run routing comparison, expert load, scores, data composition.

Pure functions over xarray (no file access; ``tasks/training.py`` reads the inputs,
``analyses/figures/training.py`` draws them). Each result's variables are declared in
an ``Output`` table and stamped with :func:`analyses.outputs.apply_outputs`.

Several runs
------------
An experiment may name other experiments as further runs (``[[runs]]``). Each run
keeps its own run folder and routing cube (its pipeline is unchanged); these functions
take one input per run and return cubes with a leading ``run`` dimension. Runs are
compared on the same inputs only where their token tables agree token for token
(:func:`compare_routing` checks ``token_id``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import xarray as xr

from .outputs import Output, apply_outputs

GATE_OUTPUTS = {
    "row_norm": Output("router row norm", "1", "L2 norm of the router's weight row of each expert (the vector "
                       "whose dot product with the hidden state is the expert's logit)"),
    "mean_row_norm": Output("mean router row norm", "1", "mean over experts of row_norm"),
    "cosine_mean": Output("mean pairwise cosine of router rows", "1",
                          "mean over expert pairs e<f of cos(w_e, w_f); 0 for orthogonal rows, 1 for identical",
                          chance="≈ 0 for random rows in high dimension"),
    "cosine_max": Output("largest pairwise cosine of router rows", "1", "max over expert pairs e<f of cos(w_e, w_f)"),
    "effective_rank": Output("effective rank of the router matrix", "1",
                             "exp of the Shannon entropy of the normalised singular values of the (experts × "
                             "hidden) router matrix (Roy & Vetterli 2007); between 1 and min(E, hidden)"),
    "logit_scale": Output("router logit scale on the eval tokens", "1",
                          "mean over eval tokens of the standard deviation of the router logits across experts",
                          nan_where="the routing cube keeps no router_logits for that run/checkpoint"),
}
# every diagnostic also as change from the run's first checkpoint (step 0: the initialisation)
GATE_OUTPUTS.update({
    f"{k}_change": Output(f"{v.long_name}, change from the first checkpoint", v.units,
                          f"{v.description}; minus its value at the run's first checkpoint (step 0 = init)",
                          nan_where=v.nan_where or "the run has no checkpoint at that step")
    for k, v in list(GATE_OUTPUTS.items())
})

COMPARE_OUTPUTS = {
    "agreement_top1": Output("top-1 agreement between runs", "1",
                             "fraction of tokens whose top-1 expert is the same in both runs", chance="1/num_experts"),
    "overlap": Output("top-k set overlap between runs", "1",
                      "mean over tokens of |S_a ∩ S_b| / k for the two runs' selected expert sets",
                      chance="k/num_experts"),
    "first_divergent_token": Output("first token whose routing differs", "1",
                                    "index along token (sample, position order) of the first token whose expert "
                                    "set differs in that layer; -1 when none differs"),
    "first_divergence_layer": Output("first layer of divergence", "1",
                                     "the layer of the earliest differing token (smallest layer at that token); "
                                     "-1 when the runs route every token identically"),
    "first_divergence_token": Output("first divergent token", "1",
                                     "index along token of the earliest token whose expert set differs in any "
                                     "layer; -1 when none"),
    "first_divergence_sample": Output("sample of the first divergent token", "1",
                                      "the sample id of first_divergence_token; '' when none differs"),
    "first_divergence_position": Output("position of the first divergent token", "1",
                                        "its position in the sample (0 = first token); -1 when none differs"),
    "first_divergence_text": Output("text of the first divergent token", "1",
                                    "its token_text; '' when none differs"),
}

LOAD_OUTPUTS = {
    "share": Output("expert load share", "1", "fraction of routed slots (all k) that go to the expert",
                    chance="1/num_experts"),
    "max_share": Output("largest expert load share", "1", "max over experts of share", chance="1/num_experts"),
    "dead_experts": Output("dead experts", "count",
                           "experts receiving less than a tenth of the uniform share (share < 0.1/num_experts)",
                           chance=0),
    "entropy": Output("routing entropy", "nat",
                      "mean over tokens of the entropy of the router's softmax over all experts",
                      nan_where="the routing cube keeps no router_logits"),
}

SCORE_OUTPUTS = {
    "score": Output("evaluation score", "as reported",
                    "the score of the run's checkpoint at that step on the task (lm-evaluation-harness metric with "
                    "its filter, or the demo's held-out NLL in nat/token and next-token accuracy)",
                    nan_where="that run has no checkpoint at that step, or was not scored on that task/metric"),
    "rank": Output("rank of the run", "1", "rank of the run among runs on the task and metric at the step "
                   "(1 = best, by the metric's higher_is_better; ties share the lower rank)",
                   nan_where="the run has no score there"),
}

DEAD_FRACTION = 0.1
"""An expert is dead at a checkpoint when its load share is below DEAD_FRACTION / num_experts."""


# ---------------------------------------------------------------- router weights


def gate_diagnostics(router: xr.DataArray, logit_scale: xr.DataArray | None = None) -> xr.Dataset:
    """Router-weight diagnostics per run, step and layer, each also as change from the first step.

    Parameters
    ----------
    router : DataArray (run, step, layer, expert, hidden)
        Router (gate) weight matrices; NaN where a run has no checkpoint at a step.
    logit_scale : DataArray (run, step, layer), optional
        Mean over eval tokens of the per-token std of router logits across experts (:func:`logit_scale`).

    Returns
    -------
    Dataset with row_norm (run, step, layer, expert); mean_row_norm, cosine_mean, cosine_max,
    effective_rank, logit_scale (run, step, layer); and each of those with ``_change`` (minus the
    value at the run's first step that has one).
    """
    w = router.transpose("run", "step", "layer", "expert", "hidden").values.astype(np.float64)
    norms = np.linalg.norm(w, axis=-1)  # (R, S, L, E)
    unit = w / np.where(norms == 0, 1, norms)[..., None]
    cos = np.einsum("rslef,rslgf->rsleg", unit, unit)
    E = w.shape[3]
    iu = np.triu_indices(E, 1)
    pairs = cos[..., iu[0], iu[1]]
    sv = np.linalg.svd(np.nan_to_num(w), compute_uv=False)  # (R, S, L, min(E, H))
    p = sv / np.where(sv.sum(-1, keepdims=True) == 0, 1, sv.sum(-1, keepdims=True))
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(p > 0, p * np.log(p), 0.0).sum(-1)
    erank = np.exp(ent)
    missing = np.isnan(w).any(axis=(-1, -2))  # (R, S, L)
    erank[missing] = np.nan
    dims3 = ("run", "step", "layer")
    ds = xr.Dataset(
        {
            "row_norm": (("run", "step", "layer", "expert"), norms),
            "mean_row_norm": (dims3, norms.mean(-1)),
            "cosine_mean": (dims3, pairs.mean(-1) if E > 1 else np.zeros(missing.shape)),
            "cosine_max": (dims3, pairs.max(-1) if E > 1 else np.zeros(missing.shape)),
            "effective_rank": (dims3, erank),
        },
        coords={k: router[k] for k in ("run", "step", "layer", "expert") if k in router.coords},
    )
    if logit_scale is not None:
        ds["logit_scale"] = logit_scale.reindex_like(ds[["run", "step", "layer"]]).transpose(*dims3)
    else:
        ds["logit_scale"] = xr.full_like(ds["mean_row_norm"], np.nan)
    for name in list(ds.data_vars):
        da = ds[name].transpose("run", "step", ...)
        vals = da.values
        # the run's first step that has a value (step 0 = the initialisation when the run saved it)
        has = ~np.isnan(vals).reshape(vals.shape[0], vals.shape[1], -1).all(-1)
        first = np.where(has.any(1), has.argmax(1), 0)
        base = vals[np.arange(vals.shape[0]), first][:, None]
        ds[f"{name}_change"] = (da.dims, vals - base)
    ds.attrs.update(definition="router (gate) weight matrices per checkpoint: row norms, pairwise cosine of rows, "
                    "effective rank, logit scale on the eval tokens; each also as change from the first checkpoint",
                    normalisation="none (weights as saved)", chance="cosine ≈ 0 for random high-dimensional rows")
    return apply_outputs(ds, GATE_OUTPUTS, where="gate_diagnostics")


def logit_scale(router_logits: xr.DataArray) -> xr.DataArray:
    """Mean over tokens of the std of the router logits across experts.

    Parameters
    ----------
    router_logits : DataArray (checkpoint, layer, token, expert)

    Returns
    -------
    DataArray (checkpoint, layer)
    """
    return router_logits.astype("float64").std("expert").mean("token").compute()


# ---------------------------------------------------------------- run vs run


def compare_routing(a: xr.Dataset, b: xr.Dataset) -> xr.Dataset:
    """Routing agreement between two runs on the same tokens, per checkpoint and layer.

    Parameters
    ----------
    a, b : routing cubes with expert_ids (checkpoint, layer, token, k) and token_id (token)
        Compared on their common checkpoints and layers; the token axes must hold the same
        token ids in the same order (the same data, tokenized the same way).

    Returns
    -------
    Dataset: agreement_top1, overlap, first_divergent_token (checkpoint, layer);
    first_divergence_layer, first_divergence_token (checkpoint). Cf. Megatron-LM's
    router_trace_compare, which reports the first mismatch between two traces.

    Raises
    ------
    ValueError : the two cubes' tokens differ, or they share no checkpoint/layer.
    """
    ta, tb = np.asarray(a["token_id"].values), np.asarray(b["token_id"].values)
    if ta.shape != tb.shape or not np.array_equal(ta, tb):
        raise ValueError(f"compare_routing: the runs' token axes differ ({ta.size} vs {tb.size} tokens, or other ids); "
                         "routing is compared on the same inputs only")
    ck = [c for c in a.checkpoint.values.tolist() if c in set(b.checkpoint.values.tolist())]
    layers = [x for x in a.layer.values.tolist() if x in set(b.layer.values.tolist())]
    if not ck or not layers:
        raise ValueError("compare_routing: the runs share no checkpoint or no layer")
    ia = a["expert_ids"].sel(checkpoint=ck, layer=layers).values.astype(np.int64)  # (C, L, T, k)
    ib = b["expert_ids"].sel(checkpoint=ck, layer=layers).values.astype(np.int64)
    E = int(a.attrs.get("num_experts") or max(ia.max(), ib.max()) + 1)
    top1 = (ia[..., 0] == ib[..., 0]).mean(-1)
    oh_a = np.zeros(ia.shape[:3] + (E,), bool)
    oh_b = np.zeros_like(oh_a)
    np.put_along_axis(oh_a, np.clip(ia, 0, E - 1), ia >= 0, axis=-1)
    np.put_along_axis(oh_b, np.clip(ib, 0, E - 1), ib >= 0, axis=-1)
    k = ia.shape[-1]
    inter = (oh_a & oh_b).sum(-1)
    overlap = (inter / k).mean(-1)
    differs = (oh_a != oh_b).any(-1)  # (C, L, T)
    first_tok = np.where(differs.any(-1), differs.argmax(-1), -1)  # (C, L)
    any_layer = differs.any(1)  # (C, T)
    f_tok = np.where(any_layer.any(-1), any_layer.argmax(-1), -1)
    f_layer = np.array([
        int(np.asarray(layers)[differs[c, :, t].argmax()]) if t >= 0 else -1 for c, t in enumerate(f_tok)
    ])
    ds = xr.Dataset(
        {
            "agreement_top1": (("checkpoint", "layer"), top1),
            "overlap": (("checkpoint", "layer"), overlap),
            "first_divergent_token": (("checkpoint", "layer"), first_tok),
            "first_divergence_layer": (("checkpoint",), f_layer),
            "first_divergence_token": (("checkpoint",), f_tok),
        },
        coords={"checkpoint": ck, "layer": layers},
        attrs={"definition": "agreement of two runs' routing on the same tokens", "num_experts": E, "top_k": k,
               "chance": f"top-1 agreement 1/E = {1 / E:.3g}; overlap k/E = {k / E:.3g}"},
    )
    # where that token is: sample, position and text (the token coordinates of ``a``), for a reader
    for coord, var, empty in (("sample", "first_divergence_sample", ""), ("position", "first_divergence_position", -1),
                              ("token_text", "first_divergence_text", "")):
        if coord in a.coords:
            vals = np.asarray(a[coord].values)
            picked = [vals[t] if t >= 0 else empty for t in f_tok]
            ds[var] = (("checkpoint",), np.asarray([int(v) for v in picked], np.int64) if empty == -1
                       else np.asarray([str(v) for v in picked], dtype=object))
    if "step" in a.coords:
        ds = ds.assign_coords(step=("checkpoint", a["step"].sel(checkpoint=ck).values))
    return apply_outputs(ds, COMPARE_OUTPUTS, where="compare_routing")


def expert_load(routing: xr.Dataset) -> xr.Dataset:
    """Expert load per checkpoint and layer (all k slots), the dead experts, and routing entropy.

    Parameters
    ----------
    routing : routing cube with expert_ids (checkpoint, layer, token, k); router_logits
        (checkpoint, layer, token, expert) optional (for entropy).

    Returns
    -------
    Dataset: share (checkpoint, layer, expert); max_share, dead_experts, entropy (checkpoint, layer).
    """
    E = int(routing.attrs.get("num_experts") or int(routing["expert_ids"].max()) + 1)
    ids = routing["expert_ids"]
    counts = xr.concat([(ids == e).sum(("token", "k")) for e in range(E)], dim="expert").compute()
    counts = counts.assign_coords(expert=np.arange(E)).transpose("checkpoint", "layer", "expert")
    total = counts.sum("expert")
    share = counts / total.where(total > 0)
    ds = xr.Dataset({"share": share.astype("float64")})
    ds["max_share"] = ds.share.max("expert")
    ds["dead_experts"] = (ds.share < DEAD_FRACTION / E).sum("expert")
    if "router_logits" in routing:
        z = routing["router_logits"].astype("float64")
        logp = z - np.log(np.exp(z - z.max("expert")).sum("expert")) - z.max("expert")
        ds["entropy"] = (-(np.exp(logp) * logp).sum("expert")).mean("token").compute()
    else:
        ds["entropy"] = xr.full_like(ds["max_share"], np.nan)
    ds.attrs.update(definition="expert load over all k slots", num_experts=E,
                    chance=f"share 1/E = {1 / E:.3g}; dead below {DEAD_FRACTION}/E")
    return apply_outputs(ds, LOAD_OUTPUTS, where="expert_load")


def stack_runs(per_run: Mapping[str, xr.Dataset], dim_order: Sequence[str] = ()) -> xr.Dataset:
    """One Dataset with a leading ``run`` dimension from per-run results (outer join on other coords)."""
    runs = list(per_run)
    ds = xr.concat([per_run[r] for r in runs], dim=xr.Variable("run", runs), join="outer", combine_attrs="override",
                   coords="minimal", compat="override")
    return ds


# ---------------------------------------------------------------- scores


def score_ranks(scores: xr.Dataset) -> xr.Dataset:
    """Rank of each run per (step, task, metric): 1 = best by the metric's ``higher_is_better``.

    Parameters
    ----------
    scores : Dataset with score (run, step, task, metric) and higher_is_better (metric)

    Returns
    -------
    Dataset with rank (run, step, task, metric); NaN where the run has no score; ties share the lower rank.
    """
    s = scores["score"].transpose("run", "step", "task", "metric").values
    hib = np.asarray(scores["higher_is_better"].values, bool)
    signed = np.where(hib[None, None, None, :], -s, s)  # smaller = better
    ranks = np.full(s.shape, np.nan)
    for idx in np.ndindex(*s.shape[1:]):
        col = signed[(slice(None), *idx)]
        ok = ~np.isnan(col)
        # 1 + the number of runs with a score strictly better than this one
        ranks[(slice(None), *idx)] = np.where(ok, 1 + ((col[None, :] < col[:, None]) & ok[None, :]).sum(1), np.nan)
    ds = xr.Dataset({"rank": (("run", "step", "task", "metric"), ranks)}, coords=scores["score"].coords)
    ds.attrs.update(definition="rank of each run on each task at each step", chance="(n_runs + 1) / 2 on average")
    return apply_outputs(ds, SCORE_OUTPUTS, where="score_ranks")


# ---------------------------------------------------------------- dataset composition


def composition(records: Sequence[Mapping]) -> xr.Dataset:
    """Tokens and samples per (domain, dataset, source), the sunburst's data.

    Parameters
    ----------
    records : sequence of {"domain", "dataset", "source", "tokens", "samples"}

    Returns
    -------
    Dataset with tokens, samples (entry) and coords domain, dataset, source (entry); rows summed by key,
    sorted by domain, dataset, then tokens descending.
    """
    agg: dict[tuple, list[int]] = {}
    for r in records:
        key = (str(r["domain"]), str(r["dataset"]), str(r.get("source") or "(unrecorded)"))
        t, n = int(r.get("tokens", 0)), int(r.get("samples", 0))
        if t < 0 or n < 0:
            raise ValueError(f"composition: negative size in {dict(r)}")
        cur = agg.setdefault(key, [0, 0])
        cur[0] += t
        cur[1] += n
    keys = sorted(agg, key=lambda k: (k[0], k[1], -agg[k][0], k[2]))
    ds = xr.Dataset(
        {"tokens": ("entry", np.array([agg[k][0] for k in keys], dtype=np.int64)),
         "samples": ("entry", np.array([agg[k][1] for k in keys], dtype=np.int64))},
        coords={"domain": ("entry", [k[0] for k in keys]), "dataset": ("entry", [k[1] for k in keys]),
                "source": ("entry", [k[2] for k in keys])},
        attrs={"definition": "dataset composition: domain → dataset → source, sized in tokens and samples"},
    )
    return apply_outputs(ds, {
        "tokens": Output("tokens", "count", "tokens of the (domain, dataset, source) entry"),
        "samples": Output("samples", "count", "samples (documents or evaluation samples) of the entry"),
    }, where="composition")


def sunburst_rings(comp: xr.Dataset, size: str = "tokens") -> list[list[tuple[str, float, float]]]:
    """Angular extents of the three rings: [[(label, start, width) ...] per ring], widths summing to 1.

    Ring 0 is domains, ring 1 (domain, dataset), ring 2 the entries; each child lies within its parent.
    """
    v = comp[size].values.astype(float)
    tot = v.sum()
    if tot <= 0:
        raise ValueError(f"sunburst_rings: total {size} is 0")
    frac = v / tot
    rings: list[list[tuple[str, float, float]]] = [[], [], []]
    start = 0.0
    doms, dsets, srcs = comp.domain.values, comp.dataset.values, comp.source.values
    for level, keyf in enumerate((lambda i: (doms[i],), lambda i: (doms[i], dsets[i]), lambda i: (doms[i], dsets[i], srcs[i]))):
        start = 0.0
        cur = None
        for i in range(len(v)):
            key = keyf(i)
            if key != cur:
                rings[level].append([str(key[-1]), start, 0.0])
                cur = key
            rings[level][-1][2] += frac[i]
            start += frac[i]
        rings[level] = [tuple(x) for x in rings[level]]
    return rings


def series_summary(logs: xr.Dataset, metrics: Sequence[str]):
    """Per (run, metric) of a training-log cube: how each logged series starts, ends and ranges.

    Parameters
    ----------
    logs : ``value`` (run, step, metric), NaN where a run did not log that metric at that step.
    metrics : the metrics to summarise.

    Returns
    -------
    pandas.DataFrame, a row per (run, metric) with values: run, metric, layer, dataset (``metric_layer`` /
    ``metric_dataset``, -1 / "" when the name holds none), n (logged steps), first_step, first, last_step,
    last, min, max, mean (over the logged steps).
    """
    import pandas as pd

    steps = np.asarray(logs["step"].values)
    names = [str(m) for m in logs.metric.values]
    rows = []
    for m in metrics:
        i = names.index(m)
        layer = int(logs["metric_layer"].values[i]) if "metric_layer" in logs.coords else -1
        dataset = str(logs["metric_dataset"].values[i]) if "metric_dataset" in logs.coords else ""
        for run in map(str, logs.run.values):
            v = np.asarray(logs["value"].sel(run=run, metric=m).values, dtype=np.float64)
            ok = np.flatnonzero(np.isfinite(v))
            if ok.size == 0:
                continue
            rows.append({"run": run, "metric": m, "layer": layer, "dataset": dataset, "n": int(ok.size),
                         "first_step": int(steps[ok[0]]), "first": float(v[ok[0]]),
                         "last_step": int(steps[ok[-1]]), "last": float(v[ok[-1]]),
                         "min": float(v[ok].min()), "max": float(v[ok].max()), "mean": float(v[ok].mean())})
    return pd.DataFrame(rows, columns=["run", "metric", "layer", "dataset", "n", "first_step", "first", "last_step",
                                       "last", "min", "max", "mean"])
