"""Router logits saved from ``output_router_logits=True`` (``torch.save`` or safetensors) plus input ids.

What transformers returns is a tuple with one (batch*seq, num_experts) tensor
per *MoE* layer (dense layers are skipped, so the tuple index is not the layer
id), padding rows included, and no metadata. Accepted files:

* ``torch.save`` output (loaded ONLY with ``torch.load(weights_only=True)``,
  memory-mapped): a tuple/list of such tensors, or a dict with
  ``router_logits`` (tuple/list, or dict layer id -> tensor) and optionally
  ``input_ids`` [batch, seq], ``attention_mask`` [batch, seq], ``layers``;
* safetensors: tensors ``router_logits.<layer id>`` and optionally
  ``input_ids`` and ``attention_mask``.

Input ids come from the file or ``input_ids=`` (a .npy, .safetensors, .pt or
.json file holding [batch, seq]); ``batch_shape=(B, S)`` replaces them when
there are none. Padding rows (``attention_mask`` 0, or ids equal to
``pad_token_id``) are dropped.

Routing is rebuilt from logits ONLY when the caller states the router's
semantics (``semantics`` in ``softmax_topk``/``topk_softmax``/``sigmoid_topk``
with ``top_k`` and, where it matters, ``renormalize``): biased or grouped
routers (DeepSeek-V3, ...) cannot be rebuilt, so without semantics the cube
keeps the logits only (no ``expert_ids``; ``has_token_ids`` False) and the
analyses that need ids say so.
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np

from ._core import (
    Block,
    SampleMeta,
    Samples,
    Trace,
    TraceError,
    check_semantics,
    describe_semantics,
    fail,
    route_from_logits,
)

VERSION = 1
_LAYER_KEY = re.compile(r"^router_logits\.(\d+)$")


def _torch_load(path: Path):
    import torch

    if zipfile.is_zipfile(path):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile) as exc:
            raise TraceError(
                f"{path}: cannot be loaded with torch.load(weights_only=True): {str(exc).splitlines()[0]} "
                "(only tensors, lists, tuples and dicts are accepted; arbitrary pickles are never loaded)"
            ) from None
    with open(path, "rb") as f:
        head = f.read(2)
    if head[:1] == b"\x80":
        raise TraceError(
            f"{path}: a bare Python pickle, not a torch.save archive; pickles are never unpickled. "
            "Save tensors with torch.save (zip format) or safetensors."
        )
    raise TraceError(f"{path}: not a torch.save archive (no zip header); truncated or another format")


def _to_numpy(t, where: str, field_name: str) -> np.ndarray:
    import torch

    if isinstance(t, np.ndarray):
        return t
    if not isinstance(t, torch.Tensor):
        raise fail(where, field_name, f"expected a tensor, got {type(t).__name__}")
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    return t.detach().cpu().numpy()


class _Source:
    """Uniform access to per-layer logits (rows sliced lazily) and the input ids of one file."""

    def __init__(self, path: Path, layers_opt):
        self.path = path
        self.input_ids = None
        self.attention_mask = None
        self._safe = None
        suffix = path.suffix.lower()
        if suffix == ".safetensors":
            from safetensors import SafetensorError, safe_open

            try:
                self._safe = safe_open(str(path), framework="pt")
                keys = list(self._safe.keys())
            except (SafetensorError, OSError, Exception) as exc:  # noqa: BLE001  safetensors raises several types
                with open(path, "rb") as f:
                    head = f.read(2)
                what = "a Python pickle" if head[:1] == b"\x80" else "not a valid safetensors file"
                raise TraceError(f"{path}: {what} ({str(exc).splitlines()[0]}); pickles are never unpickled") from None
            layer_keys = {}
            for key in keys:
                m = _LAYER_KEY.match(key)
                if m:
                    layer_keys[int(m.group(1))] = key
                elif key not in ("input_ids", "attention_mask"):
                    raise fail(str(path), key, "unknown tensor; expected router_logits.<layer>, input_ids, attention_mask")
            if not layer_keys:
                raise fail(str(path), "router_logits.<layer>", f"no such tensors; the file has {keys[:8]}")
            self.layers = sorted(layer_keys)
            self._keys = [layer_keys[l_] for l_ in self.layers]
            if layers_opt is not None:
                raise ValueError(f"{path}: safetensors keys name their layers; option layers= is not used here")
            if "input_ids" in keys:
                self.input_ids = _to_numpy(self._safe.get_tensor("input_ids"), str(path), "input_ids")
            if "attention_mask" in keys:
                self.attention_mask = _to_numpy(self._safe.get_tensor("attention_mask"), str(path), "attention_mask")
            shapes = [tuple(self._safe.get_slice(k).get_shape()) for k in self._keys]
        else:
            obj = _torch_load(path)
            if isinstance(obj, dict):
                if "router_logits" not in obj:
                    raise fail(str(path), "router_logits", f"missing; the dict has keys {sorted(map(str, obj))[:8]}")
                logits = obj["router_logits"]
                self.input_ids = _to_numpy(obj["input_ids"], str(path), "input_ids") if "input_ids" in obj else None
                self.attention_mask = (_to_numpy(obj["attention_mask"], str(path), "attention_mask")
                                       if "attention_mask" in obj else None)
                if layers_opt is None and "layers" in obj:
                    layers_opt = [int(x) for x in obj["layers"]]
            else:
                logits = obj
            if isinstance(logits, dict):
                self.layers = sorted(int(k) for k in logits)
                self._tensors = [logits[k] if k in logits else logits[str(k)] for k in self.layers]
                self.layer_source = "dict keys"
            elif isinstance(logits, (list, tuple)):
                if not logits:
                    raise fail(str(path), "router_logits", "empty tuple")
                self._tensors = list(logits)
                self.layers = list(range(len(logits)))
                self.layer_source = "tuple index (dense layers not counted)"
                if layers_opt is not None:
                    if len(layers_opt) != len(logits):
                        raise fail(str(path), "layers", f"{len(layers_opt)} layer ids for {len(logits)} logits tensors")
                    self.layers = [int(x) for x in layers_opt]
                    self.layer_source = "option layers"
                    order = np.argsort(self.layers)
                    self.layers = [self.layers[i] for i in order]
                    self._tensors = [self._tensors[i] for i in order]
            else:
                raise fail(str(path), "router_logits", f"expected a tuple/list/dict of tensors, got {type(logits).__name__}")
            import torch

            for i, t in zip(self.layers, self._tensors):
                if not isinstance(t, torch.Tensor):
                    raise fail(f"{path}: layer {i}", "router_logits", f"expected a tensor, got {type(t).__name__}")
            shapes = [tuple(t.shape) for t in self._tensors]
        if self._safe is not None:
            self.layer_source = "safetensors keys"
        for l_, shp in zip(self.layers, shapes):
            if len(shp) != 2:
                raise fail(f"{path}: layer {l_}", "router_logits", f"shape {list(shp)}; expected (batch*seq, num_experts)")
        rows = {s[0] for s in shapes}
        experts = {s[1] for s in shapes}
        if len(rows) > 1 or len(experts) > 1:
            raise fail(str(path), "router_logits", f"layers have different shapes {sorted(set(shapes))}")
        self.rows, self.num_experts = rows.pop(), experts.pop()

    def rows_of(self, li: int, r0: int, r1: int) -> np.ndarray:
        if self._safe is not None:
            t = self._safe.get_slice(self._keys[li])[r0:r1]
        else:
            t = self._tensors[li][r0:r1]
        return _to_numpy(t, f"{self.path}: layer {self.layers[li]}", "router_logits").astype(np.float32)


def _load_ids(path) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: input ids file not found")
    if p.suffix == ".npy":
        with open(p, "rb") as f:
            if not f.read(6) == b"\x93NUMPY":
                raise TraceError(f"{p}: not a .npy file (pickles are never loaded)")
        from ._npsafe import check_npy

        check_npy(p)  # the declared size against the file before np.load allocates it
        return np.load(p, allow_pickle=False)
    if p.suffix == ".json":
        try:
            return np.asarray(json.loads(p.read_text()), dtype=np.int64)
        except (ValueError, TypeError) as exc:
            raise TraceError(f"{p}: expected a JSON [batch][seq] list of ints ({exc})") from None
    if p.suffix == ".safetensors":
        from safetensors.numpy import load_file

        d = load_file(str(p))
        if "input_ids" not in d:
            raise fail(str(p), "input_ids", f"missing; the file has {sorted(d)}")
        return d["input_ids"]
    obj = _torch_load(p)
    if isinstance(obj, dict):
        obj = obj.get("input_ids")
    return _to_numpy(obj, str(p), "input_ids")


def read(source: Path, *, input_ids: str | None = None, batch_shape: tuple[int, int] | None = None,
         pad_token_id: int | None = None, layers: list[int] | None = None, semantics: str | None = None,
         top_k: int | None = None, renormalize: bool | None = None, keep_logits: bool = True,
         rows_per_block: int = 1 << 14) -> Trace:
    """Router logits of one checkpoint (one file) plus its input ids."""
    if not source.is_file():
        raise FileNotFoundError(f"{source}: router logits file not found")
    check_semantics(semantics, top_k, renormalize, str(source))
    src = _Source(source, layers)
    ids = _load_ids(input_ids) if input_ids is not None else src.input_ids
    mask = src.attention_mask
    if ids is not None:
        ids = np.asarray(ids)
        if ids.ndim == 1:
            ids = ids[None, :]
        if ids.ndim != 2:
            raise fail(str(input_ids or source), "input_ids", f"shape {list(ids.shape)}; expected [batch, seq]")
        B, S = ids.shape
    elif batch_shape is not None:
        B, S = (int(x) for x in batch_shape)
    else:
        raise ValueError(f"{source}: no input_ids in the file; pass input_ids=<file> (or batch_shape=(B, S) "
                         "when token ids are unknown)")
    if B * S != src.rows:
        raise fail(str(source), "router_logits", f"{src.rows} rows per layer, but input ids are [{B}, {S}] = {B * S} tokens")
    if mask is not None:
        mask = np.asarray(mask).astype(bool)
        if mask.shape != (B, S):
            raise fail(str(source), "attention_mask", f"shape {list(mask.shape)}, input ids are [{B}, {S}]")
    elif pad_token_id is not None and ids is not None:
        mask = ids != int(pad_token_id)
    if semantics is not None and top_k > src.num_experts:
        raise ValueError(f"{source}: top_k={top_k} > {src.num_experts} experts")

    def events():
        for b in range(B):
            keep = np.flatnonzero(mask[b]) if mask is not None else np.arange(S)
            if keep.size == 0:
                continue
            tok = ids[b, keep].astype(np.int32) if ids is not None else None
            yield Samples([SampleMeta(key=str(b), n=int(keep.size), token_id=tok, position=keep.astype(np.int32))],
                          where=f"{source}: batch row {b}")
            for r0 in range(0, keep.size, rows_per_block):
                sel = keep[r0:r0 + rows_per_block]
                lo, hi = b * S + int(sel[0]), b * S + int(sel[-1]) + 1
                for li, layer in enumerate(src.layers):
                    x = src.rows_of(li, lo, hi)[sel - sel[0]]
                    where = f"{source}: layer {layer}, batch row {b}"
                    if not np.all(np.isfinite(x)):
                        raise fail(where, "router_logits", "non-finite logit")
                    e_ids = w = None
                    if semantics is not None:
                        e_ids, w = route_from_logits(x, semantics, top_k, renormalize)
                    yield Block(layer=layer, where=where, ids=e_ids, weights=w,
                                logits=x if (keep_logits or semantics is None) else None,
                                fields={"ids": "router_logits", "weights": "router_logits", "logits": "router_logits"})

    if semantics is not None:
        router = f"rebuilt from logits by moe-atlas under user-stated semantics: {describe_semantics(semantics, top_k, renormalize)}"
    else:
        router = ("unknown (no semantics stated): only the raw router logits are kept; routing was not rebuilt "
                  "because biased or grouped routers cannot be rebuilt from logits")
    return Trace(
        format="router_logits", version=VERSION,
        paths=[str(source)] + ([str(input_ids)] if input_ids is not None else []),
        router_semantics=router, events=events(), model_family="transformers",
        slot_order="by weight, top-1 first (rebuilt)" if semantics else "",
        num_experts=int(src.num_experts), top_k=top_k,
        attrs={"layer_ids": src.layer_source,
               "padding": "dropped (attention_mask)" if src.attention_mask is not None else
               (f"dropped (pad_token_id={pad_token_id})" if mask is not None else "none declared; all rows kept")},
    )
