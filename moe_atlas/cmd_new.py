"""``moe-atlas new NAME``: write ``NAME.toml``, an experiment with every option present and commented.

The file is generated from the schema itself (the dataclasses of
``experiments/spec.py`` and ``capture.demo.DemoConfig``, their defaults and
the docstring under each field), so it never drifts from what the validator
accepts. As written it is a valid experiment (the embedded demo, every value
its default); the tables of the other model sources are commented out, with
the keys they take.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
from pathlib import Path

from experiments.toml_writer import toml_value

HELP = "write NAME.toml: a new experiment with every option present and commented"


def add_arguments(p) -> None:
    p.add_argument("name", metavar="NAME", help="the experiment's name; the file is NAME.toml (or --out)")
    p.add_argument("--out", default="", metavar="FILE", help="where to write it (default: ./NAME.toml)")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")


def field_docs(cls) -> dict[str, str]:
    """The docstring written under each field of dataclass ``cls`` (empty when there is none)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
            else:
                docs[node.target.id] = ""
    return docs


def _comment(doc: str, indent: str = "") -> list[str]:
    return [f"{indent}# {line}" for line in textwrap.wrap(doc, 100)] if doc else []


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _scalar_lines(cls, *, skip=(), commented=False, overrides=None) -> list[str]:
    """``key = default`` for every plain field of ``cls`` (not tables), each under its docstring."""
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if f.name in skip or dataclasses.is_dataclass(tp) or _is_table_list(tp):
            continue
        value = (overrides or {}).get(f.name, _default(f))
        if value is None:
            value = {str: "", int: 0, float: 0.0, bool: False}.get(tp, "")
        out += _comment(docs.get(f.name, ""))
        out.append(f"{'# ' if commented else ''}{f.name} = {toml_value(value)}")
    return out


def _is_table_list(tp) -> bool:
    return typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0])


def template(name: str) -> str:
    """The text of a new experiment called ``name`` (see the module docstring)."""
    from capture.demo import DemoConfig
    from experiments import spec

    head = [f"# moe-atlas experiment {name!r}: every option, with its default. Run it with",
            f"#   moe-atlas check {name}.toml   (what would run)",
            f"#   moe-atlas run {name}.toml",
            "# Relative paths are relative to this file's folder. Dask workers must see the same filesystem.",
            ""]
    out = head + _scalar_lines(spec.Experiment, skip=("source_file",),
                               overrides={"name": name, "output_dir": f"runs/{name}"})
    out += ["", "[model]"] + _scalar_lines(spec.ModelSpec, skip=("demo",))
    out += ["", "# source = \"demo\": the embedded tiny MoE, trained here. Its options:", "[model.demo]"]
    out += _scalar_lines(DemoConfig)
    out += ["", "# source = \"checkpoints\": one table per checkpoint (and at least one [[datasets]] table);",
            "# remove [model.demo] then."]
    for line in ["[[model.checkpoints]]"] + _scalar_lines(
            spec.CheckpointSpec, overrides={"name": "step1000", "path": "checkpoints/step1000", "step": 1000}):
        out.append(line if line.startswith("#") else f"# {line}")
    out += ["", "# Datasets: one table each (the demo uses its own held-out set when there is none)."]
    for line in ["[[datasets]]"] + _scalar_lines(spec.DatasetSpec,
                                                 overrides={"name": "eval", "path": "data/eval.jsonl"}):
        out.append(line if line.startswith("#") else f"# {line}")
    out += ["", "# source = \"import\": routing traces written by another system (remove [model.demo] then)."]
    for line in ["[trace]"] + _scalar_lines(spec.TraceSpec, skip=("options",)) + [
            "[trace.options]   # the format's own options (moe-atlas import --help)"]:
        out.append(line if line.startswith("#") else f"# {line}")
    for title, cls in (("capture", spec.CaptureSpec), ("conditions", spec.ConditionsSpec)):
        out += ["", f"[{title}]"] + _scalar_lines(cls)
    out += ["", "[analyses]"] + _scalar_lines(spec.AnalysesSpec, skip=("params",))
    out += ["# Per-analysis parameters (moe-atlas analyses --params lists them), e.g.", "# [analyses.params.usage]",
            "# n_boot = 200"]
    for title, cls in (("report", spec.ReportSpec), ("dask", spec.DaskSpec)):
        out += ["", f"[{title}]"] + _scalar_lines(cls)
    # Every other table of the schema, generically (so that a table added to the spec appears here too).
    done = {"name", "output_dir", "description", "source_file", "datasets", "model", "capture", "trace",
            "conditions", "analyses", "report", "dask"}
    docs, hints = field_docs(spec.Experiment), typing.get_type_hints(spec.Experiment)
    for f in dataclasses.fields(spec.Experiment):
        if f.name not in done:
            out += [""] + _comment(docs.get(f.name, "")) + _table_lines(f.name, hints[f.name])
    return "\n".join(out) + "\n"


def _table_lines(key: str, tp, commented: bool = False) -> list[str]:
    """``[key]`` (or a commented ``[[key]]`` example) with every field, sub-tables recursively."""
    if _is_table_list(tp):
        cls, commented, header = typing.get_args(tp)[0], True, f"[[{key}]]"
    elif dataclasses.is_dataclass(tp):
        cls, header = tp, f"[{key}]"
    else:
        return [f"# [{key}]   (a table of its own keys)"]
    lines = [header] + _scalar_lines(cls, commented=False)
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    for f in dataclasses.fields(cls):
        sub = hints[f.name]
        if dataclasses.is_dataclass(sub) or _is_table_list(sub):
            lines += _comment(docs.get(f.name, "")) + _table_lines(f"{key}.{f.name}", sub, commented)
        elif typing.get_origin(sub) is dict or sub is dict:
            lines = [line for line in lines if not line.startswith(f"{f.name} = ")]
            lines.append(f"# [{key}.{f.name}]   (a table of its own keys)")
    if commented:
        lines = [line if line.startswith("#") else f"# {line}" for line in lines]
    return lines


def run(args) -> int:
    from experiments.spec import _NAME, SpecError

    if not _NAME.match(args.name):
        raise SpecError(f"NAME {args.name!r}: use letters, digits, '_', '-', '.'")
    path = Path(args.out or f"{args.name}.toml")
    if path.exists() and not args.force:
        raise FileExistsError(f"{path}: already exists (--force overwrites it)")
    path.write_text(template(args.name))
    print(f"{path}: written; edit it, then: moe-atlas check {path} && moe-atlas run {path}")
    return 0
