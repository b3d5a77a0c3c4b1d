"""Run a checkpoint over a token table and stream its routing to a sink.

``capture_checkpoint`` loads the model, hooks its routers (``capture.hooks``),
runs consecutive samples in right-padded batches under ``torch.inference_mode``
and hands the sink, batch after batch, the arrays of consecutive tokens of the
token table (token 0 first, in token order; padding never reaches the sink).

On a GPU the host never waits for the forward inside the loop: real tokens
are gathered with host-computed indices, results leave the device through
non-blocking copies into pinned memory, and the sink runs in a background
writer thread behind a bounded queue (``capture.stage``), so sorting,
validation, compression and Zarr writes overlap the next forwards.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import torch
import xarray as xr

from .hooks import record_routing
from .load import ModelInfo, describe_model, language_model, load_model, weight_sums_constant
from .routers import find_routers, sort_slots
from .stage import to_device

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


def _nll(logits: torch.Tensor, ids: np.ndarray, lengths: np.ndarray, real: torch.Tensor) -> torch.Tensor:
    """Next-token NLL of every real token, NaN at each sample's last position.

    Which rows have a next token, and which token that is, come from the host
    (``ids``, ``lengths``): nothing here makes the host wait for the device.

    Parameters
    ----------
    logits : (B, S, V) model logits.
    ids : (B, S) right-padded input ids, on the host.
    lengths : (B,) real lengths, on the host.
    real : (sum(lengths),) flat (B·S) rows of the real tokens, sample-major, on the logits' device.

    Returns
    -------
    (sum(lengths),) float32 on the logits' device, sample-major.
    """
    B, S, V = logits.shape
    rows_np = np.concatenate([b * S + np.arange(max(int(n) - 1, 0)) for b, n in enumerate(lengths)]).astype(np.int64)
    flat = logits.reshape(B * S, V)
    out = torch.full((B * S,), float("nan"), dtype=torch.float32, device=logits.device)
    if rows_np.size:
        rows = to_device(rows_np, logits.device)
        targets = to_device(ids.reshape(-1)[rows_np + 1].astype(np.int64), logits.device)
        # Rows of float32 log-softmax at once: bounded extra memory whatever the vocabulary.
        step = max(1, _NLL_ELEMS // max(V, 1))
        for i in range(0, rows_np.size, step):
            r = rows[i:i + step]
            lp = torch.log_softmax(flat.index_select(0, r).float(), dim=-1)
            out[r] = -lp.gather(1, targets[i:i + step, None]).squeeze(1)
    return out.index_select(0, real)


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
_TOKEN_AXIS = {"capacity_dropped": 1, "expert_ids": 1, "expert_weights": 1, "router_logits": 1, "lens_logprob": 1, "lens_js": 1, "nll": 0}


class MemorySink:
    """A sink that keeps every batch in memory: for small captures (benchmarks, tests, a notebook).

    ``copy=True`` keeps copies (a caller may reuse its buffers); ``threads`` records which thread
    appended each batch. ``get(name)`` / ``result()`` join the batches along tokens.
    """

    def __init__(self, *, copy: bool = False):
        self.parts: list[dict] = []
        self.threads: list = []
        self.copy = copy

    def append(self, **arrays) -> None:
        import threading

        self.parts.append({k: np.array(v, copy=True) for k, v in arrays.items()} if self.copy else arrays)
        self.threads.append(threading.current_thread())

    def get(self, name: str) -> np.ndarray:
        return np.concatenate([p[name] for p in self.parts], axis=_TOKEN_AXIS[name])

    def result(self) -> dict:
        return {k: self.get(k) for k in self.parts[0]}


def capture_model(model, tokens: xr.Dataset, sink, *, keep_logits: bool = False, keep_nll: bool = True,
                  keep_lens: bool = False, keep_js: bool = False, batch_size: int = 16, progress: bool = True,
                  desc: str | None = None, where: str = "model", background: bool | None = None,
                  queue_depth: int = 2) -> ModelInfo:
    """Capture the routing of an already-loaded model (see ``capture_checkpoint``).

    Only the forward and a few gathers run on the model's device, without the
    host ever waiting for them: real (unpadded) tokens are picked with index
    lists computed on the host, results are copied to pinned host memory with
    ``non_blocking`` copies, and a background thread (``capture.stage``) waits
    for each batch's copies, reorders samples and calls ``sink.append`` while
    the device runs the next batches. ``background`` (default: on CUDA only)
    chooses that thread; ``queue_depth`` batches at most wait for it. An error
    in ``sink.append`` is raised here, and no later batch reaches the sink.
    """
    import tqdm

    from .stage import BackgroundWriter, stage_to_host

    # Encoder-decoder models run their encoder, Qwen3-Omni its thinker (capture.load.language_model).
    runner = language_model(model)
    sites = find_routers(runner, where=where)
    info = describe_model(model, where=where)
    if runner is not model and (keep_lens or keep_js) and runner is not getattr(model, "thinker", None):
        raise ValueError(f"{where}: the logit lens needs a decoder reading the token table; this encoder-decoder "
                         f"model's routing is captured on its encoder only (no lens_logprob / lens_js)")
    wsums: list[torch.Tensor] = []  # per batch: (min, max) of the per-token sum of the k weights, on the device
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
    if background is None:
        background = device.type == "cuda"
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
    check_lens = keep_nll and use_lens and last_layer in info.moe_layers
    # Writer-thread state (read here only after the writer is closed).
    state = {"pending": {}, "emitted": 0, "lens_check": 0.0}
    bar = tqdm.tqdm(total=int(lengths.sum()), unit="tok", desc=desc or where, disable=not progress)

    def deliver(staged) -> None:
        """Writer side of one batch: wait for its copies, hand the sink consecutive samples."""
        group, lens_b = staged.meta
        arrays = staged.numpy()
        lp = arrays.get("lens_logprob") if keep_lens else arrays.pop("lens_logprob", None)
        if check_lens:
            d = np.abs(lp[info.moe_layers.index(last_layer)].astype(np.float64) + arrays["nll"])
            if np.isfinite(d).any():
                state["lens_check"] = max(state["lens_check"], float(np.nanmax(d)))
        pending = state["pending"]
        if not pending and int(group[0]) == state["emitted"] and (np.diff(group) == 1).all():
            # The common case: this batch holds exactly the next samples; no split, no copy.
            state["emitted"] += len(group)
            sink.append(**arrays)
        else:
            # Pair batches may run a later sample early: it waits here until the ones before it are done.
            bounds = np.r_[0, np.cumsum(lens_b)]
            for b, i in enumerate(group):
                pending[int(i)] = {k: _token_slice(v, _TOKEN_AXIS[k], bounds[b], bounds[b + 1])
                                   for k, v in arrays.items()}
            ready = []
            while state["emitted"] in pending:
                ready.append(pending.pop(state["emitted"]))
                state["emitted"] += 1
            if ready:
                sink.append(**{k: np.concatenate([r[k] for r in ready], axis=_TOKEN_AXIS[k]) for k in ready[0]})
        bar.update(int(lens_b.sum()))

    writer = BackgroundWriter(deliver, threaded=background, depth=queue_depth, name=f"capture-writer {where}")
    try:
        with writer, torch.inference_mode(), \
                record_routing(model, sites, keep_logits=keep_logits, where=where) as rec, lens_ctx as lens:
            for group in groups:
                gspans = spans[group]
                lens_b = gspans[:, 1] - gspans[:, 0]
                S = int(lens_b.max())
                ids = np.zeros((len(group), S), dtype=np.int64)  # pad id 0: any valid id, it is masked
                for b, (a, z) in enumerate(gspans):
                    ids[b, : z - a] = token_id[a:z]
                # Flat (batch·seq) rows of the real tokens, from the host's lengths: a boolean mask on the
                # device would make the host wait for the forward to learn how many tokens it selects.
                real_np = np.concatenate([b * S + np.arange(n) for b, n in enumerate(lens_b)]).astype(np.int64)
                mask_np = np.arange(S)[None, :] < lens_b[:, None]
                input_ids = to_device(ids, device)
                attention_mask = to_device(mask_np.astype(np.int64), device)
                real = to_device(real_np, device)
                batch_rows = None
                if lens is not None:
                    batch_rows = _lens_rows(gspans, S, ids, partner, device)
                    lens.set_batch(*batch_rows)
                out = runner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
                routed = rec.pop()
                for layer in info.moe_layers:
                    n_seen = routed[layer][0].shape[0]
                    if n_seen != S * len(group):
                        raise RuntimeError(f"{where}: router at layer {layer} saw {n_seen} tokens, "
                                           f"expected batch x sequence = {S * len(group)}")
                per_layer = [routed[layer] for layer in info.moe_layers]
                # (layer, real tokens, k): gather first, so that sorting and casts skip the padding.
                e_ids = torch.stack([r[0] for r in per_layer]).index_select(1, real)
                e_w = torch.stack([r[1] for r in per_layer]).index_select(1, real)
                e_ids, e_w = sort_slots(e_ids, e_w)
                dev = {"expert_ids": e_ids.to(torch.int16), "expert_weights": e_w.float()}
                s_w = e_w.float().sum(-1)
                wsums.append(torch.stack([s_w.amin(), s_w.amax()]))
                if info.capacity is not None:
                    # Capacity routers give a dropped token's slot weight exactly 0 (no expert ran).
                    dev["capacity_dropped"] = (e_w == 0).to(torch.int8)
                if keep_logits:
                    dev["router_logits"] = torch.stack([r[2] for r in per_layer]).index_select(1, real).to(
                        torch.float16)
                del routed, per_layer
                if keep_nll:
                    logits = getattr(out, "logits", None)
                    # An encoder has no next-token distribution: NaN, as at a sample's last position.
                    dev["nll"] = (_nll(logits, ids, lens_b, real) if logits is not None else
                                  torch.full((real_np.size,), float("nan"), dtype=torch.float32, device=device))
                del out
                if lens is not None:
                    lp, js = _lens_arrays(lens.pop(), info.moe_layers, batch_rows, real, S * len(group))
                    if keep_lens or check_lens:
                        dev["lens_logprob"] = lp
                    if keep_js:
                        dev["lens_js"] = js
                writer.submit(stage_to_host(dev, meta=(group, lens_b)))
    finally:
        bar.close()
    if state["pending"] or state["emitted"] != len(spans):
        raise RuntimeError(f"{where}: {len(spans) - state['emitted']} samples were captured but never handed to "
                           f"the sink")
    tol = 1e-3 if info.dtype == "float32" else 5e-2
    if state["lens_check"] > tol:
        warnings.warn(f"{where}: the logit lens at the last decoder layer differs from the model's own NLL by up to "
                      f"{state['lens_check']:.3g} nats; the model transforms its logits in a way the lens "
                      f"(final norm + LM head) does not reproduce", stacklevel=2)
    return _weight_self_test(info, wsums, where, n_tokens=int(lengths.sum()))


def _weight_self_test(info: ModelInfo, wsums: list, where: str, *, n_tokens: int) -> ModelInfo:
    """``info`` with the observed per-token weight sums, checked against what the semantics claim.

    A claim of renormalisation needs every token's k weights to sum to one
    constant (1, or a routed_scaling_factor inside the weights); a claim of
    "not renormalised" (top-k of a full softmax, k > 1, or sigmoid scores) makes
    a constant sum a contradiction. A contradiction is warned about and stated
    in ``router_semantics``, so the cube never carries a wrong claim silently.
    """
    import dataclasses

    if not wsums:
        return info
    mm = torch.stack(wsums).cpu().numpy().astype(np.float64)
    lo, hi = float(mm[:, 0].min()), float(mm[:, 1].max())
    info = dataclasses.replace(info, weight_sum_min=lo, weight_sum_max=hi)
    constant = weight_sums_constant(lo, hi, info.dtype)
    claim = info.renormalised_claim
    if info.capacity is not None or n_tokens < 2:
        return info  # dropped slots weigh 0 / one token always has "one" sum: no test there
    if (claim is True and not constant) or (claim is False and constant and info.top_k > 1):
        seen = f"observed per-token weight sums in [{lo:.6g}, {hi:.6g}]"
        msg = (f"{where}: router semantics claim {'renormalised' if claim else 'not renormalised'} weights but the "
               f"capture {seen}")
        warnings.warn(msg, stacklevel=3)
        info = dataclasses.replace(info, router_semantics=info.router_semantics + f"; SELF-TEST CONTRADICTS THIS: {seen}")
    return info


def _token_slice(a: np.ndarray, axis: int, start: int, stop: int) -> np.ndarray:
    """``a[..., start:stop, ...]`` along ``axis`` (a view)."""
    sl = [slice(None)] * a.ndim
    sl[axis] = slice(int(start), int(stop))
    return a[tuple(sl)]


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
        js_a = to_device(np.ascontiguousarray(prow[keep]), device)
        js_b = to_device(np.ascontiguousarray(qrow[keep]), device)
    return to_device(rows, device), to_device(targets, device), js_a, js_b


def _lens_arrays(per_layer: dict, layers: list[int], batch_rows: tuple, real: torch.Tensor, n_flat: int):
    """(layer, n) log p(next token) and JS of the real tokens of a batch, NaN where undefined, on the device.

    ``batch_rows`` is what :func:`_lens_rows` returned for this batch (the rows
    the recorder scored, in its order); ``real`` the flat rows of the real
    tokens among the batch's ``n_flat`` = batch·seq.
    """
    rows, _, js_a, js_b = batch_rows
    lp_out, js_out = [], []
    for layer in layers:
        lp, js = per_layer[layer]
        full = torch.full((n_flat,), float("nan"), dtype=torch.float32, device=lp.device)
        full[rows] = lp
        lp_out.append(full)
        fj = torch.full((n_flat,), float("nan"), dtype=torch.float32, device=lp.device)
        if js is not None:
            fj[js_a] = js
            fj[js_b] = js
        js_out.append(fj)
    return torch.stack(lp_out).index_select(1, real), torch.stack(js_out).index_select(1, real)


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
        for the next consecutive tokens (batch of whole samples), from a
        background writer thread on CUDA (one thread, calls in order; an
        exception it raises stops the capture and is raised to the caller).
        The arrays may be views of buffers the sink may keep but not modify:

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
