"""llama.cpp tensor traces (the seed-004 BSC tensor-tracing tool): per-token JSON and the packed binary.

Layout on disk (one folder per prompt, e.g. per domain)::

    <experiment>/domain-1-code/tensor_trace.bin
    <experiment>/domain-1-code/traces/token-00000.json ...

Each traced ``MUL_MAT_ID`` operation carries up to 16 expert-id slots and a
count (``num_experts``); llama.cpp runs it two or three times per MoE layer
(gate, up, down) with the same ids, so duplicates are collapsed (and refused
when their first ``top_k`` ids disagree).

What the tool really writes (FORMATS.md, seed 004):

* ``token_id`` is a step counter that the tool may never increment, so its
  JSON export can put *every* forward step (the prompt batch and all decode
  steps) into ``token-00000.json``. Steps are therefore found in record order:
  a new step starts where the layer goes down (layer 0 comes again), where the
  phase changes, and at each new token file; in a model with a single MoE
  layer, where that layer's first operation (by ``dst_name``) comes again.
* It copies 16 slots into every record whatever the model routes to (its own
  analysis reads ``expert_ids[:4]`` for gpt-oss-20b, top-4 of 32). Routing is
  ``expert_ids[:top_k]``: pass ``top_k`` (and ``num_experts`` to check the
  ids). Without ``top_k`` it is the smallest ``num_experts`` the records
  state, and records that all state 16 (the slots, not the routing) are
  refused.
* Both phases occur (``PROMPT``, ``GENERATE``) and both are kept (token
  coordinate ``phase``: "prefill" / "decode"; ``include_prompt=False`` keeps
  decode steps only). A prefill step evaluates the whole prompt batch in one
  graph; its ids tensor is (k, n_batch) with the batch's first token first, so
  ``expert_ids[:top_k]`` is the routing of the *first token of the batch*: a
  prefill step becomes one token holding that routing.

``position`` is the step's index in its sample (prefill and decode steps
counted in record order); ``token_id`` stays -1 (traces hold no vocabulary
ids). Samples: one per folder (key = folder name); domain = folder name
without a leading ``domain-<n>-``. Weights are not recorded; slots keep
llama.cpp's order (argsort of router scores, highest first).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ._core import Block, SampleMeta, Samples, Trace, TraceError, fail
from ._text import BomJsonStream

VERSION = 2
SEMANTICS = (
    "llama.cpp MoE graph: expert ids as passed to MUL_MAT_ID (top-k of the router scores, highest first; "
    "softmax or sigmoid and any selection bias as the model's GGUF defines); weights not recorded"
)
MUL_MAT_ID = 30
NO_LAYER = 65535
SLOTS = 16  # expert-id slots in a trace record
PHASES = {0: "PROMPT", 1: "GENERATE", "PROMPT": "PROMPT", "GENERATE": "GENERATE"}
PHASE_COORD = {"PROMPT": "prefill", "GENERATE": "decode"}

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
_NAME_MIX = np.random.default_rng(20261204).integers(1, 2**63, 16, dtype=np.uint64) | np.uint64(1)


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


def _check_top_k(top_k) -> int | None:
    if top_k is None:
        return None
    if isinstance(top_k, bool) or int(top_k) != top_k or not 1 <= int(top_k) <= SLOTS:
        raise ValueError(f"top_k={top_k!r}: expected the model's experts per token, 1..{SLOTS}")
    return int(top_k)


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


def _entries(path: Path, counter: int):
    """(index, entry) of one token file's ``entries``, decoded one at a time (a file may hold every step)."""
    seen = False
    with BomJsonStream(path) as js:
        if js.peek() != "{":
            raise fail(str(path), None, "expected a JSON object (a token file of the tensor-tracing export)")
        for key in js.items("token file"):
            if key == "entries":
                if js.peek() != "[":
                    raise fail(str(path), "entries", "expected a list of trace entries")
                seen = True
                yield from js.array("entries")
            elif key == "token_id":
                tid = js.value("token_id")
                if isinstance(tid, (int, float)) and not isinstance(tid, bool) and tid != counter:
                    raise fail(str(path), "token_id", f"{tid!r} disagrees with the file name's step {counter}")
            else:
                js.value(key)
        js.end()
    if not seen:
        raise fail(str(path), "entries", "missing; a token file of the tensor-tracing export has 'entries'")


def _int_field(e: dict, key: str, where: str, *, nullable: bool = False):
    v = e.get(key)
    if v is None and nullable:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise fail(where, key, f"expected an integer, got {v!r}")
    return v


class _Step:
    """The MUL_MAT_ID entries of one forward step: layer -> [(ids, num_experts, where)]."""

    __slots__ = ("phase", "layers", "where")

    def __init__(self, phase: str, where: str):
        self.phase = phase
        self.layers: dict[int, list] = {}
        self.where = where


def _segment(recs: list[tuple]) -> list[_Step]:
    """Forward steps of MUL_MAT_ID records (file index, layer, phase, name, ids, n, where) in record order.

    A step ends at a new token file, a phase change, or where the layer goes
    down (the next pass through the layers). With a single MoE layer the layer
    never goes down: there the layer's first operation (by name) coming again
    starts the next step. (With several layers equal names are not used: some
    writers give gate, up and down one name.)
    """
    one_layer = len({r[1] for r in recs}) == 1
    steps: list[_Step] = []
    cur: _Step | None = None
    prev = None
    first_name = None
    for fi, layer, phase, name, ids, n, where in recs:
        new = cur is None or fi != prev[0] or phase != cur.phase or layer < prev[1]
        if not new and one_layer and name and name == first_name:
            new = True
        if new:
            cur = _Step(phase, where)
            steps.append(cur)
            first_name = name
        cur.layers.setdefault(layer, []).append((ids, n, where))
        prev = (fi, layer)
    return steps


def _folder_steps(folder: Path):
    """Steps of one prompt folder in record order, across its token files; -> (steps, paths read)."""
    recs = []
    paths = []
    for fi, (counter, path) in enumerate(_token_files(folder)):
        paths.append(str(path))
        for i, e in _entries(path, counter):
            if not isinstance(e, dict):
                raise fail(f"{path}: entry {i}", None, f"expected an object, got {type(e).__name__}")
            if e.get("operation_type") not in ("MUL_MAT_ID", MUL_MAT_ID):
                continue
            where = f"{path}: entry {e.get('entry_id', i)}"
            layer = _int_field(e, "layer_id", where, nullable=True)
            if layer is None:
                raise fail(where, "layer_id", "MUL_MAT_ID entry without a layer (null); cannot place its experts")
            if layer < 0:
                raise fail(where, "layer_id", f"expected a non-negative integer, got {layer!r}")
            if "expert_ids" not in e:
                raise fail(where, "expert_ids", f"missing; the entry has fields {sorted(e)}")
            ids = e["expert_ids"]
            if not isinstance(ids, list) or not ids:
                raise fail(where, "expert_ids", f"expected a non-empty list of ints, got {ids!r}")
            n = _int_field(e, "num_experts", where, nullable=True)
            n = len(ids) if n is None else n
            if n < 1 or n > len(ids):
                raise fail(where, "num_experts", f"{n!r} does not fit the {len(ids)} listed expert ids")
            phase = PHASES.get(e.get("phase", "GENERATE"))
            if phase is None:
                raise fail(where, "phase", f"{e.get('phase')!r}; expected PROMPT or GENERATE")
            recs.append((fi, layer, phase, str(e.get("dst_name") or ""), ids[:SLOTS], n, where))
    return _segment(recs), paths


def _step_ids(step: _Step, k: int) -> dict[int, list[int]]:
    """layer -> the step's k ids there; duplicates (gate/up/down) must agree on their first k ids."""
    out = {}
    for layer, recs in step.layers.items():
        first, n0, w0 = recs[0]
        for ids, n, where in recs:
            if n < k:
                raise fail(where, "num_experts", f"{n} experts recorded, top_k is {k}")
            if ids[:k] != first[:k]:
                raise fail(
                    where, "expert_ids",
                    f"MUL_MAT_ID entries of layer {layer} disagree ({first[:k]} at {w0.split(': ')[-1]} vs {ids[:k]}); "
                    "gate/up/down of one layer must route alike",
                )
        got = first[:k]
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in got):
            if all(isinstance(x, float) and x.is_integer() for x in got):
                got = [int(x) for x in got]
            else:
                raise fail(w0, "expert_ids", f"expected integers, got {got}")
        out[layer] = got
    return out


def read_json(source: Path, *, include_prompt: bool = True, top_k: int | None = None) -> Trace:
    """Per-token JSON traces (``traces/token-NNNNN.json``) of one or more prompt folders.

    Each token file is decoded entry by entry (a file may hold every step of a
    run); a sample's routing (steps × layers × k ids) is kept until the folder
    is read, then handed on.
    """
    k_opt = _check_top_k(top_k)
    folders = _sample_dirs(source, "traces")
    for folder in folders:
        _token_files(folder)  # a folder without token files is refused before any work
    attrs = {
        "position_meaning": "index of the traced forward step in its sample (prefill and decode steps in record order)",
        "token_id_meaning": "unknown (-1): traces hold no vocabulary ids",
        "phases_imported": "PROMPT+GENERATE" if include_prompt else "GENERATE",
        "prefill_meaning": "a prefill step is one token: the routing of the first token of its prompt batch "
                           "(the tool keeps the batch's first top_k ids)",
    }
    paths: list[str] = []

    def events():
        k_ref = k_opt
        layers_ref: list[int] | None = None
        for folder in folders:
            steps, read = _folder_steps(folder)
            paths.extend(read)
            if not steps:
                raise fail(str(folder / "traces"), "entries",
                           "no MUL_MAT_ID entries with expert ids (not a MoE trace, or tracing was off)")
            if k_ref is None:
                least = min(n for s in steps for recs in s.layers.values() for _, n, _ in recs)
                if least >= SLOTS:
                    raise fail(str(folder / "traces"), "num_experts",
                               f"every record fills all {SLOTS} slots, which the tool copies whatever the model "
                               "routes to; state the model's routing with top_k (e.g. gpt-oss-20b: top_k=4, "
                               "num_experts=32)")
                k_ref = least
                attrs["top_k_inferred"] = f"smallest num_experts the records state ({least}); pass top_k to be sure"
            kept, pos, phase = [], [], []
            for si, step in enumerate(steps):
                if step.phase == "PROMPT" and not include_prompt:
                    continue
                per_layer = _step_ids(step, k_ref)
                layers = sorted(per_layer)
                if layers_ref is None:
                    layers_ref = layers
                elif layers != layers_ref:
                    missing = sorted(set(layers_ref) - set(layers))
                    extra = sorted(set(layers) - set(layers_ref))
                    raise fail(
                        f"{step.where} (step {si} of {folder.name})", "layer_id",
                        f"MoE layers {layers} differ from the first step's {layers_ref} "
                        f"(missing {missing}, extra {extra}); a truncated or interrupted trace?",
                    )
                kept.append([per_layer[layer] for layer in layers_ref])
                pos.append(si)
                phase.append(PHASE_COORD[step.phase])
            if not kept:
                continue
            grid = np.asarray(kept, dtype=np.int64)  # (steps, layers, k)
            meta = SampleMeta(key=folder.name, n=len(kept), position=np.asarray(pos, np.int32),
                              domain=domain_label(folder.name), phase=np.asarray(phase, dtype=object))
            where = f"{folder}: steps {pos[0]}..{pos[-1]}"
            yield Samples([meta], where=str(folder))
            for li, layer in enumerate(layers_ref):
                yield Block(layer=layer, where=where, ids=grid[:, li, :], fields={"ids": "expert_ids"})
        if layers_ref is None:
            raise TraceError(f"{source}: no GENERATE-phase steps (pass include_prompt=True to use prompt records)")

    return Trace(
        format="llamacpp_json", version=VERSION, paths=paths, router_semantics=SEMANTICS, events=events(),
        model_family="llama.cpp (GGUF)", slot_order="llama.cpp order: router score, highest first",
        top_k=k_opt, attrs=attrs,
    )


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


def _index_binary(path: Path, include_prompt: bool, chunk: int, top_k: int | None):
    """First pass: for every (step, layer) the first MUL_MAT_ID record, duplicates checked.

    Steps are found in record order (the tool's ``token_id`` may never
    increment): a new step starts where ``token_id`` or the phase changes, or
    the layer goes down; with a single MoE layer, where the layer's first
    operation (by ``dst_name``) comes again. The file is read ``chunk`` records
    at a time; per MUL_MAT_ID record its number, layer, token, phase, a hash of
    its name and its slots (``top_k`` of them when given) are kept
    (~100 bytes; ids are re-read in the second pass).

    Returns (steps kept, layers sorted, index[step, layer] of record numbers, k, records in the file,
    phase per kept step ("prefill"/"decode"), top_k inferred or None).
    """
    n_records = _check_size(path)
    cols = {c: [] for c in ("rec", "layer", "token", "phase", "name", "n", "ids")}
    with open(path, "rb") as f:
        for start in range(0, n_records, chunk):
            part = _read_records(f, start, chunk)
            sel = (part["operation_type"] == MUL_MAT_ID) & (part["layer_id"] != NO_LAYER) & (part["timestamp_ns"] != 0)
            idx = np.flatnonzero(sel)
            if idx.size == 0:
                continue
            sub = part[idx]
            bad_phase = np.flatnonzero(sub["phase"] > 1)
            if bad_phase.size:
                i = start + int(idx[bad_phase[0]])
                raise fail(f"{path}: record at byte offset {i * RECORD.itemsize}", "phase",
                           f"{int(sub['phase'][bad_phase[0]])}; expected 0 (PROMPT) or 1 (GENERATE)")
            n = sub["num_experts"].astype(np.int64)
            over = np.flatnonzero((n < 1) | (n > SLOTS))
            if over.size:
                i = start + int(idx[over[0]])
                raise fail(f"{path}: record at byte offset {i * RECORD.itemsize}", "num_experts",
                           f"{int(n[over[0]])}; expected 1..{SLOTS} (slots in a record)")
            cols["rec"].append(idx.astype(np.int64) + start)
            cols["layer"].append(sub["layer_id"].astype(np.int64))
            cols["token"].append(sub["token_id"].astype(np.int64))
            cols["phase"].append(sub["phase"].astype(np.int8))
            # dst_name as a 64-bit hash (8 bytes kept instead of 128); an empty name hashes to 0
            raw = np.frombuffer(np.ascontiguousarray(sub["dst_name"]).tobytes(), dtype="<u8").reshape(-1, 16)
            cols["name"].append((raw * _NAME_MIX).sum(axis=1, dtype=np.uint64))
            cols["n"].append(n)
            cols["ids"].append(sub["expert_ids"][:, :top_k] if top_k else sub["expert_ids"].copy())
    if not cols["rec"]:
        raise TraceError(f"{path}: no MUL_MAT_ID records with a layer")
    rec, layer, token, phase, name, n, ids = (np.concatenate(cols[c]) for c in
                                              ("rec", "layer", "token", "phase", "name", "n", "ids"))
    # steps in record order
    run_start = np.flatnonzero(np.r_[True, layer[1:] != layer[:-1]])
    first_of_run = np.repeat(run_start, np.diff(np.r_[run_start, layer.size]))
    # one MoE layer: the layer never goes down, the run's first operation coming again starts a step
    # (with several layers names are not used: some writers give gate, up and down one name)
    one_layer = np.unique(layer).size == 1
    again = (np.arange(layer.size) != first_of_run) & (name == name[first_of_run]) & (name != 0) & one_layer
    boundary = np.r_[False, (token[1:] != token[:-1]) | (phase[1:] != phase[:-1]) | (layer[1:] < layer[:-1])] | again
    step = np.cumsum(boundary)
    k, inferred = top_k, None
    if k is None:
        least = int(n.min())
        if least >= SLOTS:
            raise fail(str(path), "num_experts",
                       f"every record fills all {SLOTS} slots, which the tool copies whatever the model routes to; "
                       "state the model's routing with top_k (e.g. gpt-oss-20b: top_k=4, num_experts=32)")
        k = inferred = least
    short = np.flatnonzero(n < k)
    if short.size:
        i = int(rec[short[0]])
        raise fail(f"{path}: record at byte offset {i * RECORD.itemsize}", "num_experts",
                   f"{int(n[short[0]])} experts recorded, top_k is {k}")
    if not include_prompt:
        keep = phase == 1
        if not keep.any():
            raise TraceError(f"{path}: no MUL_MAT_ID records in the GENERATE phase (pass include_prompt=True)")
        rec, layer, step, phase, ids = rec[keep], layer[keep], step[keep], phase[keep], ids[keep]
    ids = ids[:, :k]
    # duplicates (gate/up/down) of one (step, layer) must agree on their k ids
    key = step * 65536 + layer
    order = np.lexsort((rec, key))
    key, rec, ids, phase = key[order], rec[order], ids[order], phase[order]
    first = np.r_[True, key[1:] != key[:-1]]
    group = np.cumsum(first) - 1
    head = np.flatnonzero(first)
    differ = np.flatnonzero((ids != ids[head][group]).any(axis=1))
    if differ.size:
        j = differ[0]
        a, b = int(rec[head[group[j]]]), int(rec[j])
        raise fail(
            f"{path}: record at byte offset {b * RECORD.itemsize}", "expert_ids",
            f"MUL_MAT_ID records of step {int(key[j] // 65536)}, layer {int(key[j] % 65536)} disagree with the record "
            f"at byte offset {a * RECORD.itemsize} in their first {k} ids (gate/up/down of one layer must route alike)",
        )
    ukey, urec, uphase = key[head], rec[head], phase[head]
    stp = ukey // 65536
    lay = ukey % 65536
    steps = np.unique(stp)
    layers = np.unique(lay)
    index = np.full((steps.size, layers.size), -1, dtype=np.int64)
    si = np.searchsorted(steps, stp)
    index[si, np.searchsorted(layers, lay)] = urec
    step_phase = np.empty(steps.size, dtype=object)
    step_phase[si] = np.where(uphase == 0, "prefill", "decode")
    holes = np.argwhere(index < 0)
    if holes.size:
        t, l_ = holes[0]
        near = int(index[t][index[t] >= 0].min()) if (index[t] >= 0).any() else -1
        raise fail(
            f"{path}: step {int(steps[t])} (record at byte offset {near * RECORD.itemsize})", "layer_id",
            f"no MUL_MAT_ID record for layer {int(layers[l_])} (other steps have layers {layers.tolist()}); "
            "a truncated or interrupted trace?",
        )
    return steps, layers, index, int(k), n_records, step_phase, inferred


def read_binary(source: Path, *, include_prompt: bool = True, top_k: int | None = None,
                chunk_records: int = 1 << 14) -> Trace:
    """Packed 1024-byte ``tensor_trace.bin`` records, read with a numpy structured dtype in bounded chunks.

    First pass: the (step, layer) -> record number of MUL_MAT_ID records
    (steps in record order, duplicates checked). Second pass: for a block of
    steps whose records span about ``chunk_records`` records, one bounded read
    of that span and a gather of the first ``top_k`` ids.
    """
    k_opt = _check_top_k(top_k)
    files = [source] if source.is_file() else [d / "tensor_trace.bin" for d in _sample_dirs(source, "tensor_trace.bin")]
    plans = []
    attrs = {"position_meaning": "index of the traced forward step in its sample (prefill and decode steps in record order)",
             "token_id_meaning": "unknown (-1): traces hold no vocabulary ids",
             "phases_imported": "PROMPT+GENERATE" if include_prompt else "GENERATE",
             "prefill_meaning": "a prefill step is one token: the routing of the first token of its prompt batch "
                                "(the tool keeps the batch's first top_k ids)"}
    for f in files:
        plan = _index_binary(f, include_prompt, chunk_records, k_opt)
        if plan[6] is not None:
            attrs["top_k_inferred"] = f"smallest num_experts the records state ({plan[6]}); pass top_k to be sure"
        plans.append((f, *plan[:6]))
    ref = plans[0]
    for f, _, layers, _, k, _, _ in plans[1:]:
        if layers.tolist() != ref[2].tolist():
            raise fail(str(f), "layer_id", f"MoE layers {layers.tolist()} differ from {ref[0]}'s {ref[2].tolist()}")
        if k != ref[4]:
            raise fail(str(f), "num_experts", f"{k} experts per token, {ref[0]} has {ref[4]}")

    def events():
        for f, steps, layers, index, k, n_records, step_phase in plans:
            folder = f.parent
            key = folder.name if source.is_dir() else f.stem
            yield Samples([SampleMeta(key=key, n=int(steps.size), position=steps.astype(np.int32), phase=step_phase,
                                      domain=domain_label(folder.name) if source.is_dir() else "")], where=str(f))
            per_token = max(1.0, n_records / steps.size)
            step = max(1, int(chunk_records / per_token))
            with open(f, "rb") as fh:
                for t0 in range(0, steps.size, step):
                    idx = index[t0:t0 + step]
                    flat = idx.reshape(-1)
                    lo, hi = int(flat.min()), int(flat.max()) + 1
                    if hi - lo <= 4 * chunk_records:
                        got = _read_records(fh, lo, hi - lo)["expert_ids"][flat - lo, :k]
                    else:  # records of these steps are scattered: read them one by one
                        got = np.stack([_read_records(fh, int(i), 1)["expert_ids"][0, :k] for i in flat])
                    got = got.reshape(idx.shape[0], idx.shape[1], k)
                    where = f"{f}: steps {int(steps[t0])}..{int(steps[min(t0 + step, steps.size) - 1])}"
                    for li, layer in enumerate(layers):
                        yield Block(layer=int(layer), where=where, ids=got[:, li, :], fields={"ids": "expert_ids"})

    return Trace(
        format="llamacpp_bin", version=VERSION, paths=[str(p[0]) for p in plans], router_semantics=SEMANTICS,
        events=events(), model_family="llama.cpp (GGUF)", slot_order="llama.cpp order: router score, highest first",
        top_k=k_opt, attrs=attrs,
    )
