"""OLMoE ``scripts/run_moe_analysis.py`` output: ``<prefix>_results[_<step>].jsonl``.

One line per chunk of consecutive tokens (2048 in OLMoE's runs, documents
concatenated): ``input_ids`` [n], ``predicted_token_ids`` [n] (argmax of the
LM head; not kept: the cube has no variable for it), ``exp_ids`` [n][k][L]
with the **layer axis last**, slots sorted by descending router logit (OLMoE:
softmax over 64 experts, top-8, not renormalised; Mixtral: top-2,
renormalised). No weights.

The checkpoint comes from the file name: ``c4_results_5000.jsonl`` is step
5000 (checkpoint ``step5000``); ``c4_results.jsonl`` is the ``main`` revision
(its step is ``main_step=`` when given, else one past the largest step of the
other files imported with it). Layer ids are the axis index unless ``layers=``
names them. Each line is one sample (key ``<prefix>/<line index>``), domain =
the prefix (``c4``).

Lines are parsed with a fast path (slicing the two arrays out of the text and
reading them with numpy) accepted only when the arrays' whole bracket/comma
skeleton is that of regular [n] and [n][k][L] arrays (``_fastcheck``); any line
that does not pass falls back to ``json.loads`` so errors name the line and
field exactly (a ragged ``exp_ids`` is refused there).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from ._core import (
    Block,
    SampleMeta,
    Samples,
    Trace,
    TraceError,
    check_layers_option,
    fail,
    fast_ints,
    int_array,
    need,
    slice_int_array,
)
from ._fastcheck import regular_shape

VERSION = 1
SEMANTICS = {
    "olmoe": "softmax over all experts, top-k by logit (OLMoE: 64 experts, top-8, not renormalised); "
             "ids only (exp_ids = argsort(-router_logits)[:k]), weights not recorded",
    "mixtral": "softmax over all experts, top-2 by logit, renormalised (Mixtral); ids only, weights not recorded",
}
_NAME = re.compile(r"^(?P<prefix>.+?)_results(?:_(?P<step>\d+))?\.jsonl$")


def parse_name(path: Path) -> tuple[str, int | None]:
    m = _NAME.match(path.name)
    if not m:
        raise TraceError(f"{path}: file name is not <prefix>_results[_<step>].jsonl (OLMoE run_moe_analysis.py)")
    return m.group("prefix"), (int(m.group("step")) if m.group("step") else None)


def parse_line(line: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    """-> input_ids (n,), exp_ids (n, k, L) of one line."""
    ids_txt = slice_int_array(line, "input_ids")
    exp_txt = slice_int_array(line, "exp_ids")
    if ids_txt is not None and exp_txt is not None and line.count('"exp_ids"') == 1 and line.count('"input_ids"') == 1:
        ids = fast_ints(ids_txt)
        exp = fast_ints(exp_txt)
        if ids is not None and exp is not None and ids.size:
            n = ids.size
            # exact: the whole bracket/comma skeleton must be that of a regular [n] and [n][k][L] array;
            # counts alone let a ragged exp_ids whose totals add up through, reshaped into other routing
            if regular_shape(ids_txt, n, (), 1) == (n,):
                shape = regular_shape(exp_txt, exp.size, (n,), 3)
                if shape is not None:
                    return ids, exp.reshape(shape)
    # slow path: exact errors
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as exc:
        raise TraceError(f"{where}: not valid JSON at character {exc.pos}: {exc.msg} (truncated line?)") from None
    ids = int_array(need(rec, "input_ids", where, "list of token ids"), where, "input_ids", 1)
    exp = int_array(need(rec, "exp_ids", where, "[tokens][k][layers] expert ids"), where, "exp_ids", 3)
    return ids, exp


def read(source: Path, *, layers: list[int] | None = None, main_step: int | None = None,
         model: str = "olmoe", flush_tokens: int = 1 << 15) -> Trace:
    """One ``<prefix>_results[_<step>].jsonl`` file (one checkpoint)."""
    if not source.is_file():
        raise FileNotFoundError(f"{source}: OLMoE results file not found")
    if model not in SEMANTICS:
        raise ValueError(f"{source}: model={model!r}; known: {sorted(SEMANTICS)}")
    prefix, step = parse_name(source)
    if step is None and main_step is not None:
        step = int(main_step)
    # cheap first pass: one sample per line, its length from the input_ids bracket
    lengths = []
    with open(source, "r", encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            txt = slice_int_array(line, "input_ids")
            if txt is None:
                where = f"{source}: line {i}"
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise TraceError(f"{where}: not valid JSON at character {exc.pos}: {exc.msg} (truncated line?)") from None
                lengths.append((i, len(int_array(need(rec, "input_ids", where), where, "input_ids", 1))))
            else:
                lengths.append((i, txt.count(",") + 1 if txt.strip("[] \n") else 0))
    if not lengths:
        raise TraceError(f"{source}: no lines")

    def events():
        layer_ids = None
        k_ref = None
        with open(source, "r", encoding="utf-8") as f:
            sample = 0
            for i, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{source}: line {i}"
                ids, exp = parse_line(line, where)
                n_expected = lengths[sample][1]
                if ids.size != n_expected or exp.shape[0] != ids.size:
                    raise fail(where, "exp_ids", f"{exp.shape[0]} tokens of expert ids, input_ids has {ids.size}")
                if layer_ids is None:
                    layer_ids = check_layers_option(layers, exp.shape[2], where)
                    k_ref = exp.shape[1]
                if exp.shape[2] != len(layer_ids):
                    raise fail(where, "exp_ids", f"{exp.shape[2]} layers (last axis), earlier lines have {len(layer_ids)}")
                if exp.shape[1] != k_ref:
                    raise fail(where, "exp_ids", f"{exp.shape[1]} experts per token, earlier lines have {k_ref}")
                yield Samples([SampleMeta(key=f"{prefix}/{sample}", n=int(ids.size), token_id=ids.astype(np.int32),
                                          dataset=prefix, domain=prefix)], where=where)
                for li, layer in enumerate(layer_ids):
                    yield Block(layer=layer, where=where, ids=exp[:, :, li], fields={"ids": "exp_ids"})
                sample += 1

    return Trace(
        format="olmoe_jsonl", version=VERSION, paths=[str(source)], router_semantics=SEMANTICS[model],
        events=events(), model_family=model, slot_order="by router logit, highest first (argsort(-logits))",
        checkpoint=f"step{step}" if step is not None else "main", step=step,
        attrs={"dropped_fields": "predicted_token_ids (no cube variable holds it)",
               "layer_ids": "given by option layers" if layers is not None else "index of exp_ids' last axis"},
    )
