"""The report's "Training runs" section: figures and tables from the cubes of :mod:`analyses.training_runs`.

Called once from ``analyses/report.py`` (:func:`report_hook`); reads ``analyses/training/*.zarr``.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import xarray as xr

from storage import cube as cubes

from .. import training as tr
from ..training_runs import PARTS


def section(training_dir: Path, figures_dir: Path, tables_dir: Path, report_dir: Path,
            formats: Sequence[str] = ("png",)) -> tuple[str, dict]:
    """HTML of the report's "Training runs" section and its summary, from the cubes under ``training_dir``.

    Returns ("", {}) when the stage did not run (no ``training_dir``).
    """
    from . import training as fig

    training_dir = Path(training_dir)
    if not (training_dir.with_suffix(".zarr") / "zarr.json").exists():  # the stage's completion mark
        return "", {}
    parts = {p: cubes.open_result(training_dir / f"{p}.zarr") for p in PARTS if (training_dir / f"{p}.zarr").exists()}
    out = Path(figures_dir)
    tables_dir = Path(tables_dir)
    tables_dir.mkdir(parents=True, exist_ok=True)
    blocks, summary, skipped = [], {}, {}
    for name, ds in parts.items():
        if ds.attrs.get("skipped"):
            skipped[name] = ds.attrs["skipped"]

    def imgs(files, caption):
        pngs = [f for f in files if Path(f).suffix == ".png"]
        others = [f for f in files if Path(f).suffix != ".png"]
        if not pngs:
            return
        links = "".join(f' · <a href="{html.escape(os.path.relpath(f, report_dir))}">{html.escape(Path(f).name)}</a>'
                        for f in others)
        blocks.append(f'<p class="caption">{html.escape(caption)}{links}</p>' + "".join(
            f'<figure><img src="{html.escape(os.path.relpath(f, report_dir))}" alt="{html.escape(Path(f).stem)}" '
            f'loading="lazy"></figure>' for f in pngs))

    logs = parts.get("logs")
    if logs is not None and not logs.attrs.get("skipped"):
        imgs(fig.curves(logs, out, formats), "Training curves per run: LM loss, load-balancing (aux) loss in the "
             "log's own definition (the dashed line marks its value at perfect balance where the log states it), "
             "z-loss and learning rate where logged.")
        imgs(fig.diversity(logs, out, formats), "Diversity losses as logged, per layer / dataset series.")
        entropy = fig.family_metrics(logs, "entropy")
        if entropy:
            imgs(fig.logged_entropy(logs, out, formats), "Routing entropy as the training logs record it, per layer "
                 "/ dataset series (left: against step; right: the last logged value across layers). CSV: "
                 "training_logged_entropy.csv (first, last, min, max and mean of each series).")
            tr.series_summary(logs, entropy).to_csv(tables_dir / "training_logged_entropy.csv", index=False)
        logs["value"].to_dataframe().dropna().reset_index().to_csv(tables_dir / "training_logs.csv", index=False)
        summary["runs"] = [str(r) for r in logs.run.values]
        summary["metrics"] = [str(m) for m in logs.metric.values]
    load = parts.get("load")
    if load is not None and not load.attrs.get("skipped"):
        imgs(fig.per_layer_trends(load, [("entropy", "entropy (nats)"), ("max_share", "largest load share"),
                                         ("dead_experts", "dead experts (count)")], out, "entropy_trends", formats),
             f"Routing entropy, largest expert load and dead experts (load < {tr.DEAD_FRACTION}/E) per checkpoint; "
             "colour = run, line style = layer. CSV: training_entropy.csv.")
        t = load[["entropy", "max_share", "dead_experts"]].to_dataframe().reset_index()
        t.to_csv(tables_dir / "training_entropy.csv", index=False)
        last = load.isel(step=-1)
        summary["final_dead_experts"] = {str(r): int(last.dead_experts.sel(run=r).sum()) for r in load.run.values}
        summary["final_max_share"] = {str(r): round(float(last.max_share.sel(run=r).max()), 4) for r in load.run.values}
    gate = parts.get("gate")
    if gate is not None and not gate.attrs.get("skipped"):
        imgs(fig.per_layer_trends(gate, [("mean_row_norm_change", "Δ mean row norm"),
                                         ("cosine_mean", "mean pairwise cosine"),
                                         ("effective_rank_change", "Δ effective rank"),
                                         ("logit_scale_change", "Δ logit scale")], out, "gate_diagnostics", formats),
             "Router weights per checkpoint, as change from the first checkpoint (step 0 = initialisation): row "
             "norms, pairwise cosine of router rows, effective rank, and the std of router logits on the eval tokens.")
        gate[["mean_row_norm", "cosine_mean", "cosine_max", "effective_rank", "logit_scale"]].to_dataframe() \
            .reset_index().to_csv(tables_dir / "training_gate.csv", index=False)
    _comparison_blocks(parts, out, formats, tables_dir, imgs, blocks, summary)
    if skipped:
        summary["skipped"] = skipped
        blocks.append("<ul>" + "".join(f"<li>{html.escape(k)}: skipped — {html.escape(v)}</li>"
                                       for k, v in skipped.items()) + "</ul>")
    page = ('<section id="training-runs"><h2>Training runs</h2>'
            f'<p class="caption">Cubes in <code>analyses/training/</code>; tables training_*.csv.</p>'
            + "".join(blocks) + "</section>")
    return page, summary


def _comparison_blocks(parts: dict, out: Path, formats, tables_dir: Path, imgs, blocks: list, summary: dict) -> None:
    """The section's run comparison, scores and data composition: figures via ``imgs``, tables, summary."""
    from . import training as fig

    cmp = parts.get("compare")
    if cmp is not None and not cmp.attrs.get("skipped"):
        imgs(_compare_figure(cmp, out, formats), f"Routing of each run compared with {cmp.attrs.get('against')} on "
             "the same tokens: top-1 agreement and top-k set overlap per layer and checkpoint (chance 1/E and k/E "
             "dashed); the first layer and token where the routing differs are in the table below and "
             "training_compare.csv.")
        blocks.append(_divergence_table(cmp))
        cmp.to_dataframe().reset_index().to_csv(tables_dir / "training_compare.csv", index=False)
        summary["routing_comparison"] = {
            str(r): {str(c): _divergence(cmp.sel(run=r, checkpoint=c))
                     for c in cmp.checkpoint.values if np.isfinite(cmp.agreement_top1.sel(run=r, checkpoint=c)).any()}
            for r in cmp.run.values}
    sc = parts.get("scores")
    if sc is not None and not sc.attrs.get("skipped"):
        imgs(fig.scores(sc, sc, out, formats), "Evaluation scores per task across checkpoints (↑/↓: higher/lower is "
             "better), each run's rank per task at the last step, and the 1×2 summary (PDF too).")
        sc.to_dataframe().dropna(subset=["score"]).reset_index().to_csv(tables_dir / "training_scores.csv", index=False)
        last = sc["rank"].isel(step=-1).mean(("task", "metric"), skipna=True)
        summary["mean_rank_last_step"] = {str(r): float(last.sel(run=r)) for r in sc.run.values}
    comp = parts.get("composition")
    if comp is not None and not comp.attrs.get("skipped"):
        imgs(fig.sunburst(comp, out, formats), "The experiment's data: domain (inner) → dataset → source (outer), "
             "sized in tokens and in samples.")
        comp.to_dataframe().reset_index().to_csv(tables_dir / "training_composition.csv", index=False)


def _divergence(one: xr.Dataset) -> dict:
    """Headline of one (run, checkpoint) comparison: first diverging layer and token, where it is, mean agreement."""
    out = {"first_divergence_layer": int(one.first_divergence_layer), "first_divergence_token": int(one.first_divergence_token)}
    for v, key in (("first_divergence_sample", "sample"), ("first_divergence_position", "position"),
                   ("first_divergence_text", "token_text")):
        if v in one:
            out[key] = int(one[v]) if key == "position" else str(one[v].values)
    out["mean_top1_agreement"] = round(float(one.agreement_top1.mean()), 4)
    out["mean_overlap"] = round(float(one.overlap.mean()), 4)
    return out


def _divergence_table(cmp: xr.Dataset) -> str:
    rows = []
    for r in cmp.run.values:
        for c in cmp.checkpoint.values:
            one = cmp.sel(run=r, checkpoint=c)
            if not np.isfinite(one.agreement_top1.values).any():
                continue
            d = _divergence(one)
            where = ("routing identical on every token" if d["first_divergence_token"] < 0 else
                     f"layer {d['first_divergence_layer']}, token {d['first_divergence_token']}"
                     + (f" (sample {d['sample']}, position {d['position']}, {d.get('token_text', '')!r})"
                        if "sample" in d else ""))
            rows.append(f"<tr><td>{html.escape(str(r))}</td><td>{html.escape(str(c))}</td>"
                        f'<td class="num">{d["mean_top1_agreement"]:.3f}</td><td class="num">{d["mean_overlap"]:.3f}</td>'
                        f"<td>{html.escape(where)}</td></tr>")
    return (f'<table class="headline"><caption>First divergence from {html.escape(str(cmp.attrs.get("against")))}'
            "</caption><tr><th>run</th><th>checkpoint</th><th>top-1 agreement</th><th>top-k overlap</th>"
            "<th>first layer and token where routing differs</th></tr>" + "".join(rows) + "</table>")


def _compare_figure(cmp: xr.Dataset, out: Path, formats) -> list[Path]:
    from . import plotting

    runs = list(cmp.run.values)
    ck = [c for c in cmp.checkpoint.values if np.isfinite(cmp.agreement_top1.sel(checkpoint=c).values).any()]
    E = float(cmp.attrs.get("num_experts") or 0)
    k = float(cmp.attrs.get("top_k") or 0)
    with plotting.style():
        fig, axes = plotting.new_figure(len(runs), 2, panel_size=(3.4, 2.4), sharey=True)
        for row, r in enumerate(runs):
            for ax, var, label, chance in ((axes[row, 0], "agreement_top1", "top-1 agreement", 1 / E if E else None),
                                           (axes[row, 1], "overlap", "top-k set overlap", k / E if E and k else None)):
                for c, st in zip(ck, plotting.checkpoint_styles(list(range(len(ck))))):
                    s = cmp[var].sel(run=r, checkpoint=c)
                    ax.plot(cmp.layer.values, s.values, label=str(c), **st)
                if chance:
                    plotting.chance_line(ax, chance)
                ax.set_ylim(0, 1.02)
                ax.set_xticks([int(x) for x in cmp.layer.values])
                ax.set_title(f"{r} vs {cmp.attrs.get('against')}: {label}", fontsize=7)
                plotting.label_axes(ax, "layer", label)
            axes[row, 0].legend(frameon=False, fontsize=6)
        return plotting.savefig(fig, out, "routing_agreement", formats)


def report_hook(layout, formats, summary: dict) -> str:
    """The "Training runs" section for ``analyses.report.build_report`` (one call there); fills ``summary``.

    Tables go to ``report/tables/training_*.csv`` and are mirrored to ``tables/``.
    """
    import shutil

    report_tables = Path(layout.report_dir) / "tables"
    page, part = section(Path(layout.analyses_dir) / "training", Path(layout.figures_dir) / "training_runs",
                         report_tables, Path(layout.report_dir), formats)
    if part:
        summary["training_runs"] = part
        Path(layout.tables_dir).mkdir(parents=True, exist_ok=True)
        for f in report_tables.glob("training_*.csv"):
            shutil.copy2(f, Path(layout.tables_dir) / f.name)
    return page


# ------------------------------------------------------------------ every comparing section, runs side by side


def _flat_scalars(headline, prefix: str = "") -> dict:
    """A headline's scalar numbers as {"outer › inner": value} (lists and text left out)."""
    out = {}
    if isinstance(headline, dict):
        for k, v in headline.items():
            out.update(_flat_scalars(v, f"{prefix} › {k}" if prefix else str(k)))
    elif isinstance(headline, (bool, np.bool_)):
        pass
    elif isinstance(headline, (int, float, np.integer, np.floating)):
        out[prefix] = float(headline)
    return out


def _num(v) -> str:
    return "—" if v is None or not np.isfinite(v) else f"{v:.4g}"


def other_runs(layout) -> list[tuple[str, Path]]:
    """(name, run folder) of each further run the training stage compared (its mark's attrs), main run excluded."""
    mark = Path(layout.analyses_dir) / "training.zarr"
    if not (mark / "zarr.json").exists():
        return []
    attrs = cubes.open_result(mark).attrs
    names, roots = list(attrs.get("runs") or []), list(attrs.get("run_roots") or [])
    # run folders are stored relative to this run's (tasks/training.py)
    return [(str(n), Path(layout.root) / r) for n, r in zip(names[1:], roots[1:])]


def side_by_side(layout, name: str, analysis, main_files: Sequence[Path], formats: Sequence[str] = ("png",),
                 main_headline: dict | None = None) -> tuple[str, dict]:
    """HTML showing analysis ``name`` of every run side by side, and each further run's headline numbers.

    The further runs are the experiment's ``[[runs]]`` (found through the training stage's mark); a run
    whose own experiment computed ``name`` (``tasks/training.py`` runs the analyses both list) gets the
    same figures, drawn from its own cube into ``report/figures/<name>/runs/<run>/``: one column per
    run, one row per figure. Below them, the scalar headline numbers with a column per run.
    Returns ("", {}) when no further run has this analysis.
    """
    from storage.layout import RunLayout

    runs = []
    mark = Path(layout.analyses_dir) / "training.zarr"
    # only the runs the training stage computed this analysis for: a result another configuration left
    # in that run's folder (its experiment no longer lists the analysis) is not current, so not shown
    listed = set((cubes.open_result(mark).attrs.get("side_by_side") or {}).get(name, [])) \
        if (mark / "zarr.json").exists() else set()
    for run, root in other_runs(layout):
        path = RunLayout(root).analysis(name)
        if run not in listed or cubes.result_fingerprint(path, verify=False) is None:
            continue
        result = cubes.open_result(path)
        if result.attrs.get("skipped"):
            continue
        files = analysis.figure(result, Path(layout.figures_dir) / name / "runs" / run, formats)
        runs.append((run, [Path(f) for f in files if Path(f).suffix == ".png"], analysis.summary(result)))
    if not runs:
        return "", {}
    main_name = Path(layout.root).name
    mark = Path(layout.analyses_dir) / "training.zarr"
    if (mark / "zarr.json").exists():
        main_name = str((cubes.open_result(mark).attrs.get("runs") or [main_name])[0])
    columns = [(main_name, [Path(f) for f in main_files if Path(f).suffix == ".png"], main_headline or {})] + runs
    stems = list(dict.fromkeys(f.stem for _, files, _ in columns for f in files))
    report_dir = Path(layout.report_dir)
    n = len(columns)
    cells = "".join(f'<div><strong>{html.escape(r)}</strong></div>' for r, _, _ in columns)
    for stem in stems:
        for _, files, _ in columns:
            f = next((x for x in files if x.stem == stem), None)
            cells += (f'<div><img src="{html.escape(os.path.relpath(f, report_dir))}" alt="{html.escape(stem)}" '
                      f'loading="lazy"></div>' if f else "<div>—</div>")
    flat = [_flat_scalars(h) for _, _, h in columns]
    keys = list(dict.fromkeys(k for f in flat for k in f))[:40]
    table = ""
    if keys:
        head = "".join(f"<th>{html.escape(r)}</th>" for r, _, _ in columns)
        body = "".join(f"<tr><th>{html.escape(k)}</th>" + "".join(f'<td class="num">{_num(f.get(k))}</td>' for f in flat)
                       + "</tr>" for k in keys)
        table = f'<table class="headline"><tr><th></th>{head}</tr>{body}</table>'
    page = (f'<details class="runs" open><summary>Runs side by side: {html.escape(", ".join(r for r, _, _ in columns))}'
            f'</summary><p class="caption">The same analysis on each run&rsquo;s own routing cube (its own checkpoints '
            f'and data), a column per run.</p>'
            f'<div style="display:grid;grid-template-columns:repeat({n},minmax(0,1fr));gap:.5em">{cells}</div>'
            f"{table}</details>")
    return page, {r: h for r, _, h in runs}
