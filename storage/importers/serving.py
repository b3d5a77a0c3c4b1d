"""Routed-expert arrays returned by inference servers: vLLM (``.npy``), SGLang and vLLM HTTP responses.

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

Serving responses (format ``serving_json``; ``sglang`` reads the same): the
``/generate`` shape above, SGLang's OpenAI-compatible responses with
``choices[].sgl_ext.routed_experts`` (base64, positions
``[routed_experts_start_len, seqlen - 1)``) and vLLM's HTTP responses with
``choices[].routed_experts`` as nested lists [tokens][layers][k]. One sample
per choice; see :func:`read_serving`. Where the prompt length is known
(``usage.prompt_tokens``, ``meta_info.prompt_tokens``, an ``.npz`` split or the
tokens file's ``prompt_token_ids``) the token coordinate ``phase`` is filled:
"prefill" inside the prompt, "decode" after.

All: no weights; slots as the server's fused top-k returns them (sorted by
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

from ._core import Block, SampleMeta, Samples, Trace, TraceError, check_layers_option, fail, int_array, need
from ._text import BomJsonStream, iter_jsonl, to_int

VERSION = 1
SEMANTICS_VLLM = "vLLM fused MoE top-k as served (model's own router: softmax/sigmoid, bias, groups); ids only"
SEMANTICS_SGLANG = "SGLang MoE top-k as served (model's own router: softmax/sigmoid, bias, groups); ids only"
SEMANTICS_SERVING = "MoE top-k as the server returned it (model's own router: softmax/sigmoid, bias, groups); ids only"
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
    if path.suffix == ".npz":
        from ._npsafe import check_npz

        check_npz(path, ["prompt_routed_experts", "routed_experts"])  # sizes checked before any allocation
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


def _token_ids_vllm(path: Path | None, prompt_len: dict | None = None) -> dict[str, np.ndarray]:
    """request id -> prompt+output token ids; ``prompt_len`` (when given) receives request id -> prompt length."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: token id file not found")
    out: dict[str, np.ndarray] = {}

    def one(key, value, where):
        if isinstance(value, dict):
            prompt = list(need(value, "prompt_token_ids", where, "list of prompt token ids"))
            if prompt_len is not None:
                prompt_len[str(key)] = len(prompt)
            ids = prompt + list(value.get("output_token_ids") or [])
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
              drop_layers: list[int] | None = None, top_k: int | None = None) -> Trace:
    """One ``.npy``/``.npz`` per request (a file or a folder of them): one checkpoint.

    ``top_k``, when given, must equal the arrays' last dimension (the model's experts per token).
    """
    if not source.exists():
        raise FileNotFoundError(f"{source}: routed-experts arrays not found")
    files = sorted(p for p in source.iterdir() if p.suffix in (".npy", ".npz")) if source.is_dir() else [source]
    if not files:
        raise FileNotFoundError(f"{source}: no .npy/.npz files")
    prompt_len: dict[str, int] = {}
    token_ids = _token_ids_vllm(tokens, prompt_len)
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
    if top_k is not None and int(top_k) != k:
        raise fail(str(arrays[0][0]), "routed_experts", f"shape {list(arrays[0][1])}: {k} experts per token, top_k={top_k}")
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
            n_prompt = prompt_len.get(f.stem)
            if f.suffix == ".npz":
                with np.load(f, allow_pickle=False) as z:
                    if "prompt_routed_experts" in z.files:
                        n_prompt = int(z["prompt_routed_experts"].shape[0])
            phase = None if n_prompt is None else np.where(np.arange(seq) < n_prompt, "prefill", "decode").astype(object)
            yield Samples([SampleMeta(key=f.stem, n=int(seq), token_id=ids, phase=phase)], where=str(f))
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


# --------------------------------------------------------------------------- serving responses (SGLang, vLLM)


def _records(path: Path):
    """(where, record) of a JSON response, a JSON list of responses, or a JSONL file of them."""
    if path.suffix == ".jsonl":
        for line, rec in iter_jsonl(path):
            yield f"{path}: line {line}", rec
        return
    with BomJsonStream(path) as js:
        if js.peek() == "[":
            for i, rec in js.array("response list"):
                yield f"{path}: element {i}", rec
        else:
            yield str(path), js.value("response")
        js.end()


def _b64_ids(payload, where: str, field_name: str) -> np.ndarray:
    """base64 of little-endian int32 -> flat ids."""
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise fail(where, field_name, f"not valid base64 ({exc})") from None
    if len(raw) % 4:
        raise fail(where, field_name, f"{len(raw)} bytes is not a whole number of int32 values (truncated?)")
    return np.frombuffer(raw, dtype="<i4")


def _opt_int(d: dict, key: str, where: str):
    v = d.get(key) if isinstance(d, dict) else None
    return None if v is None else to_int(v, where, key)


class _Routed:
    """One sample of a response: its routed_experts payload and what places its tokens."""

    __slots__ = ("key", "where", "field", "payload", "start", "start_given", "prompt", "seqlen", "token_ids")

    def __init__(self, key, where, field, payload, start, prompt, seqlen, token_ids):
        self.key, self.where, self.field, self.payload = key, where, field, payload
        self.start_given = start is not None
        self.start = start or 0
        self.prompt, self.seqlen, self.token_ids = prompt, seqlen, token_ids


def _samples_of(rec, where: str, index: int) -> list[_Routed]:
    """The routed samples of one response: /generate meta_info, or each OpenAI choice (SGLang sgl_ext, vLLM)."""
    if not isinstance(rec, dict):
        raise fail(where, None, f"expected a response object, got {type(rec).__name__}")
    usage = rec.get("usage") if isinstance(rec.get("usage"), dict) else {}
    if "choices" in rec:
        choices = rec["choices"]
        if not isinstance(choices, list) or not choices:
            raise fail(where, "choices", "expected a non-empty list")
        prompt = _opt_int(usage, "prompt_tokens", f"{where}: usage")
        completion = _opt_int(usage, "completion_tokens", f"{where}: usage")
        prompt_ids = rec.get("prompt_token_ids")
        rid = rec.get("id")
        top_ext = rec.get("sgl_ext") if isinstance(rec.get("sgl_ext"), dict) else {}
        out = []
        for ci, ch in enumerate(choices):
            cw = f"{where}: choices[{ci}]"
            if not isinstance(ch, dict):
                raise fail(cw, None, f"expected an object, got {type(ch).__name__}")
            ext = ch.get("sgl_ext") if isinstance(ch.get("sgl_ext"), dict) else {}
            if "routed_experts" in ext:
                payload, rw, src = ext["routed_experts"], f"{cw}: sgl_ext", ext
            elif "routed_experts" in ch:
                payload, rw, src = ch["routed_experts"], cw, ch
            elif "routed_experts" in top_ext and len(choices) == 1:
                payload, rw, src = top_ext["routed_experts"], f"{where}: sgl_ext", top_ext
            else:
                raise fail(cw, "routed_experts", "missing (neither sgl_ext.routed_experts nor routed_experts); "
                                                 "was the request sent with return_routed_experts?")
            if payload is None:
                raise fail(rw, "routed_experts", "null (the server was not started with --enable-return-routed-experts?)")
            if "prompt_routed_experts" in ch and isinstance(payload, list):
                payload = list(ch["prompt_routed_experts"]) + payload  # vLLM's split: prompt part first
            start = _opt_int(src, "routed_experts_start_len", cw)
            # usage counts every choice's completion: the sequence length is known for a single choice only
            seqlen = prompt + completion if (prompt is not None and completion is not None and len(choices) == 1) else None
            tok = None
            out_ids = ch.get("token_ids")
            p_ids = ch.get("prompt_token_ids", prompt_ids)  # per choice in vLLM's completions, per response in chat
            if isinstance(p_ids, list) and isinstance(out_ids, list):
                tok = list(p_ids) + list(out_ids)
            key = str(rid if rid is not None else index) + (f"/{ch.get('index', ci)}" if len(choices) > 1 else "")
            out.append(_Routed(key, rw, "routed_experts", payload, start, prompt, seqlen, tok))
        return out
    meta = need(rec, "meta_info", where, "the response's meta_info (/generate) or choices (OpenAI-compatible)")
    payload = need(meta, "routed_experts", f"{where}: meta_info", "base64 int32 array")
    prompt = _opt_int(meta, "prompt_tokens", f"{where}: meta_info")
    completion = _opt_int(meta, "completion_tokens", f"{where}: meta_info")
    seqlen = prompt + completion if (prompt is not None and completion is not None) else None
    tok = None
    if "output_ids" in rec or "input_ids" in rec:
        tok = list(rec.get("input_ids") or []) + list(rec.get("output_ids") or [])
    start = _opt_int(meta, "routed_experts_start_len", f"{where}: meta_info")
    return [_Routed(str(meta.get("id", index)), f"{where}: meta_info", "routed_experts", payload, start, prompt, seqlen,
                    tok)]


def _decode_routed(r: _Routed, num_layers, top_k) -> np.ndarray:
    """(tokens, layers, k) ids of one sample."""
    if isinstance(r.payload, list):  # vLLM: nested lists [tokens][layers][k]
        a = int_array(r.payload, r.where, r.field, 3) if r.payload else np.zeros((0, num_layers or 0, top_k or 0), np.int64)
        if num_layers is not None and a.shape[1] != num_layers:
            raise fail(r.where, r.field, f"{a.shape[1]} layers, num_layers={num_layers}")
        if top_k is not None and a.shape[2] != top_k:
            raise fail(r.where, r.field, f"{a.shape[2]} experts per token, top_k={top_k}")
        return a
    if not isinstance(r.payload, str):
        raise fail(r.where, r.field, f"expected a base64 string or nested lists, got {type(r.payload).__name__}")
    flat = _b64_ids(r.payload, r.where, r.field)
    L, k = num_layers, top_k
    if L is None or k is None:
        T = None if r.seqlen is None else r.seqlen - 1 - r.start
        if not T or flat.size % T:
            raise fail(r.where, r.field, "the base64 payload is flat and its token count is unknown; pass both "
                                         "num_layers= and top_k=")
        cols = flat.size // T
        if L is None:
            L = cols // k if cols % k == 0 else None
        else:
            k = cols // L if cols % L == 0 else None
        if not L or not k:
            raise fail(r.where, r.field, f"{cols} ids per token do not split into num_layers × top_k; pass both")
    if flat.size % (L * k):
        raise fail(r.where, r.field, f"{flat.size} ids are not a whole number of tokens × num_layers={L} × top_k={k}")
    return flat.reshape(-1, L, k)


def _read_responses(fmt: str, source: Path, num_layers, top_k, layers, drop_layers) -> Trace:
    if not source.exists():
        raise FileNotFoundError(f"{source}: serving responses not found")
    files = sorted(p for p in source.iterdir() if p.suffix in (".json", ".jsonl")) if source.is_dir() else [source]
    if not files:
        raise FileNotFoundError(f"{source}: no .json/.jsonl files")
    num_layers = None if num_layers is None else int(num_layers)
    top_k = None if top_k is None else int(top_k)
    # the layout comes from the first sample (each sample's own length is known when it is read)
    where0, rec0 = next(iter(_records(files[0])), (str(files[0]), None))
    if rec0 is None:
        raise TraceError(f"{files[0]}: no responses")
    first = _samples_of(rec0, where0, 0)[0]
    a0 = _decode_routed(first, num_layers, top_k)
    L, k = a0.shape[1], a0.shape[2]
    lmap = _layer_map(layers, drop_layers, L, str(files[0]))
    attrs = {"payload_layout": f"(tokens, num_layers={L}, top_k={k})",
             "position_meaning": "index in the request's token sequence (prompt then output; "
                                 "routed_experts_start_len offsets it)"}
    seen: dict[str, int] = {}

    def events():
        i = 0
        any_tok = False
        for f in files:
            for where, rec in _records(f):
                for r in _samples_of(rec, where, i):
                    arr = _decode_routed(r, L, k)
                    T = arr.shape[0]
                    if T == 0:
                        raise fail(r.where, r.field, "no routed tokens")
                    if r.seqlen is not None:
                        # the server returns positions [start, seqlen - 1): the start follows from the length
                        start = r.seqlen - 1 - T
                        if start < 0 or (r.start_given and r.start != start):
                            raise fail(r.where, r.field,
                                       f"{T} routed tokens, but the sequence has {r.seqlen} tokens (prompt + completion)"
                                       + (f" and routed_experts_start_len is {r.start}" if r.start_given else "")
                                       + "; the routing covers positions [start, seqlen - 1)")
                        r.start = start
                    pos = np.arange(r.start, r.start + T, dtype=np.int32)
                    tok = None
                    if r.token_ids is not None:
                        if len(r.token_ids) < r.start + T:
                            raise fail(r.where, "token ids", f"{len(r.token_ids)} token ids, routed_experts covers "
                                                             f"positions {r.start}..{r.start + T - 1}")
                        tok = np.asarray([to_int(x, r.where, "token ids") for x in r.token_ids[r.start:r.start + T]],
                                         dtype=np.int32)
                        any_tok = True
                    phase = None
                    if r.prompt is not None:
                        phase = np.where(pos < r.prompt, "prefill", "decode").astype(object)
                    key = r.key
                    if key in seen:  # ids repeated across files (or missing): keep samples apart
                        seen[key] += 1
                        key = f"{key}#{seen[r.key]}"
                        attrs["repeated_sample_ids"] = "some response ids repeat; later ones are '<id>#<n>'"
                    else:
                        seen[key] = 0
                    yield Samples([SampleMeta(key=key, n=int(T), token_id=tok, position=pos, phase=phase)], where=r.where)
                    for li, lid in lmap:
                        yield Block(layer=lid, where=r.where, ids=arr[:, li, :], fields={"ids": r.field})
                i += 1
        attrs["token_id_meaning"] = ("prompt+output token ids from the responses" if any_tok else
                                     "unknown (-1): the responses carry no token ids")

    return Trace(
        format=fmt, version=VERSION, paths=[str(f) for f in files],
        router_semantics=SEMANTICS_SGLANG if fmt == "sglang" else SEMANTICS_SERVING,
        events=events(), model_family="sglang" if fmt == "sglang" else "serving",
        slot_order="as served (fused top-k, highest weight first)", top_k=k, attrs=attrs,
    )


def read_sglang(source: Path, *, num_layers: int | None = None, top_k: int | None = None,
                layers: list[int] | None = None, drop_layers: list[int] | None = None) -> Trace:
    """SGLang responses (a file or a folder of .json/.jsonl): /generate ``meta_info.routed_experts`` or
    OpenAI-compatible ``choices[].sgl_ext.routed_experts``; one checkpoint. See :func:`read_serving`."""
    return _read_responses("sglang", source, num_layers, top_k, layers, drop_layers)


def read_serving(source: Path, *, num_layers: int | None = None, top_k: int | None = None,
                 layers: list[int] | None = None, drop_layers: list[int] | None = None) -> Trace:
    """Serving responses with routed experts (a file, a JSON list, JSONL, or a folder of them): one checkpoint.

    Recognised per response:

    * SGLang ``/generate``: ``meta_info.routed_experts`` (base64 int32), ``meta_info.prompt_tokens``,
      ``completion_tokens``, ``id``; token ids from ``input_ids`` + ``output_ids`` when kept.
    * SGLang OpenAI-compatible (``/v1/chat/completions``, ``/v1/completions``): each choice's
      ``sgl_ext.routed_experts`` (base64 int32, logical shape [tokens, layers, top_k]) covering positions
      ``[routed_experts_start_len, seqlen - 1)``; ``usage`` gives prompt and completion lengths.
    * vLLM OpenAI-compatible: each choice's ``routed_experts`` as nested lists [tokens][layers][k]
      (``prompt_routed_experts`` first when split); token ids from ``prompt_token_ids`` + the choice's
      ``token_ids`` when returned.

    One sample per choice (key = response ``id``, ``/<choice index>`` added when there are several).
    Base64 payloads are flat: ``num_layers`` and ``top_k`` are needed unless the sequence length is known
    (then one of them suffices). Token coordinate ``phase``: "prefill" for positions inside the prompt,
    "decode" after, where the prompt length is known.
    """
    return _read_responses("serving_json", source, num_layers, top_k, layers, drop_layers)
