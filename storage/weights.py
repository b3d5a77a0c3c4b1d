"""Streaming reads of checkpoint weights from safetensors, one tensor (or one expert) at a time.

Public API (also used by the gate-initialisation helper of issue 16):

* :func:`iter_expert_tensors` ``(path, family=None)`` → :class:`ExpertTensor` records
  (layer, expert, kind ∈ {router, gate, up, down}, float32 array), streamed;
* :func:`iter_linear_weights` ``(path, component)`` → (layer, name, float32 2-D array) of
  every weight whose name ends with ``<component>.weight`` (attention q/k/v/o, dense MLPs...);
* :func:`read_tensor`, :func:`tensor_names`, :func:`safetensors_files`, :func:`model_type`.

Nothing here loads a checkpoint whole: shards are opened with ``safetensors.safe_open``
one at a time, tensors are read one at a time, and fused expert tensors
(``experts.gate_up_proj`` of shape (expert, 2·ffn, hidden)) are sliced one expert at a time
(``get_slice``), so a 30B-parameter checkpoint needs about one expert's weights in memory.
Arrays are returned as float32 numpy copies (bf16/fp16 are upcast).

Layouts understood (parameter names as ``save_pretrained`` writes them):

* per-expert modules: ``…layers.<L>.<block>.experts.<E>.<proj>.weight`` with ``proj`` one of
  gate_proj/up_proj/down_proj (OLMoE, Qwen2/3-MoE, DeepSeek), w1/w3/w2 (Mixtral), wi/wo (Switch);
* fused experts: ``…layers.<L>.<block>.experts.gate_up_proj`` (E, 2I, H; gate first) or, for
  ``gpt_oss``, (E, H, 2I) with gate and up interleaved; ``experts.down_proj`` (E, H, I) or (E, I, H);
* routers: ``…layers.<L>.<block>.(gate|router|router.layer|router.classifier).weight`` of
  shape (E, H). Shared experts (``shared_expert``/``shared_experts``) are not routed experts
  and are skipped.

This module imports neither capture nor analyses.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "ExpertTensor", "iter_expert_tensors", "iter_linear_weights", "read_tensor", "tensor_names",
    "safetensors_files", "model_type", "KINDS",
]

KINDS = ("router", "gate", "up", "down")

_LAYER = r"(?:^|\.)(?:layers|blocks|block|h)\.(?P<layer>\d+)\."
_PER_EXPERT = re.compile(_LAYER + r"(?:.*\.)?experts\.(?:expert_)?(?P<expert>\d+)\.(?:mlp\.)?"
                                  r"(?P<proj>gate_proj|up_proj|down_proj|w1|w2|w3|wi|wo|fc1|fc2)\.weight$")
_FUSED = re.compile(_LAYER + r"(?:.*\.)?experts\.(?P<proj>gate_up_proj|down_proj|gate_proj|up_proj)$")
_ROUTER = re.compile(_LAYER + r"(?:.*\.)?(?:mlp|block_sparse_moe|moe|ffn|feed_forward|layer\.\d+\.mlp)\."
                                r"(?:gate|router|router\.layer|router\.classifier)\.weight$")
_PROJ_KIND = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "wi": "up", "fc1": "up",
              "down_proj": "down", "w2": "down", "wo": "down", "fc2": "down"}


@dataclass(frozen=True)
class ExpertTensor:
    """One routed expert's weight (or one layer's router).

    Attributes
    ----------
    layer : decoder layer index (the ``layers.<L>`` number in the parameter name).
    expert : expert index; for ``kind == "router"`` the whole (expert, hidden) matrix comes at once
        and ``expert`` is -1.
    kind : "router", "gate", "up" or "down".
    array : float32 numpy array; router (expert, hidden), gate/up (ffn, hidden), down (hidden, ffn)
        when the layout says which is which (fused layouts are put in this orientation).
    name : the parameter name it came from.
    """

    layer: int
    expert: int
    kind: str
    array: np.ndarray
    name: str


def safetensors_files(path: str | Path) -> list[Path]:
    """The ``*.safetensors`` shards of a checkpoint directory (or the file itself), sorted.

    Raises FileNotFoundError naming the path when there are none.
    """
    p = Path(path)
    if p.is_file():
        return [p]
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{p}: no *.safetensors files (weights are read from safetensors only)")
    return files


def model_type(path: str | Path) -> str:
    """``model_type`` of the checkpoint's config.json ("" when there is none)."""
    p = Path(path)
    cfg = (p if p.is_dir() else p.parent) / "config.json"
    try:
        return str(json.loads(cfg.read_text()).get("model_type", ""))
    except (OSError, ValueError):
        return ""


def _header(file: Path) -> dict:
    """The JSON header of one safetensors file (names, dtypes, shapes); reads only the header."""
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{file}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise ValueError(f"{file}: not a safetensors file (header length {n})")
        try:
            head = json.loads(f.read(n))
        except ValueError as exc:
            raise ValueError(f"{file}: not a safetensors file (header is not JSON: {exc})") from None
    head.pop("__metadata__", None)
    return head


def tensor_names(path: str | Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """{parameter name: (shard file, shape)} over all shards, read from headers only."""
    out = {}
    for f in safetensors_files(path):
        for name, info in _header(f).items():
            out[name] = (f, tuple(int(s) for s in info["shape"]))
    return out


def _to_numpy(t) -> np.ndarray:
    import torch

    return t.to(torch.float32).numpy().copy()


def read_tensor(path: str | Path, name: str) -> np.ndarray:
    """One tensor as a float32 numpy array (KeyError naming the checkpoint when absent)."""
    from safetensors import safe_open

    names = tensor_names(path)
    if name not in names:
        raise KeyError(f"{path}: no tensor {name!r}")
    with safe_open(str(names[name][0]), framework="pt") as fh:
        return _to_numpy(fh.get_tensor(name))


def _fused_split(kind: str, block: np.ndarray, family: str, hidden: int | None) -> list[tuple[str, np.ndarray]]:
    """One expert's slice of a fused tensor → [(kind, 2-D array in the per-expert orientation)]."""
    if kind == "gate_up_proj":
        if family == "gpt_oss" or (hidden is not None and block.shape[0] == hidden and block.shape[1] != hidden):
            # (H, 2I), gate and up interleaved along the last axis (gpt-oss)
            return [("gate", np.ascontiguousarray(block[:, 0::2].T)), ("up", np.ascontiguousarray(block[:, 1::2].T))]
        half = block.shape[0] // 2
        return [("gate", block[:half]), ("up", block[half:])]
    if kind == "down_proj":
        if hidden is not None and block.shape[1] == hidden and block.shape[0] != hidden:
            block = np.ascontiguousarray(block.T)  # (I, H) -> (H, I)
        return [("down", block)]
    return [(_PROJ_KIND[kind], block)]


def iter_expert_tensors(path: str | Path, family: str | None = None, *,
                        layers: set[int] | None = None, kinds: tuple[str, ...] = KINDS) -> Iterator[ExpertTensor]:
    """Stream the routers and routed experts' weights of a checkpoint, one tensor at a time.

    Parameters
    ----------
    path : checkpoint directory (``save_pretrained`` output) or one safetensors file.
    family : ``model_type`` (default: from config.json); decides only layout ambiguities
        (gpt_oss interleaves gate and up in its fused tensor).
    layers : only these layer indices (default: all).
    kinds : which of "router", "gate", "up", "down" to yield.

    Yields
    ------
    :class:`ExpertTensor` records in file order: a layer's router as one (expert, hidden)
    matrix, each expert's projections one by one. Memory held at any time: one shard's
    memory map plus one expert's tensor.
    """
    from safetensors import safe_open

    family = model_type(path) if family is None else family
    files = safetensors_files(path)
    hidden = None
    # Routers first (they fix the hidden size that orients fused tensors), read from headers.
    for f in files:
        for name, info in _header(f).items():
            if _ROUTER.search(name) and len(info["shape"]) == 2 and "shared" not in name:
                hidden = int(info["shape"][1])
                break
        if hidden is not None:
            break
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for name in fh.keys():
                if "shared_expert" in name:
                    continue
                m = _ROUTER.search(name)
                if m:
                    layer = int(m.group("layer"))
                    if "router" in kinds and (layers is None or layer in layers):
                        arr = _to_numpy(fh.get_tensor(name))
                        if arr.ndim == 2 and arr.shape[0] > 1:
                            yield ExpertTensor(layer, -1, "router", arr, name)
                    continue
                m = _PER_EXPERT.search(name)
                if m:
                    layer, kind = int(m.group("layer")), _PROJ_KIND[m.group("proj")]
                    if kind in kinds and (layers is None or layer in layers):
                        yield ExpertTensor(layer, int(m.group("expert")), kind, _to_numpy(fh.get_tensor(name)), name)
                    continue
                m = _FUSED.search(name)
                if m:
                    layer, proj = int(m.group("layer")), m.group("proj")
                    wanted = ("gate", "up") if proj == "gate_up_proj" else (_PROJ_KIND[proj],)
                    if layers is not None and layer not in layers or not set(wanted) & set(kinds):
                        continue
                    sl = fh.get_slice(name)
                    shape = sl.get_shape()
                    if len(shape) != 3:
                        continue
                    for e in range(int(shape[0])):
                        block = _to_numpy(sl[e : e + 1])[0]  # one expert's slice only
                        for kind, arr in _fused_split(proj, block, family, hidden):
                            if kind in kinds:
                                yield ExpertTensor(layer, e, kind, arr, name)


def iter_linear_weights(path: str | Path, component: str, *, layers: set[int] | None = None
                        ) -> Iterator[tuple[int, str, np.ndarray]]:
    """Stream every 2-D weight named ``…layers.<L>.…<component>.weight`` → (layer, name, float32 array).

    ``component`` is a dotted suffix such as ``self_attn.q_proj`` or ``mlp.down_proj``; for
    routed experts use :func:`iter_expert_tensors`.
    """
    from safetensors import safe_open

    pat = re.compile(_LAYER + r"(?:.*\.)?" + re.escape(component) + r"\.weight$")
    for f in safetensors_files(path):
        with safe_open(str(f), framework="pt") as fh:
            for name in fh.keys():
                m = pat.search(name)
                if m and (layers is None or int(m.group("layer")) in layers):
                    arr = _to_numpy(fh.get_tensor(name))
                    if arr.ndim == 2:
                        yield int(m.group("layer")), name, arr
