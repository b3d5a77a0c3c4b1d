"""Assemble the HTML report, tables and summary from finished analysis cubes.

Layout (see ``storage.RunLayout``): ``report/index.html``,
``report/figures/<analysis>/*.png``, ``tables/<analysis>.csv``,
``summary.json``. ``summary.json`` is written last: its fingerprint is what
marks the report complete.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import html
import json
import os
import re
from pathlib import Path

import numpy as np

from storage import cube as cubes
from storage.schema import is_counts_cube

# Routing-cube attrs that say what an import excluded or assumed; the report lists them.
IMPORT_NOTES = ("warmup_excluded", "layers_assumed", "step_inferred")


# Spreadsheet formula injection (OWASP "CSV Injection"): a cell starting with one of
# these is run as a formula by Excel/LibreOffice/Sheets when the CSV is opened.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def escape_cell(value):
    """``value`` made inert for spreadsheets: a string starting with = + - @ tab or CR gets a leading "'".

    Only strings are touched, and a string that is a plain number ("-3", "+1e5")
    is left as it is: it cannot hold a formula. Numbers stay numbers.
    """
    if isinstance(value, str) and value.startswith(_FORMULA_START) and not _PLAIN_NUMBER.match(value):
        return "'" + value
    return value


def csv_safe(table):
    """A copy of the DataFrame ``table`` with :func:`escape_cell` applied to its text cells and column names.

    Numeric, boolean and datetime columns are returned unchanged (a negative
    number is a number, not a formula); object, string and categorical columns
    are escaped cell by cell.
    """
    import pandas as pd

    out = table.copy()
    for col in out.columns:
        s = out[col]
        if isinstance(s.dtype, pd.CategoricalDtype):
            out[col] = s.astype(object).map(escape_cell)
        elif s.dtype == object or pd.api.types.is_string_dtype(s.dtype):
            out[col] = s.map(escape_cell)
    out.columns = [escape_cell(c) for c in out.columns]
    return out


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return None if not np.isfinite(o) else float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _training_figure(layout, formats) -> tuple[list[Path], dict]:
    """Loss curve of the demo model, when the run trained one."""
    log_path = layout.model_dir / "training_log.json"
    if not log_path.exists():
        return [], {}
    log = json.loads(log_path.read_text())
    rows = log.get("steps") or []
    if not rows or not isinstance(rows[0], dict):
        return [], {}
    steps = [r["step"] for r in rows]
    loss = [r["loss"] for r in rows]
    aux = [r.get("aux_loss") for r in rows]
    import matplotlib.pyplot as plt

    from .plotting import savefig, style

    with style():
        fig, (ax, ax3) = plt.subplots(1, 2, figsize=(10, 3.4))
        ax.plot(steps, loss, label="LM loss (train)")
        ax.set_xlabel("training step")
        ax.set_ylabel("cross-entropy (nats/token)")
        if any(a is not None for a in aux):
            ax2 = ax.twinx()
            ax2.plot(steps, aux, color="0.5", lw=1, ls="--", label="load-balancing loss")
            ax2.set_ylabel("load-balancing loss (dashed)")
        ax.set_title("Training loss")
        ck = log.get("checkpoints") or []
        if ck and "eval_nll" in ck[0]:
            for dom in ck[0]["eval_nll"]:
                ax3.plot([c["step"] for c in ck], [c["eval_nll"][dom] for c in ck], marker="o", label=dom)
            ax3.set_xlabel("checkpoint step")
            ax3.set_ylabel("held-out NLL (nats/token)")
            ax3.set_title("Held-out loss by domain")
            ax3.legend(frameon=False)
        else:
            ax3.set_visible(False)
        fig.tight_layout()
        files = savefig(fig, layout.figures_dir / "training", "training_loss", formats)
    return files, {"final_lm_loss": float(loss[-1]), "initial_lm_loss": float(loss[0])}


def _img(path: Path, root: Path) -> str:
    rel = os.path.relpath(path, root)
    return f'<figure><img src="{html.escape(rel)}" alt="{html.escape(path.stem)}" loading="lazy"></figure>'


def _artifact_list(files: list[Path], root: Path) -> str:
    """Links to an analysis' extra files, grouped by their folder."""
    if not files:
        return ""
    base = os.path.commonpath([str(f.parent) for f in files])
    items = "".join(
        f'<li><a href="{html.escape(os.path.relpath(f, root))}">{html.escape(os.path.relpath(f, base))}</a></li>'
        for f in files
    )
    return f'<details class="files" open><summary>Files for other tools ({len(files)})</summary><ul>{items}</ul></details>'


def _import_note(key: str, value) -> str:
    """One sentence for an import note of the routing cube's attrs (IMPORT_NOTES)."""
    if key == "warmup_excluded":
        try:
            w = json.loads(value)
            first = w["first_runs"][0] if w.get("first_runs") else {}
            return (f"Warm-up / dummy batches: {w['tokens']} of {w['of_tokens']} tokens ({100 * w['share']:.1f} %) "
                    f"in {w['runs']} run(s), first at sample {first.get('first_sample', '?')} "
                    f"({', '.join(first.get('criteria', []))}); {w['note']}.")
        except (ValueError, KeyError, TypeError):
            pass
    return f"{key}: {value}"


def build_report(exp, layout, analysis_names: list[str], *, fingerprint: str, dashboard: str = "") -> Path:
    """Render figures, tables, summary.json and index.html for ``analysis_names``."""
    from . import get

    formats = tuple(exp.report.formats) if "png" in exp.report.formats else ("png", *exp.report.formats)
    routing = cubes.open_routing(layout.routing)
    sections = []
    summary = {
        "experiment": exp.name,
        "experiment_file": exp.source_file,
        "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {k: routing.attrs.get(k) for k in ("model_family", "num_experts", "top_k", "router_semantics")},
        "checkpoints": {str(c): int(s) for c, s in zip(routing.checkpoint.values, routing.step.values)},
        "layers": [int(x) for x in routing.layer.values],
        "tokens": 0,
        "samples": 0,
        "domains": {},
        "analyses": {},
    }
    if is_counts_cube(routing):
        # an aggregate-counts import: tokens per domain are implied by the slots (k per token)
        slots = np.asarray(routing["slot_counts"].isel(checkpoint=-1, layer=0).sum("expert").values)
        doms = [str(d) for d in routing["domain"].values]  # zarr 3 text: StringDType, no astype(str)
        counts = slots // max(int(routing.attrs["top_k"]), 1)
    else:
        summary["samples"] = int(np.unique(routing["sample"].values).size)
        doms, counts = np.unique(routing["domain"].values.astype(str), return_counts=True)
    summary["domains"] = {str(d): int(n) for d, n in zip(doms, counts)}
    summary["tokens"] = int(sum(summary["domains"].values()))
    # what an import left out or assumed (warm-up batches, layer ids), stated next to the numbers
    notes = {k: routing.attrs[k] for k in IMPORT_NOTES if routing.attrs.get(k)}
    if notes:
        summary["import_notes"] = notes
    layout.tables_dir.mkdir(parents=True, exist_ok=True)

    train_files, train_summary = _training_figure(layout, formats)
    if train_summary:
        summary["training"] = train_summary

    for name in analysis_names:
        a = get(name)
        result = cubes.open_result(layout.analysis(name))
        if result.attrs.get("skipped"):
            summary.setdefault("skipped", {})[name] = result.attrs["skipped"]
            sections.append(
                f'<section id="{html.escape(name)}"><h2>{html.escape(a.title)}</h2>'
                f'<p class="caption"><strong>Skipped:</strong> {html.escape(result.attrs["skipped"])}.</p></section>'
            )
            continue
        out = layout.figures_dir / name
        files = a.figure(result, out, formats)
        table = a.table(result)
        # labels and token text come from user data: escaped so the CSV cannot carry spreadsheet formulas
        csv_safe(table).to_csv(layout.tables_dir / f"{name}.csv", index=False)
        # Extra files for other tools (e.g. mask points for ablation sweeps), linked below.
        extra = [Path(f) for f in a.artifacts(result, layout.tables_dir / name)] if a.artifacts else []
        if extra:
            summary.setdefault("artifacts", {})[name] = [os.path.relpath(f, layout.root) for f in extra]
        headline = a.summary(result)
        summary["analyses"][name] = {
            "definition": result.attrs.get("definition", ""),
            "chance": result.attrs.get("chance", ""),
            "headline": headline,
        }
        pngs = [f for f in files if Path(f).suffix == ".png"]
        others = [f for f in files if Path(f).suffix != ".png"]
        chance = result.attrs.get("chance", "")
        sections.append(
            f"""
<section id="{html.escape(name)}">
  <h2>{html.escape(a.title)}</h2>
  <p class="caption">{html.escape(a.caption)}</p>
  <dl>
    <dt>Definition</dt><dd>{html.escape(str(result.attrs.get("definition", "")))}</dd>
    <dt>Normalisation</dt><dd>{html.escape(str(result.attrs.get("normalisation", "")))}</dd>
    <dt>Chance level</dt><dd>{html.escape(str(chance)) or "—"}</dd>
    {f'<dt>Intervals</dt><dd>{html.escape(str(result.attrs["intervals"]))}</dd>' if result.attrs.get("intervals") else ""}
  </dl>
  {''.join(_img(f, layout.report_dir) for f in pngs)}
  <p class="files">Cube: <code>{html.escape(os.path.relpath(layout.analysis(name), layout.report_dir))}</code>
  · table: <a href="{html.escape(os.path.relpath(layout.tables_dir / f"{name}.csv", layout.report_dir))}">{name}.csv</a>
  {''.join(f' · <a href="{html.escape(os.path.relpath(f, layout.report_dir))}">{html.escape(Path(f).name)}</a>' for f in others)}</p>
  {_artifact_list(extra, layout.report_dir)}
  <pre class="headline">{html.escape(json.dumps(headline, indent=1, default=_json_default))}</pre>
</section>"""
        )

    title = exp.report.title or f"moe-atlas report — {exp.name}"
    model = summary["model"]
    ckpts = ", ".join(f"{c} (step {s})" for c, s in summary["checkpoints"].items())
    dom_rows = "".join(f"<tr><td>{html.escape(d)}</td><td>{n}</td></tr>" for d, n in summary["domains"].items())
    training = ""
    if train_files:
        training = f"""<section id="training"><h2>The model's training</h2>
<p class="caption">Language-model loss during training of the demo model (the load-balancing auxiliary loss
dashed, right axis). Checkpoints analysed below were saved along this curve.</p>
{''.join(_img(f, layout.report_dir) for f in train_files if Path(f).suffix == '.png')}</section>"""
    training_item = '<li><a href="#training">The model&rsquo;s training</a></li>' if training else ""
    toc = "".join(f'<li><a href="#{html.escape(n)}">{html.escape(get(n).title)}</a></li>' for n in analysis_names)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }}
img {{ max-width: 100%; border: 1px solid #ddd; }}
figure {{ margin: 1em 0; }}
.caption {{ color: #333; }}
dt {{ font-weight: 600; }} dd {{ margin: 0 0 .5em 1em; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: .2em .6em; }}
pre.headline {{ background: #f6f6f6; padding: .5em; font-size: 85%; }}
.meta {{ color: #555; font-size: 90%; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p class="meta">Experiment <code>{html.escape(exp.source_file)}</code> · generated {summary["generated"]}
{f'· Dask dashboard during the run: <code>{html.escape(dashboard)}</code>' if dashboard else ''}</p>
{f'<p>{html.escape(exp.description)}</p>' if exp.description else ''}
<h2>What was analysed</h2>
<ul>
<li>Model: {html.escape(str(model.get("model_family")))}, {model.get("num_experts")} experts per MoE layer, top-{model.get("top_k")};
router: {html.escape(str(model.get("router_semantics")))}</li>
<li>MoE layers: {summary["layers"]}</li>
<li>Checkpoints: {html.escape(ckpts)}</li>
<li>{summary["tokens"]} tokens in {summary["samples"]} samples{" (aggregate counts only: tokens implied by the slot counts)" if is_counts_cube(routing) else ""}:</li>
{"".join(f"<li>{html.escape(_import_note(k, v))}</li>" for k, v in notes.items())}
</ul>
<table><tr><th>domain</th><th>tokens</th></tr>{dom_rows}</table>
<p>Routing cube: <code>{html.escape(os.path.relpath(layout.routing, layout.report_dir))}</code>
(<code>xr.open_zarr</code>); per-analysis cubes in <code>analyses/</code>; tables in <code>tables/</code>;
headline numbers in <code>summary.json</code>.</p>
<h2>Contents</h2><ol>{training_item}{toc}</ol>
{training}
{''.join(sections)}
</body></html>
"""
    _write_atomic(layout.report_index, page)
    summary["fingerprint"] = fingerprint
    summary["experiment_spec"] = dataclasses.asdict(exp)
    _write_atomic(layout.summary, json.dumps(summary, indent=2, default=_json_default))
    return layout.report_index
