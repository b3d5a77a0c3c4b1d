"""Assemble the HTML report, tables and summary from finished analysis cubes.

Layout (see ``storage.RunLayout``): ``report/index.html``,
``report/figures/<analysis>/*.png``, ``tables/<analysis>.csv``,
``summary.json``. ``summary.json`` is written last: its fingerprint is what
marks the report complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import html
import json
import os
import re
from pathlib import Path

import numpy as np

from storage import atomic
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


def _training_figure(layout, formats) -> tuple[list[Path], dict]:
    """Loss curve of the demo model, when the run trained one (drawn by :mod:`analyses.figures.training`)."""
    log_path = layout.model_dir / "training_log.json"
    if not log_path.exists():
        return [], {}
    try:
        log = json.loads(log_path.read_text())
    except ValueError as e:
        raise ValueError(f"{log_path}: not valid JSON ({e})") from None
    if not isinstance(log, dict):
        raise ValueError(f"{log_path}: expected a JSON object with a 'steps' list")
    from .figures import training

    return training.figure(log, layout.figures_dir / "training", formats)


def _mirror(path: Path, src_root: Path, dst_root: Path) -> Path:
    """Copy ``path`` (under ``src_root``) to the same relative place under ``dst_root``; return the copy."""
    import shutil

    dst = dst_root / Path(path).relative_to(src_root)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(path, dst)
    return dst


def _cell(value) -> str:
    """One table cell: numbers to 4 significant digits (right-aligned), the rest as text; escaped."""
    if isinstance(value, bool) or value is None:
        return f"<td>{'—' if value is None else html.escape(str(value))}</td>"
    if isinstance(value, (int, np.integer)):
        return f'<td class="num">{int(value)}</td>'
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return f'<td class="num">{"—" if not np.isfinite(v) else f"{v:.4g}"}</td>'
    if isinstance(value, (dict, list)):
        return f"<td><code>{html.escape(json.dumps(value, default=_json_default))}</code></td>"
    return f"<td>{html.escape(str(value))}</td>"


def _records_table(rows: list[dict], caption: str = "", index: list[str] | None = None) -> str:
    """An HTML table with a column per key of ``rows`` (first-seen order), optionally a leading index column."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    head = ("<th></th>" if index is not None else "") + "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join(
        "<tr>" + (f"<th>{html.escape(str(index[i]))}</th>" if index is not None else "")
        + "".join(_cell(r.get(c)) for c in cols) + "</tr>"
        for i, r in enumerate(rows)
    )
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f'<table class="headline">{cap}<tr>{head}</tr>{body}</table>'


def headline_html(headline: dict) -> str:
    """The headline numbers of an analysis as small readable tables (the JSON stays in summary.json).

    Scalars form one two-column table; a group of dicts with scalar values
    (e.g. ``earliest`` / ``final``, or one per view) one table with a row per
    key; a list of dicts (e.g. the top pairs) a table of its own; anything
    deeper is flattened into ``outer › inner`` rows.
    """
    scalars, groups, lists = {}, {}, {}

    def flat(prefix, value, into):
        if isinstance(value, dict):
            for k, v in value.items():
                flat(f"{prefix} › {k}" if prefix else str(k), v, into)
        else:
            into[prefix] = value

    for key, value in (headline or {}).items():
        if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()) \
                and all(not isinstance(x, (dict, list)) for v in value.values() for x in v.values()):
            lists[key] = (list(value.values()), [str(k) for k in value])
        elif isinstance(value, dict) and value and all(not isinstance(v, (dict, list)) for v in value.values()):
            groups[key] = value
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            lists[key] = (value, None)
        else:
            flat(str(key), value, scalars)
    # x_first / x_last (or _earliest / _final) side by side: one row per quantity, a column per checkpoint
    paired: dict[str, dict] = {}
    for key in list(scalars):
        m = re.match(r"^(.+)_(first|last|earliest|final)$", key)
        if m:
            paired.setdefault(m[1], {})[m[2]] = scalars[key]
    paired = {stem: v for stem, v in paired.items() if len(v) > 1}
    for stem, v in paired.items():
        for suffix in v:
            scalars.pop(f"{stem}_{suffix}")
    parts = []
    if scalars:
        parts.append(_records_table([{"value": v} for v in scalars.values()], index=list(scalars)))
    if paired:
        parts.append(_records_table(list(paired.values()), index=list(paired)))
    if groups:
        parts.append(_records_table(list(groups.values()), index=list(groups)))
    for key, (rows, index) in lists.items():
        parts.append(_records_table(rows, caption=str(key), index=index))
    return "".join(parts)


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


_STYLE = """<style>
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
img { max-width: 100%; border: 1px solid #ddd; }
figure { margin: 1em 0; }
.caption { color: #333; }
dt { font-weight: 600; } dd { margin: 0 0 .5em 1em; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: .2em .6em; }
img { width: 100%; }
table.headline { font-size: 90%; margin: .5em 0 1em; } table.headline td.num { text-align: right; }
table.headline caption { text-align: left; font-weight: 600; padding: .3em 0; }
.meta { color: #555; font-size: 90%; }
</style>"""


def _run_summary(exp, routing) -> tuple[dict, dict]:
    """summary.json's description of the run (model, checkpoints, layers, tokens per domain), and the import notes."""
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
    return summary, notes


def _analysis_section(name: str, layout, report_tables: Path, formats, summary: dict) -> str:
    """The report's section of analysis ``name``: figures, table, extra files; its headline added to ``summary``."""
    from . import get

    a = get(name)
    result = cubes.open_result(layout.analysis(name))
    if result.attrs.get("skipped"):
        summary.setdefault("skipped", {})[name] = result.attrs["skipped"]
        return (
            f'<section id="{html.escape(name)}"><h2>{html.escape(a.title)}</h2>'
            f'<p class="caption"><strong>Skipped:</strong> {html.escape(result.attrs["skipped"])}.</p></section>'
        )
    out = layout.figures_dir / name
    files = a.figure(result, out, formats)
    table = a.table(result)
    # labels and token text come from user data: escaped so the CSV cannot carry spreadsheet formulas
    table_file = report_tables / f"{name}.csv"
    csv_safe(table).to_csv(table_file, index=False)
    # Extra files for other tools (e.g. mask points for ablation sweeps), linked below.
    extra = [Path(f) for f in a.artifacts(result, report_tables / name)] if a.artifacts else []
    mirrored = [_mirror(f, report_tables, layout.tables_dir) for f in [table_file, *extra]]
    if extra:
        summary.setdefault("artifacts", {})[name] = [os.path.relpath(f, layout.root) for f in mirrored[1:]]
    headline = a.summary(result)
    summary["analyses"][name] = {
        "definition": result.attrs.get("definition", ""),
        "chance": result.attrs.get("chance", ""),
        "headline": headline,
    }
    pngs = [f for f in files if Path(f).suffix == ".png"]
    others = [f for f in files if Path(f).suffix != ".png"]
    chance = result.attrs.get("chance", "")
    from .figures.training_runs import side_by_side  # issue 16: this analysis of every [[runs]] run beside this one
    runs_html, runs_headline = side_by_side(layout, name, a, files, formats, headline)
    if runs_headline:
        summary["analyses"][name]["runs"] = runs_headline
    return (
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
  · table: <a href="{html.escape(os.path.relpath(table_file, layout.report_dir))}">{name}.csv</a>
  {''.join(f' · <a href="{html.escape(os.path.relpath(f, layout.report_dir))}">{html.escape(Path(f).name)}</a>' for f in others)}</p>
  {_artifact_list(extra, layout.report_dir)}
  {headline_html(headline)}
  {runs_html}
</section>"""
    )


def _section_job(name: str, layout, report_tables: Path, formats) -> tuple[str, dict]:
    """One analysis section, in a pool process or here: (html, the part of ``summary`` it adds).

    A forked process has a copy of the parent's default Dask client but not the thread that runs
    its event loop, so a compute through it would wait forever; a section reads one small result
    cube, in place.
    """
    import dask

    part: dict = {"analyses": {}}
    with dask.config.set(scheduler="synchronous"):
        return _analysis_section(name, layout, report_tables, formats, part), part


def _merge_part(summary: dict, part: dict) -> None:
    for key, value in part.items():
        summary.setdefault(key, {}).update(value)


def _render_processes(n_jobs: int) -> int:
    """Pool processes for the analysis sections: one core stays with this process, which draws the
    training, explorer, expert and intervention parts meanwhile; 0 (render here) on one core or
    where processes cannot be forked (Windows)."""
    import multiprocessing

    if "fork" not in multiprocessing.get_all_start_methods():
        return 0
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return min(n_jobs, cores - 1)


@contextlib.contextmanager
def _section_pool(processes: int):
    """A pool of ``processes`` forked processes (None for none), shut down on the way out; on an
    error or an interrupt its processes are killed rather than waited for."""
    import concurrent.futures
    import multiprocessing

    if processes <= 0:
        yield None
        return
    pool = concurrent.futures.ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork"))
    try:
        yield pool
    except BaseException:
        for proc in list((pool._processes or {}).values()):  # Python 3.11 has no terminate_workers()
            proc.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


def _run_parts(layout, routing, formats, analysis_names: list[str], summary: dict) -> tuple[str, str]:
    """The parts of the page that are not one analysis's section: (the explorer's paragraph, the
    training / training runs / experts / interventions sections); their numbers added to ``summary``."""
    train_files, train_summary = _training_figure(layout, formats)
    if train_summary:
        summary["training"] = train_summary
    training = ""
    if train_files:
        training = f"""<section id="training"><h2>The model's training</h2>
<p class="caption">Language-model loss during training of the demo model (the load-balancing auxiliary loss
dashed, right axis). Checkpoints analysed below were saved along this curve.</p>
{''.join(_img(f, layout.report_dir) for f in train_files if Path(f).suffix == '.png')}</section>"""
    from .figures.explorer import report_section as explorer_section  # issue 17: report/explorer.html
    explorer_html = explorer_section(layout, routing, formats, analysis_names)
    from .figures.training_runs import report_hook  # issue 16: training runs side by side (tasks/training.py)
    training += report_hook(layout, formats, summary)
    from .weights_report import report_hook as weights_hook  # issue 14: experts as objects, masks (tasks/experts.py)
    training += weights_hook(layout, formats, summary)
    from .figures.interventions import report_hook as interventions_hook  # issue 15 (tasks/interventions.py)
    training += interventions_hook(layout, formats, summary)
    return explorer_html, training


def build_report(exp, layout, analysis_names: list[str], *, fingerprint: str, dashboard: str = "",
                 parallel: bool = True) -> Path:
    """Render figures, tables, summary.json and index.html for ``analysis_names``.

    Figures are most of a report's time. With ``parallel`` the analyses' sections render in a
    pool of forked processes while this process draws the other parts; the files and
    ``summary.json`` are the same either way (tests/test_report.py checks). Forked, not spawned:
    a spawned child re-runs the caller's main script, which a user's script need not guard; the
    libraries a section uses (zarr, fsspec, logging) reset their threads and locks after a fork.
    """
    from . import get

    formats = tuple(exp.report.formats) if "png" in exp.report.formats else ("png", *exp.report.formats)
    routing = cubes.open_routing(layout.routing)
    sections = []
    summary, notes = _run_summary(exp, routing)
    # The report folder stands on its own (copied or zipped alone it still shows and links everything):
    # tables and extra files are written under report/tables/ and mirrored to tables/ (the README's place).
    report_tables = layout.report_dir / "tables"
    report_tables.mkdir(parents=True, exist_ok=True)
    layout.tables_dir.mkdir(parents=True, exist_ok=True)

    # A fork carries this process's registry along: analyses a user's script registered render there too.
    with _section_pool(_render_processes(len(analysis_names)) if parallel else 0) as pool:
        jobs = {n: pool.submit(_section_job, n, layout, report_tables, formats) for n in analysis_names} if pool else {}
        explorer_html, training = _run_parts(layout, routing, formats, analysis_names, summary)
        for name in analysis_names:  # in the experiment's order, wherever they were rendered
            section, part = jobs[name].result() if pool else _section_job(name, layout, report_tables, formats)
            sections.append(section)
            _merge_part(summary, part)

    title = exp.report.title or f"moe-atlas report — {exp.name}"
    model = summary["model"]
    ckpts = ", ".join(f"{c} (step {s})" for c, s in summary["checkpoints"].items())
    dom_rows = "".join(f"<tr><td>{html.escape(d)}</td><td>{n}</td></tr>" for d, n in summary["domains"].items())
    training_item = '<li><a href="#training">The model&rsquo;s training</a></li>' if training else ""
    toc = "".join(f'<li><a href="#{html.escape(n)}">{html.escape(get(n).title)}</a></li>' for n in analysis_names)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
{_STYLE}</head><body>
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
(<code>xr.open_zarr</code>); per-analysis cubes in <code>analyses/</code> of the run folder; tables in
<a href="tables/">tables/</a> beside this page; headline numbers in <a href="summary.json">summary.json</a>.</p>
{explorer_html}
<h2>Contents</h2><ol>{training_item}{toc}</ol>
{training}
{''.join(sections)}
</body></html>
"""
    atomic.write_text(layout.report_index, page)
    summary["fingerprint"] = fingerprint
    summary["experiment_spec"] = dataclasses.asdict(exp)
    text = json.dumps(summary, indent=2, default=_json_default)
    atomic.write_text(layout.report_dir / "summary.json", text)  # the report folder's own copy
    atomic.write_text(layout.summary, text)  # last: its fingerprint marks the report complete
    return layout.report_index
