"""The demo model's training curve: LM loss (and the load-balancing loss) per step, held-out loss per domain.

Drawn from the demo's ``training_log.json`` (``capture/demo/train.py`` writes
it): ``{"steps": [{"step", "loss", "aux_loss"?}, ...], "checkpoints": [{"step",
"eval_nll": {domain: nats/token}}, ...]}``. The report calls :func:`figure` when
the run trained a model; an imported trace has no such log.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from . import plotting


def figure(log: Mapping, out_dir: Path, formats: Sequence[str] = ("png",)) -> tuple[list[Path], dict]:
    """Write ``training_loss.<fmt>`` under ``out_dir``; return the files and the first/last LM loss.

    Returns ``([], {})`` when the log has no per-step rows.
    """
    rows = log.get("steps") or []
    if not rows or not isinstance(rows[0], Mapping):
        return [], {}
    steps = [r["step"] for r in rows]
    loss = [r["loss"] for r in rows]
    aux = [r.get("aux_loss") for r in rows]
    ck = log.get("checkpoints") or []
    held_out = bool(ck) and "eval_nll" in ck[0]
    with plotting.style():
        fig, axes = plotting.new_figure(1, 2 if held_out else 1, panel_size=(3.6, 2.6) if held_out else (7.2, 2.6))
        ax = axes[0, 0]
        handles = ax.plot(steps, loss, label="LM loss (train)")
        ax.set_xlabel("training step")
        ax.set_ylabel("cross-entropy (nats/token)")
        if any(a is not None for a in aux):
            ax2 = ax.twinx()
            ax2.grid(False)
            # the log names its aux loss (transformers' definition, ≈ k at balance, not the balance analysis' 1)
            label = str(log.get("aux_loss_label") or "load-balancing loss")
            handles += ax2.plot(steps, aux, color="0.5", lw=1, ls="--", label=label)
            ax2.set_ylabel("aux loss (dashed)")
            ax2.spines["right"].set_visible(True)
        ax.legend(handles=handles, frameon=False, loc="upper right", fontsize=6)
        ax.set_title("Training loss")
        if held_out:
            ax3 = axes[0, 1]
            for dom in ck[0]["eval_nll"]:
                ax3.plot([c["step"] for c in ck], [c["eval_nll"][dom] for c in ck], marker="o",
                         label=plotting.display_label(dom))
            ax3.set_xlabel("checkpoint step")
            ax3.set_ylabel("held-out NLL (nats/token)")
            ax3.set_title("Held-out loss by domain")
            ax3.legend(frameon=False)
        files = plotting.savefig(fig, out_dir, "training_loss", formats)
    return files, {"final_lm_loss": float(loss[-1]), "initial_lm_loss": float(loss[0])}


# ------------------------------------------------------------------ training runs (issue 16)
# Inputs are the cubes of storage.training and analyses.training; runs are told apart by colour
# (Okabe-Ito), layers by line style where both vary.

import numpy as np  # noqa: E402


def _run_colours(runs) -> dict:
    return {r: plotting.OKABE_ITO[i % len(plotting.OKABE_ITO)] for i, r in enumerate(runs)}


CURVE_GROUPS = (
    ("LM loss", ("lm_loss", "loss"), "cross-entropy (nats/token)"),
    ("Load-balancing (aux) loss", ("aux_loss",), "aux loss (as logged)"),
    ("Router z-loss", ("z_loss",), "z-loss (as logged)"),
    ("Learning rate", ("lr",), "learning rate"),
)


def curves(cube, out_dir: Path, formats: Sequence[str] = ("png",)) -> list[Path]:
    """``training_curves``: LM, balance/aux and z-loss and learning rate per run against step (panels with data only)."""
    metrics = [str(m) for m in cube.metric.values]
    panels = []
    for title, names, ylabel in CURVE_GROUPS:
        present = [n for n in names if n in metrics]
        if present:
            panels.append((title, present[0], ylabel))
    if not panels:
        return []
    colours = _run_colours(cube.run.values)
    with plotting.style():
        fig, axes = plotting.new_figure(*plotting.panel_grid(len(panels), 2), panel_size=(3.4, 2.4))
        for ax, (title, metric, ylabel) in zip(axes.flat, panels):
            for run in cube.run.values:
                s = cube["value"].sel(run=run, metric=metric)
                ok = ~np.isnan(s.values)
                if ok.any():
                    ax.plot(cube.step.values[ok], s.values[ok], color=colours[run], lw=1, label=str(run))
            ax.set_title(f"{title} ({metric})")
            plotting.label_axes(ax, "training step", ylabel)
            if metric == "aux_loss" and "aux_loss_ideal" in cube.attrs:
                plotting.chance_line(ax, float(cube.attrs["aux_loss_ideal"]), label="perfect balance")
            ax.legend(frameon=False, fontsize=6)
        plotting.hide_unused(axes, len(panels))
        return plotting.savefig(fig, out_dir, "training_curves", formats)


def diversity(cube, out_dir: Path, formats: Sequence[str] = ("png",)) -> list[Path]:
    """``diversity_losses``: the logged diversity losses across layers and datasets, a row per run
    (:func:`logged_family`)."""
    return logged_family(cube, out_dir, formats, word="diversity", what="diversity losses",
                         ylabel="diversity loss (as logged)", stem="diversity_losses")


def logged_entropy(cube, out_dir: Path, formats: Sequence[str] = ("png",)) -> list[Path]:
    """``logged_entropy``: routing-entropy series the training logs carry (seed 000's entropy trends), a row
    per run (:func:`logged_family`)."""
    return logged_family(cube, out_dir, formats, word="entropy", what="routing entropy (logged)",
                         ylabel="entropy (as logged)", stem="logged_entropy")


def family_metrics(cube, word: str) -> list[str]:
    """The metrics of a training-log cube whose name holds ``word`` (case-insensitive)."""
    return [str(m) for m in cube.metric.values if word in str(m).lower()]


def logged_family(cube, out_dir: Path, formats: Sequence[str] = ("png",), *, word: str, what: str, ylabel: str,
                  stem: str) -> list[Path]:
    """The logged series whose metric name holds ``word``, across layers and datasets, a row per run.

    Left: every series against step (colour = layer, line style = dataset). Right: each series' last
    logged value against its layer, a line per dataset (the seed's "… across layers/datasets"); a bar per
    series where the log names no layer. Layer and dataset come from the cube's
    ``metric_layer``/``metric_dataset`` coordinates (``storage.training.metric_parts``).
    """
    from storage.training import metric_parts

    sel = [i for i, m in enumerate(cube.metric.values) if word in str(m).lower()]
    if not sel:
        return []
    sub = cube.isel(metric=sel)
    names = [str(m) for m in sub.metric.values]
    if "metric_layer" in sub.coords:
        layer_of = dict(zip(names, (int(x) for x in sub.metric_layer.values)))
        dset_of = dict(zip(names, (str(x) for x in sub.metric_dataset.values)))
    else:  # a cube written before the coordinates existed
        layer_of = {m: metric_parts(m)[0] for m in names}
        dset_of = {m: metric_parts(m)[1] for m in names}
    runs = [r for r in sub.run.values if np.isfinite(sub["value"].sel(run=r).values).any()]
    layers = sorted(set(layer_of.values()))
    datasets = list(dict.fromkeys(dset_of.values()))
    lcol, _ = plotting.series_colours(layers)
    colour = dict(zip(layers, lcol))
    dstyle = {d: plotting.LINESTYLES[i % len(plotting.LINESTYLES)] for i, d in enumerate(datasets)}
    steps = cube.step.values
    with plotting.style():
        fig, axes = plotting.new_figure(len(runs), 2, panel_size=(3.4, 2.4))
        for row, run in enumerate(runs):
            ax, ax2 = axes[row, 0], axes[row, 1]
            last = {}
            for m in names:
                v = sub["value"].sel(run=run, metric=m).values
                ok = np.isfinite(v)
                if not ok.any():
                    continue
                ax.plot(steps[ok], v[ok], color=colour[layer_of[m]], ls=dstyle[dset_of[m]], lw=1, label=m)
                last[m] = float(v[ok][-1])
            ax.set_title(f"{run}: {what}", fontsize=7)
            plotting.label_axes(ax, "training step", ylabel)
            ax.legend(frameon=False, fontsize=5)
            per_layer = [m for m in last if layer_of[m] >= 0]
            if per_layer:
                for d in datasets:
                    ms = sorted((m for m in per_layer if dset_of[m] == d), key=lambda m: layer_of[m])
                    if ms:
                        ax2.plot([layer_of[m] for m in ms], [last[m] for m in ms], marker="o", ls=dstyle[d],
                                 color="0.2", label=d or "(no dataset)")
                ax2.set_xticks(sorted({layer_of[m] for m in per_layer}))
                plotting.label_axes(ax2, "layer", "last logged value")
                ax2.legend(frameon=False, fontsize=6)
            else:
                ax2.bar(range(len(last)), list(last.values()), color=[colour[layer_of[m]] for m in last])
                ax2.set_xticks(range(len(last)), list(last), rotation=30, ha="right", fontsize=6)
                plotting.label_axes(ax2, "series", "last logged value")
            ax2.set_title(f"{run}: across layers and datasets", fontsize=7)
        return plotting.savefig(fig, out_dir, stem, formats)


def per_layer_trends(ds, variables: Sequence[tuple[str, str]], out_dir: Path, stem: str,
                     formats: Sequence[str] = ("png",), x: str = "step") -> list[Path]:
    """A panel per (variable, y label); a line per (run, layer): colour = run, line style = layer."""
    variables = [(v, y) for v, y in variables if v in ds and np.isfinite(ds[v].values).any()]
    if not variables:
        return []
    colours = _run_colours(ds.run.values)
    layers = list(ds.layer.values)
    with plotting.style():
        fig, axes = plotting.new_figure(*plotting.panel_grid(len(variables), 2), panel_size=(3.4, 2.4))
        for ax, (v, ylabel) in zip(axes.flat, variables):
            for run in ds.run.values:
                for li, layer in enumerate(layers):
                    s = ds[v].sel(run=run, layer=layer)
                    xs = s[x].values if x in s.coords else np.arange(s.size)
                    ok = np.isfinite(s.values)
                    if ok.any():
                        ax.plot(xs[ok], s.values[ok], color=colours[run], marker="o", ms=2.5, lw=1,
                                ls=plotting.LINESTYLES[li % len(plotting.LINESTYLES)],
                                label=f"{run} · layer {layer}" if len(layers) > 1 else str(run))
            ax.set_title(ds[v].attrs.get("long_name", v), fontsize=7)
            plotting.label_axes(ax, "checkpoint step", ylabel)
        axes.flat[0].legend(frameon=False, fontsize=5, ncol=2)
        plotting.hide_unused(axes, len(variables))
        return plotting.savefig(fig, out_dir, stem, formats)


def scores(sc, ranks, out_dir: Path, formats: Sequence[str] = ("png",)) -> list[Path]:
    """``score_trends`` (a panel per task and metric, a line per run), ``score_ranks`` (run × task at the
    last step) and the 1×2 ``score_summary`` (mean score over tasks by step; mean rank per run), always as PDF too."""
    colours = _run_colours(sc.run.values)
    pairs = [(t, m) for m in sc.metric.values for t in sc.task.values
             if np.isfinite(sc.score.sel(task=t, metric=m).values).any()]
    files: list[Path] = []
    fmts = tuple(dict.fromkeys([*formats, "pdf"]))
    with plotting.style():
        fig, axes = plotting.new_figure(*plotting.panel_grid(len(pairs), 4), panel_size=(2.4, 2.0))
        for ax, (t, m) in zip(axes.flat, pairs):
            for run in sc.run.values:
                s = sc.score.sel(run=run, task=t, metric=m).values
                ok = np.isfinite(s)
                ax.plot(sc.step.values[ok], s[ok], marker="o", ms=3, lw=1, color=colours[run], label=str(run))
            arrow = "↑" if bool(sc.higher_is_better.sel(metric=m)) else "↓"
            ax.set_title(f"{t} · {m} {arrow}", fontsize=7)
        plotting.outer_labels(axes, len(pairs), "checkpoint step", "score")
        axes.flat[0].legend(frameon=False, fontsize=6)
        plotting.hide_unused(axes, len(pairs))
        files += plotting.savefig(fig, out_dir, "score_trends", fmts)

        last = ranks["rank"].isel(step=-1)
        cols = [f"{t} · {m}" for t, m in pairs]
        mat = np.array([[float(last.sel(run=r, task=t, metric=m)) for t, m in pairs] for r in sc.run.values])
        fig, axes = plotting.new_figure(1, 1, panel_size=(max(3.0, 0.5 * len(cols) + 1.5), 0.5 * len(sc.run) + 1.2))
        ax = axes[0, 0]
        im = ax.imshow(mat, cmap=plotting.SEQUENTIAL + "_r", vmin=1, vmax=max(len(sc.run), 2), aspect="auto")
        ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=6)
        ax.set_yticks(range(len(sc.run)), [str(r) for r in sc.run.values])
        for (i, j), v in np.ndenumerate(mat):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7, color="w")
        ax.set_title(f"Rank of each run at step {int(sc.step.values[-1])} (1 = best)")
        ax.grid(False)
        fig.colorbar(im, ax=ax, label="rank")
        files += plotting.savefig(fig, out_dir, "score_ranks", formats)

        fig, axes = plotting.new_figure(1, 2, panel_size=(3.4, 2.5))
        # left: mean over (task, metric) of the score in units of that task's spread, oriented so up = better
        z = sc.score.stack(tm=("task", "metric"))
        sign = xr_sign(sc)
        zz = (z * sign - (z * sign).mean(("run", "step"))) / (z.std(("run", "step")) + 1e-12)
        for run in sc.run.values:
            m = zz.sel(run=run).mean("tm", skipna=True).values
            ok = np.isfinite(m)
            axes[0, 0].plot(sc.step.values[ok], m[ok], marker="o", color=colours[run], label=str(run))
        plotting.label_axes(axes[0, 0], "checkpoint step", "mean standardised score (↑ better)")
        axes[0, 0].set_title("Scores across tasks")
        axes[0, 0].legend(frameon=False, fontsize=6)
        mean_rank = last.mean(("task", "metric"), skipna=True)
        axes[0, 1].bar([str(r) for r in sc.run.values], mean_rank.values,
                       color=[colours[r] for r in sc.run.values])
        axes[0, 1].set_ylabel("mean rank at the last step (1 = best)")
        axes[0, 1].set_title("Rank over tasks")
        files += plotting.savefig(fig, out_dir, "score_summary", fmts)
    return files


def xr_sign(sc):
    """+1 for higher-is-better metrics, -1 for lower-is-better, broadcast like ``score.stack(tm=...)``."""
    s = (sc.higher_is_better.astype(float) * 2 - 1)
    return s.broadcast_like(sc.score).stack(tm=("task", "metric"))


def sunburst(comp, out_dir: Path, formats: Sequence[str] = ("png",)) -> list[Path]:
    """``data_composition``: domain → dataset → source rings, sized in tokens (left) and samples (right)."""
    from analyses.training import sunburst_rings

    domains = list(dict.fromkeys(str(d) for d in comp.domain.values))
    base = {d: plotting.OKABE_ITO[i % len(plotting.OKABE_ITO)] for i, d in enumerate(domains)}
    import matplotlib.colors as mcolors

    with plotting.style():
        fig, axes = plotting.new_figure(1, 2, panel_size=(3.4, 3.4), subplot_kw={"projection": "polar"})
        for ax, size in zip(axes.flat, ("tokens", "samples")):
            if int(comp[size].sum()) == 0:
                ax.set_visible(False)
                continue
            rings = sunburst_rings(comp, size)
            for level, ring in enumerate(rings):
                # the parent domain of each segment: segments are in (domain, dataset, source) order
                dom_of = _segment_domains(rings[0], ring)
                for (label, start, width), dom in zip(ring, dom_of):
                    c = np.array(mcolors.to_rgb(base[dom]))
                    c = c + (1 - c) * (0.3 * level)  # lighter outwards
                    ax.bar(2 * np.pi * (start + width / 2), 1.0, width=2 * np.pi * width, bottom=0.6 + level,
                           color=c, edgecolor="white", linewidth=0.5)
                    if width > 0.06 and level < 2 or width > 0.1:
                        ax.text(2 * np.pi * (start + width / 2), 1.1 + level, _short(label), ha="center", va="center",
                                fontsize=5)
            ax.set_axis_off()
            ax.set_title(f"by {size} ({int(comp[size].sum()):,})", fontsize=8)
        return plotting.savefig(fig, out_dir, "data_composition", formats)


def _segment_domains(domain_ring, ring) -> list[str]:
    out = []
    for _, start, width in ring:
        mid = start + width / 2
        out.append(next(l for l, s, w in domain_ring if s - 1e-12 <= mid <= s + w + 1e-12))
    return out


def _short(label: str, n: int = 16) -> str:
    """A ring label cut to ``n`` characters with an ellipsis (the full names are in the composition table)."""
    return label if len(label) <= n else label[: n - 1] + "…"
