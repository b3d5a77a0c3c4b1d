"""Logit lens by condition: how well each layer already predicts the aligned content.

``lens_logprob`` (captured with ``[capture] logit_lens``) holds, per MoE layer,
log p(next token) read out through the final norm and the LM head. The
prediction *of* a token t is the value stored at t − 1. On the token pairs of
:mod:`analyses.divergence` (views ``canonical``: every aligned pair;
``last_canonical``: each pair of samples' last canonical tokens), per
checkpoint, layer and view:

- lens NLL per condition: mean −log p(target) over the view's targets;
- the paired difference A − B of those NLLs (same targets on both sides);
- with ``lens_js`` (``[capture] js_divergence``): the mean Jensen-Shannon
  divergence between the two conditions' lens distributions for the aligned
  targets (stored at the predicting positions);
- the model's own NLL on the same targets (``nll``), for reference.

At the last decoder layer the lens NLL equals the model's NLL (capture checks
it). Intervals resample pairs of samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from . import bootstrap as bs
from . import plotting
from .divergence import VIEWS, conditions, per_pair_sums, token_pairs
from .registry import Analysis, describe, finalise, json_number, register, safe_ratio, token_var

NAME = "lens"


def _targets(routing: xr.Dataset, a: str, b: str):
    """Per view: predicting positions (t − 1) of the A and B targets, and the sample-pair unit.

    Targets at position 0 (nothing predicts them) are dropped.
    """
    position = np.asarray(routing["position"].values)
    aligned = np.asarray(routing["aligned_token"].values).astype(np.int64)
    out = {}
    for view, (ta, tb, unit) in token_pairs(routing, a, b).items():
        ok = (position[ta] > 0) & (position[tb] > 0)
        # JS is stored only where the two targets are each other's aligned partner
        js_ok = aligned[ta[ok]] == tb[ok]
        out[view] = (ta[ok] - 1, tb[ok] - 1, unit[ok], js_ok)
    return out


def lens(
    routing: xr.Dataset,
    *,
    condition_a: str = "",
    condition_b: str = "",
    n_boot: int = 200,
    ci: float = 0.95,
    seed: int = 0,
) -> xr.Dataset:
    """Logit-lens NLL per layer for conditions A and B on aligned targets, their difference, and JS.

    Parameters
    ----------
    routing : routing cube with ``lens_logprob`` (checkpoint, layer, token);
        ``lens_js`` (checkpoint, layer, token) and ``nll`` (checkpoint, token)
        used when present; token coordinates as for :func:`analyses.divergence.divergence`.
    condition_a, condition_b : the conditions ('' = from the cube's attrs).
    n_boot, ci, seed : bootstrap over pairs of samples (0 = no intervals).

    Returns
    -------
    xr.Dataset
        lens_nll (checkpoint, layer, view, condition) : mean −log p(target), nats
        lens_nll_diff (checkpoint, layer, view) : mean over target pairs of NLL_A − NLL_B
        js (checkpoint, layer, view) : mean JS divergence (nats), only with lens_js
        model_nll (checkpoint, view, condition) : the model's own NLL on the same targets, only with nll
        targets (checkpoint, layer, view) : target pairs with both values finite
        ``*_lo`` / ``*_hi`` : bootstrap intervals of lens_nll, lens_nll_diff, js
    """
    a, b = conditions(routing, condition_a, condition_b)
    n_boot = int(n_boot)
    views = _targets(routing, a, b)
    lp = token_var(routing, "lens_logprob").astype(np.float64)
    n_units = int(np.unique(np.concatenate([v[2] for v in views.values()])).max()) + 1
    weights = bs.bootstrap_weights(n_units, n_boot, seed) if n_boot else None
    has_js = "lens_js" in routing
    has_nll = "nll" in routing

    per_view = []
    for view in VIEWS:
        pa, pb, unit, js_ok = views[view]
        la, lb = -lp.isel(token=pa), -lp.isel(token=pb)  # NLL of the targets
        ok = la.notnull() & lb.notnull()
        parts = {
            "sum_a": la.where(ok, 0.0), "sum_b": lb.where(ok, 0.0), "sum_d": (la - lb).where(ok, 0.0),
            "n": ok.astype(np.int64),
        }
        if has_js:
            js = token_var(routing, "lens_js").astype(np.float64).isel(token=pa)
            js = js.where(xr.DataArray(js_ok, dims="token"))
            jok = js.notnull()
            parts["sum_js"], parts["n_js"] = js.where(jok, 0.0), jok.astype(np.int64)
        if has_nll:
            nll = token_var(routing, "nll").astype(np.float64)
            ma, mb = nll.isel(token=pa), nll.isel(token=pb)
            mok = ma.notnull() & mb.notnull()
            parts["model_a"], parts["model_b"] = ma.where(mok, 0.0), mb.where(mok, 0.0)
            parts["n_model"] = mok.astype(np.int64)
        ps = per_pair_sums(xr.Dataset(parts), unit, n_units, dim="token")
        tot = ps.sum(bs.SAMPLE)
        out = {
            "lens_nll": xr.concat([safe_ratio(tot["sum_a"], tot["n"]), safe_ratio(tot["sum_b"], tot["n"])],
                                  dim="condition").assign_coords(condition=np.array([a, b], dtype=object)),
            "lens_nll_diff": safe_ratio(tot["sum_d"], tot["n"]),
            "targets": tot["n"],
        }
        if has_js:
            out["js"] = safe_ratio(tot["sum_js"], tot["n_js"])
        if has_nll:
            out["model_nll"] = xr.concat([safe_ratio(tot["model_a"], tot["n_model"]),
                                          safe_ratio(tot["model_b"], tot["n_model"])],
                                         dim="condition").assign_coords(condition=np.array([a, b], dtype=object))
        if n_boot:
            bounds = [bs.ratio_interval(ps[s], ps["n"], weights, ci=ci) for s in ("sum_a", "sum_b")]
            out["lens_nll_lo"] = xr.concat([lo for lo, _ in bounds], dim="condition").assign_coords(condition=np.array([a, b], dtype=object))
            out["lens_nll_hi"] = xr.concat([hi for _, hi in bounds], dim="condition").assign_coords(condition=np.array([a, b], dtype=object))
            out["lens_nll_diff_lo"], out["lens_nll_diff_hi"] = bs.ratio_interval(ps["sum_d"], ps["n"], weights, ci=ci)
            if has_js:
                out["js_lo"], out["js_hi"] = bs.ratio_interval(ps["sum_js"], ps["n_js"], weights, ci=ci)
        per_view.append(xr.Dataset(out))
    res = xr.concat(per_view, dim="view", coords="minimal", compat="override", join="override")
    res = res.assign_coords(view=np.array(VIEWS, dtype=object)).transpose("checkpoint", "layer", "view", "condition", ...)

    nan_none = "no target of the view has a finite lens value on both sides at this checkpoint and layer"
    ci_note = f"{100 * ci:g} % bootstrap interval over {n_boot} replicates resampling pairs of samples (not tokens)"
    out = {
        "lens_nll": describe(res["lens_nll"], "logit-lens NLL", "nats",
                             "mean over the view's targets of −log p(target) read out after the layer "
                             "(final norm + LM head)", nan_where=nan_none),
        "lens_nll_diff": describe(res["lens_nll_diff"], f"logit-lens NLL difference {a} − {b}", "nats",
                                  f"mean over target pairs of NLL[{a}] − NLL[{b}] (negative: {a} predicts the "
                                  "content better at this layer)", chance=0.0, nan_where=nan_none),
        "targets": describe(res["targets"], "target pairs", "token pairs",
                            "target pairs whose lens values are finite on both sides"),
    }
    if has_js:
        out["js"] = describe(res["js"], "Jensen-Shannon divergence between conditions", "nats",
                             "mean over aligned targets of JS(P_A ‖ P_B) of the two lens next-token distributions "
                             f"that predict them (0 = identical, ln 2 = {math.log(2):.3f} = disjoint)", chance=0.0,
                             nan_where=nan_none + "; or no target pair of the view is aligned")
    if has_nll:
        out["model_nll"] = describe(res["model_nll"], "model NLL", "nats",
                                    "the model's own next-token NLL on the same targets (the lens at the last "
                                    "decoder layer equals it)", nan_where="no target with a finite NLL")
    if n_boot:
        for name in ("lens_nll", "lens_nll_diff", "js"):
            if name not in out:
                continue
            for side in ("lo", "hi"):
                out[f"{name}_{side}"] = describe(
                    res[f"{name}_{side}"], f"{out[name].attrs['long_name']} ({'lower' if side == 'lo' else 'upper'} "
                    "bound)", "nats", ci_note, nan_where=out[name].attrs["nan_where"] + "; or every replicate undefined")
    result = finalise(
        xr.Dataset(out), routing, name=NAME,
        definition=(
            f"Conditions A = {a!r}, B = {b!r}. For each target token t of the view (aligned canonical tokens, or "
            "each sample pair's last canonical token) the lens value is lens_logprob at t − 1 = log p(t) read out "
            "after the layer; lens_nll = mean −log p; lens_nll_diff = mean of the paired differences; js = mean "
            "Jensen-Shannon divergence between the two conditions' read-out distributions for aligned targets."
        ),
        normalisation="nats per target token; means over target pairs with finite values on both sides",
        chance="lens_nll: ln V for a uniform prediction over the vocabulary; difference 0; JS 0 for identical "
        "distributions",
        params={"condition_a": condition_a, "condition_b": condition_b, "n_boot": n_boot, "ci": ci, "seed": seed},
    )
    result.attrs["condition_a"], result.attrs["condition_b"] = a, b
    return result


def table(result: xr.Dataset) -> pd.DataFrame:
    """Per-layer metrics: rows (checkpoint, layer, view); NLL per condition, difference, JS, with CIs."""
    a, b = result.attrs["condition_a"], result.attrs["condition_b"]
    r = result.compute()
    base = r[["targets"]].to_dataframe().reset_index()
    for c in (a, b):
        for suffix in ("", "_lo", "_hi"):
            name = f"lens_nll{suffix}"
            if name in r:
                col = r[name].sel(condition=c, drop=True).rename(f"lens_nll_{c}{suffix}").to_dataframe().reset_index()
                base = base.merge(col[["checkpoint", "layer", "view", f"lens_nll_{c}{suffix}"]],
                                  on=["checkpoint", "layer", "view"])
    for name in ("lens_nll_diff", "lens_nll_diff_lo", "lens_nll_diff_hi", "js", "js_lo", "js_hi"):
        if name in r:
            col = r[name].to_dataframe().reset_index()
            base = base.merge(col[["checkpoint", "layer", "view", name]], on=["checkpoint", "layer", "view"])
    if "model_nll" in r:
        for c in (a, b):
            col = r["model_nll"].sel(condition=c, drop=True).rename(f"model_nll_{c}").to_dataframe().reset_index()
            base = base.merge(col[["checkpoint", "view", f"model_nll_{c}"]], on=["checkpoint", "view"])
    first = ["checkpoint", "step", "layer", "view"]
    return base[first + [c for c in base.columns if c not in first]]


def summary(result: xr.Dataset) -> dict:
    """At the last checkpoint, per view: NLL per condition at the last layer, the difference, the first layer's gap."""
    a, b = result.attrs["condition_a"], result.attrs["condition_b"]
    last = result.isel(checkpoint=-1).compute()
    out = {"checkpoint": str(last["checkpoint"].values), "condition_a": a, "condition_b": b}
    for view in map(str, last["view"].values):
        v = last.sel(view=view)
        d = {
            f"last_layer_nll_{a}": json_number(v["lens_nll"].sel(condition=a).isel(layer=-1)),
            f"last_layer_nll_{b}": json_number(v["lens_nll"].sel(condition=b).isel(layer=-1)),
            "last_layer_diff": json_number(v["lens_nll_diff"].isel(layer=-1)),
            "first_layer_diff": json_number(v["lens_nll_diff"].isel(layer=0)),
            "target_pairs": json_number(v["targets"].max()),
        }
        if "js" in v:
            d["mean_js"] = json_number(v["js"].mean())
        out[view] = d
    return out


def figure(result: xr.Dataset, out_dir: Path, formats: Sequence[str] = ("png",)) -> list[Path]:
    """Per view: lens NLL per condition (last checkpoint), the difference A − B and the JS, per layer."""
    result = result.compute()
    a, b = result.attrs["condition_a"], result.attrs["condition_b"]
    layers = [int(x) for x in result["layer"].values]
    views = [str(v) for v in result["view"].values]
    has_js = "js" in result
    ncols = 3 if has_js else 2
    last = result["checkpoint"].values[-1]
    colours, mappable = plotting.ordered_colours(result["step"].values)
    with plotting.style():
        fig, axes = plotting.new_figure(len(views), ncols, panel_size=(3.3, 2.5), sharex=True)
        for r, view in enumerate(views):
            ax = axes[r, 0]
            for c, style, colour in ((a, "-", plotting.OKABE_ITO[0]), (b, "--", plotting.OKABE_ITO[1])):
                sel = result.sel(checkpoint=last, view=view, condition=c)
                ax.plot(layers, sel["lens_nll"].values, ls=style, marker="o", ms=2.5, color=colour,
                        label=f"{plotting.display_label(c)}")
                if "lens_nll_lo" in result:
                    ax.fill_between(layers, sel["lens_nll_lo"].values, sel["lens_nll_hi"].values, color=colour,
                                    alpha=0.2, linewidth=0)
                if "model_nll" in result:
                    ax.plot([layers[-1]], [float(sel["model_nll"])], marker="*", ms=7, color=colour, ls="none",
                            label=f"model NLL ({plotting.display_label(c)})")
            ax.set_title(f"{view}: lens NLL, {last}")
            plotting.label_axes(ax, "layer (MoE layer index)", "−log p(target) (nats)")
            ax.legend(frameon=False)
            panels = [("lens_nll_diff", f"NLL {a} − {b} (nats)", "difference")]
            if has_js:
                panels.append(("js", "JS divergence (nats)", "JS divergence"))
            for j, (name, ylabel, title) in enumerate(panels, start=1):
                ax = axes[r, j]
                for ci, ckpt in enumerate(result["checkpoint"].values):
                    sel = result.sel(checkpoint=ckpt, view=view)
                    ax.plot(layers, sel[name].values, marker="o", ms=2.5, color=colours[ci])
                    if ckpt == last and f"{name}_lo" in result:
                        ax.fill_between(layers, sel[f"{name}_lo"].values, sel[f"{name}_hi"].values,
                                        color=colours[ci], alpha=0.2, linewidth=0)
                plotting.chance_line(ax, 0.0, label="no difference")
                ax.set_title(f"{view}: {title}")
                plotting.label_axes(ax, "layer (MoE layer index)", ylabel)
            for ax in axes[r]:
                ax.set_xticks(layers)
        cb = fig.colorbar(mappable, ax=axes[:, 1:].ravel().tolist(), shrink=0.8)
        cb.set_label("checkpoint (training step)")
        fig.suptitle(f"Logit lens by condition {a} vs {b} on aligned targets (bands: 95 % CI over sample pairs)")
        return plotting.savefig(fig, out_dir, f"{NAME}_curves", formats)


ANALYSIS = register(
    Analysis(
        name=NAME,
        func=lens,
        figure=figure,
        title="Logit lens: how well each layer predicts the content, by condition",
        caption=(
            "Each MoE layer's output is read through the model's final norm and LM head (logit lens, computed "
            "during capture); the curves show the mean negative log-probability of the next token for the same "
            "content in conditions A and B (left, last checkpoint, solid = A, dashed = B, stars = the model's own "
            "NLL, which the last layer's lens equals), the paired difference A − B per checkpoint (middle; below 0: "
            "A predicts the content better at that depth) and the Jensen-Shannon divergence between the two "
            "conditions' predicted distributions (right; 0 = identical, ln 2 = disjoint). Upper row: every aligned "
            "token; lower row: each sample pair's last canonical token. Bands: 95 % bootstrap intervals over "
            "sample pairs. A uniform prediction would score ln V nats."
        ),
        requires=("expert_ids", "lens_logprob"),
        optional=("lens_js", "nll"),
        params={"condition_a": "", "condition_b": "", "n_boot": 200, "ci": 0.95, "seed": 0},
        table=table,
        summary=summary,
    )
)
