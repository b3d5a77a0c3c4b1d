"""Intervention figures: degradation curves with the random-control band, and observational vs causal scatter.

Drawn from :func:`analyses.interventions.delta_cube` results whose ``run`` dim
carries the coords ``ranking``, ``scope``, ``n_masked`` and ``seed`` (-1 for a
non-random ranking), and from a per-unit table of an observational measure vs
the causal ΔNLL.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import xarray as xr

from . import plotting

NAME = "interventions"


def degradation(cube: xr.Dataset, out_dir: Path, formats: Sequence[str] = ("png",), *, group: str = "all",
                stem: str = f"{NAME}_degradation") -> list[Path]:
    """ΔNLL vs number of masked experts per ranking (line + bootstrap CI), random controls as a min–max band."""
    dim = [d for d in cube.delta_nll.dims if d != "run"][0]
    c = cube.sel({dim: group})
    rank = np.asarray(c["ranking"].values).astype(str)
    n = np.asarray(c["n_masked"].values)
    with plotting.style():
        fig, axes = plotting.new_figure(1, 1, panel_size=(3.4, 2.4))
        ax = axes[0, 0]
        rnd = rank == "random"
        if rnd.any():
            xs = np.unique(n[rnd])
            vals = [c.delta_nll.values[rnd & (n == x)] for x in xs]
            ax.fill_between(xs, [v.min() for v in vals], [v.max() for v in vals], color="0.6", alpha=0.3,
                            linewidth=0, label=f"random ({int(len(np.unique(c['seed'].values[rnd])))} seeds)")
        for r in sorted(set(rank[~rnd]) - {"own top-1"}):
            sel = np.flatnonzero(rank == r)
            sel = sel[np.argsort(n[sel])]
            ax.errorbar(n[sel], c.delta_nll.values[sel],
                        yerr=[c.delta_nll.values[sel] - c.delta_nll_lo.values[sel],
                              c.delta_nll_hi.values[sel] - c.delta_nll.values[sel]], marker="o", markersize=3,
                        capsize=2, label=r)
        ax.axhline(0, **plotting.CHANCE_STYLE)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("experts masked (router mask, global top-n)")
        ax.set_ylabel(f"ΔNLL (nat), {dim} = {group}")
        ax.legend(loc="upper left")
        return plotting.savefig(fig, out_dir, stem, formats)


def scatter(measure: np.ndarray, effect: np.ndarray, units: Sequence[str], out_dir: Path,
            formats: Sequence[str] = ("png",), *, measure_name: str = "usage", rho: float | None = None,
            stem: str = f"{NAME}_obs_vs_causal") -> list[Path]:
    """One point per (layer, expert): the observational measure vs the ΔNLL of masking that expert alone."""
    with plotting.style():
        fig, axes = plotting.new_figure(1, 1, panel_size=(3.0, 2.6))
        ax = axes[0, 0]
        ax.scatter(measure, effect, s=10)
        gap = np.abs(np.argsort(np.argsort(measure)) - np.argsort(np.argsort(effect)))
        for i in np.argsort(-gap)[:3]:
            ax.annotate(str(units[i]), (measure[i], effect[i]), fontsize=6)
        ax.axhline(0, **plotting.CHANCE_STYLE)
        ax.set_xlabel(measure_name)
        ax.set_ylabel("ΔNLL when masked alone (nat)")
        if rho is not None:
            ax.set_title(f"Spearman ρ = {rho:.2f}")
        return plotting.savefig(fig, out_dir, stem, formats)


# ------------------------------------------------------------------ the pipeline's cube (tasks/interventions.py)


def _steps(cube) -> list[int]:
    return [int(s) for s in cube["step"].values]


def degradation_panels(cube: xr.Dataset, out_dir: Path, formats: Sequence[str] = ("png",), *, group: str = "all",
                       scope: str = "global", metric: str = "delta_nll",
                       stem: str = f"{NAME}_degradation") -> list[Path]:
    """One panel per checkpoint: the ranked sweeps' ΔNLL (or Δaccuracy) vs experts masked, random band behind."""
    ck = [str(c) for c in cube["checkpoint"].values]
    steps = _steps(cube)
    sel = (np.asarray(cube["intervention"].values).astype(str) == "mask") & \
          (np.asarray(cube["scope"].values).astype(str) == scope)
    runs = cube.isel(run=np.flatnonzero(sel))
    rank = np.asarray(runs["ranking"].values).astype(str)
    n = np.asarray(runs["n_masked"].values)
    names = sorted(set(rank) - {"random"})
    colours = dict(zip(names, plotting.OKABE_ITO * 3))
    ylab = {"delta_nll": "ΔNLL (nat)", "delta_accuracy": "Δ accuracy"}[metric]
    with plotting.style():
        rows, cols = plotting.panel_grid(len(ck), max_cols=2)
        fig, axes = plotting.new_figure(rows, cols, panel_size=(3.4, 2.6), sharey=True)
        for i, (c, step) in enumerate(zip(ck, steps)):
            ax = axes.flat[i]
            d = runs.sel(checkpoint=c, domain=group)
            rnd = rank == "random"
            if rnd.any():
                xs = np.unique(n[rnd])
                vals = [d[metric].values[rnd & (n == x)] for x in xs]
                ax.fill_between(xs, [np.nanmin(v) for v in vals], [np.nanmax(v) for v in vals], color="0.6",
                                alpha=0.35, linewidth=0,
                                label=f"random ({int(len(np.unique(runs['seed'].values[rnd])))} seeds, min–max)")
            for r in names:
                j = np.flatnonzero(rank == r)
                j = j[np.argsort(n[j])]
                y = d[metric].values[j]
                ax.errorbar(n[j], y, yerr=[y - d[f"{metric}_lo"].values[j], d[f"{metric}_hi"].values[j] - y],
                            marker="o", markersize=3, capsize=2, label=r, color=colours[r], linewidth=1)
            ax.axhline(0, **plotting.CHANCE_STYLE)
            ax.set_xscale("log", base=2)
            ax.set_title(plotting.checkpoint_label(i, len(ck), step))
        plotting.hide_unused(axes, len(ck))
        plotting.outer_labels(axes, len(ck), f"experts masked ({scope} top-n, router mask)", f"{ylab}, {group}")
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=3, fontsize=6)
        return plotting.savefig(fig, out_dir, stem, formats)


def drop_top1(cube: xr.Dataset, out_dir: Path, formats: Sequence[str] = ("png",),
              stem: str = f"{NAME}_drop_top1") -> list[Path]:
    """ΔNLL of dropping each token's own top-1 expert, per layer (x) and domain (panels), one line per checkpoint."""
    sel = np.flatnonzero(np.asarray(cube["intervention"].values).astype(str) == "drop_top1")
    runs = cube.isel(run=sel)
    layers = [int(str(s)[1:]) for s in runs["scope"].values]
    doms = [str(d) for d in runs["domain"].values]
    doms = ["all"] + [d for d in doms if d != "all"]
    steps = _steps(cube)
    styles = plotting.checkpoint_styles(steps)
    with plotting.style():
        rows, cols = plotting.panel_grid(len(doms), max_cols=3)
        fig, axes = plotting.new_figure(rows, cols, panel_size=(2.6, 2.2), sharex=True)
        for k, dom in enumerate(doms):
            ax = axes.flat[k]
            for i, c in enumerate(runs["checkpoint"].values):
                d = runs.sel(checkpoint=c, domain=dom)
                y = d["delta_nll"].values
                ax.errorbar(layers, y, yerr=[y - d["delta_nll_lo"].values, d["delta_nll_hi"].values - y], capsize=2,
                            markersize=3, label=plotting.checkpoint_label(i, len(steps), steps[i]), **styles[i])
            ax.axhline(0, **plotting.CHANCE_STYLE)
            ax.set_title(plotting.display_label(dom))
            ax.set_xticks(layers)
        plotting.hide_unused(axes, len(doms))
        plotting.outer_labels(axes, len(doms), "MoE layer", "ΔNLL (nat)")
        axes.flat[0].legend(loc="upper right", fontsize=6)
        return plotting.savefig(fig, out_dir, stem, formats)


def obs_vs_causal_panels(cube: xr.Dataset, out_dir: Path, formats: Sequence[str] = ("png",), *, group: str = "all",
                         stem: str = f"{NAME}_obs_vs_causal") -> list[Path]:
    """Rows: checkpoints; columns: observational measures. Each point a (layer, expert): measure vs causal ΔNLL."""
    ck = [str(c) for c in cube["checkpoint"].values]
    steps = _steps(cube)
    measures = [str(m) for m in cube["measure"].values]
    layers = [int(x) for x in cube["layer"].values]
    E = int(cube.sizes["expert"])
    units = [f"L{l}E{e}" for l in layers for e in range(E)]
    colour = np.repeat(np.arange(len(layers)), E)
    with plotting.style():
        fig, axes = plotting.new_figure(len(ck), len(measures), panel_size=(2.2, 2.3))
        for i, c in enumerate(ck):
            d = cube.sel(checkpoint=c)
            eff = d["effect"].sel(domain=group).values.reshape(-1)
            for j, m in enumerate(measures):
                ax = axes[i, j]
                x = d["measure_value"].sel(measure=m).values.reshape(-1)
                ax.scatter(x, eff, c=colour, cmap="viridis", s=8, vmin=0, vmax=max(len(layers) - 1, 1))
                for u in np.asarray(d["disagree"].sel(measure=m, domain=group).values).astype(str):
                    if u in units:
                        k = units.index(u)
                        ax.annotate(u, (x[k], eff[k]), fontsize=5)
                ax.axhline(0, **plotting.CHANCE_STYLE)
                r = d["rho"].sel(measure=m, domain=group)
                lo, hi = d["rho_lo"].sel(measure=m, domain=group), d["rho_hi"].sel(measure=m, domain=group)
                ax.set_title(f"{m}\nρ = {float(r):.2f} [{float(lo):.2f}, {float(hi):.2f}]", fontsize=6)
                ax.tick_params(labelsize=5)
                ax.set_xlabel(m if i == len(ck) - 1 else "")
                ax.set_ylabel(f"ΔNLL alone (nat)\n{plotting.checkpoint_label(i, len(ck), steps[i])}" if j == 0 else "")
        return plotting.savefig(fig, out_dir, stem, formats)


def rho_summary(cube: xr.Dataset, out_dir: Path, formats: Sequence[str] = ("png",),
                stem: str = f"{NAME}_rho") -> list[Path]:
    """Spearman ρ (bootstrap CI) of each observational measure with the causal effect, per checkpoint and domain."""
    measures = [str(m) for m in cube["measure"].values]
    doms = [str(d) for d in cube["domain"].values if np.isfinite(cube["rho"].sel(domain=d).values).any()]
    steps = _steps(cube)
    styles = plotting.checkpoint_styles(steps)
    with plotting.style():
        fig, axes = plotting.new_figure(1, len(doms), panel_size=(2.0, 2.4), sharey=True)
        for k, dom in enumerate(doms):
            ax = axes[0, k]
            for i, c in enumerate(cube["checkpoint"].values):
                d = cube.sel(checkpoint=c, domain=dom)
                y = np.arange(len(measures)) + (i - (len(steps) - 1) / 2) * 0.15
                r = d["rho"].sel(measure=measures).values
                ax.errorbar(r, y, xerr=[r - d["rho_lo"].sel(measure=measures).values,
                                        d["rho_hi"].sel(measure=measures).values - r],
                            fmt=styles[i].get("marker", "o"), color=styles[i]["color"], markersize=3, capsize=2,
                            label=plotting.checkpoint_label(i, len(steps), steps[i]))
            ax.axvline(0, **plotting.CHANCE_STYLE)
            ax.set_xlim(-1.05, 1.05)
            ax.set_yticks(np.arange(len(measures)), measures)
            ax.set_title(plotting.display_label(dom))
            ax.set_xlabel("Spearman ρ")
        axes[0, 0].legend(loc="lower left", fontsize=5)
        return plotting.savefig(fig, out_dir, stem, formats)


# ------------------------------------------------------------------ report section


def _tables(cube: xr.Dataset) -> dict:
    """Tidy tables of the cube: deltas per run and domain, per condition, ρ per measure, effects per unit."""
    labels = ["intervention", "kind", "ranking", "scope", "unit", "n_masked", "seed"]
    out = {}
    vars_ = [v for v in ("delta_nll", "delta_nll_lo", "delta_nll_hi", "delta_accuracy", "delta_accuracy_lo",
                         "delta_accuracy_hi", "n_tokens") if v in cube]
    df = cube[vars_ + ["masked"]].to_dataframe().reset_index()
    out["interventions"] = df[["checkpoint", "step", "run", *labels, "masked", "domain", *vars_]] \
        if "step" in df else df
    if "delta_nll_by_condition" in cube:
        cv = [v for v in cube.data_vars if v.endswith("_by_condition")]
        df = cube[cv].to_dataframe().reset_index()
        out["interventions_by_condition"] = df.rename(columns={v: v[: -len("_by_condition")] for v in cv})
    if "condition_gap" in cube:
        gv = [v for v in ("condition_gap", "condition_gap_lo", "condition_gap_hi") if v in cube]
        out["interventions_condition_gap"] = cube[gv + ["masked"]].to_dataframe().reset_index()
    if "rho" in cube:
        df = cube[["rho", "rho_lo", "rho_hi"]].to_dataframe().reset_index()
        dis = cube["disagree"].to_dataframe().reset_index()
        dis = dis.groupby(["checkpoint", "measure", "domain"])["disagree"].apply(lambda s: " ".join(map(str, s)))
        out["interventions_obs_vs_causal"] = df.merge(dis.reset_index(), on=["checkpoint", "measure", "domain"],
                                                      how="left")
        eff = cube[["effect", "effect_lo", "effect_hi"]].to_dataframe().reset_index()
        mv = cube["measure_value"].to_dataframe().reset_index().pivot_table(
            index=["checkpoint", "layer", "expert"], columns="measure", values="measure_value").reset_index()
        out["interventions_units"] = eff.merge(mv, on=["checkpoint", "layer", "expert"], how="left")
    return out


def headline(cube: xr.Dataset) -> dict:
    """summary.json numbers: drop-top-1 ΔNLL per layer, ρ per measure (domain all), cost, top disagreements."""
    out = {"forward_passes_total": int(cube.attrs.get("forward_passes_total", 0)),
           "forward_equivalents_total": float(cube.attrs.get("forward_equivalents_total", 0))}
    iv = np.asarray(cube["intervention"].values).astype(str)
    for c in map(str, cube["checkpoint"].values):
        d = cube.sel(checkpoint=c, domain="all")
        part = {}
        for j in np.flatnonzero(iv == "drop_top1"):
            r = d.isel(run=j)
            part.setdefault("drop_top1_delta_nll", {})[str(r["scope"].values)] = [
                round(float(r[v]), 4) for v in ("delta_nll", "delta_nll_lo", "delta_nll_hi")]
        if "rho" in cube:
            for m in map(str, cube["measure"].values):
                part.setdefault("rho", {})[m] = [round(float(d[v].sel(measure=m)), 3) for v in ("rho", "rho_lo", "rho_hi")]
                part.setdefault("most_disagreeing", {})[m] = [str(x) for x in d["disagree"].sel(measure=m).values]
        out[c] = part
    return out


def report_hook(layout, formats, summary: dict) -> str:
    """The "Interventions" section for ``analyses.report.build_report``: "" unless the stage ran."""
    import html
    import json
    import os
    import shutil

    from storage import cube as cubes

    path = Path(layout.intervention("interventions"))
    if not cubes.result_fingerprint(path):
        return ""
    cube = cubes.open_result(path)
    report_dir = Path(layout.report_dir)
    fig_dir = Path(layout.figures_dir) / NAME
    tables = report_dir / "tables"
    tables.mkdir(parents=True, exist_ok=True)
    Path(layout.tables_dir).mkdir(parents=True, exist_ok=True)
    links = []
    for name, df in _tables(cube).items():
        f = tables / f"{name}.csv"
        df.to_csv(f, index=False)
        shutil.copy2(f, Path(layout.tables_dir) / f.name)
        links.append(f'<a href="{html.escape(os.path.relpath(f, report_dir))}">{name}.csv</a>')
    summary[NAME] = headline(cube)
    blocks = []

    def fig(files, caption):
        for f in files:
            if Path(f).suffix == ".png":
                blocks.append(f'<figure><img src="{html.escape(os.path.relpath(f, report_dir))}" alt="{html.escape(caption)}" '
                              f'loading="lazy"><figcaption>{html.escape(caption)}</figcaption></figure>')

    iv = set(np.asarray(cube["intervention"].values).astype(str))
    if "drop_top1" in iv:
        fig(drop_top1(cube, fig_dir, formats),
            "Drop-top-1 (seed 000): in one MoE layer at a time, each token's own top-1 expert is masked; ΔNLL "
            "(masked − unmasked, nat per scored token) per layer and domain with a 95 % bootstrap CI over samples. "
            "0 = no effect. Earliest checkpoint dashed grey, final black.")
    if "mask" in iv:
        for scope in sorted(set(np.asarray(cube["scope"].values[np.asarray(cube["intervention"].values).astype(str)
                                                                 == "mask"]).astype(str))):
            if scope != "global":
                continue
            fig(degradation_panels(cube, fig_dir, formats, scope=scope),
                "Degradation curves (seed 001): ΔNLL when the top-n experts (over all layers) of each ranking are "
                "router-masked, n on a log scale, with 95 % bootstrap CIs; the grey band spans the random rankings "
                "(chance). A ranking above the band picks experts that matter more than chance.")
            fig(degradation_panels(cube, fig_dir, formats, scope=scope, metric="delta_accuracy",
                                   stem=f"{NAME}_degradation_accuracy"),
                "The same sweeps, change in next-token (argmax) accuracy.")
    if "rho" in cube:
        fig(obs_vs_causal_panels(cube, fig_dir, formats),
            "Observational vs causal: each point is one (layer, expert), coloured by layer; x = the observational "
            "measure, y = ΔNLL when that expert alone is router-masked. Titles: Spearman ρ with a 95 % bootstrap CI "
            "over samples; labelled points are the experts whose two ranks disagree most.")
        fig(rho_summary(cube, fig_dir, formats),
            "Spearman ρ between each observational measure and the causal effect, per domain (the effect and the "
            "measure both restricted to that domain's samples) and checkpoint; 0 = observation does not predict "
            "effect.")
    cost = json.loads(cube.attrs.get("forward_passes", "{}"))
    equiv = json.loads(cube.attrs.get("forward_equivalents", "{}"))
    rows = "".join(f"<tr><td>{html.escape(c)}</td><td>{html.escape(s)}</td><td>{n}</td>"
                   f"<td>{equiv.get(c, {}).get(s, n):g}</td></tr>"
                   for c, per in cost.items() for s, n in per.items())
    masks = json.loads(cube.attrs.get("masks", "{}"))
    defs = "".join(f"<dt>{html.escape(k)} mask</dt><dd>{html.escape(v)}</dd>" for k, v in masks.items())
    return f"""<section id="{NAME}"><h2>Interventions: what matters when experts are masked</h2>
<p class="caption">Experts are masked with hooks while the model scores the captured tokens (teacher-forced next-token
NLL and accuracy); every Δ is masked minus unmasked over the same samples. {html.escape(str(cube.attrs.get("intervals", "")))}.</p>
<dl>{defs}<dt>Cost</dt><dd>{html.escape(str(cube.attrs.get("cost", "")))}. Total:
{int(cube.attrs.get("forward_passes_total", 0))} forward passes; with hidden-state reuse (mask sets that start at
the same later layer share the unmasked layers before it) the layers actually run add up to
{float(cube.attrs.get("forward_equivalents_total", 0)):g} whole forwards.</dd></dl>
{''.join(blocks)}
<details><summary>Forward passes per checkpoint and sweep</summary><table><tr><th>checkpoint</th><th>sweep</th>
<th>forward passes</th><th>whole-forward equivalents run</th></tr>{rows}</table></details>
<p class="files">Cube: <code>{html.escape(os.path.relpath(path, report_dir))}</code> · tables: {' · '.join(links)}</p>
</section>"""
