"""llama.cpp tensor traces (the seed-004 BSC tensor-tracing tool): per-token JSON and the packed binary.

Layout on disk (one folder per prompt, e.g. per domain)::

    <experiment>/domain-1-code/tensor_trace.bin
    <experiment>/domain-1-code/traces/token-00000.json ...

Each traced ``MUL_MAT_ID`` operation carries up to 16 expert ids and their
count (``num_experts``, = top-k); llama.cpp runs it three times per MoE layer
(gate, up, down) with the same ids, so duplicates are collapsed (and refused
when they disagree). ``token_id`` in these traces is a *decode-step counter*,
not a vocabulary id: it becomes the token's ``position``; ``token_id`` stays -1.

Prompt processing evaluates the whole prompt in one graph: its ``MUL_MAT_ID``
slots then hold the first 16 ids of a (k, n_prompt) batch, not one token's
top-k, so PROMPT-phase records are skipped unless ``include_prompt=True``
(only meaningful when the prompt was fed one token at a time, and then each
record must hold exactly k ids).

Samples: one per folder (key = folder name); domain = folder name without a
leading ``domain-<n>-``. Weights are not recorded; slots keep llama.cpp's
order (argsort of router scores, highest first).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from ._core import Block, SampleMeta, Samples, Trace, TraceError, fail

VERSION = 1
SEMANTICS = (
    "llama.cpp MoE graph: expert ids as passed to MUL_MAT_ID (top-k of the router scores, highest first; "
    "softmax or sigmoid and any selection bias as the model's GGUF defines); weights not recorded"
)
MUL_MAT_ID = 30
NO_LAYER = 65535
PHASES = {0: "PROMPT", 1: "GENERATE", "PROMPT": "PROMPT", "GENERATE": "GENERATE"}

RECORD = np.dtype([
    ("timestamp_ns", "<u8"),
    ("token_id", "<u4"),
    ("layer_id", "<u2"),
    ("thread_id", "<u2"),
    ("operation_type", "u1"),
    ("phase", "u1"),
    ("num_sources", "u1"),
    ("_pad0", "V5"),
    ("dst_name", "S128"),
    ("sources", "V640"),
    ("expert_ids", "<i4", (16,)),
    ("num_experts", "u1"),
    ("_pad1", "V167"),
])
assert RECORD.itemsize == 1024

_TOKEN_FILE = re.compile(r"^token-(\d+)\.json$")
_PHASE_RE = re.compile(r'"phase"\s*:\s*"?([A-Za-z0-9_]+)"?')


def domain_label(folder_name: str) -> str:
    return re.sub(r"^domain-\d+-", "", folder_name)


def _sample_dirs(source: Path, marker: str) -> list[Path]:
    """Folders that hold one prompt's trace (``marker`` = 'traces' or 'tensor_trace.bin')."""
    if not source.exists():
        raise FileNotFoundError(f"{source}: trace folder not found")
    if (source / marker).exists():
        return [source]
    if marker == "traces" and source.name == "traces" and source.is_dir():
        return [source.parent]
    found = sorted(p for p in source.iterdir() if p.is_dir() and (p / marker).exists())
    if not found:
        raise FileNotFoundError(
            f"{source}: no '{marker}' here or in its sub-folders (expected <experiment>/<domain>/{marker})"
        )
    return found


# --------------------------------------------------------------------------- JSON


def _token_files(folder: Path) -> list[tuple[int, Path]]:
    tdir = folder / "traces"
    files = []
    for p in tdir.iterdir():
        m = _TOKEN_FILE.match(p.name)
        if m:
            files.append((int(m.group(1)), p))
    if not files:
        raise FileNotFoundError(f"{tdir}: no token-NNNNN.json files")
    return sorted(files)


def _head_phase(path: Path) -> str | None:
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        head = f.read(1 << 16)
    m = _PHASE_RE.search(head)
    return PHASES.get(m.group(1).upper()) if m else None


def _parse_token_file(path: Path, counter: int, top_k: int | None):
    """-> (phase, {layer: ids list}) of one token file; duplicates collapsed and checked."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            doc = json.load(f)
    except json.JSONDecodeError as exc:
        raise TraceError(f"{path}: not valid JSON at character {exc.pos}: {exc.msg} (truncated file?)") from None
    if not isinstance(doc, dict):
        raise fail(str(path), None, f"expected a JSON object, got {type(doc).__name__}")
    entries = doc.get("entries")
    if not isinstance(entries, list):
        raise fail(str(path), "entries", f"missing or not a list; the file has fields {sorted(doc)}")
    if "token_id" in doc and doc["token_id"] != counter:
        raise fail(str(path), "token_id", f"{doc['token_id']!r} disagrees with the file name's step {counter}")
    per_layer: dict[int, tuple[list[int], str]] = {}
    phases = set()
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise fail(f"{path}: entry {i}", None, f"expected an object, got {type(e).__name__}")
        if e.get("operation_type") not in ("MUL_MAT_ID", MUL_MAT_ID):
            continue
        where = f"{path}: entry {e.get('entry_id', i)}"
        layer = e.get("layer_id")
        if layer is None:
            raise fail(where, "layer_id", "MUL_MAT_ID entry without a layer (null); cannot place its experts")
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise fail(where, "layer_id", f"expected a non-negative integer, got {layer!r}")
        if "expert_ids" not in e:
            raise fail(where, "expert_ids", f"missing; the entry has fields {sorted(e)}")
        ids = e["expert_ids"]
        if not isinstance(ids, list):
            raise fail(where, "expert_ids", f"expected a list of ints, got {type(ids).__name__}")
        n = e.get("num_experts", top_k if top_k is not None else len(ids))
        if isinstance(n, bool) or not isinstance(n, int) or n < 1 or n > len(ids):
            raise fail(where, "num_experts", f"{n!r} does not fit the {len(ids)} listed expert ids")
        ids = ids[:n]
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in ids):
            raise fail(where, "expert_ids", f"expected integers, got {ids}")
        phase = PHASES.get(e.get("phase", "GENERATE"))
        if phase is None:
            raise fail(where, "phase", f"{e.get('phase')!r}; expected PROMPT or GENERATE")
        phases.add(phase)
        if layer in per_layer:
            prev, prev_where = per_layer[layer]
            if prev != ids:
                raise fail(
                    where, "expert_ids",
                    f"MUL_MAT_ID entries of layer {layer} disagree ({prev} at {prev_where.split(': ')[-1]} vs {ids}); "
                    "gate/up/down of one layer must route alike",
                )
        else:
            per_layer[layer] = (ids, where)
    if len(phases) > 1:
        raise fail(str(path), "phase", f"one token file mixes phases {sorted(phases)}")
    phase = phases.pop() if phases else None
    return phase, {layer: ids for layer, (ids, _) in per_layer.items()}


def read_json(source: Path, *, include_prompt: bool = False, top_k: int | None = None, flush_tokens: int = 256) -> Trace:
    """Per-token JSON traces (``traces/token-NNNNN.json``) of one or more prompt folders.

    A cheap first pass reads each file's head for its phase (to know how many
    tokens each sample has); the second pass parses the files one at a time.
    """
    folders = _sample_dirs(source, "traces")
    plan = []
    for folder in folders:
        keep = []
        for counter, path in _token_files(folder):
            phase = _head_phase(path)
            if phase is None:  # no phase near the top: parse it (slow path)
                phase, _ = _parse_token_file(path, counter, top_k)
            if phase == "GENERATE" or (include_prompt and phase == "PROMPT"):
                keep.append((counter, path))
        if keep:
            plan.append((folder, keep))
    if not plan:
        raise TraceError(f"{source}: no GENERATE-phase token files (pass include_prompt=True to use prompt records)")
    paths = [str(p) for _, keep in plan for _, p in keep]

    def events():
        layers_ref: list[int] | None = None
        k_ref = top_k
        for folder, keep in plan:
            meta = SampleMeta(
                key=folder.name, n=len(keep), position=np.array([c for c, _ in keep], np.int32),
                domain=domain_label(folder.name),
            )
            yield Samples([meta], where=str(folder))
            rows: dict[int, list] = {}
            for counter, path in keep:
                phase, per_layer = _parse_token_file(path, counter, top_k)
                if not per_layer:
                    raise fail(str(path), "entries", "no MUL_MAT_ID entries with expert ids (not a MoE trace, or tracing was off)")
                layers = sorted(per_layer)
                if layers_ref is None:
                    layers_ref = layers
                elif layers != layers_ref:
                    missing = sorted(set(layers_ref) - set(layers))
                    extra = sorted(set(layers) - set(layers_ref))
                    raise fail(
                        str(path), "layer_id",
                        f"MoE layers {layers} differ from the first token's {layers_ref} (missing {missing}, extra {extra})",
                    )
                for layer in layers:
                    ids = per_layer[layer]
                    if k_ref is None:
                        k_ref = len(ids)
                    if len(ids) != k_ref:
                        raise fail(f"{path}: layer {layer}", "num_experts",
                                   f"{len(ids)} experts, other records have {k_ref} (a PROMPT batch record?)")
                    rows.setdefault(layer, []).append(ids)
                if len(rows[layers[0]]) >= flush_tokens:
                    yield from _flush(rows, f"{folder}: tokens up to {path.name}")
            yield from _flush(rows, f"{folder}: tokens up to {keep[-1][1].name}")

    return Trace(
        format="llamacpp_json", version=VERSION, paths=paths, router_semantics=SEMANTICS, events=events(),
        model_family="llama.cpp (GGUF)", slot_order="llama.cpp order: router score, highest first",
        top_k=top_k, attrs={"position_meaning": "decode-step counter of the trace (token_id field)",
                           "token_id_meaning": "unknown (-1): traces hold no vocabulary ids",
                           "phases_imported": "PROMPT+GENERATE" if include_prompt else "GENERATE"},
    )


def _flush(rows: dict[int, list], where: str):
    for layer, lst in rows.items():
        if lst:
            yield Block(layer=layer, where=where, ids=np.asarray(lst, dtype=np.int64), fields={"ids": "expert_ids"})
    for lst in rows.values():
        lst.clear()


# --------------------------------------------------------------------------- binary


def _check_size(path: Path) -> int:
    """Number of records in ``path``; a size that is not a whole number of records is a truncated file."""
    size = path.stat().st_size
    if size % RECORD.itemsize:
        whole = size // RECORD.itemsize
        raise TraceError(
            f"{path}: {size} bytes is not a whole number of {RECORD.itemsize}-byte records; the record at byte offset "
            f"{whole * RECORD.itemsize} is truncated ({size - whole * RECORD.itemsize} bytes)"
        )
    if size == 0:
        raise TraceError(f"{path}: empty trace file")
    return size // RECORD.itemsize


def _read_records(f, start: int, count: int) -> np.ndarray:
    """``count`` records from record number ``start`` (a bounded read, not a mapping of the file)."""
    f.seek(start * RECORD.itemsize)
    return np.fromfile(f, dtype=RECORD, count=count)


def _index_binary(path: Path, include_prompt: bool, chunk: int):
    """First pass: for every (token, layer) the first MUL_MAT_ID record, duplicates checked.

    Returns (tokens sorted, layers sorted, index[token, layer] of record numbers, k, records in the file).
    The file is read ``chunk`` records at a time; only ~25 bytes per MUL_MAT_ID record are kept
    (ids are re-read in the second pass).
    """
    n_records = _check_size(path)
    recs, keys, nexp, hashes = [], [], [], []
    weights = np.array([1, 7, 31, 131, 521, 1031, 4099, 8191, 16381, 32749, 65521, 131071, 262139, 524287,
                        1048573, 2097143], dtype=np.int64)
    f = open(path, "rb")
    for start in range(0, n_records, chunk):
        part = _read_records(f, start, chunk)
        op = part["operation_type"]
        layer = part["layer_id"]
        sel = (op == MUL_MAT_ID) & (layer != NO_LAYER) & (part["timestamp_ns"] != 0)
        phase = part["phase"]
        bad_phase = sel & (phase > 1)
        if bad_phase.any():
            i = start + int(np.flatnonzero(bad_phase)[0])
            raise fail(f"{path}: record at byte offset {i * RECORD.itemsize}", "phase",
                       f"{int(phase[i - start])}; expected 0 (PROMPT) or 1 (GENERATE)")
        if not include_prompt:
            sel &= phase == 1
        idx = np.flatnonzero(sel)
        if idx.size == 0:
            continue
        sub = part[idx]
        n = sub["num_experts"].astype(np.int64)
        over = np.flatnonzero((n < 1) | (n > 16))
        if over.size:
            i = start + int(idx[over[0]])
            raise fail(f"{path}: record at byte offset {i * RECORD.itemsize}", "num_experts",
                       f"{int(n[over[0]])}; expected 1..16 (slots in a record)")
        ids = sub["expert_ids"].astype(np.int64)
        slot = np.arange(16)
        ids = np.where(slot[None, :] < n[:, None], ids, 0)  # ignore unused slots
        recs.append(idx.astype(np.int64) + start)
        keys.append(sub["token_id"].astype(np.int64) * 65536 + sub["layer_id"].astype(np.int64))
        nexp.append(n)
        hashes.append(ids @ weights + n * 1_000_003)
    f.close()
    if not recs:
        raise TraceError(
            f"{path}: no MUL_MAT_ID records with a layer"
            + ("" if include_prompt else " in the GENERATE phase (pass include_prompt=True to use prompt records)")
        )
    rec = np.concatenate(recs)
    key = np.concatenate(keys)
    n = np.concatenate(nexp)
    h = np.concatenate(hashes)
    order = np.lexsort((rec, key))
    key, rec, n, h = key[order], rec[order], n[order], h[order]
    first = np.r_[True, key[1:] != key[:-1]]
    group = np.cumsum(first) - 1
    head = np.flatnonzero(first)
    differ = np.flatnonzero(h != h[head][group])
    if differ.size:
        j = differ[0]
        a, b = int(rec[head[group[j]]]), int(rec[j])
        raise fail(
            f"{path}: record at byte offset {b * RECORD.itemsize}", "expert_ids",
            f"MUL_MAT_ID records of token {int(key[j] // 65536)}, layer {int(key[j] % 65536)} disagree with the record "
            f"at byte offset {a * RECORD.itemsize} (gate/up/down of one layer must route alike)",
        )
    ukey, urec, un = key[head], rec[head], n[head]
    tok = ukey // 65536
    lay = ukey % 65536
    tokens = np.unique(tok)
    layers = np.unique(lay)
    ks = np.unique(un)
    if ks.size > 1:
        odd = int(np.flatnonzero(un != np.bincount(un).argmax())[0])
        raise fail(f"{path}: record at byte offset {int(urec[odd]) * RECORD.itemsize}", "num_experts",
                   f"{int(un[odd])} experts, most records have {int(np.bincount(un).argmax())} (ragged top-k; a PROMPT batch record?)")
    index = np.full((tokens.size, layers.size), -1, dtype=np.int64)
    index[np.searchsorted(tokens, tok), np.searchsorted(layers, lay)] = urec
    holes = np.argwhere(index < 0)
    if holes.size:
        t, l_ = holes[0]
        raise fail(
            f"{path}: token {int(tokens[t])}", "layer_id",
            f"no MUL_MAT_ID record for layer {int(layers[l_])} (other tokens have layers {layers.tolist()}); "
            "a truncated or interrupted trace?",
        )
    return tokens, layers, index, int(ks[0]), n_records


def read_binary(source: Path, *, include_prompt: bool = False, chunk_records: int = 1 << 14) -> Trace:
    """Packed 1024-byte ``tensor_trace.bin`` records, read with a numpy structured dtype in bounded chunks.

    First pass: the (token, layer) -> record number of MUL_MAT_ID records
    (duplicates checked by hash; ~25 bytes kept per MUL_MAT_ID record). Second
    pass: for a block of tokens whose records span about ``chunk_records``
    records, one bounded read of that span and a gather of the ids.
    """
    files = [source] if source.is_file() else [d / "tensor_trace.bin" for d in _sample_dirs(source, "tensor_trace.bin")]
    plans = []
    for f in files:
        plans.append((f, *_index_binary(f, include_prompt, chunk_records)))
    ref = plans[0]
    for f, _, layers, _, k, _ in plans[1:]:
        if layers.tolist() != ref[2].tolist():
            raise fail(str(f), "layer_id", f"MoE layers {layers.tolist()} differ from {ref[0]}'s {ref[2].tolist()}")
        if k != ref[4]:
            raise fail(str(f), "num_experts", f"{k} experts per token, {ref[0]} has {ref[4]}")

    def events():
        for f, tokens, layers, index, k, n_records in plans:
            folder = f.parent
            key = folder.name if source.is_dir() else f.stem
            yield Samples([SampleMeta(key=key, n=int(tokens.size), position=tokens.astype(np.int32),
                                      domain=domain_label(folder.name) if source.is_dir() else "")], where=str(f))
            per_token = max(1.0, n_records / tokens.size)
            step = max(1, int(chunk_records / per_token))
            with open(f, "rb") as fh:
                for t0 in range(0, tokens.size, step):
                    idx = index[t0:t0 + step]
                    flat = idx.reshape(-1)
                    lo, hi = int(flat.min()), int(flat.max()) + 1
                    if hi - lo <= 4 * chunk_records:
                        got = _read_records(fh, lo, hi - lo)["expert_ids"][flat - lo, :k]
                    else:  # records of these tokens are scattered: read them one by one
                        got = np.stack([_read_records(fh, int(i), 1)["expert_ids"][0, :k] for i in flat])
                    got = got.reshape(idx.shape[0], idx.shape[1], k)
                    where = f"{f}: tokens {int(tokens[t0])}..{int(tokens[min(t0 + step, tokens.size) - 1])}"
                    for li, layer in enumerate(layers):
                        yield Block(layer=int(layer), where=where, ids=got[:, li, :], fields={"ids": "expert_ids"})

    return Trace(
        format="llamacpp_bin", version=VERSION, paths=[str(p[0]) for p in plans], router_semantics=SEMANTICS,
        events=events(), model_family="llama.cpp (GGUF)", slot_order="llama.cpp order: router score, highest first",
        attrs={"position_meaning": "decode-step counter of the trace (token_id field)",
               "token_id_meaning": "unknown (-1): traces hold no vocabulary ids",
               "phases_imported": "PROMPT+GENERATE" if include_prompt else "GENERATE"},
    )
