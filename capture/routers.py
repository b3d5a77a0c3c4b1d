"""Find the routers of a transformers model and decode what they return.

transformers lists the router classes of a model in
``_can_record_outputs["router_logits"]`` (the mechanism behind
``output_router_logits=True``). We walk ``model.named_modules()`` for instances
of those classes, map each to the decoder layer that owns it, and pick an
*adapter* that turns the router's return value into

    ids      (n, k) int      the experts the tokens are sent to
    weights  (n, k) float    the weights those experts' outputs are multiplied by
    logits   (n, E) float    the raw router scores over all experts

Top-k is never recomputed from logits: selection biases (DeepSeek-V3's
``e_score_correction_bias``), group limits, p-norms and sparsemixer make that
wrong. The adapter reads the selection the model itself made.

Adapters (read from ``transformers/models/*/modeling_*.py``, v5):

``triple``
    ``(router_logits, top_k_weights, top_k_index)``: Mixtral, OLMoE, Qwen2/3-MoE,
    DeepSeek-V2/V3, GLM-4-MoE, GPT-OSS, Granite-MoE, Jamba, PhiMoE, ERNIE-4.5,
    MiniMax, Hunyuan, ... (most families). The weights are what the MoE block
    hands to its experts module unchanged (block forwards checked).
``triple_plus``
    the same three first, then extra outputs the block uses elsewhere (Inkling).
``probs_triple``
    ``(router_probabilities, top_k_weights, top_k_index)`` (Gemma-4): the first
    element is a softmax, not logits; we record its log, which is the logits up
    to a per-token constant (same softmax).
``dense_sigmoid``
    Llama-4: ``(router_scores, router_logits)`` where ``router_scores`` is (n, E),
    sigmoid of the selected logits and exactly 0 elsewhere; the scores scale the
    experts' *input*. The selected ids are the non-zero columns of the scores the
    model produced (read off, not re-selected from logits).
``capacity_top1``
    Switch Transformers: ``(dispatch_mask, router_probs, router_logits)``; the
    dispatch mask is one-hot (tokens, E) with the rows of tokens dropped by
    expert capacity zeroed, ``router_probs`` (tokens, 1) the top-1 probability.
    The id is the router's own choice (argmax of its softmax, as the router
    computes it); the weight is that probability where the token was
    dispatched and exactly 0 where capacity dropped it (no expert ran: the
    layer passes the token through its residual only). Capture records the
    drops in ``capacity_dropped``.
``experts_inputs``
    DBRX: the router returns logits only and the block selects in
    ``route_tokens_to_experts``; ids and weights are read from a forward
    pre-hook on the sibling ``experts`` module, i.e. literally what it received.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = [
    "RouterSite",
    "find_routers",
    "router_specs",
    "decode_router_output",
    "describe_semantics",
    "capacity_info",
    "uncovered_moe_blocks",
    "count_shared_experts",
    "sort_slots",
    "ADAPTERS",
    "UNSUPPORTED",
]

# Router classes whose return value is not the common triple. Keyed by class
# name so that no model module needs importing here.
ADAPTERS: dict[str, str] = {
    "Llama4Router": "dense_sigmoid",
    "DbrxRouter": "experts_inputs",
    "Gemma4TextRouter": "probs_triple",
    "DiffusionGemmaTextRouter": "probs_triple",
    "InklingTopkRouter": "triple_plus",
    "SwitchTransformersTop1Router": "capacity_top1",
}

# Routers we have read and know we cannot decode faithfully with a hook.
UNSUPPORTED: dict[str, str] = {
    "NllbMoeTop2Router": ("NLLB-MoE: in this transformers version NllbMoeExperts dispatches on the VALUES of the "
                          "router's 0/1 top-1 mask (one_hot(router_mask)), so only experts 0 and 1 ever run, whatever "
                          "the router chose; no per-token expert ids would describe what the experts receive"),
    "JetMoeTopKGating": "routing returned as sorted expert batches, not per-token top-k",
    "JetMoeAttention": "mixture-of-attention-heads router; not a per-token expert FFN choice",
    "DogeCDMoE": "the recorded module is the whole MoE block (output index 1 = logits only, product-key routing)",
    "Ernie4_5_VLMoeMoeBlock": "the recorded module is the whole multimodal MoE block (logits only)",
    "ZayaRouter": "router returns probabilities plus recurrent router state; weights are not per-token top-k",
}

# Router classes that run in MoE blocks but that the model does not list in
# ``_can_record_outputs["router_logits"]``: without them those layers would be
# silently missing from the capture. Class name -> adapter.
UNDECLARED_ROUTERS: dict[str, str] = {
    # DeepSeek-V4's hash-routed layers: ids = tid2eid[input_ids] (a frozen table), weights from the learned
    # gate's scores of those ids; returns the common (logits, weights, ids) triple.
    "DeepseekV4HashRouter": "triple",
}

# Child names under which MoE blocks keep their router.
_ROUTER_CHILD_NAMES = ("gate", "router", "gating", "mlp_router", "moe_gate")

_KNOWN_ADAPTERS = ("triple", "triple_plus", "probs_triple", "dense_sigmoid", "experts_inputs", "capacity_top1")


@dataclass
class RouterSite:
    """One router of a model.

    Attributes
    ----------
    name : dotted module name inside the model.
    module : the router module (hooks go here).
    layer : the model's own decoder-layer index.
    adapter : one of ``triple``, ``triple_plus``, ``probs_triple``, ``dense_sigmoid``,
        ``experts_inputs``.
    logits_index : position of the logits in the router's output tuple (from the
        ``OutputRecorder``).
    num_experts, top_k : as read from the router / MoE block / config.
    experts : the sibling experts module (only for ``experts_inputs``).
    zero_experts : trailing expert ids that are "zero-computation" identity experts
        (LongcatFlash): ids ``num_experts - zero_experts .. num_experts - 1`` pass the
        token through unchanged, scaled by their weight; included in ``num_experts``.
    post_scale : a factor the MoE block multiplies the experts' summed output by
        *after* the experts ran (Beam, Step3p7, Laguna); not part of the weights.
        None when the block applies none (a factor inside the router, e.g.
        DeepSeek-V3's ``routed_scaling_factor``, is already in the weights).
    """

    name: str
    module: nn.Module
    layer: int
    adapter: str
    logits_index: int
    num_experts: int
    top_k: int
    experts: nn.Module | None = field(default=None, repr=False)
    zero_experts: int = 0
    post_scale: float | None = None

    @property
    def class_name(self) -> str:
        return type(self.module).__name__


@dataclass(frozen=True)
class _Spec:
    target_class: type | None
    class_name: str | None
    index: int
    layer_name: str | None

    def matches(self, name: str, module: nn.Module) -> bool:
        ok = (self.target_class is not None and isinstance(module, self.target_class)) or (
            self.class_name is not None and name.endswith(self.class_name)
        )
        if ok and self.layer_name is not None:
            # Same rule as transformers.utils.output_capturing: ".layer_name." in ".name."
            ok = "." + self.layer_name.strip(".") + "." in "." + name + "."
        return ok


def _specs(value, default_index: int) -> list[_Spec]:
    from transformers.utils.output_capturing import OutputRecorder

    out = []
    for v in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(v, OutputRecorder):
            out.append(_Spec(v.target_class, v.class_name, int(v.index), v.layer_name))
        elif isinstance(v, str):
            out.append(_Spec(None, v, default_index, None))
        elif isinstance(v, type):
            out.append(_Spec(v, None, default_index, None))
    return out


def router_specs(model: nn.Module) -> tuple[list[tuple[str, _Spec]], list[tuple[str, _Spec]]]:
    """The router and decoder-layer recorder specs of ``model`` and its sub-models.

    Composite models (e.g. ``Llama4ForCausalLM`` wrapping ``Llama4TextModel``)
    declare ``_can_record_outputs`` on the inner ``PreTrainedModel``; each spec
    applies to the modules under the sub-model that declared it.

    Returns
    -------
    (routers, layers): lists of ``(prefix, spec)``; ``prefix`` is the declaring
    sub-model's module name ('' for the root).
    """
    from transformers import PreTrainedModel

    routers, layers = [], []
    for prefix, sub in model.named_modules():
        if not isinstance(sub, PreTrainedModel):
            continue
        rec = getattr(type(sub), "_can_record_outputs", None) or {}
        # transformers' own default: index 0 for hidden_states keys, 1 otherwise.
        routers += [(prefix, s) for s in _specs(rec.get("router_logits", []), 1)]
        layers += [(prefix, s) for s in _specs(rec.get("hidden_states", []), 0)]
    return routers, layers


def _under(prefix: str, name: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def _layer_index(name: str, layer_names: dict[str, int], where: str) -> int:
    """Decoder-layer index owning module ``name``.

    Prefer the decoder-layer modules the model declares (``hidden_states``
    recorder); fall back to the first ``<list>.<int>`` segment of the dotted name
    (``model.layers.3.mlp.gate`` -> 3), which is where every decoder stack in
    transformers keeps its layers.
    """
    best = None
    for lname, idx in layer_names.items():
        if name.startswith(lname + ".") and (best is None or len(lname) > len(best[0])):
            best = (lname, idx)
    if best is not None:
        return best[1]
    for part in name.split("."):
        if re.fullmatch(r"\d+", part):
            return int(part)
    raise ValueError(f"{where}: cannot tell which decoder layer owns router '{name}'")


def _parent(model: nn.Module, name: str) -> nn.Module | None:
    if "." not in name:
        return model if name else None
    return model.get_submodule(name.rsplit(".", 1)[0])


def _first_int_attr(objs, names) -> int | None:
    for obj in objs:
        if obj is None:
            continue
        for n in names:
            v = getattr(obj, n, None)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return None


_E_NAMES = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_K_NAMES = ("top_k", "num_experts_per_tok", "moe_top_k", "top_k_experts", "num_selected_experts")


def _config_chain(config):
    """The config and the sub-configs that may carry MoE fields."""
    out = [config]
    for sub in ("text_config", "ffn_config", "language_config", "thinker_config"):
        c = getattr(config, sub, None)
        if c is not None:
            out.append(c)
    return out


def find_routers(model: nn.Module, *, where: str = "model") -> list[RouterSite]:
    """All routers of ``model``, sorted by layer.

    Parameters
    ----------
    model : a transformers ``PreTrainedModel`` (may live on the meta device).
    where : what to name in error messages (the checkpoint dir).

    Raises
    ------
    ValueError
        ``"no MoE router found"`` when the model declares or holds no router;
        a router class known to be undecodable; two routers on one layer.
    """
    router_spec, layer_spec = router_specs(model)
    modules = list(model.named_modules())
    layer_names: dict[str, int] = {}
    for prefix, spec in layer_spec:
        for name, mod in modules:
            if _under(prefix, name) and spec.matches(name, mod):
                m = re.search(r"(\d+)$", name)
                if m:
                    layer_names[name] = int(m.group(1))

    sites: list[RouterSite] = []
    seen: set[int] = set()
    config = getattr(model, "config", None)
    for prefix, spec in router_spec:
        for name, mod in modules:
            if id(mod) in seen or not _under(prefix, name) or not spec.matches(name, mod):
                continue
            seen.add(id(mod))
            sites.append(_make_site(model, name, mod, ADAPTERS.get(type(mod).__name__, "triple"), spec.index,
                                    layer_names, config, where))
    sites += _undeclared_sites(model, modules, sites, seen, layer_names, config, where)
    if not sites and _uncovered_blocks(modules, sites):
        blocks = [f"{n} ({type(m).__name__})" for n, m in _uncovered_blocks(modules, sites)]
        raise ValueError(f"{where}: MoE blocks hold experts but none has a router the capture can read "
                         f"(not in _can_record_outputs['router_logits'] nor capture.routers.UNDECLARED_ROUTERS): "
                         f"{blocks[:3]}{' ...' if len(blocks) > 3 else ''}")
    if not sites:
        raise ValueError(f"{where}: no MoE router found (model class {type(model).__name__} declares no router "
                         f"in _can_record_outputs['router_logits'] or holds no instance of it)")
    sites.sort(key=lambda s: s.layer)
    layers = [s.layer for s in sites]
    if len(set(layers)) != len(layers):
        dup = sorted({l for l in layers if layers.count(l) > 1})
        names = [s.name for s in sites if s.layer in dup]
        raise ValueError(f"{where}: several routers map to decoder layer(s) {dup}: {names}")
    for s in sites:
        if s.adapter not in _KNOWN_ADAPTERS:  # a typo in ADAPTERS must not pass silently
            raise ValueError(f"{where}: unknown adapter '{s.adapter}' for {s.class_name}")
    return sites


def _make_site(model, name, mod, adapter, index, layer_names, config, where) -> RouterSite:
    cls = type(mod).__name__
    if cls in UNSUPPORTED:
        raise ValueError(f"{where}: router class {cls} at '{name}' is not supported: {UNSUPPORTED[cls]}")
    parent = _parent(model, name)
    own_cfg = [getattr(m, "config", None) for m in (mod, parent)]
    E = _first_int_attr([mod, parent, *own_cfg], _E_NAMES)
    if E is None:
        w = getattr(mod, "weight", None)
        E = int(w.shape[0]) if isinstance(w, torch.Tensor) and w.ndim == 2 else None
    E = E or _first_int_attr(_config_chain(config), _E_NAMES)
    K = _first_int_attr([mod, parent, *own_cfg], _K_NAMES) or _first_int_attr(_config_chain(config), _K_NAMES)
    if adapter == "capacity_top1":
        K = 1
    if E is None or K is None:
        raise ValueError(f"{where}: cannot read the number of experts / top-k of router '{name}' ({cls})")
    # LongcatFlash: Z "zero-computation" experts follow the E real ones in the router's
    # logits and ids; the block adds weight x token for them instead of running an expert.
    zero = getattr(parent, "zero_expert_num", 0) or 0
    if isinstance(zero, int) and zero > 0:
        E = int(getattr(parent, "num_routed_experts", E)) + zero
    experts = None
    if adapter == "experts_inputs":
        experts = getattr(parent, "experts", None)
        if not isinstance(experts, nn.Module):
            raise ValueError(f"{where}: router '{name}' ({cls}) has no sibling 'experts' module to read the selection from")
    # A scaling factor held by the block but not by the router is applied after the
    # experts (the router's own factor is inside the weights it returns).
    post = None
    f = getattr(parent, "routed_scaling_factor", None)
    if isinstance(f, (int, float)) and not isinstance(f, bool) and not hasattr(mod, "routed_scaling_factor") and f != 1:
        post = float(f)
    return RouterSite(name, mod, _layer_index(name, layer_names, where), adapter, index, int(E), int(K), experts,
                      int(zero) if isinstance(zero, int) else 0, post)


def _holds_experts(mod: nn.Module) -> bool:
    ex = getattr(mod, "experts", None)
    return isinstance(ex, nn.Module) and ex is not mod


def _uncovered_blocks(modules, sites) -> list[tuple[str, nn.Module]]:
    # By identity, not by name: sites may be named relative to a sub-model (an encoder, a thinker).
    covered = {id(s.module) for s in sites}
    return [(name, mod) for name, mod in modules
            if name and _holds_experts(mod) and not any(id(m) in covered for m in mod.modules())]


def _undeclared_sites(model, modules, sites, seen, layer_names, config, where) -> list[RouterSite]:
    """Sites for MoE blocks no declared router covers, whose router class we know (``UNDECLARED_ROUTERS``).

    A MoE block is a module holding an ``experts`` child. Blocks still uncovered
    afterwards are returned by ``uncovered_moe_blocks``; ``capture.hooks`` arms a
    tripwire on their experts, so a capture fails loudly if one of them runs.
    """
    extra = []
    for name, mod in _uncovered_blocks(modules, sites):
        for child in _ROUTER_CHILD_NAMES:
            router = getattr(mod, child, None)
            if isinstance(router, nn.Module) and type(router).__name__ in UNDECLARED_ROUTERS:
                seen.add(id(router))
                extra.append(_make_site(model, f"{name}.{child}", router, UNDECLARED_ROUTERS[type(router).__name__],
                                        0, layer_names, config, where))
                break
    return extra


def uncovered_moe_blocks(model: nn.Module, sites: list[RouterSite]) -> list[tuple[str, nn.Module]]:
    """MoE blocks of ``model`` (modules holding an ``experts`` child) that contain no router site.

    Vision or audio towers of multimodal checkpoints may hold such blocks and
    never run on text; a text block in this list would be a layer missing from
    the capture. ``capture.hooks.record_routing`` makes any of them that runs an error.

    Returns
    -------
    [(dotted name, block module)]
    """
    return _uncovered_blocks(list(model.named_modules()), sites)

def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"Tensor{tuple(x.shape)} {str(x.dtype).replace('torch.', '')}"
    if isinstance(x, (tuple, list)):
        return f"{type(x).__name__}(" + ", ".join(_describe(v) for v in x) + ")"
    return type(x).__name__


def decode_router_output(site: RouterSite, output, experts_args=None):
    """Turn one router call's return value into (ids, weights, logits).

    Parameters
    ----------
    site : the router.
    output : what the router's ``forward`` returned.
    experts_args : ``(top_k_index, top_k_weights)`` seen by the sibling experts
        module (``experts_inputs`` adapter only).

    Returns
    -------
    ids : (n, k) integer tensor, weights : (n, k) float tensor, logits : (n, E)
    float tensor, on the model's device, in the router's slot order.

    Raises
    ------
    ValueError naming the router class when the return value has an unexpected form.
    """
    def bad(msg):
        return ValueError(
            f"router {site.class_name} at '{site.name}' (adapter '{site.adapter}') returned {_describe(output)}: {msg}. "
            f"Add an adapter for this router family in capture/routers.py"
        )

    a = site.adapter
    if a in ("triple", "triple_plus", "probs_triple"):
        if not isinstance(output, (tuple, list)) or (len(output) != 3 if a != "triple_plus" else len(output) < 3):
            raise bad("expected a tuple (logits, top_k_weights, top_k_index)")
        logits, weights, ids = output[0], output[1], output[2]
        if a == "probs_triple":
            logits = torch.log(logits.float())
    elif a == "dense_sigmoid":
        if not isinstance(output, (tuple, list)) or len(output) != 2:
            raise bad("expected a tuple (router_scores, router_logits)")
        scores, logits = output
        if not (isinstance(scores, torch.Tensor) and scores.ndim == 2):
            raise bad("router_scores must be (tokens, experts)")
        # The model zeroes (sigmoid(-inf)) every expert it did not select, so the
        # k non-zero columns are its own selection; ties among zeros cannot win.
        weights, ids = torch.topk(scores, site.top_k, dim=-1)
        if bool((weights <= 0).any()):
            raise bad(f"fewer than top_k={site.top_k} non-zero scores for some token")
    elif a == "capacity_top1":
        if not isinstance(output, (tuple, list)) or len(output) != 3:
            raise bad("expected a tuple (dispatch_mask, router_probs, router_logits)")
        dispatch, probs, logits = output
        if not all(isinstance(t, torch.Tensor) for t in output):
            raise bad("dispatch_mask, router_probs and router_logits must be tensors")
        dispatch = dispatch.reshape(-1, dispatch.shape[-1])
        logits = logits.reshape(-1, logits.shape[-1])
        # The router's own rule: argmax of softmax(logits) in float32 (its router_dtype).
        ids = torch.softmax(logits.float(), dim=-1).argmax(dim=-1, keepdim=True)
        sent = dispatch.sum(dim=-1, keepdim=True) > 0
        if bool((sent & (dispatch.gather(1, ids) == 0)).any()):
            raise bad("the dispatch mask sends a token to an expert other than the router's top-1")
        weights = torch.where(sent, probs.reshape(-1, 1).float(), torch.zeros((), dtype=torch.float32,
                                                                                device=logits.device))
    elif a == "experts_inputs":
        logits = output[site.logits_index] if isinstance(output, (tuple, list)) else output
        if experts_args is None:
            raise bad("the experts module did not run after the router")
        ids, weights = experts_args
    else:  # pragma: no cover - find_routers validates adapters
        raise bad("unknown adapter")

    for nm, t in (("logits", logits), ("weights", weights), ("ids", ids)):
        if not isinstance(t, torch.Tensor):
            raise bad(f"{nm} is not a tensor")
    logits = logits.reshape(-1, logits.shape[-1])
    ids = ids.reshape(-1, ids.shape[-1])
    weights = weights.reshape(-1, weights.shape[-1])
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise bad("top_k_index is not an integer tensor")
    if not weights.dtype.is_floating_point:
        raise bad("top_k_weights is not a float tensor")
    if ids.shape != weights.shape or logits.shape[0] != ids.shape[0]:
        raise bad(f"shapes disagree: ids {tuple(ids.shape)}, weights {tuple(weights.shape)}, logits {tuple(logits.shape)}")
    if logits.shape[1] != site.num_experts:
        raise bad(f"logits have {logits.shape[1]} columns, expected num_experts={site.num_experts}")
    return ids, weights, logits


def sort_slots(ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Order the k slots of every token by weight, largest first (stable).

    Parameters
    ----------
    ids, weights : (..., k)

    Returns
    -------
    ids, weights : (..., k), slot 0 = top-1.
    """
    w, order = torch.sort(weights, dim=-1, descending=True, stable=True)
    return torch.gather(ids, -1, order), w


def capacity_info(model: nn.Module, sites: list[RouterSite]) -> dict | None:
    """Capacity-limited routing facts (Switch Transformers), None for other routers.

    Returns
    -------
    {"expert_capacity": int, "scope": ..., "stack": "encoder", "decoder": ...}
    """
    cap = [s for s in sites if s.adapter == "capacity_top1"]
    if not cap:
        return None
    return {
        "expert_capacity": int(getattr(cap[0].module, "expert_capacity", -1)),
        "scope": "per sequence: tokens are served in position order until an expert has taken expert_capacity "
                 "tokens of that sequence; later tokens for that expert are dropped (weight 0, "
                 "capacity_dropped = 1) and pass through the layer's residual only",
        "stack": "encoder",
        "decoder": "not captured: the token table is the encoder input; decoder routing depends on a target "
                   "sequence the token table does not have",
    }


# --------------------------------------------------------------------------- semantics

_SHARED_NAMES = ("n_shared_experts", "num_shared_experts", "shared_experts", "num_shared_expert", "moe_num_shared_experts")


def count_shared_experts(model: nn.Module, sites: list[RouterSite]) -> int:
    """Number of always-active shared experts per MoE layer (0 when none).

    From the config where it counts them (``n_shared_experts``, ...); otherwise 1
    when the MoE block holds a ``shared_expert(s)`` module (Qwen2-MoE, Llama-4 keep
    one fused shared MLP sized by ``shared_expert_intermediate_size``).
    """
    for cfg in _config_chain(getattr(model, "config", None)):
        v = _first_int_attr([cfg], _SHARED_NAMES)
        if v:
            return v
    for s in sites:
        parent = _parent(model, s.name)
        if parent is not None and any(isinstance(getattr(parent, n, None), nn.Module) for n in ("shared_expert", "shared_experts", "shared_mlp")):
            return 1
    return 0


def _cfg(config, name, default=None):
    for c in _config_chain(config):
        if hasattr(c, name):
            return getattr(c, name)
    return default


def describe_semantics(model: nn.Module, sites: list[RouterSite]) -> str:
    """A human-readable statement of how the router turns logits into weights.

    Written per family from the transformers v5 source; families not catalogued
    say so and list the routing knobs their config carries.
    """
    config = model.config
    fam = getattr(config, "model_type", "?")
    E, K = sites[0].num_experts, sites[0].top_k
    g = lambda n, d=None: _cfg(config, n, d)  # noqa: E731
    norm = g("norm_topk_prob")
    renorm = "renormalised to sum 1" if norm else "not renormalised (weights are full-softmax probabilities)"
    scale = g("routed_scaling_factor")
    scale_s = f" x routed_scaling_factor={scale}" if scale not in (None, 1, 1.0) else ""

    if fam in ("qwen3_vl_moe", "qwen3_vl_moe_text", "qwen3_5_moe", "qwen3_5_moe_text"):
        # Their routers renormalise unconditionally; the configs carry no norm_topk_prob.
        s = f"softmax over {E} experts -> top-{K} -> renormalised to sum 1 (always: the config has no norm_topk_prob)"
        if g("shared_expert_intermediate_size"):
            s += "; shared expert output gated by sigmoid(shared_expert_gate)"
    elif fam in ("mixtral", "minimax", "hunyuan_v1_moe"):
        s = f"softmax over {E} experts -> top-{K} -> renormalised to sum 1"
    elif fam in ("olmoe", "flex_olmo", "qwen2_moe", "qwen3_moe", "qwen3_next"):
        s = f"softmax over {E} experts -> top-{K} -> {renorm} (norm_topk_prob={bool(norm)})"
        if g("shared_expert_intermediate_size"):
            s += "; shared expert output gated by sigmoid(shared_expert_gate)"
    elif fam == "jamba":
        s = f"softmax over {E} experts -> top-{K}, not renormalised"
    elif fam in ("granitemoe", "granitemoeshared", "granitemoehybrid", "gpt_oss"):
        s = f"top-{K} of raw logits over {E} experts -> softmax over the {K} selected logits"
        if fam == "gpt_oss":
            s += " (router has a bias)"
    elif fam == "deepseek_v2":
        method = g("topk_method", "greedy")
        s = f"softmax over {E} experts -> top-{K} ({method}"
        if method == "group_limited_greedy":
            s += f": {g('n_group')} groups ranked by max prob, keep topk_group={g('topk_group')}"
        s += f") -> not renormalised{scale_s}"
    elif fam in ("deepseek_v3", "glm4_moe", "glm4_moe_lite"):
        s = (f"sigmoid scores over {E} experts; selection on scores + e_score_correction_bias (bias affects selection "
             f"only), group-limited: {g('n_group')} groups ranked by sum of top-2 biased scores, keep topk_group="
             f"{g('topk_group')} -> top-{K}; weights = unbiased sigmoid scores of the selected experts, "
             f"{'renormalised to sum 1' if norm else 'not renormalised'} (norm_topk_prob={bool(norm)}){scale_s}")
    elif fam == "lfm2_moe":
        s = (f"sigmoid scores over {E} experts; selection on scores"
             f"{' + expert_bias (selection only)' if g('use_expert_bias') else ''} -> top-{K}; weights = sigmoid scores, "
             f"{'renormalised' if norm else 'not renormalised'}{scale_s}")
    elif fam == "ernie4_5_moe":
        s = (f"softmax over {E} experts; selection on probs corrected by moe_statics bias -> top-{K}; weights = "
             f"uncorrected probs of the selected, renormalised (clamped at norm_min)")
    elif fam == "phimoe":
        s = f"sparsemixer over {E} experts (top-{K} by masked softmax of logits, jitter threshold {g('router_jitter_noise')})"
    elif fam in ("llama4", "llama4_text"):
        s = (f"top-{K} of raw logits over {E} experts; weight = sigmoid(logit) of the selected, not renormalised; "
             f"weights scale the experts' INPUT, not their output")
    elif fam == "dbrx":
        p = g("moe_normalize_expert_weights")
        s = f"softmax over {E} experts -> top-{K} -> " + (f"divided by the L{p} norm of the top-{K}" if p else "not renormalised")
    elif fam == "switch_transformers":
        s = (f"softmax over {E} experts -> top-1 (argmax); weight = its probability, not renormalised; capacity "
             f"{sites[0].module.expert_capacity} tokens per expert per sequence in position order, tokens beyond it "
             f"dropped (weight 0, capacity_dropped=1); encoder layers only")
    elif fam in ("gemma4", "gemma4_text"):
        s = (f"softmax over {E} experts -> top-{K} -> renormalised -> x per_expert_scale[expert]; "
             f"router_logits holds log-probabilities (the router returns probabilities)")
    else:
        knobs = {n: g(n) for n in ("scoring_func", "norm_topk_prob", "routed_scaling_factor", "n_group", "topk_group",
                                   "topk_method", "moe_router_activation") if g(n) is not None}
        biased = any("bias" in n for s_ in sites for n, _ in s_.module.named_buffers()) or any(
            "bias" in n for s_ in sites for n, _ in s_.module.named_parameters() if n != "weight")
        s = (f"family '{fam}' (router {sites[0].class_name}) not catalogued: {E} experts, top-{K}, semantics NOT verified; "
             f"config knobs {knobs}" + ("; router carries a bias/correction tensor" if biased else ""))
    post = {st.post_scale for st in sites}
    if post != {None}:
        s += (f"; the MoE block multiplies the experts' summed output by {sorted(p for p in post if p)} AFTER the "
              f"experts (routed_scaling_factor on the block, not in expert_weights)")
    zero = sites[0].zero_experts
    if zero:
        s += (f"; experts {E - zero}..{E - 1} are {zero} zero-computation (identity) experts: a slot on one adds "
              f"weight x the token's input, no FFN runs")
    shared = count_shared_experts(model, sites)
    if shared:
        s += f"; {shared} shared expert(s) always active (not in expert_ids)"
    return s
