"""Forward hooks on routers, registered in a context manager and always removed.

Usage::

    sites = find_routers(model, where=model_dir)
    with record_routing(model, sites, keep_logits=True) as rec:
        for batch in ...:
            model(**batch)
            per_layer = rec.pop()       # {layer: (ids, weights, logits)} on device

The hooks only keep references to (small) device tensors; nothing is copied to
the CPU here, so the caller can copy once per batch.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .routers import RouterSite, decode_router_output, find_routers, uncovered_moe_blocks

__all__ = ["HookRecorder", "RoutingRecorder", "record_routing"]


class HookRecorder:
    """Forward hooks that collect what each layer produced during one forward pass.

    Subclasses add their hooks to ``handles`` in ``install`` and read ``_out`` ({layer: [calls]}) in ``pop``.
    """

    def __init__(self, layers):
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self._out: dict[int, list] = {i: [] for i in layers}

    def install(self) -> None:
        raise NotImplementedError

    def remove(self) -> None:
        while self.handles:
            self.handles.pop().remove()

    def clear(self) -> None:
        for v in self._out.values():
            v.clear()

    @contextmanager
    def installed(self):
        """The hooks installed for the ``with`` block; removed (and what they kept forgotten) on exit, also on error."""
        try:
            self.install()
            yield self
        finally:
            self.remove()
            self.clear()


class RoutingRecorder(HookRecorder):
    """Collects what every router returned during one forward pass.

    Attributes
    ----------
    sites : the routers being recorded, sorted by layer.
    handles : the hook handles (removed by ``record_routing`` on exit).
    """

    def __init__(self, sites: list[RouterSite], *, keep_logits: bool,
                 uncovered: list[tuple[str, nn.Module]] | None = None):
        self.sites = sites
        self.uncovered = uncovered or []
        self.keep_logits = keep_logits
        super().__init__([s.layer for s in sites])
        self._experts_args: dict[int, list] = {s.layer: [] for s in sites}

    # -- hooks -------------------------------------------------------------
    def _router_hook(self, site: RouterSite):
        def hook(module, args, output):
            if site.adapter == "experts_inputs":
                # The experts run after the router returns: decode later, in pop().
                self._out[site.layer].append(output)
                return None
            ids, w, logits = decode_router_output(site, output)
            # clone: a block may modify the router's tensors in place afterwards.
            self._out[site.layer].append(
                (ids.clone(), w.detach().float().clone(), logits.detach().clone() if self.keep_logits else None)
            )
            return None

        return hook

    def _experts_hook(self, site: RouterSite):
        def hook(module, args, kwargs):
            # experts.forward(hidden_states, top_k_index, top_k_weights)
            vals = list(args[1:3])
            for key in ("top_k_index", "top_k_weights")[len(vals):]:
                if key not in kwargs:
                    raise ValueError(
                        f"experts module after router '{site.name}' was called without {key}; "
                        f"expected forward(hidden_states, top_k_index, top_k_weights)"
                    )
                vals.append(kwargs[key])
            self._experts_args[site.layer].append((vals[0].clone(), vals[1].detach().float().clone()))
            return None

        return hook

    @staticmethod
    def _tripwire(name: str, block: nn.Module):
        def hook(module, args):
            raise RuntimeError(
                f"MoE block '{name}' ({type(block).__name__}) ran its experts, but no router of it is captured "
                f"(its router class is neither in the model's _can_record_outputs['router_logits'] nor in "
                f"capture.routers.UNDECLARED_ROUTERS); refusing to write a capture with a missing MoE layer")

        return hook

    def install(self) -> None:
        for name, block in self.uncovered:
            self.handles.append(block.experts.register_forward_pre_hook(self._tripwire(name, block)))
        for s in self.sites:
            self.handles.append(s.module.register_forward_hook(self._router_hook(s)))
            if s.adapter == "experts_inputs":
                self.handles.append(s.experts.register_forward_pre_hook(self._experts_hook(s), with_kwargs=True))

    # -- results -----------------------------------------------------------
    def clear(self) -> None:
        super().clear()
        for v in self._experts_args.values():
            v.clear()

    def pop(self) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """What each router produced since the last ``pop``; then forget it.

        Returns
        -------
        {layer: (ids (n, k) int, weights (n, k) float32, logits (n, E) or None)}
        with n = batch * sequence (the router's flattened tokens), slots in the
        router's order.

        Raises
        ------
        RuntimeError if a router ran zero or several times (the caller must run
        exactly one forward between pops).
        """
        res = {}
        try:
            for s in self.sites:
                calls = self._out[s.layer]
                if len(calls) != 1:
                    raise RuntimeError(
                        f"router {s.class_name} at '{s.name}' (layer {s.layer}) ran {len(calls)} times in one forward, expected 1"
                    )
                if s.adapter == "experts_inputs":
                    ex = self._experts_args[s.layer]
                    if len(ex) != 1:
                        raise RuntimeError(f"experts module after router '{s.name}' ran {len(ex)} times, expected 1")
                    ids, w, logits = decode_router_output(s, calls[0], ex[0])
                    calls[0] = (ids, w, logits.detach().clone() if self.keep_logits else None)
                res[s.layer] = calls[0]
        finally:
            self.clear()
        return res


@contextmanager
def record_routing(model: nn.Module, sites: list[RouterSite] | None = None, *, keep_logits: bool = False,
                   where: str = "model"):
    """Register router hooks for the duration of the ``with`` block.

    Parameters
    ----------
    model : the model (only used to find routers when ``sites`` is None).
    sites : routers to hook; default ``find_routers(model)``.
    keep_logits : also keep each router's (n, E) logits.
    where : name for error messages.

    Yields
    ------
    RoutingRecorder. Its hooks are removed when the block exits, also on exception.
    """
    if sites is None:
        sites = find_routers(model, where=where)
    with RoutingRecorder(sites, keep_logits=keep_logits, uncovered=uncovered_moe_blocks(model, sites)).installed() as rec:
        yield rec
