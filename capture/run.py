"""Run a checkpoint over a token table and stream its routing to a sink.

``capture_checkpoint`` loads the model, hooks its routers (``capture.hooks``),
runs consecutive samples in right-padded batches under ``torch.inference_mode``
and hands the sink, batch after batch, the arrays of consecutive tokens of the
token table (token 0 first, in token order; padding never reaches the sink).
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import torch
import xarray as xr

from .hooks import record_routing
from .load import ModelInfo, describe_model, load_model
from .routers import find_routers, sort_slots

__all__ = ["capture_checkpoint", "capture_model", "sample_spans", "batches", "lens_partners", "pair_batches"]

# Rows of (rows, vocab) float32 log-softmax computed at once: bounds the NLL's
# extra memory to ~128 MiB whatever the vocabulary.
_NLL_ELEMS = 1 << 25


def sample_spans(tokens: xr.Dataset, *, where: str = "token table") -> np.ndarray:
    """(start, stop) token offsets of each sample, in token order.

    Parameters
    ----------
    tokens : token table (dim ``token``; coords ``sample``, ``position``, ``token_id``).

    Returns
    -------
    (n_samples, 2) int64 array.

    Raises
    ------
    ValueError when a coordinate is missing, the table is empty, a sample is
    split across the table, or positions do not run 0..len-1 within a sample.
    """
    for name in ("sample", "position", "token_id"):
        if name not in tokens.coords and name not in tokens:
            raise ValueError(f"{where}: coordinate '{name}' is missing (expected a storage.schema.token_table)")
    sample = np.asarray(tokens["sample"].values)
    position = np.asarray(tokens["position"].values)
    n = sample.shape[0]
    if n == 0:
        raise ValueError(f"{where}: no tokens")
    starts = np.flatnonzero(np.r_[True, sample[1:] != sample[:-1]])
    stops = np.r_[starts[1:], n]
    ids = sample[starts]
    vals, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"{where}: sample {vals[counts > 1][0]} is not contiguous along 'token' "
                         f"(samples must be contiguous)")
    expected = np.arange(n) - np.repeat(starts, stops - starts)
    bad = np.flatnonzero(position != expected)
    if bad.size:
        t = int(bad[0])
        raise ValueError(f"{where}: token {t} (sample {sample[t]}) has position {position[t]}, expected "
                         f"{expected[t]} (positions must run 0..len-1 within each sample)")
    return np.stack([starts, stops], axis=1).astype(np.int64)


def batches(spans: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Consecutive groups of at most ``batch_size`` samples (never reordered)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [spans[i:i + batch_size] for i in range(0, len(spans), batch_size)]


def _max_positions(model) -> int | None:
    cfg = model.config
    for c in (cfg, getattr(cfg, "text_config", None)):
        v = getattr(c, "max_position_embeddings", None) if c is not None else None
        if isinstance(v, int) and v > 0:
            return v
    return None


def _nll(logits: torch.Tensor, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Next-token NLL of every real token, NaN at each sample's last position.

    Parameters
    ----------
    logits : (B, S, V) model logits.
    input_ids : (B, S) right-padded ids.
    lengths : (B,) real lengths.

    Returns
    -------
    (sum(lengths),) float32 on the logits' device, sample-major.
    """
    B, S, V = logits.shape
    pos = torch.arange(S, device=logits.device)
    real = pos[None, :] < lengths[:, None]
    has_next = pos[None, :] < (lengths[:, None] - 1)
    out = torch.full((B, S), float("nan"), dtype=torch.float32, device=logits.device)
    b_idx, p_idx = has_next.nonzero(as_tuple=True)
    targets = input_ids[b_idx, p_idx + 1]
    vals = torch.empty(b_idx.shape[0], dtype=torch.float32, device=logits.device)
    step = max(1, _NLL_ELEMS // max(V, 1))
    for i in range(0, b_idx.shape[0], step):
        rows = logits[b_idx[i:i + step], p_idx[i:i + step]].float()
        lp = torch.log_softmax(rows, dim=-1)
        vals[i:i + step] = -lp.gather(1, targets[i:i + step, None]).squeeze(1)
    out[b_idx, p_idx] = vals
    return out[real]


def lens_partners(tokens: xr.Dataset, *, where: str = "token table") -> np.ndarray:
    """For each predicting position, the predicting position of its next token's aligned partner.

    The lens at position p predicts token p+1; when p+1 is aligned with token
    u (``aligned_token``), the two distributions to compare are those at p and
    u-1. Both must lie inside their samples (position > 0).

    Returns
    -------
    (token,) int64, -1 where the next token is unaligned; symmetric.

    Raises
    ------
    ValueError when ``aligned_token`` is missing or not symmetric.
    """
    if "aligned_token" not in tokens.coords:
        raise ValueError(f"{where}: coordinate 'aligned_token' is missing; the JS divergence needs the alignment "
                         f"(name the two conditions in [conditions])")
    aligned = np.asarray(tokens["aligned_token"].values).astype(np.int64)
    position = np.asarray(tokens["position"].values)
    t = np.flatnonzero(aligned >= 0)
    u = aligned[t]
    if (u >= aligned.size).any() or (aligned[u] != t).any():
        raise ValueError(f"{where}: 'aligned_token' is not symmetric (aligned_token[aligned_token[t]] != t)")
    ok = (position[t] > 0) & (position[u] > 0)
    out = np.full(aligned.size, -1, dtype=np.int64)
    out[t[ok] - 1] = u[ok] - 1
    return out


def pair_batches(spans: np.ndarray, partner: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Groups of sample indices (into ``spans``) that keep each pair of samples in one forward.

    Samples are taken in order; a sample's partner sample (the one holding its
    tokens' ``partner`` positions) joins it, so a batch may reach
    ``batch_size + 1`` samples. Returns a list of int64 arrays.

    Raises ValueError when one sample's tokens partner with several samples.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    lengths = spans[:, 1] - spans[:, 0]
    owner = np.repeat(np.arange(len(spans)), lengths)
    mate = np.full(len(spans), -1, dtype=np.int64)
    t = np.flatnonzero(partner >= 0)
    for i, j in set(zip(owner[t].tolist(), owner[partner[t]].tolist())):
        if mate[i] not in (-1, j):
            raise ValueError(f"sample {i} (index along the token table's samples) is aligned with samples "
                             f"{mate[i]} and {j}; a sample has at most one partner")
        mate[i] = j
    groups, current, taken = [], [], np.zeros(len(spans), dtype=bool)
    for i in range(len(spans)):
        if taken[i]:
            continue
        unit = [i] + ([int(mate[i])] if mate[i] >= 0 and not taken[mate[i]] and mate[i] != i else [])
        if current and len(current) + len(unit) > batch_size:
            groups.append(np.asarray(current, dtype=np.int64))
            current = []
        current += unit
        taken[unit] = True
    if current:
        groups.append(np.asarray(current, dtype=np.int64))
    return groups


# Token axis of each array handed to the sink.
_TOKEN_AXIS = {"expert_ids": 1, "expert_weights": 1, "router_logits": 1, "lens_logprob": 1, "lens_js": 1, "nll": 0}


def capture_model(model, tokens: xr.Dataset, sink, *, keep_logits: bool = False, keep_nll: bool = True,
                  keep_lens: bool = False, keep_js: bool = False, batch_size: int = 16, progress: bool = True,
                  desc: str | None = None, where: str = "model") -> ModelInfo:
    """Capture the routing of an already-loaded model (see ``capture_checkpoint``)."""
    import tqdm

    sites = find_routers(model, where=where)
    info = describe_model(model, where=where)
    if info.num_experts > np.iinfo(np.int16).max:
        raise ValueError(f"{where}: {info.num_experts} experts do not fit expert_ids' int16")
    spans = sample_spans(tokens)
    token_id = np.asarray(tokens["token_id"].values).astype(np.int64)
    if token_id.min() < 0 or token_id.max() >= info.vocab_size:
        t = int(np.flatnonzero((token_id < 0) | (token_id >= info.vocab_size))[0])
        raise ValueError(f"token table: token {t} has token_id {token_id[t]}, outside the model's vocabulary "
                         f"[0, {info.vocab_size}) ({where})")
    lengths = spans[:, 1] - spans[:, 0]
    max_pos = _max_positions(model)
    if max_pos is not None and lengths.max() > max_pos:
        i = int(np.argmax(lengths > max_pos))
        sample = np.asarray(tokens["sample"].values)[spans[i, 0]]
        raise ValueError(f"token table: sample {sample} has {lengths[i]} tokens, more than the model's "
                         f"max_position_embeddings={max_pos} ({where}); tokenize with a smaller max_length")

    device = next(iter(model.parameters())).device
    model.eval()
    partner = lens_partners(tokens) if keep_js else None
    if keep_js:
        # Both sides of a pair in one forward: the JS needs the two distributions at once.
        groups = pair_batches(spans, partner, batch_size)
    else:
        groups = [np.arange(i, min(i + batch_size, len(spans))) for i in range(0, len(spans), batch_size)]
    use_lens = keep_lens or keep_js
    lens_ctx = contextlib.nullcontext(None)
    last_layer = None
    if use_lens:
        from .lens import decoder_layers, record_lens

        last_layer = max(decoder_layers(model, where=where))
        lens_ctx = record_lens(model, list(info.moe_layers), where=where)
    pending: dict[int, dict[str, np.ndarray]] = {}
    emitted = 0  # samples handed to the sink so far
    lens_check = 0.0  # max |lens at the last layer + model NLL|
    bar = tqdm.tqdm(total=int(lengths.sum()), unit="tok", desc=desc or where, disable=not progress)
    try:
        with torch.inference_mode(), record_routing(model, sites, keep_logits=keep_logits, where=where) as rec, \
                lens_ctx as lens:
            for group in groups:
                gspans = spans[group]
                lens_b = gspans[:, 1] - gspans[:, 0]
                S = int(lens_b.max())
                ids = np.zeros((len(group), S), dtype=np.int64)  # pad id 0: any valid id, it is masked
                for b, (a, z) in enumerate(gspans):
                    ids[b, : z - a] = token_id[a:z]
                input_ids = torch.from_numpy(ids).to(device)
                lens_t = torch.from_numpy(lens_b).to(device)
                mask = (torch.arange(S, device=device)[None, :] < lens_t[:, None])
                if lens is not None:
                    batch_rows = _lens_rows(gspans, S, ids, partner, device)
                    lens.set_batch(*batch_rows)
                out = model(input_ids=input_ids, attention_mask=mask.long(), use_cache=False)
                routed = rec.pop()
                flat_mask = mask.reshape(-1)
                e_ids, e_w, e_lg = [], [], []
                for layer in info.moe_layers:
                    r_ids, r_w, r_lg = routed[layer]
                    if r_ids.shape[0] != flat_mask.shape[0]:
                        raise RuntimeError(f"{where}: router at layer {layer} saw {r_ids.shape[0]} tokens, "
                                           f"expected batch x sequence = {flat_mask.shape[0]}")
                    r_ids, r_w = sort_slots(r_ids[flat_mask], r_w[flat_mask])
                    e_ids.append(r_ids.to(torch.int16))
                    e_w.append(r_w.float())
                    if keep_logits:
                        e_lg.append(r_lg[flat_mask].to(torch.float16))
                arrays = {
                    "expert_ids": torch.stack(e_ids).cpu().numpy(),
                    "expert_weights": torch.stack(e_w).cpu().numpy(),
                }
                if keep_logits:
                    arrays["router_logits"] = torch.stack(e_lg).cpu().numpy()
                if keep_nll:
                    arrays["nll"] = _nll(out.logits, input_ids, lens_t).cpu().numpy()
                del out
                if lens is not None:
                    lp, js = _lens_arrays(lens.pop(), info.moe_layers, batch_rows, flat_mask)
                    if keep_lens:
                        arrays["lens_logprob"] = lp
                    if keep_js:
                        arrays["lens_js"] = js
                    if keep_nll and last_layer in info.moe_layers:
                        d = np.abs(lp[info.moe_layers.index(last_layer)] + arrays["nll"])
                        if np.isfinite(d).any():
                            lens_check = max(lens_check, float(np.nanmax(d)))
                # Hand the sink consecutive samples only (pair batches may run a later sample early).
                bounds = np.r_[0, np.cumsum(lens_b)]
                for b, i in enumerate(group):
                    pending[int(i)] = {k: np.take(v, np.arange(bounds[b], bounds[b + 1]), axis=_TOKEN_AXIS[k])
                                       for k, v in arrays.items()}
                ready = []
                while emitted in pending:
                    ready.append(pending.pop(emitted))
                    emitted += 1
                if ready:
                    sink.append(**{k: np.concatenate([r[k] for r in ready], axis=_TOKEN_AXIS[k]) for k in ready[0]})
                bar.update(int(lens_b.sum()))
    finally:
        bar.close()
    if pending or emitted != len(spans):
        raise RuntimeError(f"{where}: {len(spans) - emitted} samples were captured but never handed to the sink")
    tol = 1e-3 if info.dtype == "float32" else 5e-2
    if lens_check > tol:
        warnings.warn(f"{where}: the logit lens at the last decoder layer differs from the model's own NLL by up to "
                      f"{lens_check:.3g} nats; the model transforms its logits in a way the lens "
                      f"(final norm + LM head) does not reproduce", stacklevel=2)
    return info


def _lens_rows(gspans: np.ndarray, S: int, ids: np.ndarray, partner: np.ndarray | None, device):
    """Flat (batch·seq) rows whose next token the lens scores, their targets, and the JS row pairs."""
    lens_b = gspans[:, 1] - gspans[:, 0]
    rows = np.concatenate([b * S + np.arange(n - 1) for b, n in enumerate(lens_b)]).astype(np.int64)
    targets = ids.reshape(-1)[rows + 1]
    js_a = js_b = None
    if partner is not None:
        glob = np.concatenate([np.arange(a, z) for a, z in gspans])
        flat = np.concatenate([b * S + np.arange(n) for b, n in enumerate(lens_b)]).astype(np.int64)
        q = partner[glob]
        order = np.argsort(glob)
        has = q >= 0
        pos = np.searchsorted(glob, q[has], sorter=order)
        pos = np.minimum(pos, len(glob) - 1)
        found = glob[order[pos]] == q[has]
        if not found.all():
            raise RuntimeError("a JS partner position is not in the same forward batch")
        qrow = flat[order[pos]]
        prow = flat[has]
        keep = glob[has] < q[has]  # each pair once
        js_a = torch.from_numpy(prow[keep]).to(device)
        js_b = torch.from_numpy(qrow[keep]).to(device)
    return torch.from_numpy(rows).to(device), torch.from_numpy(targets).to(device), js_a, js_b


def _lens_arrays(per_layer: dict, layers: list[int], batch_rows: tuple, flat_mask: torch.Tensor):
    """(layer, n) log p(next token) and JS of the real tokens of a batch, NaN where undefined.

    ``batch_rows`` is what :func:`_lens_rows` returned for this batch (the rows
    the recorder scored, in its order).
    """
    rows, _, js_a, js_b = batch_rows
    n_flat = flat_mask.shape[0]
    lp_out, js_out = [], []
    for layer in layers:
        lp, js = per_layer[layer]
        full = torch.full((n_flat,), float("nan"), dtype=torch.float32, device=lp.device)
        full[rows] = lp
        lp_out.append(full[flat_mask])
        fj = torch.full((n_flat,), float("nan"), dtype=torch.float32, device=lp.device)
        if js is not None:
            fj[js_a] = js
            fj[js_b] = js
        js_out.append(fj[flat_mask])
    return torch.stack(lp_out).cpu().numpy(), torch.stack(js_out).cpu().numpy()


def capture_checkpoint(model_dir, tokens: xr.Dataset, sink, *, keep_logits: bool = False, keep_nll: bool = True,
                       keep_lens: bool = False, keep_js: bool = False, batch_size: int = 16, device="cpu",
                       trust_remote_code: bool = False, progress: bool = True,
                       desc: str | None = None) -> ModelInfo:
    """Capture one checkpoint's routing over a token table.

    Parameters
    ----------
    model_dir : checkpoint dir (config.json + safetensors).
    tokens : token table, dim ``token`` (samples contiguous, positions 0..len-1).
    sink : object with ``append(**arrays)``; called once per batch with arrays
        for the next consecutive tokens (batch of whole samples):

        - ``expert_ids`` (layer, n, k) int16, slots sorted by weight (top-1 first)
        - ``expert_weights`` (layer, n, k) float32, the weights the experts receive
        - ``router_logits`` (layer, n, expert) float16, only if ``keep_logits``
        - ``nll`` (n,) float32, the model's next-token NLL in nats, NaN at each
          sample's last position; only if ``keep_nll``
        - ``lens_logprob`` (layer, n) float32, log p(next token) read out after
          each MoE layer through final norm + LM head (``capture.lens``), NaN at
          each sample's last position; only if ``keep_lens``
        - ``lens_js`` (layer, n) float32, JS divergence (nats) between the lens
          distributions here and at the partner position (``lens_partners``),
          NaN where the next token is unaligned; only if ``keep_js``

        ``layer`` runs over ``ModelInfo.moe_layers`` in that order.
    keep_logits, keep_nll, keep_lens, keep_js : which optional arrays to produce.
        ``keep_js`` needs the ``aligned_token`` coordinate and runs both samples
        of a pair in one forward; samples still reach the sink in token order
        (a sample run early waits in memory until the ones before it are done,
        so keep pairs close together in the data).
    batch_size : samples per forward (consecutive samples, right-padded).
    device : torch device for the model.
    trust_remote_code : passed to transformers only when True.
    progress : show a tqdm bar (tokens).
    desc : bar label (default: the checkpoint dir).

    Returns
    -------
    ModelInfo of the loaded model (``dtype`` = the dtype used).
    """
    model = load_model(model_dir, device=device, trust_remote_code=trust_remote_code)
    try:
        return capture_model(model, tokens, sink, keep_logits=keep_logits, keep_nll=keep_nll, keep_lens=keep_lens,
                             keep_js=keep_js, batch_size=batch_size, progress=progress, desc=desc,
                             where=str(model_dir))
    finally:
        del model
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
