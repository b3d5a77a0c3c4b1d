"""Segment-level routing reports (seed 002, GMM-XLNet ``export_routing_to_json``).

A JSON report ``{"model_id", "num_experts", "evaluation_dataset", ...,
"routing_data": [{"document_id", "segment_idx", "routing_probs": [E floats]}]}``,
or the bare ``routing_data`` list, or a JSONL file of such records. Each
segment of a document becomes one token (position = ``segment_idx``), each
document one sample (key = ``document_id``). The router is soft: every expert
receives ``routing_probs`` (a softmax), so by default k = E with the slots
sorted by probability and weights = the probabilities; ``top_k=`` keeps the k
most probable (``renormalize=True`` rescales them to sum to 1).

Records of a document need not be contiguous (time-step-major evaluation
writes segment 0 of every document, then segment 1, ...): a first pass
collects (document, segment) and the probabilities go to a temporary memmap in
their final order before the blocks are emitted.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ._core import Block, SampleMeta, Samples, Trace, TraceError, fail, need
from ._jsonstream import JsonStream

VERSION = 1
SEMANTICS = ("soft routing over memory experts: every expert receives routing_probs (softmax over experts; "
             "GMM-XLNet segment routing); no top-k unless top_k was given")


def _records(path: Path):
    """(where, record) for a report, a bare list, or JSONL; header fields are returned via a dict."""
    header: dict = {}
    if path.suffix == ".jsonl":
        def gen():
            with open(path, encoding="utf-8") as f:
                for i, line in enumerate(f, start=1):
                    if line.strip():
                        where = f"{path}: line {i}"
                        try:
                            yield where, json.loads(line)
                        except json.JSONDecodeError as exc:
                            raise TraceError(f"{where}: not valid JSON at character {exc.pos}: {exc.msg} (truncated?)") from None
        return header, gen()

    def gen():
        with JsonStream(path) as js:
            if js.peek() == "[":
                for i, rec in js.array("routing_data"):
                    yield f"{path}: routing_data[{i}]", rec
            else:
                found = False
                for key in js.items("report"):
                    if key == "routing_data":
                        found = True
                        for i, rec in js.array("routing_data"):
                            yield f"{path}: routing_data[{i}]", rec
                    else:
                        header[key] = js.value(f"report field {key!r}")
                if not found:
                    raise fail(str(path), "routing_data", f"missing; the report has fields {sorted(header)}")
            js.end()
    return header, gen()


def read(source: Path, *, top_k: int | None = None, renormalize: bool = False, atol: float = 1e-3) -> Trace:
    """One segment-routing report (one checkpoint)."""
    if not source.is_file():
        raise FileNotFoundError(f"{source}: segment routing report not found")
    # first pass: (document, segment) of every record, and E
    header, recs = _records(source)
    order: dict[str, dict[int, int]] = {}
    E = None
    n = 0
    for where, rec in recs:
        doc = str(need(rec, "document_id", where, "document id"))
        seg = need(rec, "segment_idx", where, "segment index")
        if isinstance(seg, bool) or not isinstance(seg, int) or seg < 0:
            raise fail(where, "segment_idx", f"expected a non-negative integer, got {seg!r}")
        probs = need(rec, "routing_probs", where, "list of per-expert probabilities")
        if not isinstance(probs, list) or not probs:
            raise fail(where, "routing_probs", f"expected a non-empty list, got {probs!r:.60}")
        if E is None:
            E = len(probs)
        elif len(probs) != E:
            raise fail(where, "routing_probs", f"{len(probs)} probabilities, earlier records have {E} (ragged)")
        segs = order.setdefault(doc, {})
        if seg in segs:
            raise fail(where, "segment_idx", f"segment {seg} of document {doc!r} appears twice")
        segs[seg] = n
        n += 1
    if n == 0:
        raise TraceError(f"{source}: no routing records")
    declared = header.get("num_experts")
    if declared is not None and declared != E:
        raise fail(str(source), "num_experts", f"{declared}, but routing_probs have {E} entries")
    k = E if top_k is None else int(top_k)
    if not 1 <= k <= E:
        raise ValueError(f"{source}: top_k={top_k} outside 1..{E}")
    docs = list(order)
    final = np.empty(n, dtype=np.int64)  # record index -> row in the final (document, segment) order
    row = 0
    for doc in docs:
        for seg in sorted(order[doc]):
            final[order[doc][seg]] = row
            row += 1

    def events():
        tmp = Path(tempfile.mkdtemp(prefix="moe-atlas-segments-"))
        try:
            probs = np.lib.format.open_memmap(tmp / "probs.npy", mode="w+", dtype=np.float32, shape=(n, E))
            _, again = _records(source)
            for i, (where, rec) in enumerate(again):
                p = np.asarray(rec["routing_probs"], dtype=np.float64)
                if not np.all(np.isfinite(p)) or p.min() < 0 or abs(p.sum() - 1.0) > atol:
                    raise fail(where, "routing_probs", f"not a probability vector (min {p.min():.3g}, sum {p.sum():.6g})")
                probs[final[i]] = p
            probs.flush()
            start = 0
            for doc in docs:
                segs = np.array(sorted(order[doc]), dtype=np.int32)
                m = SampleMeta(key=doc, n=int(segs.size), position=segs,
                               dataset=str(header.get("evaluation_dataset", "")))
                yield Samples([m], where=f"{source}: document {doc!r}")
                p = np.asarray(probs[start:start + segs.size], dtype=np.float64)
                ids = np.argsort(-p, axis=1, kind="stable")[:, :k]
                w = np.take_along_axis(p, ids, axis=1)
                if renormalize:
                    w = w / w.sum(axis=1, keepdims=True)
                yield Block(layer=0, where=f"{source}: document {doc!r}", ids=ids, weights=w.astype(np.float32),
                            fields={"ids": "routing_probs", "weights": "routing_probs"})
                start += segs.size
            del probs
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    semantics = SEMANTICS if top_k is None else (
        SEMANTICS.replace("no top-k unless top_k was given", f"top-{k} most probable kept"
                          + (", renormalised" if renormalize else ", not renormalised")))
    return Trace(
        format="segments_json", version=VERSION, paths=[str(source)], router_semantics=semantics, events=events(),
        model_family=str(header.get("model_id", "gmm-xlnet")), num_experts=E, top_k=k,
        attrs={"token_meaning": "one token per document segment (position = segment_idx)",
               "layer_meaning": "one routing point (layer 0): the memory-expert router"},
    )
