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

from .routers import capacity_info, count_shared_experts, describe_semantics, find_routers

__all__ = ["ModelInfo", "weight_sums_constant", "language_model", "describe_checkpoint", "describe_model", "load_model", "load_tokenizer", "check_checkpoint_dir",
           "check_checkpoints", "device_problem"]

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
    zero_experts : trailing expert ids that are zero-computation identity experts
        (LongcatFlash), 0 otherwise; they count in ``num_experts``.
    post_expert_scale : factor the MoE block applies to the experts' summed output
        after the experts (Beam, Step3p7, Laguna); None when none. A factor inside
        the router (DeepSeek-V3) is already in ``expert_weights``.
    renormalised_claim : what the semantics claim about the per-token sum of the
        k weights: True (a constant: 1, or routed_scaling_factor inside the
        weights), False (explicitly not renormalised), None (no claim).
    weight_sum_min, weight_sum_max : observed per-token sum of the k captured
        weights over every captured token and layer (``capture_model`` only;
        None from ``describe_*``). The self-test compares them with the claim.
    capacity : encoder-decoder capacity-limited routing (Switch Transformers,
        NLLB-MoE): ``{"expert_capacity": ..., "decoder": ...}``; None otherwise.
    """

    family: str
    moe_layers: list[int]
    num_experts: int
    top_k: int
    router_semantics: str
    shared_experts: int
    dtype: str
    vocab_size: int
    zero_experts: int = 0
    post_expert_scale: float | None = None
    renormalised_claim: bool | None = None
    weight_sum_min: float | None = None
    weight_sum_max: float | None = None
    capacity: dict | None = None

    def attrs(self) -> dict:
        """The routing-cube attributes this info fills (see storage.schema.REQUIRED_ATTRS).

        Optional facts appear only when they apply: ``zero_experts``,
        ``post_expert_scale``, ``weight_sum_min``/``weight_sum_max`` (after a
        capture) with ``renormalised_observed``, and ``capacity`` (JSON).
        """
        out = {
            "model_family": self.family,
            "num_experts": int(self.num_experts),
            "top_k": int(self.top_k),
            "router_semantics": self.router_semantics,
            "shared_experts": int(self.shared_experts),
            "dtype": self.dtype,
        }
        if self.zero_experts:
            out["zero_experts"] = int(self.zero_experts)
        if self.post_expert_scale is not None:
            out["post_expert_scale"] = float(self.post_expert_scale)
        if self.weight_sum_min is not None:
            out["weight_sum_min"] = float(self.weight_sum_min)
            out["weight_sum_max"] = float(self.weight_sum_max)
            out["renormalised_observed"] = int(weight_sums_constant(self.weight_sum_min, self.weight_sum_max,
                                                                    self.dtype))
        if self.capacity is not None:
            out["capacity"] = json.dumps(self.capacity, sort_keys=True)
        return out


def weight_sums_constant(lo: float, hi: float, dtype: str = "float32") -> bool:
    """Whether observed per-token weight sums in [lo, hi] are one constant, rounding in ``dtype`` aside.

    Routers renormalise in the model's dtype: bfloat16 sums spread by ~1e-2 around 1.
    """
    tol = 1e-4 if dtype in ("float32", "float64") else 2e-2
    return bool(abs(hi - lo) <= tol * max(1.0, abs(hi)))


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


# The safetensors format's own limit on the JSON header (safetensors' MAX_HEADER_SIZE).
MAX_SAFETENSORS_HEADER = 100_000_000


def _check_header_entries(path: Path, header) -> None:
    """The header is {name: {dtype, shape, data_offsets}} (+ "__metadata__": {str: str}), nothing deeper.

    Checked here, not left to the Rust parser or to transformers, so any other
    shape fails with one line naming the file and the entry.
    """
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header: expected a JSON object, got {type(header).__name__}")
    for name, meta in header.items():
        if name == "__metadata__":
            if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
                raise ValueError(f"{path}: corrupt safetensors header: '__metadata__' must map strings to strings")
            continue
        ok = (isinstance(meta, dict) and isinstance(meta.get("dtype"), str)
              and isinstance(meta.get("shape"), list)
              and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in meta["shape"])
              and isinstance(meta.get("data_offsets"), list) and len(meta["data_offsets"]) == 2
              and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in meta["data_offsets"]))
        if not ok:
            raise ValueError(f"{path}: corrupt safetensors header entry '{name}': expected "
                             f"{{\"dtype\": str, \"shape\": [ints], \"data_offsets\": [begin, end]}}")


def _check_safetensors(path: Path) -> None:
    """Header sanity check: bounded, well-formed, and the file is at least as long as the header says."""
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
        if n > MAX_SAFETENSORS_HEADER:
            raise ValueError(f"{path}: corrupt safetensors header: {n} bytes, over the format's limit of "
                             f"{MAX_SAFETENSORS_HEADER}")
        try:
            header = json.loads(f.read(n))
        except RecursionError:
            # deep nesting blows the parser's stack: a corrupt or hostile header, not a Python bug
            raise ValueError(f"{path}: corrupt safetensors header: JSON nested too deeply") from None
        except ValueError as e:
            raise ValueError(f"{path}: corrupt safetensors header: {e}") from e
    _check_header_entries(path, header)
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


# Config keys naming experts per token and routed experts, across MoE families.
# (Not "top_k": older configs use it for sampling.)
_TOPK_KEYS = ("num_experts_per_tok", "moe_top_k", "moe_k")
_NUM_EXPERTS_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def _check_config_sizes(config, where) -> None:
    """Refuse a config routing each token to more experts than a layer has (torch.topk would fail mid-capture)."""
    def first(keys):
        for key in keys:
            v = getattr(config, key, None)
            if isinstance(v, int) and not isinstance(v, bool):
                return key, v
        return None, None

    k_key, k = first(_TOPK_KEYS)
    e_key, E = first(_NUM_EXPERTS_KEYS)
    if k is not None and k < 1:
        raise ValueError(f"{where}: {k_key}={k}; expected >= 1 expert per token")
    if k is not None and E is not None and k > E:
        raise ValueError(f"{where}: {k_key}={k} is larger than {e_key}={E}; a token cannot be routed to more "
                         f"experts than a layer has")


def _load_config(d: Path, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(d), local_files_only=True, trust_remote_code=trust_remote_code)
    except RecursionError:
        raise ValueError(f"{d / 'config.json'}: cannot read the model config: JSON nested too deeply") from None
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{d / 'config.json'}: cannot read the model config: {e}") from e
    _check_config_sizes(config, d / "config.json")
    return config


# Models with separate encoder and decoder MoE stacks whose configs do not say
# is_encoder_decoder: DiffusionGemma's encoder reads the prompt (the token table),
# its decoder denoises a generated canvas the token table does not hold.
_ENCODER_READS_TOKENS = frozenset({"DiffusionGemmaForBlockDiffusion"})


def language_model(model):
    """The module whose routers are captured and which is run on the token table.

    - encoder-decoder models (Switch Transformers, DiffusionGemma): the encoder,
      which reads the token table as its input (decoder routing needs a target
      sequence, or a diffusion canvas, that the token table does not hold);
    - Qwen3-Omni-style composites with a ``thinker`` (text model) and a
      ``talker`` (speech model): the thinker;
    - everything else (causal LMs, vision-language models run on text): the model.
    """
    if (getattr(getattr(model, "config", None), "is_encoder_decoder", False)
            or type(model).__name__ in _ENCODER_READS_TOKENS) and hasattr(model, "get_encoder"):
        return model.get_encoder()
    thinker = getattr(model, "thinker", None)
    if isinstance(thinker, torch.nn.Module):
        return thinker
    return model


def describe_model(model, *, where: str = "model", dtype: str | None = None) -> ModelInfo:
    """ModelInfo of an instantiated model (real or meta device).

    Raises
    ------
    ValueError ``"{where}: no MoE router found"`` for a dense model.
    """
    family = str(getattr(model.config, "model_type", type(model).__name__))  # the checkpoint's, not the sub-model's
    model = language_model(model)
    sites = find_routers(model, where=where)
    E = {s.num_experts for s in sites}
    K = {s.top_k for s in sites}
    if len(E) != 1 or len(K) != 1:
        raise ValueError(f"{where}: routers disagree on experts/top-k: num_experts {sorted(E)}, top_k {sorted(K)}")
    if dtype is None:
        dtype = _dtype_name(next(iter(model.parameters())).dtype)
    semantics = describe_semantics(model, sites)
    claim = None
    if "not renormalised" in semantics:
        claim = False
    elif "renormalised" in semantics and "per_expert_scale" not in semantics:
        claim = True
    post = {s.post_scale for s in sites}
    return ModelInfo(
        family=family,
        moe_layers=[s.layer for s in sites],
        num_experts=E.pop(),
        top_k=K.pop(),
        router_semantics=semantics,
        shared_experts=count_shared_experts(model, sites),
        dtype=dtype,
        vocab_size=int(model.get_input_embeddings().num_embeddings),
        zero_experts=int(sites[0].zero_experts),
        post_expert_scale=post.pop() if len(post) == 1 else None,
        renormalised_claim=claim,
        capacity=capacity_info(model, sites),
    )


def _auto_class(config):
    """The class to instantiate: the one ``config.architectures`` names, else AutoModelForCausalLM.

    Composite and multimodal MoE checkpoints (Qwen3-VL-MoE, Qwen3-Omni, GLM-4V-MoE,
    Mistral-4, ...) name a ``...ForConditionalGeneration`` class that
    AutoModelForCausalLM does not map; ``language_model`` picks what is captured.
    """
    import transformers
    from transformers import AutoModelForCausalLM

    arch = None
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None) if isinstance(name, str) else None
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            arch = cls
            break
    if arch is None:
        return AutoModelForCausalLM  # remote code or no architectures: the auto class decides (trust_remote_code)
    try:
        mapped = AutoModelForCausalLM._model_mapping[type(config)]
    except (KeyError, ValueError):
        mapped = None
    # The auto class when it builds the very class the checkpoint names (plain causal LMs).
    return AutoModelForCausalLM if mapped is arch else arch


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
    cls = _auto_class(config)
    try:
        with torch.device("meta"):
            if cls is AutoModelForCausalLM:
                model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
            else:
                model = cls._from_config(config)
    except ValueError as e:
        raise ValueError(f"{d}: cannot build {getattr(cls, '__name__', 'a causal LM')} from config.json (model_type "
                         f"'{getattr(config, 'model_type', '?')}'): {e}") from e
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return describe_model(model, where=str(d), dtype=_dtype_name(declared))


def check_checkpoints(checkpoints, *, trust_remote_code: bool = False) -> list[ModelInfo]:
    """Check an experiment's checkpoints and that they share one routing architecture.

    Parameters
    ----------
    checkpoints : sequence of (name, model_dir) pairs, in the experiment's order.
    trust_remote_code : passed to transformers; only set it for code you trust.

    Returns
    -------
    list of ModelInfo, one per checkpoint (no weights are loaded; the weight files are checked).

    Raises
    ------
    OSError or ValueError naming the checkpoint (``checkpoint 'x': ...``) whose folder is
    missing or unsafe, and ValueError when the checkpoints differ in number of
    experts, top-k or MoE layers: an experiment compares checkpoints of one architecture.
    """
    infos = []
    for name, model_dir in checkpoints:
        try:
            check_checkpoint_dir(model_dir, need_weights=True)
        except (OSError, ValueError) as exc:
            raise type(exc)(f"checkpoint {name!r}: {exc}") from exc
        infos.append(describe_checkpoint(model_dir, trust_remote_code=trust_remote_code))
    shapes = {(m.num_experts, m.top_k, tuple(m.moe_layers)) for m in infos}
    if len(shapes) > 1:
        raise ValueError(f"checkpoints differ in experts/top-k/MoE layers {sorted(shapes)}; "
                         "an experiment compares checkpoints of one architecture")
    return infos


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


def device_problem(device) -> str:
    """What keeps this torch from using ``device`` ('' when nothing does).

    Known devices: cpu, cuda, cuda:N, mps. Asked before loading, so that a CPU-only
    torch answers "no CUDA" rather than an AssertionError from ``model.to``.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        return f"{device!r} is not a device torch knows (expected 'cpu', 'cuda', 'cuda:N' or 'mps')"
    if dev.type == "cpu":
        return ""
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "built without CUDA" if torch.version.cuda is None else "built for CUDA but sees no GPU"
            return f"{device!r} requested but this torch ({torch.__version__}, {build}) has no CUDA"
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            return f"{device!r} requested but this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})"
        return ""
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        return "" if mps is not None and mps.is_available() else f"{device!r} requested but this torch has no MPS"
    return f"{device!r} is not a supported device (expected 'cpu', 'cuda', 'cuda:N' or 'mps')"


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

    problem = device_problem(device)
    if problem:
        raise ValueError(f"{model_dir}: capture.device: {problem}")
    d = check_checkpoint_dir(model_dir, need_weights=True)
    config = _load_config(d, trust_remote_code)  # a readable error for a bad config.json
    cls = _auto_class(config)
    try:
        model, info = cls.from_pretrained(
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
