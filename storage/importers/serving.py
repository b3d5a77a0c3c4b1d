"""Routed-expert arrays returned by inference servers: vLLM (``.npy``) and SGLang (base64 in JSON).

vLLM (``routed_experts`` of a request output): an integer array
[seq_len, moe_layers, k] per request with seq_len = prompt + generated - 1
(the last generated token is never fed back); users ``np.save`` it, one file
per request (key = file stem), or an ``.npz`` holding ``prompt_routed_experts``
and ``routed_experts`` (concatenated along seq). Files are memory-mapped and
``allow_pickle`` stays off. Token ids come from ``tokens=``: a JSON object
{request id: [ids]} or {request id: {"prompt_token_ids", "output_token_ids"}},
or a JSONL file of objects with ``request_id`` and those fields; the first
seq_len of prompt+output ids are used.

SGLang (``/generate`` response, ``meta_info["routed_experts"]``): base64 of a
little-endian int32 C-order array of shape (stream - 1, num_layers * topk).
A source is a JSON response, a JSON list of responses or a JSONL file of them.
``num_layers=`` or ``top_k=`` must be given (the payload is flat). Token ids:
the record's ``input_ids`` (when the request was kept beside the response) +
``output_ids``; absent, token ids are -1. Sample key = ``meta_info.id`` or the
record's index.

Both: no weights; slots as the server's fused top-k returns them (sorted by
weight). ``layers=`` names the array's layers (default 0..L-1);
``drop_layers=`` removes layers that are not MoE (e.g. dense layers an
array still lists).
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path

import numpy as np

from ._core import Block, SampleMeta, Samples, Trace, TraceError, check_layers_option, fail, need
from ._jsonstream import JsonStream

VERSION = 1
SEMANTICS_VLLM = "vLLM fused MoE top-k as served (model's own router: softmax/sigmoid, bias, groups); ids only"
SEMANTICS_SGLANG = "SGLang MoE top-k as served (model's own router: softmax/sigmoid, bias, groups); ids only"
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"


def _check_not_pickle(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(8)
    if not (head.startswith(_NPY_MAGIC) or head.startswith(_ZIP_MAGIC)):
        what = "a Python pickle" if head[:1] == b"\x80" else "not a .npy/.npz file"
        raise TraceError(f"{path}: {what} (no NumPy magic); pickles are never loaded; save arrays with np.save")


def _load_npy(path: Path) -> np.ndarray:
    _check_not_pickle(path)
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                if "routed_experts" not in z.files:
                    raise fail(str(path), "routed_experts", f"missing; the archive holds {z.files}")
                parts = [z[k] for k in ("prompt_routed_experts", "routed_experts") if k in z.files]
                return np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise TraceError(f"{path}: cannot read the array ({exc}); object arrays/pickles are refused") from None
    except EOFError:
        raise TraceError(f"{path}: truncated array file") from None


def _token_ids_vllm(path: Path | None) -> dict[str, np.ndarray]:
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: token id file not found")
    out: dict[str, np.ndarray] = {}

    def one(key, value, where):
        if isinstance(value, dict):
            ids = list(need(value, "prompt_token_ids", where, "list of prompt token ids")) + list(value.get("output_token_ids") or [])
        elif isinstance(value, list):
            ids = value
        else:
            raise fail(where, "token ids", f"expected a list or an object, got {type(value).__name__}")
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in ids):
            raise fail(where, "prompt_token_ids", "token ids must be integers")
        out[str(key)] = np.asarray(ids, dtype=np.int64)

    if path.suffix == ".jsonl":
        with open(path) as f:
            for i, line in enumerate(f, start=1):
                if line.strip():
                    where = f"{path}: line {i}"
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise TraceError(f"{where}: not valid JSON ({exc.msg})") from None
                    one(need(rec, "request_id", where), rec, where)
    else:
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise TraceError(f"{path}: not valid JSON at character {exc.pos}: {exc.msg}") from None
        if not isinstance(raw, dict):
            raise TraceError(f"{path}: expected an object mapping request id -> token ids")
        for key, value in raw.items():
            one(key, value, f"{path}: request {key!r}")
    return out


def _layer_map(layers, drop_layers, n: int, where: str) -> list[tuple[int, int]]:
    ids = check_layers_option(layers, n, where)
    drop = set(int(x) for x in (drop_layers or ()))
    unknown = drop - set(ids)
    if unknown:
        raise fail(where, "drop_layers", f"layers {sorted(unknown)} are not among {ids}")
    return [(i, lid) for i, lid in enumerate(ids) if lid not in drop]


def read_vllm(source: Path, *, tokens: str | None = None, layers: list[int] | None = None,
              drop_layers: list[int] | None = None) -> Trace:
    """One ``.npy``/``.npz`` per request (a file or a folder of them): one checkpoint."""
    if not source.exists():
        raise FileNotFoundError(f"{source}: routed-experts arrays not found")
    files = sorted(p for p in source.iterdir() if p.suffix in (".npy", ".npz")) if source.is_dir() else [source]
    if not files:
        raise FileNotFoundError(f"{source}: no .npy/.npz files")
    token_ids = _token_ids_vllm(tokens)
    if token_ids:
        missing = [f.stem for f in files if f.stem not in token_ids]
        if missing:
            raise fail(str(tokens), "request_id", f"no token ids for request(s) {missing[:3]} (file stems)")
    arrays = []
    for f in files:
        a = _load_npy(f)
        if a.ndim != 3:
            raise fail(str(f), "routed_experts", f"shape {list(a.shape)}; expected [seq_len, moe_layers, k]")
        if a.dtype.kind not in "iu":
            raise fail(str(f), "routed_experts", f"dtype {a.dtype}; expected integers")
        arrays.append((f, a.shape))
    L, k = arrays[0][1][1], arrays[0][1][2]
    for f, shape in arrays[1:]:
        if shape[1:] != (L, k):
            raise fail(str(f), "routed_experts", f"shape {list(shape)}; {arrays[0][0].name} has [*, {L}, {k}]")
    lmap = _layer_map(layers, drop_layers, L, str(files[0]))

    def events():
        for f, shape in arrays:
            seq = shape[0]
            ids = None
            if token_ids:
                t = token_ids[f.stem]
                if t.size < seq:
                    raise fail(str(tokens), f.stem, f"{t.size} token ids, the routed-experts array has {seq} tokens")
                ids = t[:seq].astype(np.int32)
            yield Samples([SampleMeta(key=f.stem, n=int(seq), token_id=ids)], where=str(f))
            a = _load_npy(f)
            for t0 in range(0, seq, 1 << 16):
                part = np.asarray(a[t0:t0 + (1 << 16)])
                for i, lid in lmap:
                    yield Block(layer=lid, where=f"{f}: tokens {t0}..{t0 + part.shape[0] - 1}", ids=part[:, i, :],
                                fields={"ids": "routed_experts"})

    return Trace(
        format="vllm_npy", version=VERSION, paths=[str(f) for f, _ in arrays], router_semantics=SEMANTICS_VLLM,
        events=events(), model_family="vllm", slot_order="as served (fused top-k, highest weight first)",
        attrs={"token_id_meaning": "prompt+output token ids from the tokens file" if token_ids else
               "unknown (-1): no tokens file given"},
    )


# --------------------------------------------------------------------------- SGLang


def _records(path: Path):
    """(where, record) of a JSON response, a JSON list of responses, or a JSONL file."""
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, start=1):
                if line.strip():
                    where = f"{path}: line {i}"
                    try:
                        yield where, json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise TraceError(f"{where}: not valid JSON at character {exc.pos}: {exc.msg} (truncated?)") from None
        return
    with JsonStream(path) as js:
        if js.peek() == "[":
            for i, rec in js.array("response list"):
                yield f"{path}: element {i}", rec
        else:
            yield str(path), js.value("response")
        js.end()


def _decode(rec: dict, where: str, cols_hint: tuple[int | None, int | None]) -> np.ndarray:
    meta = need(rec, "meta_info", where, "the SGLang response's meta_info")
    payload = need(meta, "routed_experts", f"{where}: meta_info", "base64 int32 array")
    if not isinstance(payload, str):
        raise fail(f"{where}: meta_info", "routed_experts", f"expected a base64 string, got {type(payload).__name__}")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise fail(f"{where}: meta_info", "routed_experts", f"not valid base64 ({exc})") from None
    if len(raw) % 4:
        raise fail(f"{where}: meta_info", "routed_experts", f"{len(raw)} bytes is not a whole number of int32 values (truncated?)")
    flat = np.frombuffer(raw, dtype="<i4")
    L, k = cols_hint
    cols = L * k
    if flat.size % cols:
        raise fail(f"{where}: meta_info", "routed_experts",
                   f"{flat.size} ids are not a whole number of tokens × num_layers={L} × top_k={k}")
    return flat.reshape(-1, L, k)


def read_sglang(source: Path, *, num_layers: int | None = None, top_k: int | None = None,
                layers: list[int] | None = None, drop_layers: list[int] | None = None) -> Trace:
    """SGLang responses with ``meta_info.routed_experts`` (a file or a folder of .json/.jsonl): one checkpoint."""
    if not source.exists():
        raise FileNotFoundError(f"{source}: SGLang responses not found")
    files = sorted(p for p in source.iterdir() if p.suffix in (".json", ".jsonl")) if source.is_dir() else [source]
    if not files:
        raise FileNotFoundError(f"{source}: no .json/.jsonl files")
    if num_layers is None and top_k is None:
        raise ValueError(f"{source}: the routed_experts payload is flat; pass num_layers= (the model's "
                         "num_hidden_layers as the server counts them) or top_k=")
    # the layout comes from the first record (each record's own length is known when it is read)
    where, rec = next(_records(files[0]))
    meta = need(rec, "meta_info", where, "the SGLang response's meta_info")
    payload = need(meta, "routed_experts", f"{where}: meta_info", "base64 int32 array")
    n_ids = (len(payload) * 3 // 4) // 4 if isinstance(payload, str) else 0
    T = None
    if "prompt_tokens" in meta and "completion_tokens" in meta:
        T = int(meta["prompt_tokens"]) + int(meta["completion_tokens"]) - 1
    if num_layers is None or top_k is None:
        cols = n_ids // T if T else None
        if num_layers is None and cols and top_k:
            num_layers = cols // top_k
        if top_k is None and cols and num_layers:
            top_k = cols // num_layers
    if not num_layers or not top_k:
        raise ValueError(f"{where}: cannot infer the payload's layout; pass both num_layers= and top_k=")
    hint = (int(num_layers), int(top_k))
    lmap = _layer_map(layers, drop_layers, hint[0], str(files[0]))

    def events():
        i = 0
        for f in files:
            for where, rec in _records(f):
                arr = _decode(rec, where, hint)
                T = arr.shape[0]
                tok = None
                if "output_ids" in rec or "input_ids" in rec:
                    ids = list(rec.get("input_ids") or []) + list(rec.get("output_ids") or [])
                    if len(ids) < T:
                        raise fail(where, "input_ids", f"{len(ids)} input+output token ids, routed_experts covers {T} tokens")
                    tok = np.asarray(ids[:T], dtype=np.int32)
                key = str(rec.get("meta_info", {}).get("id", i))
                yield Samples([SampleMeta(key=key, n=int(T), token_id=tok)], where=where)
                for li, lid in lmap:
                    yield Block(layer=lid, where=where, ids=arr[:, li, :], fields={"ids": "meta_info.routed_experts"})
                i += 1

    return Trace(
        format="sglang", version=VERSION, paths=[str(f) for f in files], router_semantics=SEMANTICS_SGLANG,
        events=events(), model_family="sglang", slot_order="as served (fused top-k, highest weight first)",
        top_k=top_k, attrs={"payload_layout": f"(tokens, num_layers={hint[0]}, top_k={hint[1]}) int32"},
    )
