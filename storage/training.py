"""Training runs as data: training logs and evaluation scores -> labelled cubes.

Training logs (one run per file; a W&B panel export may hold several) become one
**training cube**::

    value (run, step, metric)   float64, NaN where the run did not log the metric at that step
    coords: metric_unit (metric), metric_source_name (metric), run_source (run), run_format (run)

Formats (``LOG_FORMATS``; ``"auto"`` picks by name and content)::

    hf_trainer   HF Trainer trainer_state.json: {"log_history": [{"step", "loss", "learning_rate", ...}, ...]}
    wandb_csv    W&B history export: a step column (_step / Step / step / global_step / trainer/global_step)
                 and one column per metric; panel exports' "<run> - <metric>" columns are split into runs,
                 their __MIN/__MAX companions and W&B's own _runtime/_timestamp columns dropped
    tensorboard  TensorBoard event files (a file or a folder of them), read with tensorboard's own
                 EventAccumulator (scalars and scalar tensors)
    csv          plain CSV: long (step, metric, value[, run]) or wide (step + one column per metric)
    jsonl        one JSON object per line: {"step", <metric>: number, ...}
    demo         the demo's training_log.json (capture/demo/train.py): per step loss (LM), aux_loss, lr;
                 per checkpoint the held-out NLL (and next-token accuracy) by domain

Metric names are the log's own, with the common aliases folded onto one name
(``ALIASES``: learning_rate -> lr, load_balancing_loss -> aux_loss, router_z_loss ->
z_loss, train/ prefixes dropped) so runs logged by different tools line up; the
log's own name stays in ``metric_source_name``. Units come from the name
(``unit_of``): losses in nat/token (cross-entropy with natural logs, as PyTorch
and HF compute it), an unknown metric "as logged".

Evaluation scores become a **scores cube** ``score (run, step, task, metric)`` with
``checkpoint (run, step)`` and ``higher_is_better (metric)``: from
lm-evaluation-harness results JSON (one file per run and checkpoint), a CSV
(run, checkpoint, step, task, metric, value) or, for the demo, the per-domain
held-out NLL and next-token accuracy its training log records at every checkpoint.

Bad input stops with one line naming the file and the record.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr

LOG_FORMATS = ("hf_trainer", "wandb_csv", "tensorboard", "csv", "jsonl", "demo")
SCORE_FORMATS = ("lm_eval", "csv", "demo")


class TrainingLogError(ValueError):
    """A training log or score file cannot be read; the message names the file and the record."""


ALIASES = {
    "learning_rate": "lr",
    "train/learning_rate": "lr",
    "lr": "lr",
    "load_balancing_loss": "aux_loss",
    "lb_loss": "aux_loss",
    "balance_loss": "aux_loss",
    "router_aux_loss": "aux_loss",
    "aux_loss": "aux_loss",
    "moe_aux_loss": "aux_loss",
    "load_balancing_loss_func": "aux_loss",
    "z_loss": "z_loss",
    "router_z_loss": "z_loss",
    "moe_z_loss": "z_loss",
    "lm_loss": "lm_loss",
    "loss": "loss",
    "train_loss": "loss",
    "grad_norm": "grad_norm",
    "eval_loss": "eval_loss",
    "epoch": "epoch",
}
"""Log name (after dropping a leading ``train/`` or ``train_``) -> canonical metric name."""

_STEP_COLUMNS = ("_step", "step", "Step", "global_step", "trainer/global_step", "train/global_step")
_WANDB_INTERNAL = re.compile(r"^_(runtime|timestamp|wandb.*)$|__(MIN|MAX)$")


def canonical_metric(name: str) -> str:
    """The metric's name in the cube: an alias folded (``ALIASES``), else the log's name.

    ``train/loss`` and ``train_loss`` -> ``loss``; ``train/learning_rate`` -> ``lr``;
    ``diversity_loss/layer_3`` stays as it is (per-layer series keep their suffix).
    """
    n = str(name).strip()
    low = n.lower()
    if low in ALIASES:
        return ALIASES[low]
    for prefix in ("train/", "train_", "trainer/"):
        if low.startswith(prefix) and low[len(prefix):] in ALIASES:
            return ALIASES[low[len(prefix):]]
    return n


def unit_of(metric: str) -> str:
    """Units of a canonical metric name (CF-style: "1" dimensionless, "nat/token" for cross-entropy)."""
    m = metric.lower()
    if m in ("lr", "grad_norm") or m.startswith(("aux_loss", "z_loss")):
        return "1"
    if m == "epoch":
        return "epoch"
    if "acc" in m:
        return "1"
    if "entropy" in m:
        return "nat"
    if m in ("loss", "lm_loss", "eval_loss") or m.startswith(("eval_nll", "nll")) or m.endswith("/loss"):
        return "nat/token"
    if "diversity" in m:
        return "1"
    return "as logged"


_LAYER_PART = re.compile(r"^(?:layers?|l|block|blk)[_\-. ]?(\d+)$", re.I)
_LAYER_IN = re.compile(r"(?:^|[_\-. ])(?:layers?|block|blk)[_\-. ]?(\d+)(?=$|[_\-. ])", re.I)
_BASE_WORDS = re.compile(r"loss|diversity|entropy|nll|acc|lr|norm|score", re.I)
_SPLIT_PARTS = {"train", "trainer", "eval", "val", "valid", "validation", "test"}


def metric_parts(name: str) -> tuple[int, str]:
    """(layer, dataset) a per-layer / per-dataset series name states; -1 and "" where it states none.

    The name is split at "/": a part like ``layer_3``/``layer3``/``l3``/``block3`` (or a ``_layer3`` suffix
    inside a part) gives the layer; the part naming the quantity (the first holding loss, diversity,
    entropy, nll, acc, lr, norm or score; else the first) is the metric; split words (train, eval, val,
    test) are dropped; what remains is the dataset::

        diversity_loss/layer_3         -> (3, "")
        mmstar/diversity_loss/layer_0  -> (0, "mmstar")
        train/diversity_loss_layer2    -> (2, "")
        eval_nll/code                  -> (-1, "code")
    """
    parts = [x for x in str(name).split("/") if x]
    layer = -1
    rest = []
    for x in parts:
        m = _LAYER_PART.match(x)
        if m:
            layer = int(m[1])
            continue
        m = _LAYER_IN.search(x)
        if m:
            layer = int(m[1])
        rest.append(x)
    if not rest:
        return layer, ""
    base = next((i for i, x in enumerate(rest) if _BASE_WORDS.search(x)), 0)
    dataset = [x for i, x in enumerate(rest) if i != base and x.lower() not in _SPLIT_PARTS]
    return layer, "/".join(dataset)


@dataclass(frozen=True)
class LogRecord:
    """One logged number."""

    run: str
    step: int
    metric: str
    value: float
    source_name: str


def _number(value, file, where: str) -> float | None:
    """A float, None for null/empty; one-line error for anything else."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise TrainingLogError(f"{file}: {where}: expected a number, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise TrainingLogError(f"{file}: {where}: expected a number, got {value!r}") from None
    raise TrainingLogError(f"{file}: {where}: expected a number, got {type(value).__name__} {value!r}")


def _step(value, file, where: str) -> int:
    v = _number(value, file, where)
    if v is None or not math.isfinite(v) or v != int(v) or v < 0:
        raise TrainingLogError(f"{file}: {where}: step must be a non-negative integer, got {value!r}")
    return int(v)


def _load_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TrainingLogError(f"{path}: not valid JSON ({exc})") from None


def detect_format(path: str | Path) -> str:
    """Guess a log's format from its name and first bytes (``LOG_FORMATS``)."""
    p = Path(path)
    if p.is_dir() or "tfevents" in p.name:
        return "tensorboard"
    if p.name == "trainer_state.json":
        return "hf_trainer"
    if p.name == "training_log.json":
        return "demo"
    if p.suffix == ".jsonl":
        return "jsonl"
    if p.suffix == ".json":
        obj = _load_json(p)
        if isinstance(obj, dict) and "log_history" in obj:
            return "hf_trainer"
        if isinstance(obj, dict) and "steps" in obj:
            return "demo"
        raise TrainingLogError(f"{p}: a JSON file that is neither trainer_state.json (log_history) nor a demo "
                               "training_log.json (steps); give format explicitly")
    if p.suffix in (".csv", ".tsv"):
        with open(p, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
        if any(h in ("_step", "Step", "trainer/global_step") or " - " in h for h in header):
            return "wandb_csv"
        return "csv"
    raise TrainingLogError(f"{p}: cannot tell the log format from the name; give format = one of {LOG_FORMATS}")


# ---------------------------------------------------------------- per-format readers


def _rows_records(rows: Iterable[tuple[str, Mapping]], run: str, file, step_keys=("step",)) -> list[LogRecord]:
    out = []
    for where, row in rows:
        if not isinstance(row, Mapping):
            raise TrainingLogError(f"{file}: {where}: expected an object, got {type(row).__name__}")
        key = next((k for k in step_keys if k in row), None)
        if key is None:
            raise TrainingLogError(f"{file}: {where}: no step field ({'/'.join(step_keys)})")
        step = _step(row[key], file, f"{where} field {key!r}")
        for k, v in row.items():
            if k in step_keys:
                continue
            if isinstance(v, (dict, list)):
                continue  # nested summaries (e.g. per-domain dicts) are not scalars of this step
            x = _number(v, file, f"{where} field {k!r}")
            if x is None:
                continue
            out.append(LogRecord(run, step, canonical_metric(k), x, str(k)))
    return out


def _read_hf_trainer(path: Path, run: str) -> list[LogRecord]:
    obj = _load_json(path)
    if not isinstance(obj, dict) or not isinstance(obj.get("log_history"), list):
        raise TrainingLogError(f"{path}: expected trainer_state.json with a 'log_history' list")
    rows = [(f"log_history[{i}]", r) for i, r in enumerate(obj["log_history"])]
    return _rows_records(rows, run, path)


def _read_jsonl(path: Path, run: str) -> list[LogRecord]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append((f"line {i}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise TrainingLogError(f"{path}: line {i}: not valid JSON ({exc})") from None
    return _rows_records(rows, run, path, step_keys=("step", "_step", "global_step"))


def _csv_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    delim = "\t" if path.suffix == ".tsv" else ","
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter=delim)
        header = next(reader, None)
        if not header:
            raise TrainingLogError(f"{path}: empty file, expected a header row")
        rows = [r for r in reader if any(c.strip() for c in r)]
    for i, r in enumerate(rows, 2):
        if len(r) != len(header):
            raise TrainingLogError(f"{path}: row {i}: {len(r)} fields, the header has {len(header)}")
    return header, rows


def _read_csv(path: Path, run: str) -> list[LogRecord]:
    header, rows = _csv_rows(path)
    cols = {h.strip().lower(): j for j, h in enumerate(header)}
    if {"step", "metric", "value"} <= set(cols):  # long
        out = []
        for i, r in enumerate(rows, 2):
            step = _step(r[cols["step"]], path, f"row {i} column 'step'")
            x = _number(r[cols["value"]], path, f"row {i} column 'value'")
            if x is None:
                continue
            name = r[cols["metric"]].strip()
            if not name:
                raise TrainingLogError(f"{path}: row {i}: empty metric name")
            rrun = r[cols["run"]].strip() if "run" in cols and r[cols["run"]].strip() else run
            out.append(LogRecord(rrun, step, canonical_metric(name), x, name))
        return out
    step_col = next((header.index(c) for c in _STEP_COLUMNS if c in header), None)
    if step_col is None:
        raise TrainingLogError(f"{path}: no step column; expected long columns step,metric,value or a wide table "
                               f"with one of {list(_STEP_COLUMNS)}")
    out = []
    for i, r in enumerate(rows, 2):
        step = _step(r[step_col], path, f"row {i} column {header[step_col]!r}")
        for j, h in enumerate(header):
            if j == step_col:
                continue
            x = _number(r[j], path, f"row {i} column {h!r}")
            if x is not None:
                out.append(LogRecord(run, step, canonical_metric(h), x, h))
    return out


def _read_wandb_csv(path: Path, run: str) -> list[LogRecord]:
    header, rows = _csv_rows(path)
    step_col = next((header.index(c) for c in _STEP_COLUMNS if c in header), None)
    if step_col is None:
        raise TrainingLogError(f"{path}: no step column; a W&B export has one of {list(_STEP_COLUMNS)}")
    out = []
    for i, r in enumerate(rows, 2):
        step = _step(r[step_col], path, f"row {i} column {header[step_col]!r}")
        for j, h in enumerate(header):
            if j == step_col or _WANDB_INTERNAL.search(h):
                continue
            rrun, name = (h.split(" - ", 1) if " - " in h else (run, h))
            x = _number(r[j], path, f"row {i} column {h!r}")
            if x is not None:
                out.append(LogRecord(rrun.strip(), step, canonical_metric(name.strip()), x, name.strip()))
    return out


def _read_tensorboard(path: Path, run: str) -> list[LogRecord]:
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        raise TrainingLogError(f"{path}: reading TensorBoard event files needs the 'tensorboard' package "
                               "(pip install 'moe-atlas[training]')") from None
    files = sorted(path.rglob("*tfevents*")) if path.is_dir() else [path]
    if not files:
        raise TrainingLogError(f"{path}: no TensorBoard event files (*tfevents*) in this folder")
    out = []
    for f in files:
        # size_guidance 0 = keep every event (the default samples scalars down to 10 000)
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0, "tensors": 0})
        try:
            acc.Reload()
        except Exception as exc:  # the reader raises its own DataLossError and friends for a damaged file
            raise TrainingLogError(f"{f}: not a readable TensorBoard event file ({type(exc).__name__}: {exc})") from None
        tags = acc.Tags()
        for tag in tags.get("scalars", []):
            for ev in acc.Scalars(tag):
                out.append(LogRecord(run, int(ev.step), canonical_metric(tag), float(ev.value), tag))
        for tag in tags.get("tensors", []):
            from tensorboard.util import tensor_util

            for ev in acc.Tensors(tag):
                arr = tensor_util.make_ndarray(ev.tensor_proto)
                if arr.size == 1 and np.issubdtype(arr.dtype, np.number):
                    out.append(LogRecord(run, int(ev.step), canonical_metric(tag), float(arr.reshape(())), tag))
    return out


def _read_demo(path: Path, run: str) -> list[LogRecord]:
    log = _load_json(path)
    if not isinstance(log, dict) or not isinstance(log.get("steps"), list):
        raise TrainingLogError(f"{path}: expected the demo's training_log.json with a 'steps' list")
    rows = []
    for i, r in enumerate(log["steps"]):
        if not isinstance(r, Mapping):
            raise TrainingLogError(f"{path}: steps[{i}]: expected an object")
        # the demo's "loss" is the LM cross-entropy alone (aux loss logged apart), so it is lm_loss here
        rows.append((f"steps[{i}]", {("lm_loss" if k == "loss" else k): v for k, v in r.items()}))
    out = _rows_records(rows, run, path)
    for i, c in enumerate(log.get("checkpoints") or []):
        if not isinstance(c, Mapping) or "step" not in c:
            raise TrainingLogError(f"{path}: checkpoints[{i}]: expected an object with a 'step'")
        step = _step(c["step"], path, f"checkpoints[{i}] field 'step'")
        for key, prefix in (("eval_nll", "eval_nll"), ("eval_acc", "eval_acc")):
            for dom, v in (c.get(key) or {}).items():
                x = _number(v, path, f"checkpoints[{i}] {key}[{dom!r}]")
                if x is not None:
                    out.append(LogRecord(run, step, f"{prefix}/{dom}", x, f"{key}.{dom}"))
    return out


_READERS = {
    "hf_trainer": _read_hf_trainer,
    "wandb_csv": _read_wandb_csv,
    "tensorboard": _read_tensorboard,
    "csv": _read_csv,
    "jsonl": _read_jsonl,
    "demo": _read_demo,
}


def read_log_records(path: str | Path, *, format: str = "auto", run: str = "") -> list[LogRecord]:
    """Every number a training log holds, as records; ``run`` defaults to the file's stem."""
    p = Path(path)
    if not p.exists():
        raise TrainingLogError(f"{p}: training log not found")
    fmt = detect_format(p) if format == "auto" else format
    if fmt not in _READERS:
        raise TrainingLogError(f"{p}: unknown training-log format {fmt!r}; expected one of {LOG_FORMATS} or 'auto'")
    if not run:
        run = p.name if p.is_dir() else (p.parent.name if p.name in ("trainer_state.json", "training_log.json")
                                         else p.stem)
    try:
        return _READERS[fmt](p, run)
    except UnicodeDecodeError as exc:
        raise TrainingLogError(f"{p}: not a UTF-8 text file ({exc})") from None


def training_cube(records: Sequence[LogRecord], *, sources: Mapping[str, tuple[str, str]] | None = None) -> xr.Dataset:
    """The training cube ``value (run, step, metric)`` of ``records``.

    A (run, step, metric) logged twice keeps the last value (HF Trainer and TensorBoard
    repeat steps after a resume); ``attrs["duplicates"]`` counts them. ``sources`` maps
    run -> (file, format) for the ``run_source``/``run_format`` coordinates.
    """
    if not records:
        raise TrainingLogError("no training-log records: the log(s) hold no numeric metric with a step")
    runs = list(dict.fromkeys(r.run for r in records))
    steps = sorted({r.step for r in records})
    metrics = list(dict.fromkeys(r.metric for r in records))
    ri = {r: i for i, r in enumerate(runs)}
    si = {s: i for i, s in enumerate(steps)}
    mi = {m: i for i, m in enumerate(metrics)}
    value = np.full((len(runs), len(steps), len(metrics)), np.nan)
    seen = np.zeros(value.shape, dtype=bool)
    dup = 0
    src_name = {}
    for r in records:
        idx = (ri[r.run], si[r.step], mi[r.metric])
        dup += bool(seen[idx])
        seen[idx] = True
        value[idx] = r.value
        src_name.setdefault(r.metric, r.source_name)
    sources = dict(sources or {})
    ds = xr.Dataset(
        {"value": (("run", "step", "metric"), value)},
        coords={
            "run": runs, "step": np.asarray(steps, dtype=np.int64), "metric": metrics,
            "metric_unit": ("metric", [unit_of(m) for m in metrics]),
            "metric_source_name": ("metric", [src_name[m] for m in metrics]),
            "metric_layer": ("metric", np.asarray([metric_parts(m)[0] for m in metrics], dtype=np.int64)),
            "metric_dataset": ("metric", [metric_parts(m)[1] for m in metrics]),
            "run_source": ("run", [sources.get(r, ("", ""))[0] for r in runs]),
            "run_format": ("run", [sources.get(r, ("", ""))[1] for r in runs]),
        },
        attrs={"duplicates": int(dup), "description": "training logs as a (run, step, metric) cube; NaN where a "
               "run did not log that metric at that step", "source": "storage.training"},
    )
    for name, long_name, desc in (
            ("step", "optimizer step", "the training step the log recorded the value at"),
            ("metric_unit", "units of the metric", "CF-style units per metric (storage.training.unit_of): "
             "'nat/token' for cross-entropy, '1' dimensionless, 'as logged' when the name does not tell"),
            ("metric_source_name", "the log's own name of the metric", "before aliases were folded (ALIASES)"),
            ("metric_layer", "layer the series belongs to", "from the metric's name (metric_parts); -1 = not per layer"),
            ("metric_dataset", "dataset the series belongs to", "from the metric's name (metric_parts); '' = none"),
            ("run_source", "file the run was read from", "path of the training log (relative to the run folder "
             "for the log the run itself wrote)"),
            ("run_format", "format the run was read as", f"one of {', '.join(LOG_FORMATS)}")):
        ds[name].attrs = {"long_name": long_name, "description": desc}
    ds["step"].attrs["units"] = "1"
    ds["value"].attrs = {
        "long_name": "logged training metric", "units": "see metric_unit",
        "description": "the value the training log recorded for the metric at the optimizer step; units per "
                       "metric in the metric_unit coordinate",
        "nan_where": "the run did not log that metric at that step"}
    return ds


def read_training_logs(logs: Sequence[Mapping]) -> xr.Dataset:
    """The training cube of several logs: ``[{"path", "format"="auto", "run"="", "source"=path}, ...]``.

    ``source`` is what the ``run_source`` coordinate records (default: the path as given); a log inside
    the run folder is best named relative to it, so that the outputs do not depend on where the run lies.
    """
    records: list[LogRecord] = []
    sources = {}
    for entry in logs:
        path = Path(entry["path"])
        fmt = entry.get("format") or "auto"
        fmt = detect_format(path) if fmt == "auto" else fmt
        recs = read_log_records(path, format=fmt, run=entry.get("run", ""))
        for r in recs:
            sources.setdefault(r.run, (str(entry.get("source") or path), fmt))
        records.extend(recs)
    return training_cube(records, sources=sources)


# ---------------------------------------------------------------- evaluation scores


@dataclass(frozen=True)
class ScoreRecord:
    run: str
    checkpoint: str
    step: int
    task: str
    metric: str
    value: float
    higher_is_better: bool


LOWER_IS_BETTER = ("nll", "loss", "perplexity", "ppl", "word_perplexity", "byte_perplexity", "bits_per_byte")


def _higher_is_better(metric: str) -> bool:
    base = metric.split(",")[0].lower()
    return not any(base == m or base.endswith(m) for m in LOWER_IS_BETTER)


def read_lm_eval(path: str | Path, *, run: str, checkpoint: str, step: int) -> list[ScoreRecord]:
    """Scores of one lm-evaluation-harness results JSON (``{"results": {task: {"acc,none": x, ...}}}``).

    ``*_stderr`` entries and the ``alias`` are dropped; the metric keeps its filter
    (``acc,none``, ``exact_match,strict-match``). ``higher_is_better`` comes from the
    file when it says so, else from the metric's name (nll/perplexity/loss lower).
    """
    p = Path(path)
    if not p.is_file():
        raise TrainingLogError(f"{p}: lm-eval results file not found")
    obj = _load_json(p)
    if not isinstance(obj, dict) or not isinstance(obj.get("results"), dict):
        raise TrainingLogError(f"{p}: expected lm-evaluation-harness results JSON with a 'results' object")
    hib = obj.get("higher_is_better") if isinstance(obj.get("higher_is_better"), dict) else {}
    out = []
    for task, metrics in obj["results"].items():
        if not isinstance(metrics, dict):
            raise TrainingLogError(f"{p}: results[{task!r}]: expected an object of metrics")
        for key, v in metrics.items():
            if key == "alias" or "_stderr" in key or key == "samples":
                continue
            if isinstance(v, str) and v.strip().upper() == "N/A":
                continue
            x = _number(v, p, f"results[{task!r}][{key!r}]")
            if x is None:
                continue
            base = key.split(",")[0]
            h = hib.get(task, {}).get(base) if isinstance(hib.get(task), dict) else None
            out.append(ScoreRecord(run, checkpoint, int(step), task, key, x,
                                   bool(h) if isinstance(h, bool) else _higher_is_better(key)))
    if not out:
        raise TrainingLogError(f"{p}: 'results' holds no numeric score")
    return out


def read_scores_csv(path: str | Path) -> list[ScoreRecord]:
    """Scores from a CSV with columns run, checkpoint, step, task, metric, value [, higher_is_better]."""
    p = Path(path)
    if not p.is_file():
        raise TrainingLogError(f"{p}: scores file not found")
    header, rows = _csv_rows(p)
    cols = {h.strip().lower(): j for j, h in enumerate(header)}
    need = ["run", "step", "task", "metric", "value"]
    missing = [c for c in need if c not in cols]
    if missing:
        raise TrainingLogError(f"{p}: missing column(s) {missing}; expected run, checkpoint, step, task, metric, value")
    out = []
    for i, r in enumerate(rows, 2):
        x = _number(r[cols["value"]], p, f"row {i} column 'value'")
        if x is None:
            continue
        step = _step(r[cols["step"]], p, f"row {i} column 'step'")
        metric = r[cols["metric"]].strip()
        hib = _higher_is_better(metric)
        if "higher_is_better" in cols and r[cols["higher_is_better"]].strip():
            s = r[cols["higher_is_better"]].strip().lower()
            if s not in ("true", "false", "1", "0"):
                raise TrainingLogError(f"{p}: row {i} column 'higher_is_better': expected true/false, got {s!r}")
            hib = s in ("true", "1")
        ck = r[cols["checkpoint"]].strip() if "checkpoint" in cols else ""
        out.append(ScoreRecord(r[cols["run"]].strip(), ck or f"step_{step}", step, r[cols["task"]].strip(),
                               metric, x, hib))
    return out


def demo_scores(log_path: str | Path, *, run: str) -> list[ScoreRecord]:
    """The demo's scores: held-out NLL (lower is better) and next-token accuracy per domain and checkpoint."""
    p = Path(log_path)
    log = _load_json(p)
    out = []
    for i, c in enumerate(log.get("checkpoints") or [] if isinstance(log, dict) else []):
        step = _step(c.get("step"), p, f"checkpoints[{i}] field 'step'")
        name = str(c.get("name") or f"step_{step:04d}")
        for key, metric, hib in (("eval_nll", "nll", False), ("eval_acc", "acc", True)):
            for dom, v in (c.get(key) or {}).items():
                x = _number(v, p, f"checkpoints[{i}] {key}[{dom!r}]")
                if x is not None:
                    out.append(ScoreRecord(run, name, step, str(dom), metric, x, hib))
    return out


def scores_cube(records: Sequence[ScoreRecord]) -> xr.Dataset:
    """``score (run, step, task, metric)`` with ``checkpoint (run, step)`` and ``higher_is_better (metric)``."""
    if not records:
        raise TrainingLogError("no evaluation scores")
    runs = list(dict.fromkeys(r.run for r in records))
    steps = sorted({r.step for r in records})
    tasks = list(dict.fromkeys(r.task for r in records))
    metrics = list(dict.fromkeys(r.metric for r in records))
    hib: dict[str, bool] = {}
    for r in records:
        if hib.setdefault(r.metric, r.higher_is_better) != r.higher_is_better:
            raise TrainingLogError(f"scores: metric {r.metric!r} is marked both higher- and lower-is-better")
    score = np.full((len(runs), len(steps), len(tasks), len(metrics)), np.nan)
    ck = np.full((len(runs), len(steps)), "", dtype=object)
    for r in records:
        i, j = runs.index(r.run), steps.index(r.step)
        score[i, j, tasks.index(r.task), metrics.index(r.metric)] = r.value
        ck[i, j] = r.checkpoint
    ds = xr.Dataset(
        {"score": (("run", "step", "task", "metric"), score)},
        coords={"run": runs, "step": np.asarray(steps, dtype=np.int64), "task": tasks, "metric": metrics,
                "checkpoint": (("run", "step"), ck.astype(str)),
                "higher_is_better": ("metric", [hib[m] for m in metrics])},
        attrs={"source": "storage.training"},
    )
    ds["score"].attrs = {
        "long_name": "evaluation score", "units": "as reported",
        "description": "the score of the run's checkpoint at that step on the task (lm-evaluation-harness metric "
                       "with its filter, or the demo's held-out NLL in nat/token and next-token accuracy)",
        "nan_where": "that run has no checkpoint at that step, or was not scored on that task/metric"}
    return ds
