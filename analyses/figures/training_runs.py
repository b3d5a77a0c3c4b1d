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
    cmp = parts.get("compare")
    if cmp is not None and not cmp.attrs.get("skipped"):
        imgs(_compare_figure(cmp, out, formats), f"Routing of each run compared with {cmp.attrs.get('against')} on "
             "the same tokens: top-1 agreement per layer and checkpoint (chance 1/E dashed).")
        cmp.to_dataframe().reset_index().to_csv(tables_dir / "training_compare.csv", index=False)
        summary["routing_comparison"] = {
            str(r): {str(c): {"first_divergence_layer": int(cmp.first_divergence_layer.sel(run=r, checkpoint=c)),
                              "first_divergence_token": int(cmp.first_divergence_token.sel(run=r, checkpoint=c)),
                              "mean_top1_agreement": round(float(cmp.agreement_top1.sel(run=r, checkpoint=c).mean()), 4)}
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
    if skipped:
        summary["skipped"] = skipped
        blocks.append("<ul>" + "".join(f"<li>{html.escape(k)}: skipped — {html.escape(v)}</li>"
                                       for k, v in skipped.items()) + "</ul>")
    page = ('<section id="training-runs"><h2>Training runs</h2>'
            f'<p class="caption">Cubes in <code>analyses/training/</code>; tables training_*.csv.</p>'
            + "".join(blocks) + "</section>")
    return page, summary


def _compare_figure(cmp: xr.Dataset, out: Path, formats) -> list[Path]:
    from . import plotting

    runs = list(cmp.run.values)
    ck = [c for c in cmp.checkpoint.values if np.isfinite(cmp.agreement_top1.sel(checkpoint=c).values).any()]
    E = float(cmp.attrs.get("num_experts") or 0)
    with plotting.style():
        fig, axes = plotting.new_figure(1, len(runs), panel_size=(3.4, 2.4), sharey=True)
        for ax, r in zip(axes.flat, runs):
            for c, st in zip(ck, plotting.checkpoint_styles(list(range(len(ck))))):
                s = cmp.agreement_top1.sel(run=r, checkpoint=c)
                ax.plot(cmp.layer.values, s.values, label=str(c), **st)
            if E:
                plotting.chance_line(ax, 1 / E)
            ax.set_ylim(0, 1.02)
            ax.set_title(f"{r} vs {cmp.attrs.get('against')}")
            plotting.label_axes(ax, "layer", "top-1 agreement")
            ax.legend(frameon=False, fontsize=6)
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
