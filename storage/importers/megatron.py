"""Megatron-LM router traces (``megatron/core/transformer/moe/router_trace.py``, ``RouterTracer``).

``router_trace_rank{r}.jsonl``: one line per (step, block, layer)::

    {"step": 0, "stage": "pre_dispatch", "block": "decoder", "layer": 3, "rank": 0,
     "num_tokens": 128, "topk": 8, ["mtp_idx",] ["logit_offset", "logit_bytes", "logit_shape",]
     "top_indices": [[...], ...]}

``top_indices`` [num_tokens][topk]; when the router returned a boolean routing
map the ids are in *ascending* order, not by weight. Optional sidecar
``logits_rank{r}.bin``: headerless bfloat16 pre-top-k logits, the record's
``logit_offset``/``logit_bytes``/``logit_shape`` ([num_tokens, E]) locating
them. With logits, slots are sorted by logit (highest first; the weight order
for softmax and sigmoid routers alike, whatever selection bias chose the set),
and ``semantics=`` (with ``renormalize=``) turns them into the weights the
recorded experts receive. Without logits there are no weights and slots keep
the file's order.

Tokens: a record's rows are the step's tokens flattened [seq, batch]; with
``micro_batch_size=b`` they are unflattened into b samples of seq tokens
(sample = (step, batch row), position = sequence index); by default a step is
one sample. ``layer`` is the traced module's layer index (pipeline-local when
the model was pipeline-parallel; ``layer_offset=`` shifts it). MTP records are
skipped. Several ranks: pick one with ``rank=``, or ``ranks="data_parallel"``
to import every rank's tokens as further samples (key ``rank<r>/step<s>``).

Token ids: a record may carry ``semantic_token_ids`` [num_tokens] (the input
token id of each row, flattened like the rows); the first record of a step that
has it gives the step's token ids (the cube's ``token_id``; -1 stays unknown),
and another record of the step with different ids is refused. Without it token
ids are unknown (-1), and token-id statistics are NaN.
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
    bf16_to_float32,
    check_semantics,
    describe_semantics,
    fail,
    fast_ints,
    int_array,
    route_from_logits,
    slice_int_array,
    weights_for,
)
from ._fastcheck import regular_shape

VERSION = 1
SEMANTICS_IDS_ONLY = (
    "Megatron-LM TopKRouter as configured for the run (score function, pre/post-softmax, expert bias, "
    "group limits, scaling): recorded top-k ids only; weights not recorded"
)
_RANK = re.compile(r"^router_trace_rank(\d+)\.jsonl$")
_SMALL = ("step", "stage", "block", "layer", "rank", "num_tokens", "topk", "mtp_idx",
          "logit_offset", "logit_bytes", "logit_shape")


def _files(source: Path, rank, ranks) -> list[tuple[int, Path]]:
    if not source.exists():
        raise FileNotFoundError(f"{source}: Megatron router trace not found")
    if source.is_file():
        m = _RANK.match(source.name)
        return [(int(m.group(1)) if m else 0, source)]
    found = sorted((int(m.group(1)), p) for p in source.iterdir() if (m := _RANK.match(p.name)))
    if not found:
        raise FileNotFoundError(f"{source}: no router_trace_rank<r>.jsonl files")
    if rank is not None:
        sel = [f for f in found if f[0] == int(rank)]
        if not sel:
            raise FileNotFoundError(f"{source}: no router_trace_rank{rank}.jsonl (ranks {[r for r, _ in found]})")
        return sel
    if len(found) > 1 and ranks != "data_parallel":
        raise ValueError(
            f"{source}: traces of ranks {[r for r, _ in found]}; pass rank=<r> to import one, or "
            "ranks='data_parallel' when ranks saw different data (their tokens become separate samples)"
        )
    return found


def _small_fields(line: str, where: str) -> dict:
    """The record's scalar fields without decoding ``top_indices`` (cheap first pass)."""
    i = line.find('"top_indices"')
    if i > 0:
        head = line[:i].rstrip().rstrip(",") + "}"
        try:
            rec = json.loads(head)
            if isinstance(rec, dict):
                return rec
        except json.JSONDecodeError:
            pass
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as exc:
        raise TraceError(f"{where}: not valid JSON at character {exc.pos}: {exc.msg} (truncated line?)") from None
    if not isinstance(rec, dict):
        raise fail(where, None, f"expected a JSON object, got {type(rec).__name__}")
    return {k: rec[k] for k in _SMALL if k in rec} | ({"top_indices": None} if "top_indices" in rec else {})


def _int_field(rec: dict, key: str, where: str) -> int:
    if key not in rec:
        raise fail(where, key, f"missing; the record has fields {sorted(rec)}")
    v = rec[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise fail(where, key, f"expected an integer, got {v!r}")
    return v


def _top_indices(line: str, n: int, k: int, where: str) -> np.ndarray:
    txt = slice_int_array(line, "top_indices")
    if txt is not None and txt.count("[") == n + 1:
        flat = fast_ints(txt)
        # exact skeleton, not just counts: a ragged [[1, 2, 3], [4]] must not pass as [[1, 2], [3, 4]]
        if flat is not None and flat.size == n * k and regular_shape(txt, flat.size, (n,), 2) == (n, k):
            return flat.reshape(n, k)
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as exc:
        raise TraceError(f"{where}: not valid JSON at character {exc.pos}: {exc.msg} (truncated line?)") from None
    if "top_indices" not in rec:
        raise fail(where, "top_indices", f"missing; the record has fields {sorted(rec)}")
    a = int_array(rec["top_indices"], where, "top_indices", 2)
    if a.shape != (n, k):
        raise fail(where, "top_indices", f"shape {list(a.shape)}, expected [num_tokens={n}, topk={k}]")
    return a


def _token_ids(line: str, n: int, where: str) -> np.ndarray | None:
    """The record's ``semantic_token_ids`` as (n,) int64, or None when it has none."""
    if '"semantic_token_ids"' not in line:
        return None
    txt = slice_int_array(line, "semantic_token_ids")
    flat = fast_ints(txt) if txt is not None and txt.count("[") == 1 else None
    if flat is None:
        rec = json.loads(line)
        value = rec.get("semantic_token_ids")
        if value is None:
            return None
        flat = int_array(value, where, "semantic_token_ids", 1)
    if flat.size != n:
        raise fail(where, "semantic_token_ids", f"{flat.size} token ids, num_tokens={n}")
    if flat.size and (flat.min() < -1 or flat.max() > np.iinfo(np.int32).max):
        raise fail(where, "semantic_token_ids", f"token id {int(flat.min() if flat.min() < -1 else flat.max())} "
                                                "outside -1..2^31-1")
    return flat.astype(np.int64)


def _plan(path: Path, r: int, include_mtp: bool):
    """First pass: per step, the decoder records (line number, layer, rows) and checks of the scalars."""
    steps: list[tuple[int, int, list]] = []  # (step, num_tokens, [(line_no, offset, layer, rec)])
    seen_steps = set()
    skipped = 0
    with open(path, "rb") as f:
        offset = 0
        for i, raw in enumerate(f, start=1):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            where = f"{path}: line {i}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise fail(where, None, "not UTF-8 text") from None
            if not line.endswith("\n") and f.peek(1) == b"":
                # the tracer ends every record with a newline; a last line without one was cut off
                try:
                    json.loads(line)
                except json.JSONDecodeError:
                    raise fail(where, None, "the file ends inside this record (truncated)") from None
            rec = _small_fields(line, where)
            step = _int_field(rec, "step", where)
            layer = _int_field(rec, "layer", where)
            n = _int_field(rec, "num_tokens", where)
            k = _int_field(rec, "topk", where)
            if "top_indices" not in rec and '"top_indices"' not in line:
                raise fail(where, "top_indices", f"missing; the record has fields {sorted(rec)}")
            stage = rec.get("stage", "pre_dispatch")
            if stage != "pre_dispatch":
                raise fail(where, "stage", f"{stage!r}; only 'pre_dispatch' records are known")
            block = rec.get("block", "decoder")
            if block not in ("decoder", "mtp"):
                raise fail(where, "block", f"{block!r}; expected 'decoder' or 'mtp'")
            if block == "mtp" or "mtp_idx" in rec:
                skipped += 1
                if not include_mtp:
                    continue
            if n < 0 or k < 1:
                raise fail(where, "num_tokens" if n < 0 else "topk", f"num_tokens={n}, topk={k}")
            if not steps or steps[-1][0] != step:
                if step in seen_steps:
                    raise fail(where, "step", f"step {step} appears again after other steps (records of a step must be contiguous)")
                seen_steps.add(step)
                steps.append((step, n, []))
            elif n != steps[-1][1]:
                raise fail(where, "num_tokens", f"{n} tokens at layer {layer}, other layers of step {step} have {steps[-1][1]}")
            if any(x[2] == layer for x in steps[-1][2]):
                raise fail(where, "layer", f"layer {layer} twice in step {step}")
            steps[-1][2].append((i, start, layer, {k_: rec[k_] for k_ in ("topk", "logit_offset", "logit_bytes", "logit_shape") if k_ in rec}))
    if not steps:
        raise TraceError(f"{path}: no decoder router records")
    return steps, skipped


def read(source: Path, *, rank: int | None = None, ranks: str | None = None, micro_batch_size: int = 1,
         layer_offset: int = 0, semantics: str | None = None, top_k: int | None = None,
         renormalize: bool | None = None, keep_logits: bool = True) -> Trace:
    """Megatron ``router_trace_rank<r>.jsonl`` (one rank, or several data-parallel ranks) of one checkpoint."""
    files = _files(source, rank, ranks)
    check_semantics(semantics, top_k, renormalize, str(source))
    b = int(micro_batch_size)
    if b < 1:
        raise ValueError(f"{source}: micro_batch_size must be >= 1, got {micro_batch_size}")
    plans = []
    skipped = 0
    for r, path in files:
        steps, sk = _plan(path, r, include_mtp=False)
        skipped += sk
        logit_file = path.with_name(f"logits_rank{r}.bin")
        has_logits = any("logit_offset" in x[3] for _, _, recs in steps for x in recs)
        if has_logits and not logit_file.is_file():
            raise FileNotFoundError(f"{logit_file}: records of {path} point into this logits sidecar, which is missing")
        plans.append((r, path, steps, logit_file if has_logits else None))
    with_logits = [p[3] is not None for p in plans]
    if any(with_logits) and not all(with_logits):
        raise TraceError(f"{source}: some ranks have a logits sidecar, others do not")
    has_logits = all(with_logits)
    if semantics is not None and not has_logits:
        raise ValueError(f"{source}: semantics={semantics!r} needs the logits sidecar (logits_rank<r>.bin); there is none")
    multi = len(plans) > 1
    attrs: dict = {"megatron_mtp_records_skipped": int(skipped),
                   "token_layout": f"record rows are [seq, batch] flattened; micro_batch_size={b} used to unflatten",
                   "layer_ids": "record 'layer' (traced module index; pipeline-local under pipeline parallelism)"
                                + (f" + {layer_offset}" if layer_offset else "")}
    stats = {"tokens": 0, "mismatch": 0}

    def events():
        for r, path, steps, logit_file in plans:
            lmm = np.memmap(logit_file, dtype=np.uint16, mode="r") if logit_file is not None else None
            with open(path, "rb") as f:
                for step, n, recs in steps:
                    where0 = f"{path}: step {step}"
                    if n % b:
                        raise fail(f"{path}: line {recs[0][0]}", "num_tokens",
                                   f"{n} tokens are not a whole number of micro_batch_size={b} sequences")
                    S = n // b
                    prefix = f"rank{r}/" if multi else ""
                    tids, tid_where = None, ""
                    for line_no, offset, _, _ in recs:  # the step's token ids, from its first record with them
                        f.seek(offset)
                        tids = _token_ids(f.readline().decode("utf-8"), n, f"{path}: line {line_no}")
                        if tids is not None:
                            tid_where = f"{path}: line {line_no}"
                            break
                    per = None if tids is None else tids.reshape(S, b).T  # rows are [seq, batch] flattened
                    metas = [SampleMeta(key=f"{prefix}step{step}" + (f"/{j}" if b > 1 else ""), n=S,
                                        token_id=None if per is None else per[j]) for j in range(b)]
                    yield Samples(metas, where=where0)
                    for line_no, offset, layer, small in recs:
                        where = f"{path}: line {line_no}"
                        f.seek(offset)
                        line = f.readline().decode("utf-8")
                        if tids is not None:
                            other = _token_ids(line, n, where)
                            if other is not None and not np.array_equal(other, tids):
                                raise fail(where, "semantic_token_ids",
                                           f"differs from the token ids of {tid_where} (same step, same tokens)")
                        k = small["topk"]
                        ids = _top_indices(line, n, k, where)
                        logits = None
                        if lmm is not None:
                            logits = _logits(lmm, logit_file, small, n, where)
                            # slot order by logit: the weight order for softmax and sigmoid scores
                            sel = np.take_along_axis(logits, ids.clip(0, logits.shape[1] - 1), axis=1)
                            order = np.argsort(-sel, axis=1, kind="stable")
                            ids = np.take_along_axis(ids, order, axis=1)
                        weights = None
                        if semantics is not None:
                            if ids.size and (ids.min() < 0 or ids.max() >= logits.shape[1]):
                                raise fail(where, "top_indices", f"expert id outside 0..{logits.shape[1] - 1} (logit_shape)")
                            weights = weights_for(logits, ids, semantics, renormalize)
                            rebuilt, _ = route_from_logits(logits, semantics, ids.shape[1], renormalize)
                            stats["tokens"] += n
                            stats["mismatch"] += int((np.sort(rebuilt, 1) != np.sort(ids, 1)).any(axis=1).sum())
                        if b > 1:
                            def unflatten(a):
                                return None if a is None else a.reshape(S, b, -1).transpose(1, 0, 2).reshape(n, -1)
                            ids, weights, logits = unflatten(ids), unflatten(weights), unflatten(logits)
                        yield Block(layer=layer + layer_offset, where=where, ids=ids, weights=weights,
                                    logits=logits if keep_logits else None,
                                    fields={"ids": "top_indices", "logits": "logit_offset", "weights": "logits"})
            if stats["tokens"]:
                attrs["semantics_check"] = (
                    f"top-k rebuilt from the logits under the stated semantics differs from the recorded ids on "
                    f"{stats['mismatch']} of {stats['tokens']} token-layers (selection biases or group limits show here)"
                )
            del lmm

    if semantics is not None:
        router = ("recorded top-k ids (Megatron TopKRouter); weights computed from the logit sidecar under the "
                  f"user-stated semantics: {describe_semantics(semantics, top_k, renormalize)}")
    elif has_logits:
        router = SEMANTICS_IDS_ONLY.replace("weights not recorded", "raw router logits kept; weights not derived "
                                            "(no semantics stated)")
    else:
        router = SEMANTICS_IDS_ONLY
    return Trace(
        format="megatron", version=VERSION, paths=[str(p) for _, p, _, _ in plans]
        + [str(p[3]) for p in plans if p[3] is not None],
        router_semantics=router, events=events(), model_family="megatron",
        slot_order="by router logit, highest first" if has_logits else
        "as recorded (Megatron writes ascending expert ids when the router returns a routing map; not by weight)",
        top_k=top_k, attrs=attrs,
    )


def _logits(lmm: np.memmap, path: Path, small: dict, n: int, where: str) -> np.ndarray:
    for key in ("logit_offset", "logit_bytes", "logit_shape"):
        if key not in small:
            raise fail(where, key, f"missing while other records point into {path.name}")
    off, nbytes, shape = small["logit_offset"], small["logit_bytes"], small["logit_shape"]
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(x, int) for x in shape)):
        raise fail(where, "logit_shape", f"{shape!r}; expected [num_tokens, num_experts]")
    if shape[0] != n:
        raise fail(where, "logit_shape", f"{shape} but num_tokens={n}")
    if not isinstance(off, int) or off < 0 or off % 2:
        raise fail(where, "logit_offset", f"{off!r}; expected an even byte offset")
    if nbytes != 2 * shape[0] * shape[1]:
        raise fail(where, "logit_bytes", f"{nbytes} bytes, logit_shape {shape} of bfloat16 needs {2 * shape[0] * shape[1]}")
    if off + nbytes > lmm.size * 2:
        raise fail(where, "logit_offset", f"bytes {off}..{off + nbytes} run past the end of {path} ({lmm.size * 2} bytes; truncated?)")
    raw = lmm[off // 2: off // 2 + shape[0] * shape[1]]
    return bf16_to_float32(raw).reshape(shape)
