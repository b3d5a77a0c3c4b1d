"""vLLM routing-logger JSONL, written by several public vLLM patches (format ``vllm_routes_jsonl``).

Layout (FORMATS.md item 8)::

    {"type": "meta", "model_id": "...", "vllm_version": "...", "top_k": 8, "layers_logged": [0, 1, ...], ...}
    {"type": "route", "req_id": "r-17", "token_idx": 0, "layer": 0, "topk_ids": [5, 9, ...], "topk_weights": [...]}
    ...

One ``route`` line per (request, token, layer), in the order the engine ran
them: requests of a batch interleave. Each request is one sample (key =
``req_id``, kept as the sample key for side tables); its tokens are ordered by
``token_idx``, which becomes ``position``. ``topk_weights`` become the
weights when present on every line (slots are sorted by weight, top-1 first).
A line's ``phase`` ("prefill"/"decode", or "prompt"/"generate") or boolean
``is_prefill`` fills the token coordinate ``phase`` when present; otherwise it
is unknown ("").

Quirks handled: BOM, CRLF, blank lines, trailing whitespace, extra fields,
ints written as floats or strings, ``req_id`` written as a number; a truncated
last line is refused by number; a ``meta`` line may come anywhere before the
first route or be absent (then ``top_k`` comes from the lines or the option).
Patches that log a batch under one ``req_id`` repeat a (``token_idx``,
``layer``) pair: the repeat starts a new sample ``<req_id>#<n>`` (counted in
attrs ``repeated_request_ids``) rather than mixing two requests.

Tokens that miss a layer logged for others are counted (attrs
``tokens_missing_layers``) and, by ``missing_layers``, dropped ("drop",
default) or kept with fill ("fill": ids -1, weights NaN). vLLM's warm-up /
profiling batches are removed by the shared warm-up step of the importers,
not here. The meta line has no ``num_experts``: state it (``num_experts=``).
"""

from __future__ import annotations

from pathlib import Path

from ._core import TraceError, Trace, fail
from ._text import float_list, int_list, iter_jsonl, phase_name, to_int
from .table import Rows, check_missing_option, emit_samples, rows_to_columns

VERSION = 1
SEMANTICS = ("vLLM fused MoE top-k as logged by the routing logger (model's own router: softmax/sigmoid, bias, "
             "groups); weights as logged")


def _files(source: Path) -> list[Path]:
    if not source.exists():
        raise FileNotFoundError(f"{source}: routing log not found")
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix in (".jsonl", ".ndjson") and p.is_file())
        if not files:
            raise FileNotFoundError(f"{source}: no .jsonl files")
        return files
    return [source]


def read(source: Path, *, top_k: int | None = None, missing_layers: str = "drop") -> Trace:
    """Routing-logger JSONL file(s) (a file or a folder of them): one checkpoint.

    Parameters
    ----------
    top_k : the model's experts per token; checked against the meta line and every route line.
    missing_layers : "drop" (default) or "fill": what happens to a token that misses a logged layer.
    """
    check_missing_option(missing_layers)
    files = _files(source)
    rows = Rows()
    meta: dict = {}
    k_ref = None if top_k is None else int(top_k)
    k_where = "option top_k"
    for path in files:
        routes_before = rows.n
        for line, rec in iter_jsonl(path):
            where = f"{path}: line {line}"
            if not isinstance(rec, dict):
                raise fail(where, None, f"expected a JSON object, got {type(rec).__name__}")
            kind = rec.get("type", "route")
            if kind == "meta":
                if rows.n > routes_before:
                    raise fail(where, "type", "a meta line after route lines (two logs concatenated?)")
                if meta and meta.get("model_id") != rec.get("model_id"):
                    raise fail(where, "model_id", f"{rec.get('model_id')!r}, an earlier log is of {meta.get('model_id')!r}")
                meta = rec
                if rec.get("top_k") is not None:
                    mk = to_int(rec["top_k"], where, "top_k")
                    if k_ref is not None and mk != k_ref:
                        raise fail(where, "top_k", f"the meta line says {mk}, {k_where} says {k_ref}")
                    k_ref, k_where = mk, f"the meta line ({where})"
                continue
            if kind != "route":
                continue  # other record types some patches add (stats, summaries)
            for key in ("req_id", "token_idx", "layer", "topk_ids"):
                if key not in rec:
                    raise fail(where, key, f"missing; the route line has fields {sorted(rec)[:12]}")
            req = rec["req_id"]
            if req is None or isinstance(req, (dict, list)):
                raise fail(where, "req_id", f"expected a request id, got {req!r}")
            ids = int_list(rec["topk_ids"], where, "topk_ids")
            if k_ref is None:
                k_ref, k_where = len(ids), f"the first route line ({where})"
            if len(ids) != k_ref:
                raise fail(where, "topk_ids", f"{len(ids)} experts, {k_where} says top_k={k_ref}")
            w = rec.get("topk_weights")
            weights = None if w is None else float_list(w, where, "topk_weights")
            if weights is not None and len(weights) != len(ids):
                raise fail(where, "topk_weights", f"{len(weights)} weights for {len(ids)} experts")
            if "phase" in rec:
                phase = phase_name(rec["phase"], where)
            elif isinstance(rec.get("is_prefill"), bool):  # another patch's spelling
                phase = "prefill" if rec["is_prefill"] else "decode"
            else:
                phase = ""
            rows.add(sample=str(req), token=to_int(rec["token_idx"], where, "token_idx"),
                     layer=to_int(rec["layer"], where, "layer"), ids=ids, weights=weights, phase=phase, where=where)
    if not rows.n:
        raise TraceError(f"{files[0]}: no route lines (type 'route' with req_id, token_idx, layer, topk_ids)")
    logged = meta.get("layers_logged")
    layers = None
    if isinstance(logged, list) and logged:
        layers = [to_int(x, "meta line", "layers_logged") for x in logged]
    attrs = {"position_meaning": "token_idx of the route lines",
             "token_id_meaning": "unknown (-1): the routing log holds no vocabulary ids",
             "missing_layers": missing_layers}
    for key in ("model_id", "vllm_version", "seed", "device"):
        if meta.get(key) is not None:
            attrs[f"log_{key}"] = str(meta[key])
    events = emit_samples(rows_to_columns(rows, "topk_ids"), layers=layers, missing=missing_layers, attrs=attrs,
                          where=str(source), split_repeats=True)
    return Trace(
        format="vllm_routes_jsonl", version=VERSION, paths=[str(p) for p in files], router_semantics=SEMANTICS,
        events=events, model_family=str(meta.get("model_id") or "vllm"),
        slot_order="by logged weight, top-1 first" if rows.all_weights else "as logged (fused top-k order)",
        top_k=k_ref, attrs=attrs,
    )
