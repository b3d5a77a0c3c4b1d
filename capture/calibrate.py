"""Calibration activations for Wanda: ‖X_j‖₂ of every input feature of chosen linear layers.

One forward pass per calibration sample (unpadded, so padding never enters a norm)
with hooks that accumulate Σ_t x_tj² over the tokens t of the experiment's token
tables, then the square root. Components:

* a module-name suffix of an ``nn.Linear`` (``self_attn.q_proj``, ``mlp.down_proj``…):
  its inputs, all tokens;
* ``experts.gate_proj`` / ``experts.up_proj`` / ``experts.down_proj`` of routed experts:
  per expert, the tokens routed to it (a forward pre-hook on the ``experts`` module
  reads ``hidden_states, top_k_index``). For ``down_proj`` the expert's intermediate
  act(gate)·up is recomputed from the fused ``gate_up_proj`` (E, 2I, H) of the
  Mixtral/OLMoE/Qwen-MoE layout; another layout is refused by name.

:func:`input_norms` returns {(component, layer): float64 array (in_features,) or (expert,
in_features)}; :func:`input_grams` (SparseGPT's Hessian) the Gram matrices Σ_t x_t x_tᵀ,
(in_features, in_features) or (expert, in_features, in_features), from the same passes.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from torch import nn

__all__ = ["input_norms", "input_grams"]

_LAYER = re.compile(r"(?:^|\.)(?:layers|blocks|block|h)\.(\d+)\.")


def _layer_of(name: str) -> int | None:
    m = _LAYER.search(name + ".")
    return int(m.group(1)) if m else None


def input_norms(model, token_ids: list[np.ndarray], components: list[str], *, layers=None,
                where: str = "model") -> dict[tuple[str, int], np.ndarray]:
    """‖X_j‖₂ per input feature of each (component, layer), over the given samples (Wanda).

    Parameters and errors as :func:`input_grams`.
    """
    sums = _accumulate(model, token_ids, components, layers=layers, where=where, gram=False)
    return {k: np.sqrt(v) for k, v in sums.items()}


def input_grams(model, token_ids: list[np.ndarray], components: list[str], *, layers=None,
                where: str = "model") -> dict[tuple[str, int], np.ndarray]:
    """Gram matrix XᵀX of the inputs of each (component, layer), over the given samples (SparseGPT's Hessian).

    Parameters
    ----------
    model : a transformers causal LM in eval mode.
    token_ids : one int array of token ids per calibration sample.
    components : module-name suffixes, or ``experts.<gate_proj|up_proj|down_proj>``.
    layers : layer indices to calibrate (default: all).

    Raises ValueError naming the component when no module matches it, or when an experts
    layout cannot be calibrated.
    """
    return _accumulate(model, token_ids, components, layers=layers, where=where, gram=True)


def _accumulate(model, token_ids, components, *, layers, where, gram: bool) -> dict[tuple[str, int], np.ndarray]:
    """Σ_t x_tj² (gram False) or Σ_t x_t x_tᵀ (gram True) per (component, layer) [per expert], float64."""

    def stat(x: torch.Tensor) -> torch.Tensor:
        x = x.double()
        return x.T @ x if gram else (x**2).sum(0)

    wanted = None if layers is None else {int(x) for x in layers}
    sums: dict[tuple[str, int], torch.Tensor] = {}
    handles = []

    def add(key, value):
        sums[key] = sums[key] + value if key in sums else value

    for comp in components:
        found = False
        if comp.startswith("experts."):
            proj = comp.split(".", 1)[1]
            if proj not in ("gate_proj", "up_proj", "down_proj"):
                raise ValueError(f"component {comp!r}: experts components are experts.gate_proj/up_proj/down_proj")
            for name, mod in model.named_modules():
                layer = _layer_of(name)
                if not name.endswith(".experts") or layer is None or (wanted is not None and layer not in wanted):
                    continue
                gu = getattr(mod, "gate_up_proj", None)
                if not isinstance(gu, torch.Tensor) or gu.dim() != 3 or getattr(mod, "is_transposed", False) \
                        or not getattr(mod, "has_gate", True):
                    raise ValueError(f"{where}: {name} ({type(mod).__name__}): Wanda calibration of {comp} needs the "
                                     "fused (expert, 2·ffn, hidden) gate_up_proj layout; use method 'magnitude'")
                found = True

                def hook(module, args, kwargs, key=(comp, layer), proj=proj):
                    h = args[0] if args else kwargs["hidden_states"]
                    idx = args[1] if len(args) > 1 else kwargs["top_k_index"]
                    h = h.reshape(-1, h.shape[-1]).float()
                    idx = idx.reshape(h.shape[0], -1)
                    E = module.gate_up_proj.shape[0]
                    cols = h.shape[1] if proj != "down_proj" else module.gate_up_proj.shape[1] // 2
                    acc = torch.zeros((E, cols, cols) if gram else (E, cols), dtype=torch.float64)
                    for e in range(E):
                        x = h[(idx == e).any(-1)]
                        if len(x) == 0:
                            continue
                        if proj == "down_proj":
                            gate, up = nn.functional.linear(x, module.gate_up_proj[e].float()).chunk(2, dim=-1)
                            x = module.act_fn(gate) * up
                        acc[e] = stat(x)
                    add(key, acc)

                handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
        else:
            for name, mod in model.named_modules():
                layer = _layer_of(name)
                if not (isinstance(mod, nn.Linear) and (name == comp or name.endswith("." + comp))) or layer is None:
                    continue
                if wanted is not None and layer not in wanted:
                    continue
                found = True

                def hook(module, args, key=(comp, layer)):
                    add(key, stat(args[0].reshape(-1, args[0].shape[-1])))

                handles.append(mod.register_forward_pre_hook(hook))
        if not found:
            raise ValueError(f"{where}: no module matches component {comp!r}"
                             + (f" in layers {sorted(wanted)}" if wanted is not None else ""))
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            for ids in token_ids:
                if len(ids):
                    model(input_ids=torch.as_tensor(np.asarray(ids)[None], dtype=torch.long, device=device),
                          use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {k: v.cpu().numpy() for k, v in sums.items()}
