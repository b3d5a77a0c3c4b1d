"""Run a checkpoint over a token table and stream its routing to a sink.

``capture_checkpoint`` loads the model, hooks its routers (``capture.hooks``),
runs consecutive samples in right-padded batches under ``torch.inference_mode``
and hands the sink, batch after batch, the arrays of consecutive tokens of the
token table (token 0 first, in token order; padding never reaches the sink).
"""

from __future__ import annotations

import numpy as np
import torch
import xarray as xr

from .hooks import record_routing
from .load import ModelInfo, describe_model, load_model
from .routers import find_routers, sort_slots

__all__ = ["capture_checkpoint", "capture_model", "sample_spans", "batches"]

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


def capture_model(model, tokens: xr.Dataset, sink, *, keep_logits: bool = False, keep_nll: bool = True,
                  batch_size: int = 16, progress: bool = True, desc: str | None = None,
                  where: str = "model") -> ModelInfo:
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
    groups = batches(spans, batch_size)
    bar = tqdm.tqdm(total=int(lengths.sum()), unit="tok", desc=desc or where, disable=not progress)
    try:
        with torch.inference_mode(), record_routing(model, sites, keep_logits=keep_logits, where=where) as rec:
            for group in groups:
                lens = group[:, 1] - group[:, 0]
                S = int(lens.max())
                ids = np.zeros((len(group), S), dtype=np.int64)  # pad id 0: any valid id, it is masked
                for b, (a, z) in enumerate(group):
                    ids[b, : z - a] = token_id[a:z]
                input_ids = torch.from_numpy(ids).to(device)
                lens_t = torch.from_numpy(lens).to(device)
                mask = (torch.arange(S, device=device)[None, :] < lens_t[:, None])
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
                sink.append(**arrays)
                bar.update(int(lens.sum()))
    finally:
        bar.close()
    return info


def capture_checkpoint(model_dir, tokens: xr.Dataset, sink, *, keep_logits: bool = False, keep_nll: bool = True,
                       batch_size: int = 16, device="cpu", trust_remote_code: bool = False, progress: bool = True,
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

        ``layer`` runs over ``ModelInfo.moe_layers`` in that order.
    keep_logits, keep_nll : which optional arrays to produce.
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
        return capture_model(model, tokens, sink, keep_logits=keep_logits, keep_nll=keep_nll, batch_size=batch_size,
                             progress=progress, desc=desc, where=str(model_dir))
    finally:
        del model
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
