"""Logit lens computed during capture: read each MoE layer's output through the
final norm and the LM head, keep only log p(next token) (and, optionally, the
Jensen-Shannon divergence between two positions' distributions).

Nothing per layer is kept beyond a (tokens,) vector: forward hooks on the
decoder layers apply the read-out as soon as a layer has run, in row chunks
bounded by ``chunk_elems`` logits, so memory does not grow with the number of
layers or the vocabulary. Hooks see the raw layer output (before the final
norm), so the final norm is applied to every layer, the last included, and the
lens of the last decoder layer equals the model's own next-token log-prob.
(``output_hidden_states=True`` would instead return the last hidden state
already normalised; this module never reads those.)

Usage::

    head = find_lens_head(model)
    with record_lens(model, layers=[0, 1, 2, 3], head=head) as lens:
        lens.set_batch(rows, targets, js_a, js_b)   # flat (batch*seq) row indices
        model(...)
        per_layer = lens.pop()                      # {layer: (logprob (m,), js (p,) or None)}
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .hooks import HookRecorder

__all__ = ["LensHead", "LensRecorder", "decoder_layers", "find_lens_head", "js_divergence", "record_lens",
           "target_logprob"]

# Logits (rows x vocab) materialised at once: ~128 MiB in float32 whatever the vocabulary.
CHUNK_ELEMS = 1 << 25
_NORM_NAMES = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "norm_f")


@dataclass
class LensHead:
    """The read-out the model applies after its last decoder layer.

    Attributes
    ----------
    norm : the final norm (None only if the model has none).
    lm_head : the output embedding.
    softcap : ``final_logit_softcapping`` (Gemma family) or None.
    scale : ``logits_scaling`` (Granite family: logits are divided by it) or None.
    """

    norm: nn.Module | None
    lm_head: nn.Module
    softcap: float | None = None
    scale: float | None = None

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(n, hidden) raw layer output -> (n, vocab) float32 logits."""
        x = self.norm(h) if self.norm is not None else h
        z = self.lm_head(x)
        if self.scale is not None:
            z = z / self.scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z.float()


def find_lens_head(model: nn.Module, *, where: str = "model") -> LensHead:
    """The final norm and LM head of a causal LM.

    Raises
    ------
    ValueError naming ``where`` when the model has no output embedding or no
    recognisable final norm (a lens without it would read un-normalised states).
    """
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if lm_head is None:
        raise ValueError(f"{where}: the model has no output embedding (LM head); the logit lens needs one")
    candidates = []
    for getter in ("get_decoder",):
        fn = getattr(model, getter, None)
        if callable(fn):
            try:
                candidates.append(fn())
            except (AttributeError, NotImplementedError, ValueError):
                pass
    candidates += [getattr(model, "model", None), getattr(model, "transformer", None), model]
    norm = None
    for obj in candidates:
        if obj is None:
            continue
        for name in _NORM_NAMES:
            m = getattr(obj, name, None)
            if isinstance(m, nn.Module):
                norm = m
                break
        if norm is not None:
            break
    if norm is None:
        raise ValueError(f"{where}: no final norm found (looked for {', '.join(_NORM_NAMES)} on the decoder); "
                         f"the logit lens needs final norm + LM head")
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    softcap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(cfg, "logits_scaling", None)
    return LensHead(norm=norm, lm_head=lm_head, softcap=float(softcap) if softcap else None,
                    scale=float(scale) if scale not in (None, 1, 1.0) else None)


def decoder_layers(model: nn.Module, *, where: str = "model") -> dict[int, nn.Module]:
    """The decoder-layer modules by the model's own layer index.

    Uses the classes the model declares for ``hidden_states`` in
    ``_can_record_outputs`` (the same declaration routers are mapped with);
    falls back to the ``layers`` list of the decoder.
    """
    from .routers import router_specs

    _, layer_specs = router_specs(model)
    found: dict[int, nn.Module] = {}
    modules = list(model.named_modules())
    for prefix, spec in layer_specs:
        for name, mod in modules:
            if (prefix == "" or name.startswith(prefix + ".")) and spec.matches(name, mod):
                m = re.search(r"(\d+)$", name)
                if m:
                    found.setdefault(int(m.group(1)), mod)
    if not found:
        dec = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
        layers = getattr(dec, "layers", None)
        if isinstance(layers, nn.ModuleList):
            found = dict(enumerate(layers))
    if not found:
        raise ValueError(f"{where}: cannot find the decoder layers (no hidden_states recorder, no 'layers' list)")
    return found


def _rows_per_chunk(vocab: int, chunk_elems: int, per_row: int = 1) -> int:
    return max(1, chunk_elems // max(1, vocab * per_row))


def target_logprob(head: LensHead, h: torch.Tensor, targets: torch.Tensor, *,
                   chunk_elems: int = CHUNK_ELEMS) -> torch.Tensor:
    """log p(target) under the lens read-out of ``h``.

    Parameters
    ----------
    h : (m, hidden) layer outputs; targets : (m,) token ids.

    Returns
    -------
    (m,) float32 log-probabilities (natural log).
    """
    out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
    V = head.lm_head.weight.shape[0] if hasattr(head.lm_head, "weight") else None
    step = _rows_per_chunk(V or 1, chunk_elems)
    for i in range(0, h.shape[0], step):
        z = head.logits(h[i:i + step])
        # z[target] − logsumexp(z): the log-softmax of one entry, without writing all V of them
        out[i:i + step] = z.gather(1, targets[i:i + step, None]).squeeze(1) - torch.logsumexp(z, dim=-1)
    return out


def js_divergence(head: LensHead, ha: torch.Tensor, hb: torch.Tensor, *, targets_a: torch.Tensor | None = None,
                  targets_b: torch.Tensor | None = None, chunk_elems: int = CHUNK_ELEMS):
    """Jensen-Shannon divergence (nats, in [0, ln 2]) between the lens distributions of row pairs.

    Parameters
    ----------
    ha, hb : (p, hidden) layer outputs of the two sides of each pair.
    targets_a, targets_b : optional (p,) next-token ids; their log-probabilities
        then come out of the same read-out (no second pass over the LM head).

    Returns
    -------
    (p,) float32: ½ KL(P‖M) + ½ KL(Q‖M), M = (P + Q) / 2; with targets, also
    the (p,) log p(target) of each side: ``(js, logprob_a, logprob_b)``.
    """
    out = torch.empty(ha.shape[0], dtype=torch.float32, device=ha.device)
    with_targets = targets_a is not None
    if with_targets:
        lp_a = torch.empty_like(out)
        lp_b = torch.empty_like(out)
    V = head.lm_head.weight.shape[0] if hasattr(head.lm_head, "weight") else None
    step = _rows_per_chunk(V or 1, chunk_elems, per_row=2)
    ln2 = math.log(2.0)
    for i in range(0, ha.shape[0], step):
        la = torch.log_softmax(head.logits(ha[i:i + step]), dim=-1)
        lb = torch.log_softmax(head.logits(hb[i:i + step]), dim=-1)
        if with_targets:
            lp_a[i:i + step] = la.gather(1, targets_a[i:i + step, None]).squeeze(1)
            lp_b[i:i + step] = lb.gather(1, targets_b[i:i + step, None]).squeeze(1)
        lm = torch.logaddexp(la, lb) - ln2
        pa, pb = la.exp(), lb.exp()
        # 0 · log 0 = 0: a probability that underflowed contributes nothing
        ta = torch.where(pa > 0, pa * (la - lm), torch.zeros_like(pa))
        tb = torch.where(pb > 0, pb * (lb - lm), torch.zeros_like(pb))
        out[i:i + step] = (0.5 * (ta.sum(-1) + tb.sum(-1))).clamp(0.0, ln2)
    return (out, lp_a, lp_b) if with_targets else out


class LensRecorder(HookRecorder):
    """Forward hooks on decoder layers that apply the lens right after each layer.

    Call :meth:`set_batch` before each forward with flat row indices into the
    (batch · sequence) positions, then :meth:`pop` after it.
    """

    def __init__(self, head: LensHead, layers: dict[int, nn.Module], *, chunk_elems: int = CHUNK_ELEMS):
        self.head = head
        self.layers = dict(sorted(layers.items()))
        self.chunk_elems = chunk_elems
        super().__init__(self.layers)
        self._rows = self._targets = self._js_a = self._js_b = None
        self._solo = self._ia = self._ib = None

    def set_batch(self, rows: torch.Tensor, targets: torch.Tensor, js_a: torch.Tensor | None = None,
                  js_b: torch.Tensor | None = None) -> None:
        """rows, targets : (m,) flat positions (ascending) and their next-token ids; js_a, js_b : (p,) row pairs.

        Every JS row must be among ``rows`` (a position whose next token is aligned has a next token).
        """
        self._rows, self._targets, self._js_a, self._js_b = rows, targets, js_a, js_b
        self._solo = self._ia = self._ib = None
        if js_a is not None and js_a.numel():
            # Rows on a JS pair get log p(target) from the pair's read-out: the LM head runs once per row.
            n = rows.numel()
            ia, ib = torch.searchsorted(rows, js_a), torch.searchsorted(rows, js_b)
            ok = bool(((ia < n) & (ib < n)).all())
            if ok:
                ok = bool(((rows[ia] == js_a) & (rows[ib] == js_b)).all())
            if not ok:
                raise ValueError("JS rows must be among the rows whose next token the lens scores")
            solo = torch.ones(rows.numel(), dtype=torch.bool, device=rows.device)
            solo[ia] = False
            solo[ib] = False
            self._solo, self._ia, self._ib = solo, ia, ib

    def _hook(self, layer: int):
        def hook(module, args, output):
            h = output[0] if isinstance(output, (tuple, list)) else output
            if not isinstance(h, torch.Tensor) or h.ndim != 3:
                raise RuntimeError(f"decoder layer {layer} returned {type(h).__name__}; the lens expects a "
                                   f"(batch, seq, hidden) tensor")
            flat = h.reshape(-1, h.shape[-1])
            js = None
            if self._solo is None:
                lp = target_logprob(self.head, flat[self._rows], self._targets, chunk_elems=self.chunk_elems)
            else:
                lp = torch.empty(self._rows.numel(), dtype=torch.float32, device=flat.device)
                solo = self._solo
                lp[solo] = target_logprob(self.head, flat[self._rows[solo]], self._targets[solo],
                                          chunk_elems=self.chunk_elems)
                js, lp[self._ia], lp[self._ib] = js_divergence(
                    self.head, flat[self._js_a], flat[self._js_b], targets_a=self._targets[self._ia],
                    targets_b=self._targets[self._ib], chunk_elems=self.chunk_elems)
            self._out[layer].append((lp, js))
            return None

        return hook

    def install(self) -> None:
        for i, mod in self.layers.items():
            self.handles.append(mod.register_forward_hook(self._hook(i)))

    def pop(self) -> dict[int, tuple[torch.Tensor, torch.Tensor | None]]:
        """{layer: (log p(target) (m,), JS (p,) or None)} of the last forward; then forget it.

        Raises RuntimeError when a layer ran zero or several times.
        """
        try:
            res = {}
            for i, calls in self._out.items():
                if len(calls) != 1:
                    raise RuntimeError(f"decoder layer {i} ran {len(calls)} times in one forward, expected 1")
                res[i] = calls[0]
            return res
        finally:
            self.clear()


@contextmanager
def record_lens(model: nn.Module, layers: list[int], *, head: LensHead | None = None, where: str = "model",
                chunk_elems: int = CHUNK_ELEMS):
    """Hook the lens onto the decoder layers ``layers`` for the ``with`` block (hooks always removed).

    Raises ValueError when a requested layer index is not a decoder layer of the model.
    """
    head = head or find_lens_head(model, where=where)
    all_layers = decoder_layers(model, where=where)
    missing = [i for i in layers if i not in all_layers]
    if missing:
        raise ValueError(f"{where}: layers {missing} are not decoder layers of the model "
                         f"(found {sorted(all_layers)})")
    with LensRecorder(head, {i: all_layers[i] for i in layers}, chunk_elems=chunk_elems).installed() as rec:
        yield rec
