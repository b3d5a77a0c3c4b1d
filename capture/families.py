"""Every MoE family of the installed transformers, and tiny random models of them.

``moe_families()`` enumerates the modelling modules of ``transformers.models``
whose ``PreTrainedModel`` classes declare ``_can_record_outputs["router_logits"]``
(the mechanism behind ``output_router_logits``), so the list follows the
installed version instead of a hand-kept one. ``tiny_model(family)`` builds a
small random model of a family from its config class (2 decoder layers, 8
experts, hidden 32) so that capture can be checked on every family in CI
(``tests/test_families.py``).

Only ``moe_families`` is used at capture time (nowhere, in fact: ``find_routers``
reads the model it is given); the tiny builders are test and benchmark helpers
kept here so that the bench and the tests share one definition.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
from functools import lru_cache
from pathlib import Path

import torch

__all__ = ["moe_families", "tiny_config", "tiny_model", "TINY_SIZES", "OVERRIDES", "MAX_TINY_PARAMS"]

# Fields set on every (sub-)config that declares them. Sizes are the smallest
# that keep every family's own validators happy (heads x head_dim = hidden, ...).
TINY_SIZES: dict[str, object] = dict(
    hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=4, head_dim=8, vocab_size=100, max_position_embeddings=64, num_experts=8,
    num_local_experts=8, n_routed_experts=8, moe_num_experts=8, num_experts_per_tok=2, top_k=2, moe_top_k=2,
    top_k_experts=2,
    shared_expert_intermediate_size=16, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
    v_head_dim=8, first_k_dense_replace=0, n_group=2, topk_group=1, d_model=32, n_heads=4, n_layers=2,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
    # vision / audio towers of composite checkpoints (built, never run: capture is text-only)
    depth=1, num_heads=2, embed_dim=32, out_hidden_size=32, num_layers=2, projection_dim=32, patch_size=4,
    image_size=16, spatial_merge_size=1, temporal_patch_size=1,
    # encoder-decoder MoE (Switch Transformers, NLLB-MoE)
    d_ff=64, d_kv=8, num_decoder_layers=2, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=64,
    decoder_ffn_dim=64, encoder_attention_heads=4, decoder_attention_heads=4, expert_capacity=4,
)

# Per-family fields on top of TINY_SIZES (a family's own validators or layouts).
# Keys are family names; values map a dotted config path ("text_config.x" or "x") to a value.
OVERRIDES: dict[str, dict[str, object]] = {
    "beam": {"mlp_layer_types": ["dense", "sparse"]},
    "dbrx": {"attn_config": dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
             "ffn_config": dict(ffn_hidden_size=64, moe_num_experts=8, moe_top_k=2)},
    "deepseek_ocr2": {"text_config.mlp_layer_types": ["dense", "sparse"]},
    "doge": {"is_moe": True, "num_experts": 16, "num_experts_per_tok": 2},
    "dots1": {"n_shared_experts": 1},
    "flint": {"mlp_only_layers": [0]},
    "glm4v_moe": {"text_config.rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                  "mrope_section": [1, 1, 0], "partial_rotary_factor": 0.5}},
    "granitemoehybrid": {"mamba_n_heads": 4, "mamba_d_state": 8, "mamba_chunk_size": 8},
    "hy_v4_vl": {"text_config.rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                 "mrope_section": [2, 1, 1]}},
    "inkling2": {"vision_config.text_hidden_size": 32},
    "inkling2_loop": {"vision_config.text_hidden_size": 32},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 0},
    "zaya": {"num_experts_per_tok": 1},
    # scaling applied after the experts: a factor != 1 so that it shows
    "laguna": {"moe_routed_scaling_factor": 2.0},
    "gemma4": {"text_config.hidden_size_per_layer_input": 0, "text_config.enable_moe_block": True,
               "text_config.top_k_experts": 2},
    "kolibri1_1": {"head_dim": 16, "index_num_heads": 1, "mlp_only_layers": [0]},
    "ernie4_5_vl_moe": {"text_config.moe_intermediate_size": [16, 16],
                        "text_config.rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                        "mrope_section": [1, 1, 2]}},
    "inkling": {"vision_config.patch_size": 40, "vision_config.temporal_patch_size": 2,
                "vision_config.text_hidden_size": 32, "audio_config.text_hidden_size": 32},
    "mimo_v2_flash": {"num_key_value_heads": 2},
    "switch_transformers": {"num_sparse_encoder_layers": 2, "num_sparse_decoder_layers": 2, "router_jitter_noise": 0.0,
                            "expert_capacity": 2},
    "longcat_flash": {"ffn_hidden_size": 64, "expert_ffn_hidden_size": 16, "zero_expert_num": 4},
    "nllb_moe": {"encoder_sparse_step": 1, "decoder_sparse_step": 1},
    "dots3_note": {"audio_config.adapter_input_size": 32, "audio_config.adapter_out_dim": 32, "vision_config.pyramid_num_routed": [0, 0],
                   "vision_config.adapter_in_dim": 32, "vision_config.adapter_out_dim": 32,
                   "vision_config.adapter_merge_size": 1},
    # (attention that is not a linear-attention kernel: those run a slow reference implementation on CPU)
    "kimi_linear": {"layer_types": ["full_attention", "full_attention"]},
    "qwen3_next": {"layer_types": ["linear_attention", "full_attention"]},
    "qwen3_5_moe": {"text_config.layer_types": ["full_attention", "full_attention"]},
    "glm5_next": {"text_config.mlp_layer_types": ["dense", "sparse"],
                  "text_config.layer_types": ["indexed_attention", "indexed_attention"], "text_config.qk_rope_head_dim": 0, "text_config.index_head_dim": 8, "text_config.index_n_heads": 2,
                  "text_config.index_topk": 16},
    "llama4": {"vision_config.vision_output_dim": 32, "vision_config.projector_input_dim": 32,
               "vision_config.projector_output_dim": 32},
    "muse_spark": {"audio_config.num_hidden_layers": 4, "audio_config.hidden_sizes": [8, 8, 8, 8],
                   "audio_config.out_hidden_size": 32, "vision_adapter_hidden_size": 32, "projector_hidden_size": 32},
    "step3p7": {"text_config.mlp_layer_types": ["dense", "sparse"], "text_config.sliding_window": 8,
                "text_config.moe_router_scaling_factor": 2.0},
    "qwen3_omni_moe": {"talker_config.text_config.shared_expert_intermediate_size": 16,
                       "thinker_config.vision_start_token_id": 97, "thinker_config.audio_start_token_id": 96,
                       "code2wav_config.decoder_dim": 16, "code2wav_config.codebook_size": 16,
                       "talker_config.spatial_merge_size": 1},
}

# A tiny model larger than this means a sub-config kept a production size: refuse
# to allocate it (it would take GBs on the shared CI machine).
MAX_TINY_PARAMS = 12_000_000


def _models_dir() -> Path:
    import transformers.models

    return Path(transformers.models.__file__).parent


@lru_cache(maxsize=1)
def moe_families() -> dict[str, str]:
    """Families whose modelling code declares a ``router_logits`` recorder.

    Returns
    -------
    {family (the ``transformers.models`` sub-package name): modelling module name},
    sorted by family. A module that mentions ``router_logits`` but cannot be
    imported (missing optional dependency) is skipped; one that imports but
    declares no recorder is not a MoE family.
    """
    from transformers import PreTrainedModel

    out = {}
    for path in sorted(_models_dir().glob("*/modeling_*.py")):
        # A cheap text filter first: importing all ~560 modules takes ~30 s on 2 cores.
        if "router_logits" not in path.read_text(encoding="utf-8", errors="replace"):
            continue
        fam = path.parent.name
        name = f"transformers.models.{fam}.{path.stem}"
        try:
            mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - an optional dependency missing is not our concern here
            continue
        for obj in vars(mod).values():
            if (inspect.isclass(obj) and issubclass(obj, PreTrainedModel) and obj.__module__ == name
                    and "router_logits" in (obj.__dict__.get("_can_record_outputs") or {})):
                out[fam] = name
                break
    return dict(sorted(out.items()))


def _config_class(family: str):
    """The family's top-level config class (the one no other config of the package nests)."""
    mod = importlib.import_module(f"transformers.models.{family}.configuration_{family}")
    classes = [c for c in vars(mod).values() if inspect.isclass(c) and c.__module__ == mod.__name__
               and isinstance(getattr(c, "model_type", None), str) and c.model_type]
    nested = {id(sub) for c in classes for sub in (getattr(c, "sub_configs", None) or {}).values()}
    top = [c for c in classes if id(c) not in nested]
    top.sort(key=lambda c: (c.model_type.replace("-", "_") != family, not getattr(c, "sub_configs", None)))
    if not top:
        raise ValueError(f"family '{family}': no config class in {mod.__name__}")
    return top[0]


def _fields(cls) -> set[str]:
    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls)}
    return set(inspect.signature(cls.__init__).parameters)


def _tiny(cls, overrides: dict[str, object], depth: int = 0):
    from transformers import PreTrainedConfig

    names = _fields(cls)
    kw = {k: v for k, v in TINY_SIZES.items() if k in names}
    if depth < 3:
        try:
            # The default instance names the concrete class of each sub-config (some declare AutoConfig).
            default = cls()
        except Exception:  # noqa: BLE001 - a validator may reject the defaults: no sub-configs to shrink then
            default = None
        for key in sorted(names):
            try:
                sub = getattr(default, key, None)
            except Exception:  # noqa: BLE001 - per-layer attributes refuse a global read
                continue
            if isinstance(sub, PreTrainedConfig) and dataclasses.is_dataclass(type(sub)):
                sub_over = {k.split(".", 1)[1]: v for k, v in overrides.items() if k.startswith(key + ".")}
                kw[key] = _tiny(type(sub), sub_over, depth + 1)
    kw.update({k: v for k, v in overrides.items() if "." not in k})
    return cls(**kw)


def tiny_config(family: str):
    """A small config of ``family``: 2 layers, 8 experts (top-2), hidden 32, vocabulary 100."""
    return _tiny(_config_class(family), OVERRIDES.get(family, {}))


def _model_class(family: str, config):
    """The class the auto mappings give the family's config: a causal LM, or the composite (multimodal) model."""
    from transformers.models.auto import modeling_auto as ma

    mod = importlib.import_module(moe_families()[family])
    composite = any(hasattr(config, k) for k in ("text_config", "thinker_config", "language_config"))
    order = ["MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
             "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
             "MODEL_MAPPING_NAMES"]
    if composite:
        order = order[1:] + order[:1]
    for key in (config.model_type, family):
        for mapping in order:
            name = getattr(ma, mapping, {}).get(key)
            if isinstance(name, (tuple, list)):
                name = name[0]
            if name and hasattr(mod, name):
                return getattr(mod, name)
    raise ValueError(f"family '{family}': no model class for model_type '{config.model_type}' in the auto mappings")


def tiny_model(family: str, seed: int = 0):
    """A tiny random model of ``family`` in eval mode, on the CPU, float32.

    Routers are sharpened (weights x 20) so that slots get distinct weights and
    ties cannot hide a slot-order bug; selection biases are made large so that
    a capture that re-selected from logits would disagree with the model.

    Raises
    ------
    ValueError when the tiny model would exceed ``MAX_TINY_PARAMS`` (a sub-config
    kept a production size).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    config = tiny_config(family)
    cls = _model_class(family, config)
    with torch.device("meta"):
        n = sum(p.numel() for p in cls(config).parameters())
    if n > MAX_TINY_PARAMS:
        raise ValueError(f"family '{family}': tiny {cls.__name__} would have {n} parameters (> {MAX_TINY_PARAMS}); "
                         f"a sub-config keeps a production size, add it to capture.families.OVERRIDES")
    torch.manual_seed(seed)
    model = cls(config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith(("e_score_correction_bias", "expert_bias")) and buf.is_floating_point():
                buf.copy_(torch.randn(buf.shape, generator=g) * 2.0)
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 2)
            if len(leaf) == 3 and leaf[1] in ("gate", "router", "layer", "classifier") and leaf[2] == "weight" \
                    and ("gate" in name or "router" in name):
                p.mul_(20.0)
    return model
