"""LibMoE analyst logs (Fsoft-AIC/LibMoE, lmms_eval ``llava.py`` with ``return_id_experts=True``).

Layout: ``<root>/<model>/analysts/<run_dir>/{<dataset>.json, results.json}``.
A dataset JSON has top-level ``args``, ``model_configs``, ``logs`` (one entry
per evaluated document: ``doc_id``, ``domain``, ``logs_metrics_vision``...) and
``time``. ``logs_metrics_vision`` is nested [request][repeat] -> {layer id:
metrics}; like LibMoE's own readers we use request 0, repeat 0. Layer keys are
"0".. (gaps possible); ``mm_projector`` and ``time_inference`` are skipped.
Per layer: ``entropy_weight_topk``, ``entropy_weight_all`` (floats),
``dist_experts_top1``/``dist_experts_top2`` (per-expert counts over the image
tokens; "top2" counts every top-k slot), ``router_magine`` (sic: per-token
top-1 minus top-2 weight) and, when its writer line was enabled,
``selected_experts`` [N tokens][k].

The checkpoint is parsed from ``results.json`` ``model_configs.model_args``
("pretrained=/x/Full_smoe/checkpoint-4159,...": checkpoint ``checkpoint-4159``,
step 4159, model family ``libmoe:Full_smoe``).

With ``selected_experts`` (``mode="tokens"``; the default picks it when the
first document has them): one sample per document (key ``<dataset>/<doc_id>``,
domain = the entry's ``domain`` labels joined by '|'), its image tokens as
tokens (token ids unknown), expert ids only.

Without them (``mode="aggregates"``) there are no per-token ids: the cube holds
the per-layer aggregates as their own variables (``agg_entropy_topk``,
``agg_entropy_all``, ``agg_margin``, ``agg_top1_counts``, ``agg_topk_counts``,
``agg_samples``), no ``expert_ids`` and ``has_token_ids`` False, so analyses
that need ids report them missing instead of running on nothing.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import xarray as xr

from ._core import Block, SampleMeta, Samples, Trace, TraceError, fail, int_array
from ._jsonstream import JsonStream

VERSION = 1
SEMANTICS = ("LibMoE SMoE router of the evaluated checkpoint (softmax over experts, top-k; weights used for "
             "entropy_weight_topk): expert ids only, weights not logged")
_SKIP_FILES = re.compile(r"(^results\.json$|_processed_data.*\.json$|_data_selected_final.*\.json$|_score_selected_final.*\.json$)")


def parse_checkpoint(results: Path) -> tuple[str | None, int | None, str | None]:
    """(checkpoint name, step, model name) from ``results.json``'s model_args."""
    try:
        meta = json.loads(results.read_text())
    except json.JSONDecodeError as exc:
        raise TraceError(f"{results}: not valid JSON at character {exc.pos}: {exc.msg}") from None
    args = None
    for holder in (meta.get("model_configs"), meta.get("config"), meta):
        if isinstance(holder, dict) and isinstance(holder.get("model_args"), str):
            args = holder["model_args"]
            break
    if args is None:
        raise fail(str(results), "model_configs.model_args", "missing; cannot tell the checkpoint")
    m = re.search(r"(?:^|,)\s*pretrained=([^,]+)", args)
    if not m:
        raise fail(str(results), "model_configs.model_args", f"no 'pretrained=...' in {args!r}")
    parts = [p for p in m.group(1).strip().rstrip("/").split("/") if p]
    name = parts[-1] if parts else None
    model = parts[-2] if len(parts) > 1 else None
    step = None
    if name:
        s = re.search(r"(\d+)$", name)
        step = int(s.group(1)) if s else None
    return name, step, model


def _dataset_files(source: Path, datasets) -> tuple[Path, list[Path]]:
    if not source.exists():
        raise FileNotFoundError(f"{source}: LibMoE analyst run not found")
    if source.is_file():
        return source.parent, [source]
    files = sorted(p for p in source.glob("*.json") if not _SKIP_FILES.search(p.name))
    if datasets is not None:
        want = [str(d) for d in datasets]
        have = {p.stem: p for p in files}
        missing = [d for d in want if d not in have]
        if missing:
            raise FileNotFoundError(f"{source}: no dataset file(s) {missing} (has {sorted(have)})")
        files = [have[d] for d in want]
    if not files:
        raise FileNotFoundError(f"{source}: no <dataset>.json analyst logs")
    return source, files


def _layer_logs(entry, where: str):
    """The {layer: metrics} dict of request 0, repeat 0 (None when the document has none)."""
    v = entry.get("logs_metrics_vision") if isinstance(entry, dict) else None
    depth = 0
    while isinstance(v, list):
        if not v:
            return None
        v, depth = v[0], depth + 1
        if depth > 4:
            raise fail(where, "logs_metrics_vision", "nested deeper than [request][repeat]")
    if v is None:
        return None
    if not isinstance(v, dict):
        raise fail(where, "logs_metrics_vision", f"expected per-layer objects, got {type(v).__name__}")
    return v


def _numeric_layers(logs: dict, where: str) -> dict[int, dict]:
    out = {}
    for key, metrics in logs.items():
        if key.isdigit():
            if not isinstance(metrics, dict):
                raise fail(where, f"logs_metrics_vision.{key}", f"expected an object of metrics, got {type(metrics).__name__}")
            out[int(key)] = metrics
    return out


def _iter_docs(path: Path):
    """(where, entry) for every entry of ``logs`` in one dataset file, streamed."""
    with JsonStream(path) as js:
        found = False
        for key in js.items("analyst log"):
            if key == "logs":
                found = True
                if js.peek() == "{":  # logs keyed by doc id
                    for doc_key in js.items("logs"):
                        yield f"{path}: logs[{doc_key!r}]", js.value(f"logs[{doc_key!r}]")
                else:
                    for i, entry in js.array("logs"):
                        yield f"{path}: logs[{i}]", entry
            else:
                js.value(f"field {key!r}")
        js.end()
    if not found:
        raise fail(str(path), "logs", "missing (expected the per-document log entries)")


def _squeeze_tokens(a, where: str) -> np.ndarray:
    """``selected_experts`` as (tokens, k); a leading batch dim of 1 is dropped."""
    try:
        arr = np.asarray(a)
    except ValueError:
        arr = np.asarray([0], dtype=object)
    if arr.dtype == object:
        raise fail(where, "selected_experts", "ragged nested list (tokens with different numbers of experts)")
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise fail(where, "selected_experts", f"shape {list(arr.shape)}; expected [tokens][k]")
    return int_array(arr, where, "selected_experts", 2)


def read(source: Path, *, datasets: list[str] | None = None, mode: str = "auto", top_k: int | None = None) -> Trace:
    """One LibMoE analyst run folder (or one dataset JSON of it): one checkpoint."""
    if mode not in ("auto", "tokens", "aggregates"):
        raise ValueError(f"{source}: mode={mode!r}; expected 'auto', 'tokens' or 'aggregates'")
    run_dir, files = _dataset_files(source, datasets)
    results = run_dir / "results.json"
    ckpt = step = model = None
    if results.is_file():
        ckpt, step, model = parse_checkpoint(results)
    attrs = {"libmoe_request_used": "logs_metrics_vision[0][0] (request 0, repeat 0), as LibMoE's readers do",
             "libmoe_datasets": json.dumps([f.stem for f in files]),
             "libmoe_results": str(results) if results.is_file() else "missing: checkpoint not parsed"}
    if mode == "auto":
        mode = "aggregates"
        for where, entry in _iter_docs(files[0]):
            logs = _layer_logs(entry, where)
            if logs:
                layers = _numeric_layers(logs, where)
                mode = "tokens" if any("selected_experts" in m for m in layers.values()) else "aggregates"
                break
    common = dict(format="libmoe", version=VERSION, paths=[str(f) for f in files] + ([str(results)] if results.is_file() else []),
                  router_semantics=SEMANTICS, model_family=f"libmoe:{model}" if model else "libmoe",
                  checkpoint=ckpt, step=step, attrs=attrs)
    if mode == "tokens":
        return Trace(events=_token_events(files, attrs), top_k=top_k, slot_order="as logged (selected_experts order)",
                     **common)
    agg = _aggregates(files, attrs)
    k = top_k or attrs.pop("_k_inferred", None)
    return Trace(events=None, aggregates=agg, top_k=k,
                 num_experts=int(agg.sizes.get("expert", 0)) or None, slot_order="", **common)


_SKIPPED = "libmoe_documents_without_vision_metrics"


def _with_vision_metrics(files: list[Path], attrs: dict):
    """(file, where, document, its layer logs) of each document that has vision metrics; the others are
    counted in ``attrs["libmoe_documents_without_vision_metrics"]``."""
    attrs[_SKIPPED] = 0
    for f in files:
        for where, entry in _iter_docs(f):
            logs = _layer_logs(entry, where)
            if logs:
                yield f, where, entry, logs
            else:
                attrs[_SKIPPED] += 1


def _token_events(files: list[Path], attrs: dict):
    for f, where, entry, logs in _with_vision_metrics(files, attrs):
        layers = _numeric_layers(logs, where)
        blocks, n = [], None
        for layer in sorted(layers):
            m = layers[layer]
            lw = f"{where}: logs_metrics_vision.{layer}"
            if "selected_experts" not in m:
                raise fail(lw, "selected_experts", f"missing here but present in other layers/documents (fields {sorted(m)})")
            ids = _squeeze_tokens(m["selected_experts"], lw)
            if n is None:
                n = ids.shape[0]
            elif ids.shape[0] != n:
                raise fail(lw, "selected_experts", f"{ids.shape[0]} tokens, layer {min(layers)} has {n}")
            blocks.append(Block(layer=layer, where=lw, ids=ids, fields={"ids": "selected_experts"}))
        if not blocks:
            attrs[_SKIPPED] += 1
            continue
        doc = entry.get("doc_id", where.rsplit("[", 1)[-1].rstrip("]"))
        dom = entry.get("domain", f.stem)
        dom = "|".join(map(str, dom)) if isinstance(dom, list) else str(dom)
        yield Samples([SampleMeta(key=f"{f.stem}/{doc}", n=int(n), dataset=f.stem, domain=dom)], where=where)
        yield from blocks


def _aggregates(files: list[Path], attrs: dict) -> xr.Dataset:
    acc: dict[int, dict] = {}
    keys: list[str] = []
    E = None
    for f, where, entry, logs in _with_vision_metrics(files, attrs):
        keys.append(f"{f.stem}/{entry.get('doc_id', len(keys))}")
        for layer, m in _numeric_layers(logs, where).items():
            lw = f"{where}: logs_metrics_vision.{layer}"
            a = acc.setdefault(layer, {"top1": None, "topk": None, "ent_topk": [], "ent_all": [], "margin": [0.0, 0],
                                       "samples": 0})
            a["samples"] += 1
            for field_name, slot in (("dist_experts_top1", "top1"), ("dist_experts_top2", "topk")):
                if field_name in m:
                    c = int_array(m[field_name], lw, field_name, 1)
                    if E is None:
                        E = c.size
                    elif c.size != E:
                        raise fail(lw, field_name, f"{c.size} experts, earlier records have {E}")
                    if c.size and c.min() < 0:
                        raise fail(lw, field_name, "negative count")
                    a[slot] = c.astype(np.int64) if a[slot] is None else a[slot] + c
            for field_name, slot in (("entropy_weight_topk", "ent_topk"), ("entropy_weight_all", "ent_all")):
                if field_name in m:
                    v = m[field_name]
                    if isinstance(v, bool) or not isinstance(v, (int, float)):
                        raise fail(lw, field_name, f"expected a number, got {v!r:.40}")
                    a[slot].append(float(v))
            if "router_magine" in m:
                try:
                    v = np.asarray(m["router_magine"], dtype=np.float64).ravel()
                except (TypeError, ValueError):
                    raise fail(lw, "router_magine", "expected numbers (per-token top-1 minus top-2 weight)") from None
                a["margin"][0] += float(v.sum())
                a["margin"][1] += int(v.size)
    if not acc:
        raise TraceError(f"{files[0]}: no per-layer vision metrics in any document")
    layers = sorted(acc)
    E = E or 0

    def col(fn, dtype):
        return np.array([fn(acc[l_]) for l_ in layers], dtype=dtype)

    data = {
        "agg_entropy_topk": (("layer",), col(lambda a: np.mean(a["ent_topk"]) if a["ent_topk"] else np.nan, np.float32)),
        "agg_entropy_all": (("layer",), col(lambda a: np.mean(a["ent_all"]) if a["ent_all"] else np.nan, np.float32)),
        "agg_margin": (("layer",), col(lambda a: a["margin"][0] / a["margin"][1] if a["margin"][1] else np.nan, np.float32)),
        "agg_samples": (("layer",), col(lambda a: a["samples"], np.int32)),
    }
    if E:
        zero = np.full(E, -1, np.int64)
        data["agg_top1_counts"] = (("layer", "expert"), np.stack([acc[l_]["top1"] if acc[l_]["top1"] is not None else zero for l_ in layers]))
        data["agg_topk_counts"] = (("layer", "expert"), np.stack([acc[l_]["topk"] if acc[l_]["topk"] is not None else zero for l_ in layers]))
        t1 = sum(int(acc[l_]["top1"].sum()) for l_ in layers if acc[l_]["top1"] is not None)
        tk = sum(int(acc[l_]["topk"].sum()) for l_ in layers if acc[l_]["topk"] is not None)
        if t1 and tk and tk % t1 == 0:
            attrs["_k_inferred"] = tk // t1
    ds = xr.Dataset(data, coords={"layer": np.asarray(layers, np.int32)})
    if E:
        ds = ds.assign_coords(expert=np.arange(E, dtype=np.int32))
    attrs["aggregates_pooled"] = (f"{len(keys)} documents of {[f.stem for f in files]}: entropies averaged over documents, "
                                  "margins over logged tokens, counts summed")
    return ds
