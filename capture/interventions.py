"""Interventions on routed experts: masks applied with hooks that are always removed.

Two kinds of mask (``MaskSet.kind``):

``router``
    The masked experts' *selection score* is set to −inf before top-k, so the
    tokens re-route to the best unmasked experts. Done without rewriting any
    router: while a masked router runs, a ``TorchFunctionMode`` sets them to
    −inf in every ``topk`` input over the experts (also the (…, groups,
    experts/group) view of group-limited routers). Only the selection changes:
    the weights are computed as the router computes them (a renormalised
    router's weights equal those of a router that only has the unmasked
    experts; a NON-renormalised softmax router (OLMoE) keeps full-softmax
    probabilities, whose denominator still includes the masked experts). For
    sigmoid routers with a selection bias (DeepSeek-V3
    ``e_score_correction_bias``) the biased selection score is masked; the
    weights stay the unbiased scores of the selected experts. Routers that
    select without a top-k (Switch's argmax; DBRX, whose block selects after
    the router) get the masked columns of their (…, num_experts) projection
    set to −inf instead (their softmax gives those experts 0). Masking an
    expert no token selects is therefore bit-exact a no-op. After every masked call the router's own selection is
    read back (``capture.routers.decode_router_output``, no top-k recomputed)
    and a selection of a masked expert is an error naming the router class: a
    family the mask cannot reach is refused, never silently unmasked.
``output``
    Routing is kept (same ids, same weights for the other slots, nothing
    renormalised); the masked expert's slot weight is set to 0, so its output
    contributes nothing (Llama-4 scales the expert *input*: its bias-free
    experts then output 0; Switch: the top-1 probability is zeroed, capacity
    still counted).

Which experts: per layer a static set (``static={layer: [experts]}``) and/or
each token's own top-1 (``drop_top={layer: 1}``: the slot with the largest
weight; for router masks the router runs once unmasked to learn it).

Usage::

    with apply_masks(model, MaskSet("router", static={2: [5]})) as handle:
        scores = token_scores(model, tokens)      # per-token NLL / accuracy under the mask
    # hooks and patched forwards are gone here, also after an exception

Register masks *before* ``record_routing`` when both are used: hooks run in
registration order, so the recorder then sees the masked routing.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

from .load import language_model
from .routers import RouterSite, decode_router_output, find_routers, sort_slots
from .run import sample_spans

__all__ = ["MaskSet", "MaskError", "apply_masks", "token_scores", "expert_importance", "MASK_ATTRS",
           "maskable", "forward_passes", "score_job", "sweep_job", "sweep_scores", "decoder_stack", "mask_from_spec",
           "ROUTER_PASS_NOTE"]

MASK_ATTRS = {
    "router": ("router mask: the masked experts' selection score is -inf before top-k, so tokens re-route to the best "
               "unmasked experts; weights are computed as the router computes them (renormalised routers: as if the "
               "expert did not exist; non-renormalised softmax routers keep the full-softmax denominator; biased "
               "sigmoid routers: the biased selection score is masked, weights stay the unbiased scores)"),
    "output": ("output mask: routing kept (same expert ids); the masked expert's slot weight is set to 0 so its output "
               "contributes nothing; the other experts' weights are unchanged, not renormalised"),
}


class MaskError(ValueError):
    """A mask that cannot be applied faithfully to this model (names the router class)."""


@dataclass(frozen=True)
class MaskSet:
    """Which experts to mask, and how.

    Attributes
    ----------
    kind : "router" or "output" (see the module docstring).
    static : {decoder layer: expert ids} masked for every token.
    drop_top : {decoder layer: 1}: also mask each token's own top-1 expert there (only 1 is supported).
    """

    kind: str
    static: Mapping[int, tuple[int, ...]] = field(default_factory=dict)
    drop_top: Mapping[int, int] = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in MASK_ATTRS:
            raise ValueError(f"mask kind {self.kind!r}: expected one of {sorted(MASK_ATTRS)}")
        object.__setattr__(self, "static", {int(k): tuple(sorted({int(e) for e in v})) for k, v in self.static.items()
                                            if len(tuple(v))})
        bad = {k: v for k, v in self.drop_top.items() if int(v) != 1}
        if bad:
            raise ValueError(f"drop_top {bad}: only the top-1 expert can be dropped per token")
        object.__setattr__(self, "drop_top", {int(k): 1 for k in self.drop_top})

    @property
    def layers(self) -> list[int]:
        return sorted(set(self.static) | set(self.drop_top))

    @property
    def first_layer(self) -> int | None:
        return self.layers[0] if self.layers else None


def maskable(site: RouterSite, kind: str, *, dynamic: bool = False) -> str | None:
    """Why ``site`` cannot carry a mask of ``kind`` (None when it can)."""
    if site.adapter == "experts_inputs" and dynamic and kind == "router":
        return (f"router {site.class_name}: its block selects the experts after the router returns, so a token's own "
                f"top-1 is not known before the selection (drop-top-1 router masks unsupported; use an output mask)")
    return None


# Routers that select without a top-k over the experts (Switch: argmax; DBRX: the block selects after the
# router returns): their (…, E) projection is masked instead, so the softmax gives the masked experts 0.
_PROJECT_ADAPTERS = ("capacity_top1", "experts_inputs")
_TOPK = {torch.topk, torch.Tensor.topk}
_LINEAR = {torch.nn.functional.linear, torch.matmul, torch.Tensor.__matmul__, torch.Tensor.matmul, torch.mm,
           torch.addmm}


class _MaskMode(TorchFunctionMode):
    """Inside one router call: −inf on the masked experts in the first projection and in every top-k input."""

    def __init__(self, mask: torch.Tensor, num_experts: int, project: bool = False):
        super().__init__()
        self.mask = mask            # (E,) or (n, E) bool
        self.E = num_experts
        self.projected = not project  # only routers that select outside a top-k get their projection masked
        self.topk_masked = 0

    def _masked(self, x):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim == 0:
            return None
        m = self.mask.to(x.device)
        if m.ndim == 2:
            if x.numel() != m.numel() or not (x.shape[-1] == self.E or (x.ndim >= 2 and x.shape[-1] * x.shape[-2] == self.E)):
                return None
            m = m.reshape(x.shape)
        elif x.shape[-1] == self.E:
            pass
        elif x.ndim >= 2 and x.shape[-1] * x.shape[-2] == self.E and x.shape[-1] > 1:
            m = m.reshape(x.shape[-2], x.shape[-1])
        else:
            return None
        return x.masked_fill(m, float("-inf"))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _TOPK and args:
            dim = kwargs.get("dim", args[2] if len(args) > 2 else -1)
            x = args[0]
            if isinstance(x, torch.Tensor) and dim in (-1, x.ndim - 1):
                xm = self._masked(x)
                if xm is not None:
                    self.topk_masked += 1
                    args = (xm, *args[1:])
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        if not self.projected and func in _LINEAR and isinstance(out, torch.Tensor) and out.ndim >= 1 \
                and out.shape[-1] == self.E:
            om = self._masked(out)
            if om is not None:
                self.projected = True
                out = om
        return out


def _static_mask(site: RouterSite, experts: Iterable[int], device) -> torch.Tensor:
    m = torch.zeros(site.num_experts, dtype=torch.bool, device=device)
    ex = list(experts)
    if ex:
        if min(ex) < 0 or max(ex) >= site.num_experts:
            raise MaskError(f"layer {site.layer}: expert ids {ex} outside [0, {site.num_experts})")
        m[torch.as_tensor(ex, device=device)] = True
    return m


def _top1(ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return sort_slots(ids, weights.float())[0][:, 0]


class MaskHandle:
    """What ``apply_masks`` installed; counts masked router calls (for the tests and the cost report)."""

    def __init__(self):
        self.handles: list = []
        self.patched: list[tuple[torch.nn.Module, object]] = []
        self.calls: dict[int, int] = {}
        self.masked_slots: dict[int, int] = {}

    def remove(self) -> None:
        while self.handles:
            self.handles.pop().remove()
        while self.patched:
            mod, had = self.patched.pop()
            if had is None:
                mod.__dict__.pop("forward", None)
            else:
                mod.forward = had


def _router_forward(site: RouterSite, orig, static: torch.Tensor | None, dynamic: bool, handle: MaskHandle):
    def forward(*args, **kwargs):
        if dynamic:
            first = orig(*args, **kwargs)
            ids, w, _ = decode_router_output(site, first)
            top = _top1(ids, w)
            mask = torch.zeros(ids.shape[0], site.num_experts, dtype=torch.bool, device=ids.device)
            mask[torch.arange(ids.shape[0], device=ids.device), top.long()] = True
            if static is not None:
                mask |= static.to(ids.device)
        else:
            mask = static
        mode = _MaskMode(mask, site.num_experts, project=site.adapter in _PROJECT_ADAPTERS)
        with mode:
            out = orig(*args, **kwargs)
        if site.adapter != "experts_inputs":
            ids, _, _ = decode_router_output(site, out)
            m = mask.to(ids.device)
            hit = m[ids.long()] if m.ndim == 1 else m.gather(1, ids.long())
            if bool(hit.any()):
                raise MaskError(f"router {site.class_name} at '{site.name}' (layer {site.layer}) still selected a "
                                f"masked expert under a router mask; this family cannot be router-masked by "
                                f"capture.interventions (use an output mask)")
        elif not mode.projected:
            raise MaskError(f"router {site.class_name} at '{site.name}': no (…, {site.num_experts}) projection found "
                            f"to mask; this family cannot be router-masked")
        handle.calls[site.layer] = handle.calls.get(site.layer, 0) + 1
        return out

    return forward


def _slot_mask(ids: torch.Tensor, weights: torch.Tensor, static: torch.Tensor | None, dynamic: bool) -> torch.Tensor:
    """(n, k) True on the slots to zero."""
    ids2 = ids.reshape(-1, ids.shape[-1]).long()
    out = torch.zeros(ids2.shape, dtype=torch.bool, device=ids.device)
    if static is not None:
        out |= static.to(ids.device)[ids2]
    if dynamic:
        w2 = weights.reshape(-1, weights.shape[-1]).float()
        order = torch.argsort(w2, dim=-1, descending=True, stable=True)[:, :1]
        out.scatter_(1, order, True)
    return out.reshape(ids.shape)


def _output_hook(site: RouterSite, static: torch.Tensor | None, dynamic: bool, handle: MaskHandle):
    a = site.adapter

    def count(n):
        handle.calls[site.layer] = handle.calls.get(site.layer, 0) + 1
        handle.masked_slots[site.layer] = handle.masked_slots.get(site.layer, 0) + int(n)

    if a == "experts_inputs":
        def pre(module, args, kwargs):
            args, kwargs = list(args), dict(kwargs)
            ids = args[1] if len(args) > 1 else kwargs["top_k_index"]
            w = args[2] if len(args) > 2 else kwargs["top_k_weights"]
            slots = _slot_mask(ids, w, static, dynamic)
            w = w.masked_fill(slots, 0)
            if len(args) > 2:
                args[2] = w
            else:
                kwargs["top_k_weights"] = w
            count(slots.sum())
            return tuple(args), kwargs

        return site.experts.register_forward_pre_hook(pre, with_kwargs=True)

    def hook(module, args, output):
        if a in ("triple", "triple_plus", "probs_triple"):
            ids, w = output[2], output[1]
            slots = _slot_mask(ids, w, static, dynamic)
            count(slots.sum())
            return (output[0], w.masked_fill(slots, 0), *output[2:])
        if a == "dense_sigmoid":
            scores, logits = output
            flat = scores.reshape(-1, scores.shape[-1])
            m = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
            if static is not None:
                m |= static.to(flat.device)[None, :] & (flat > 0)
            if dynamic:
                m.scatter_(1, flat.argmax(dim=-1, keepdim=True), True)
            count(m.sum())
            return (flat.masked_fill(m, 0).reshape(scores.shape), logits)
        if a == "capacity_top1":
            dispatch, probs, logits = output
            ids, w, _ = decode_router_output(site, output)
            slots = _slot_mask(ids, w, static, dynamic)[:, 0]
            count(slots.sum())
            return (dispatch, probs.masked_fill(slots.reshape(probs.shape), 0), logits)
        raise MaskError(f"router {site.class_name}: no output mask for adapter '{a}'")

    return site.module.register_forward_hook(hook)


@contextlib.contextmanager
def apply_masks(model, masks: MaskSet | None, *, sites: list[RouterSite] | None = None, where: str = "model"):
    """Mask experts for the duration of the ``with`` block (no-op for ``None`` or an empty set).

    Yields a ``MaskHandle``; on exit (also on an exception) every hook is removed and every
    patched ``forward`` restored.

    Raises
    ------
    MaskError naming the layer when a masked layer has no router, or the family cannot carry the mask.
    """
    handle = MaskHandle()
    if masks is None or not masks.layers:
        yield handle
        return
    if sites is None:
        sites = find_routers(language_model(model), where=where)
    by_layer = {s.layer: s for s in sites}
    missing = [l for l in masks.layers if l not in by_layer]
    if missing:
        raise MaskError(f"{where}: no MoE router at decoder layer(s) {missing} (MoE layers: {sorted(by_layer)})")
    try:
        for layer in masks.layers:
            site = by_layer[layer]
            dynamic = layer in masks.drop_top
            why = maskable(site, masks.kind, dynamic=dynamic)
            if why:
                raise MaskError(f"{where}: layer {layer}: {why}")
            dev = next(iter(site.module.parameters()), torch.empty(0)).device
            static = _static_mask(site, masks.static[layer], dev) if layer in masks.static else None
            if masks.kind == "router":
                orig = site.module.forward
                handle.patched.append((site.module, site.module.__dict__.get("forward")))
                site.module.forward = _router_forward(site, orig, static, dynamic, handle)
            else:
                handle.handles.append(_output_hook(site, static, dynamic, handle))
        yield handle
    finally:
        handle.remove()


def forward_passes(n_samples: int, batch_size: int) -> int:
    """Forward passes one scoring of ``n_samples`` samples costs (batches of ``batch_size``)."""
    return -(-int(n_samples) // int(batch_size))


def _batches(tokens, batch_size: int):
    spans = sample_spans(tokens)
    token_id = np.asarray(tokens["token_id"].values).astype(np.int64)
    for i in range(0, len(spans), batch_size):
        g = spans[i:i + batch_size]
        lens = g[:, 1] - g[:, 0]
        S = int(lens.max())
        ids = np.zeros((len(g), S), dtype=np.int64)
        for b, (a, z) in enumerate(g):
            ids[b, : z - a] = token_id[a:z]
        yield g, lens, ids


def _scores_of(logits: torch.Tensor, ids: np.ndarray, g, nll: np.ndarray, correct: np.ndarray) -> None:
    """Write one batch's per-token next-token NLL and accuracy into the (token,) arrays."""
    logits = logits.float()
    lp = torch.log_softmax(logits[:, :-1], dim=-1)
    tgt = torch.as_tensor(ids[:, 1:], device=logits.device)
    tok_nll = -lp.gather(2, tgt[..., None])[..., 0].double().cpu().numpy()
    ok = (logits[:, :-1].argmax(-1) == tgt).double().cpu().numpy()
    for b, (a, z) in enumerate(g):
        m = z - a - 1
        if m > 0:
            nll[a:a + m] = tok_nll[b, :m]
            correct[a:a + m] = ok[b, :m]


def _logits(out, runner, where: str) -> torch.Tensor:
    logits = getattr(out, "logits", None)
    if logits is None or logits.ndim != 3:
        raise MaskError(f"{where}: {type(runner).__name__} gives no next-token logits; interventions score a causal "
                        f"language model")
    return logits


def decoder_stack(runner, sites: list[RouterSite]) -> torch.nn.ModuleList | None:
    """The ``ModuleList`` of decoder layers that owns every router (``stack[site.layer]``), or None.

    None when the routers do not all sit at ``<list>.<site.layer>.…`` of one list: hidden-state reuse is then
    not attempted (the masked forwards run whole).
    """
    stack = None
    for site in sites:
        parts = site.name.split(".")
        found = None
        for i in range(1, len(parts)):
            if parts[i] == str(site.layer):
                parent = runner.get_submodule(".".join(parts[:i])) if i else runner
                if isinstance(parent, torch.nn.ModuleList):
                    found = parent
                    break
        if found is None or (stack is not None and found is not stack):
            return None
        stack = found
    return stack


class _Stop(Exception):
    """Ends the unmasked prefix pass once the last needed layer output is cached."""


def _clone(x):
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, tuple):
        return tuple(_clone(v) for v in x)
    return x


def _prefix(runner, stack, starts: list[int], run) -> dict[int, object]:
    """Outputs of decoder layers ``L − 1`` for every ``L`` in ``starts`` (all > 0), from one unmasked pass
    that stops after layer ``max(starts) − 1`` (``run()`` calls the runner)."""
    cache, last, handles = {}, max(starts) - 1, []

    def hook(i):
        def h(module, args, output):
            cache[i + 1] = _clone(output)
            if i == last:
                raise _Stop
        return h

    try:
        for L in starts:
            handles.append(stack[L - 1].register_forward_hook(hook(L - 1)))
        try:
            run()
        except _Stop:
            pass
    finally:
        for h in handles:
            h.remove()
    missing = sorted(set(starts) - set(cache))
    if missing:
        raise RuntimeError(f"hidden-state reuse: decoder layers {[L - 1 for L in missing]} did not run")
    return cache


@contextlib.contextmanager
def _skip_layers(stack, start: int, output):
    """Decoder layers ``< start`` return (a copy of) ``output``, the cached output of layer ``start − 1``,
    without computing: the layers from ``start`` on run on exactly the hidden states an unmasked pass gave."""
    patched = []
    try:
        for i in range(start):
            mod = stack[i]
            if any(mod is m for m, _ in patched):  # one module at several places: patched (and restored) once
                continue
            patched.append((mod, mod.__dict__.get("forward")))
            mod.forward = lambda *a, **k: _clone(output)
        yield
    finally:
        for mod, had in reversed(patched):
            if had is None:
                mod.__dict__.pop("forward", None)
            else:
                mod.forward = had


def sweep_scores(model, tokens, mask_sets: list[MaskSet | None], *, batch_size: int = 16, sites=None,
                 where: str = "model", reuse: bool = True) -> tuple[list[dict[str, np.ndarray]], dict]:
    """Per-token NLL and accuracy under each of several mask sets, reusing the unmasked prefix.

    A mask set whose first masked layer is ``L > 0`` changes nothing before decoder layer ``L``: per
    batch, one unmasked pass (stopped after the last layer any set needs) caches the output of layer
    ``L − 1``, and that set's forward skips layers ``< L``, returning the cached states (embeddings and
    attention masks are still built; a layer returns a copy, so in-place edits cannot leak). Reuse is used
    when at least two sets start after layer 0; on the first batch each start layer is checked against a
    whole masked forward and must give bit-identical logits, else reuse is off for the call (``stats``
    says why).

    Returns
    -------
    (scores, stats): ``scores[i]`` as :func:`token_scores` for ``mask_sets[i]``; ``stats`` = {"reuse": bool,
    "why": str, "decoder_layers": n, "layer_passes": decoder-layer evaluations (prefix passes, checks and
    masked passes), "forward_passes": batches × sets (the cost without reuse)}.
    """
    runner = language_model(model)
    device = next(iter(model.parameters())).device
    n = tokens.sizes["token"]
    if sites is None:
        sites = find_routers(runner, where=where)
    moe = sorted(s.layer for s in sites)
    bad = sorted({l for m in mask_sets if m is not None for l in m.layers} - set(moe))
    if bad:
        raise MaskError(f"{where}: no MoE router at decoder layer(s) {bad} (MoE layers: {moe})")
    stack = decoder_stack(runner, sites)
    starts = [(m.first_layer or 0) if m is not None else 0 for m in mask_sets]
    later = sorted({L for L in starts if L > 0})
    # layer_passes in decoder layers; without a layer list a whole forward counts 1 of 1
    stats = {"reuse": False, "why": "", "forward_passes": 0, "layer_passes": 0,
             "decoder_layers": len(stack) if stack is not None else 1}
    if not reuse:
        stats["why"] = "off"
    elif stack is None:
        stats["why"] = f"{where}: the routers do not sit in one decoder-layer list"
    elif sum(L > 0 for L in starts) < 2:
        stats["why"] = "fewer than two mask sets start after layer 0"
    else:
        stats["reuse"] = True
    out = [{"nll": np.full(n, np.nan), "correct": np.full(n, np.nan)} for _ in mask_sets]
    n_layers = stats["decoder_layers"]
    model.eval()
    with torch.inference_mode():
        for bi, (g, lens, ids) in enumerate(_batches(tokens, batch_size)):
            attn = torch.as_tensor((np.arange(ids.shape[1])[None, :] < lens[:, None]).astype(np.int64), device=device)
            x = torch.as_tensor(ids, device=device)

            def run():
                return _logits(runner(input_ids=x, attention_mask=attn, use_cache=False), runner, where)

            cache = _prefix(runner, stack, later, run) if stats["reuse"] else {}
            stats["layer_passes"] += max(later) if cache else 0
            checked: set[int] = set()
            for i, (m, L) in enumerate(zip(mask_sets, starts)):
                stats["forward_passes"] += 1
                with apply_masks(model, m, sites=sites, where=where):
                    if L in cache:
                        with _skip_layers(stack, L, cache[L]):
                            logits = run()
                        stats["layer_passes"] += n_layers - L
                        if bi == 0 and L not in checked:
                            whole = run()
                            stats["layer_passes"] += n_layers
                            checked.add(L)
                            if not torch.equal(whole, logits):
                                stats.update(reuse=False, why=f"{where}: reusing the states before layer {L} "
                                                              f"changed the logits; whole forwards used")
                                cache = {}
                                logits = whole
                    else:
                        logits = run()
                        stats["layer_passes"] += n_layers
                _scores_of(logits, ids, g, out[i]["nll"], out[i]["correct"])
    return out, stats


def token_scores(model, tokens, *, masks: MaskSet | None = None, batch_size: int = 16, sites=None,
                 where: str = "model") -> dict[str, np.ndarray]:
    """Per-token next-token NLL and accuracy of ``model`` on a token table, under ``masks``.

    Parameters
    ----------
    tokens : token table (dim ``token``; coords ``sample``, ``position``, ``token_id``).

    Returns
    -------
    {"nll": (token,) float64 nat, "correct": (token,) float64 1/0 (argmax == next token)}; NaN at each
    sample's last token (no next token). Ties in the argmax go to the lowest token id.
    """
    runner = language_model(model)
    device = next(iter(model.parameters())).device
    n = tokens.sizes["token"]
    nll = np.full(n, np.nan)
    correct = np.full(n, np.nan)
    model.eval()
    with torch.inference_mode(), apply_masks(model, masks, sites=sites, where=where):
        for g, lens, ids in _batches(tokens, batch_size):
            attn = torch.as_tensor((np.arange(ids.shape[1])[None, :] < lens[:, None]).astype(np.int64), device=device)
            out = runner(input_ids=torch.as_tensor(ids, device=device), attention_mask=attn, use_cache=False)
            _scores_of(_logits(out, runner, where), ids, g, nll, correct)
    return {"nll": nll, "correct": correct}


def expert_importance(model, tokens, *, batch_size: int = 16, where: str = "model") -> dict[str, np.ndarray]:
    """Output-aware importance per (layer, expert), as in EASY-EP, from one unmasked pass.

    For every routed slot: gate weight × ‖expert output‖ × the token's contribution
    ``1 − cos(h_before, h_after)`` of the MoE block (its input vs its output added to
    the residual), summed per (layer, expert, sample).

    Needs MoE blocks whose experts module is called ``experts(hidden, top_k_index,
    top_k_weights)`` (the ``triple`` router adapters of transformers v5); others are refused.

    Returns
    -------
    {"importance": (layer, expert, sample) float64, "layers": (layer,) int, "samples": sample ids}
    """
    runner = language_model(model)
    sites = find_routers(runner, where=where)
    bad = [s.class_name for s in sites if s.adapter not in ("triple", "triple_plus", "probs_triple")]
    if bad:
        raise MaskError(f"{where}: output-aware importance needs experts(hidden, top_k_index, top_k_weights) "
                        f"blocks; router {bad[0]} is not one")
    spans = sample_spans(tokens)
    E = sites[0].num_experts
    out = np.zeros((len(sites), E, len(spans)), dtype=np.float64)
    device = next(iter(model.parameters())).device
    state: dict = {}
    handles = []

    def block_hooks(i, site):
        block = runner.get_submodule(site.name.rsplit(".", 1)[0])
        experts = getattr(block, "experts", None)
        if not isinstance(experts, torch.nn.Module):
            raise MaskError(f"{where}: MoE block of '{site.name}' has no 'experts' module")

        def pre(module, args, kwargs):
            vals = list(args[:3])
            for key in ("hidden_states", "top_k_index", "top_k_weights")[len(vals):]:
                vals.append(kwargs[key])
            x, ids, w = vals
            x2 = x.reshape(-1, x.shape[-1])
            ids2 = ids.reshape(x2.shape[0], -1)
            w2 = w.reshape(x2.shape[0], -1).float()
            norms = []
            for j in range(ids2.shape[1]):
                one = torch.ones_like(w2[:, j:j + 1]).to(w.dtype)
                y = module.__class__.forward(module, x2, ids2[:, j:j + 1], one)
                norms.append(y.float().norm(dim=-1))
            state[i] = (ids2, w2 * torch.stack(norms, dim=1))

        def bpre(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            state[("in", i)] = h.reshape(-1, h.shape[-1]).float()

        def bpost(module, args, output):
            y = output[0] if isinstance(output, tuple) else output
            h = state[("in", i)]
            after = h + y.reshape(-1, y.shape[-1]).float()
            state[("contrib", i)] = 1 - torch.nn.functional.cosine_similarity(h, after, dim=-1)

        handles.append(experts.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(block.register_forward_pre_hook(bpre, with_kwargs=True))
        handles.append(block.register_forward_hook(bpost))

    try:
        for i, s in enumerate(sites):
            block_hooks(i, s)
        with torch.inference_mode():
            offset = 0
            for g, lens, ids in _batches(tokens, batch_size):
                S = ids.shape[1]
                attn = torch.as_tensor((np.arange(S)[None, :] < lens[:, None]).astype(np.int64), device=device)
                runner(input_ids=torch.as_tensor(ids, device=device), attention_mask=attn, use_cache=False)
                real = np.concatenate([b * S + np.arange(n_) for b, n_ in enumerate(lens)])
                owner = np.repeat(np.arange(len(g)) + offset, lens)
                for i in range(len(sites)):
                    ids2, slot = state[i]
                    contrib = state[("contrib", i)]
                    val = (slot * contrib[:, None]).double().cpu().numpy()[real]
                    e = ids2.cpu().numpy()[real]
                    np.add.at(out[i], (e.reshape(-1), np.repeat(owner, e.shape[1])), val.reshape(-1))
                offset += len(g)
                state.clear()
    finally:
        for h in handles:
            h.remove()
    return {"importance": out, "layers": np.asarray([s.layer for s in sites]),
            "samples": np.asarray(tokens["sample"].values)[spans[:, 0]]}



# ------------------------------------------------------------------ Dask jobs (tasks/interventions.py)

#: Models loaded by the jobs of this worker process, most recent last (a sweep's jobs reuse one load).
_MODELS: dict = {}
_MAX_MODELS = 2

ROUTER_PASS_NOTE = ("a drop-top-1 router mask runs each masked router twice (once unmasked to learn the token's "
                    "top-1); counted as one forward pass")


_MODELS_LOCK = threading.Lock()


@contextlib.contextmanager
def _model(model_dir: str, device: str, dtype: str, trust_remote_code: bool):
    """The worker's copy of a checkpoint, held for one job at a time: masks and hidden-state reuse patch
    the model while a job runs, so two jobs on threads of one worker must not share it at once."""
    from .load import load_model

    key = (str(model_dir), device, dtype, bool(trust_remote_code))
    with _MODELS_LOCK:
        if key not in _MODELS:
            while len(_MODELS) >= _MAX_MODELS:
                _MODELS.pop(next(iter(_MODELS)))
            _MODELS[key] = (load_model(model_dir, device=device, dtype=dtype, trust_remote_code=trust_remote_code),
                            threading.Lock())
        model, lock = _MODELS[key]
    with lock:
        yield model


def mask_from_spec(spec: Mapping | None) -> MaskSet | None:
    """A :class:`MaskSet` from its plain form ``{"kind", "static": {layer: [experts]}, "drop_top": [layers]}``."""
    if not spec:
        return None
    return MaskSet(spec["kind"], static={int(k): v for k, v in dict(spec.get("static") or {}).items()},
                   drop_top={int(l): 1 for l in spec.get("drop_top") or ()})


def score_job(model_dir: str, tokens: Mapping[str, np.ndarray], masks: Mapping | None = None, *,
              batch_size: int = 16, device: str = "cpu", dtype: str = "float32", trust_remote_code: bool = False,
              importance: bool = False) -> dict:
    """One Dask job: per-token NLL / accuracy of a checkpoint under one mask set (plain data in and out).

    Parameters
    ----------
    tokens : {"sample", "position", "token_id"} (token,) arrays, samples contiguous.
    masks : plain mask set (:func:`mask_from_spec`); None = the unmasked baseline.
    importance : also return the output-aware importance (:func:`expert_importance`, unmasked runs only).

    Returns
    -------
    {"nll", "correct": (token,) float64 (NaN at each sample's last token), "forward_passes": int,
    optionally "importance": (layer, expert, sample) float64 and "layers"}.
    """
    from storage.schema import token_table

    if importance and masks:
        raise ValueError("score_job: output-aware importance is measured on the unmasked model only")
    table = token_table(sample=np.asarray(tokens["sample"]), position=np.asarray(tokens["position"]),
                        token_id=np.asarray(tokens["token_id"]))
    n_samples = int(np.unique(np.asarray(tokens["sample"])).size)
    with _model(model_dir, device, dtype, trust_remote_code) as model:
        out = token_scores(model, table, masks=mask_from_spec(masks), batch_size=batch_size, where=str(model_dir))
        out["forward_passes"] = forward_passes(n_samples, batch_size)
        if importance:
            imp = expert_importance(model, table, batch_size=batch_size, where=str(model_dir))
            out["importance"], out["layers"] = imp["importance"], imp["layers"]
            out["forward_passes"] += forward_passes(n_samples, batch_size)
    return out


def sweep_job(model_dir: str, tokens: Mapping[str, np.ndarray], masks: list[Mapping], *, batch_size: int = 16,
              device: str = "cpu", dtype: str = "float32", trust_remote_code: bool = False,
              reuse: bool = True) -> dict:
    """One Dask job: per-token scores of a checkpoint under several mask sets (:func:`sweep_scores`).

    Returns
    -------
    {"scores": [{"nll", "correct"} per mask set], "forward_passes": batches × sets,
    "layer_passes": decoder-layer evaluations actually run, "decoder_layers": n, "reuse": bool, "why": str}.
    """
    from storage.schema import token_table

    table = token_table(sample=np.asarray(tokens["sample"]), position=np.asarray(tokens["position"]),
                        token_id=np.asarray(tokens["token_id"]))
    with _model(model_dir, device, dtype, trust_remote_code) as model:
        scores, stats = sweep_scores(model, table, [mask_from_spec(m) for m in masks], batch_size=batch_size,
                                     where=str(model_dir), reuse=reuse)
    return {"scores": scores, **stats}
