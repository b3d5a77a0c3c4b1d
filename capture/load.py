"""Load checkpoints and tokenizers offline, safely, and describe their routing.

Everything here is offline (``HF_HUB_OFFLINE=1``, ``local_files_only=True``),
reads weights from safetensors only (never unpickles), and passes
``trust_remote_code`` through only when the caller asks for it.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .routers import count_shared_experts, describe_semantics, find_routers

__all__ = ["ModelInfo", "describe_checkpoint", "describe_model", "load_model", "load_tokenizer", "check_checkpoint_dir"]

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


@dataclass(frozen=True)
class ModelInfo:
    """What a reader of the routing cube must know about the model.

    Attributes
    ----------
    family : ``config.model_type``.
    moe_layers : the model's own decoder-layer indices that have a router, ascending.
    num_experts, top_k : routed experts per layer and experts per token.
    router_semantics : how logits become the weights the experts receive.
    shared_experts : always-active shared experts per MoE layer (not in expert_ids).
    dtype : parameter dtype (the checkpoint's declared dtype for
        ``describe_checkpoint``, the one actually used for ``load_model``/capture).
    vocab_size : rows of the input embedding (token ids must be below it).
    """

    family: str
    moe_layers: list[int]
    num_experts: int
    top_k: int
    router_semantics: str
    shared_experts: int
    dtype: str
    vocab_size: int

    def attrs(self) -> dict:
        """The routing-cube attributes this info fills (see storage.schema.REQUIRED_ATTRS)."""
        return {
            "model_family": self.family,
            "num_experts": int(self.num_experts),
            "top_k": int(self.top_k),
            "router_semantics": self.router_semantics,
            "shared_experts": int(self.shared_experts),
            "dtype": self.dtype,
        }


def _dtype_name(dt) -> str:
    if dt is None:
        return "unknown"
    return str(dt).replace("torch.", "")


def check_checkpoint_dir(model_dir, *, need_weights: bool) -> Path:
    """Validate a checkpoint directory before transformers sees it.

    Parameters
    ----------
    model_dir : directory holding ``config.json`` (+ safetensors weights).
    need_weights : also check the weights: safetensors present, none truncated,
        every shard of an index present; pickle-only dirs are refused.

    Raises
    ------
    FileNotFoundError : missing dir, no config.json, no weights.
    ValueError : pickle-only weights, truncated/corrupt safetensors, bad index.
    """
    d = Path(model_dir)
    if not d.exists():
        raise FileNotFoundError(f"checkpoint dir {d} does not exist")
    if not d.is_dir():
        raise FileNotFoundError(f"checkpoint {d} is not a directory (expected a dir with config.json)")
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"checkpoint dir {d} has no config.json")
    if not need_weights:
        return d
    shards = sorted(d.glob("*.safetensors"))
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            wmap = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a safetensors index (expected JSON with a 'weight_map' object): {e}") from e
        for shard in sorted(set(wmap.values())):
            if not (d / shard).is_file():
                raise FileNotFoundError(f"{index}: shard {shard} listed in weight_map is missing from {d}")
    if not shards:
        pickles = sorted(p.name for p in d.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise ValueError(
                f"checkpoint dir {d} holds only pickle-based weights {pickles}; refusing to unpickle. "
                f"Convert them to safetensors (model.save_pretrained(dir, safe_serialization=True)) and retry"
            )
        raise FileNotFoundError(f"checkpoint dir {d} has no *.safetensors weights")
    for shard in shards:
        _check_safetensors(shard)
    return d


def _pickle_kind(head: bytes) -> str:
    """What a file that should be safetensors really is, from its first bytes; '' when not a pickle."""
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (the torch.save format, pickle inside)"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "a Python pickle"
    return ""


def _check_safetensors(path: Path) -> None:
    """Header sanity check: the file is at least as long as its header says."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        # A pickle read as safetensors gives an impossible header length: say what the file really is.
        kind = _pickle_kind(raw)
        if kind and (len(raw) < 8 or struct.unpack("<Q", raw)[0] > size - 8):
            raise ValueError(f"{path}: not a safetensors file but {kind}; refusing to unpickle it. Convert the "
                             f"weights to safetensors (model.save_pretrained(dir, safe_serialization=True))")
        if len(raw) < 8:
            raise ValueError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise ValueError(f"{path}: truncated safetensors file (header says {n} bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"{path}: corrupt safetensors header: {e}") from e
    end = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(meta["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError) as e:
            raise ValueError(f"{path}: corrupt safetensors header entry '{name}': {e}") from e
    if 8 + n + end > size:
        raise ValueError(f"{path}: truncated safetensors file (tensors need {8 + n + end} bytes, file has {size})")


def _load_config(d: Path, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(d), local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{d / 'config.json'}: cannot read the model config: {e}") from e


def describe_model(model, *, where: str = "model", dtype: str | None = None) -> ModelInfo:
    """ModelInfo of an instantiated model (real or meta device).

    Raises
    ------
    ValueError ``"{where}: no MoE router found"`` for a dense model.
    """
    sites = find_routers(model, where=where)
    E = {s.num_experts for s in sites}
    K = {s.top_k for s in sites}
    if len(E) != 1 or len(K) != 1:
        raise ValueError(f"{where}: routers disagree on experts/top-k: num_experts {sorted(E)}, top_k {sorted(K)}")
    config = model.config
    if dtype is None:
        dtype = _dtype_name(next(iter(model.parameters())).dtype)
    return ModelInfo(
        family=str(getattr(config, "model_type", type(model).__name__)),
        moe_layers=[s.layer for s in sites],
        num_experts=E.pop(),
        top_k=K.pop(),
        router_semantics=describe_semantics(model, sites),
        shared_experts=count_shared_experts(model, sites),
        dtype=dtype,
        vocab_size=int(model.get_input_embeddings().num_embeddings),
    )


def describe_checkpoint(model_dir, *, trust_remote_code: bool = False) -> ModelInfo:
    """Describe a checkpoint's routing from its config, without loading weights.

    The model is instantiated on the meta device (no memory, no weights) so that
    routers are found exactly as they will be at capture time.

    Parameters
    ----------
    model_dir : checkpoint directory with ``config.json``.
    trust_remote_code : passed to transformers; only set it for code you trust.

    Returns
    -------
    ModelInfo; ``dtype`` is the checkpoint's declared dtype.
    """
    from transformers import AutoModelForCausalLM

    d = check_checkpoint_dir(model_dir, need_weights=False)
    config = _load_config(d, trust_remote_code)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as e:
        raise ValueError(f"{d}: cannot build a causal LM from config.json (model_type "
                         f"'{getattr(config, 'model_type', '?')}'): {e}") from e
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return describe_model(model, where=str(d), dtype=_dtype_name(declared))


def _resolve_dtype(dtype, device):
    if dtype is None:
        # CPUs are slow and imprecise in half precision; accelerators use the checkpoint's dtype.
        return torch.float32 if torch.device(device).type == "cpu" else "auto"
    if isinstance(dtype, str) and dtype != "auto":
        dt = getattr(torch, dtype, None)
        if not isinstance(dt, torch.dtype):
            raise ValueError(f"dtype '{dtype}' is not a torch dtype (expected e.g. 'float32', 'bfloat16', 'auto')")
        return dt
    return dtype


def load_model(model_dir, *, device="cpu", dtype=None, trust_remote_code: bool = False):
    """Load a causal LM checkpoint for inference.

    Parameters
    ----------
    model_dir : directory with ``config.json`` and ``*.safetensors``.
    device : where to put it ("cpu", "cuda", "cuda:1", ...).
    dtype : torch dtype or its name; default float32 on CPU, the checkpoint's on
        accelerators.
    trust_remote_code : passed through; False unless asked.

    Returns
    -------
    PreTrainedModel in eval mode.

    Raises
    ------
    FileNotFoundError / ValueError naming the dir or file (see ``check_checkpoint_dir``);
    ValueError when weights the model needs are missing from the checkpoint
    (transformers would silently initialise them at random).
    """
    from transformers import AutoModelForCausalLM

    d = check_checkpoint_dir(model_dir, need_weights=True)
    _load_config(d, trust_remote_code)  # a readable error for a bad config.json
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            str(d),
            dtype=_resolve_dtype(dtype, device),
            use_safetensors=True,
            local_files_only=True,
            trust_remote_code=trust_remote_code,
            output_loading_info=True,
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{d}: cannot load the checkpoint: {e}") from e
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ValueError(f"{d}: the safetensors lack {len(missing)} weight(s) the model needs, e.g. {missing[:5]}; "
                         f"refusing to capture a partly random model")
    # No device_map: that needs `accelerate`; a plain move keeps the dependency list short.
    model.to(device)
    model.eval()
    return model


def load_tokenizer(tokenizer_dir, *, trust_remote_code: bool = False):
    """Load a fast tokenizer (character offsets are needed for alignment).

    Raises
    ------
    FileNotFoundError for a missing dir; ValueError when the tokenizer cannot be
    loaded or is not a fast (Rust) tokenizer.
    """
    from transformers import AutoTokenizer

    d = Path(tokenizer_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"tokenizer dir {d} does not exist")
    try:
        tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{d}: cannot load a tokenizer: {e}") from e
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"{d}: tokenizer {type(tok).__name__} is not a fast tokenizer; character offsets need "
                         f"one (provide tokenizer.json)")
    return tok
