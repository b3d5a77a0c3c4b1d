"""``moe-atlas import FORMAT PATH... --out DIR``: a routing cube from traces another system wrote.

Runs ``storage.importers.import_trace`` (one PATH per checkpoint) and writes
``DIR/routing.zarr``; analyses then run on it with an experiment of
``model.source = "import"``, or ``moe_atlas.open_run(DIR)`` opens it.
``--option key=value`` passes the format's own options (values are read as
TOML: ``top_k=4``, ``semantics="softmax"``, ``keep_warmup=true``).
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

HELP = "import routing traces (llama.cpp, LibMoE, OLMoE, Megatron, vLLM/SGLang, tables...) into DIR/routing.zarr"


def add_arguments(p) -> None:
    p.add_argument("format", metavar="FORMAT", help="the trace format (--list-formats shows them)")
    p.add_argument("paths", metavar="PATH", nargs="+", help="trace files or folders, one per checkpoint")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder; the cube is DIR/routing.zarr")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the format (repeatable); VALUE is a TOML value, bare words are strings")
    p.add_argument("--checkpoint", action="append", default=None, metavar="NAME",
                   help="checkpoint name per PATH (repeatable; default: from the files)")
    p.add_argument("--step", action="append", type=int, default=None, metavar="N",
                   help="training step per PATH (repeatable)")
    p.add_argument("--side-table", default=None, metavar="FILE",
                   help="CSV/JSON: sample key -> dataset, domain, condition, pair")
    p.add_argument("--num-experts", type=int, default=None, metavar="E", help="experts per layer, if the format "
                   "does not say")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DIR/routing.zarr")


def parse_option(text: str) -> tuple[str, object]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--option {text!r}: expected KEY=VALUE")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word: a string
    return key.strip(), value


def run(args) -> int:
    from storage.importers import IMPORTERS, import_trace

    if args.format not in IMPORTERS:
        raise ValueError(f"unknown trace format {args.format!r}; known: {', '.join(sorted(IMPORTERS))}")
    options = dict(parse_option(o) for o in args.option)
    for p in args.paths:
        if not Path(p).exists():
            raise FileNotFoundError(f"{p}: no such file or folder")
    out = Path(args.out)
    summary = import_trace(args.format, [str(Path(p).resolve()) for p in args.paths], out / "routing.zarr",
                           checkpoint=args.checkpoint, step=args.step, side_table=args.side_table,
                           num_experts=args.num_experts, overwrite=args.overwrite, **options)
    keep = ("checkpoints", "tokens", "samples", "layers", "num_experts", "top_k", "variables")
    print(json.dumps({"path": str(out / "routing.zarr"), **{k: summary.get(k) for k in keep}}, default=str))
    return 0
