"""Benchmark (issue 4): the logit lens computed during capture, against a plain forward and the dump-then-read way.

For one model and one token table, with the same batches everywhere, the
script times (repetitions interleaved, the order rotating between them):

``forward``
    the model's forward alone (no hooks), batch by batch;
``capture``
    ``capture.run.capture_model`` without the lens (routing + NLL);
``capture_lens``
    the same with ``keep_lens=True`` (log p(next token) after every MoE layer,
    computed in the forward hooks, chunked);
``capture_lens_js``
    also ``keep_js=True`` (JS divergence between the two conditions at aligned
    positions; pairs of samples run in one forward);
``dump`` + ``dump_lens``
    the earlier workflow: a forward with ``output_hidden_states=True``, every
    hidden state saved to disk (safetensors, one file per batch), then read back
    and the lens applied afterwards (final norm + LM head on every layer but the
    last, whose hidden state transformers already returns normalised).

It prints one JSON document: median and all times per method, the ratios, the
bytes on disk (hidden-state dumps vs ``lens_logprob`` stored as a Zarr array
with the default codecs, and raw), the largest difference between the two
lens computations, and the machine's load average (other processes share it).

Run from the repository root::

    python -m bench.lens --run runs/demo          # the trained demo model and its token table
    python -m bench.lens --model medium           # a random Mixtral (hidden 512, vocab 32000), random tokens
    python -m bench.lens --model tiny --reps 1    # seconds; a smoke run

``--threads`` sets torch's CPU threads (default 1).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a file: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

SIZES = {
    # name: (hidden, intermediate, layers, heads, experts, top_k, vocab, samples, min_len, max_len)
    "tiny": (32, 64, 2, 2, 4, 2, 384, 8, 16, 32),
    "demo": (64, 128, 4, 4, 8, 2, 2048, 96, 64, 128),
    "medium": (512, 1024, 8, 8, 8, 2, 32000, 24, 64, 96),
}


def _synthetic(size: str, seed: int = 0):
    """A random Mixtral of ``size`` and a paired token table (sample 2i and 2i+1 share their tokens)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from storage.schema import token_table

    H, I, L, heads, E, k, V, n, lo, hi = SIZES[size]
    torch.manual_seed(seed)
    cfg = MixtralConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=heads,
                        num_key_value_heads=heads, num_local_experts=E, num_experts_per_tok=k, vocab_size=V,
                        max_position_embeddings=hi)
    model = MixtralForCausalLM(cfg).eval()
    rng = np.random.default_rng(seed)
    lengths = np.repeat(rng.integers(lo, hi + 1, size=n // 2), 2)
    ids = [rng.integers(3, V, size=m) for m in lengths[::2]]
    tok = np.concatenate([x for x in ids for _ in range(2)])
    sample = np.repeat(np.arange(len(lengths)), lengths)
    position = np.concatenate([np.arange(m) for m in lengths])
    starts = np.r_[0, np.cumsum(lengths)[:-1]]
    aligned = np.full(tok.size, -1, dtype=np.int64)
    for i in range(0, len(lengths), 2):
        a = starts[i] + np.arange(1, lengths[i])  # position 0 plays BOS: not canonical
        b = starts[i + 1] + np.arange(1, lengths[i])
        aligned[a], aligned[b] = b, a
    pair = np.repeat([f"p{i // 2}" for i in range(len(lengths))], lengths)
    cond = np.repeat(["A" if i % 2 == 0 else "B" for i in range(len(lengths))], lengths)
    tokens = token_table(sample=sample, position=position, token_id=tok, condition=cond, pair=pair,
                         aligned_token=aligned, canonical=position > 0)
    return model, tokens, f"random Mixtral '{size}' (hidden {H}, {L} layers, {E} experts top-{k}, vocab {V})"


def _from_run(run: Path):
    """The last checkpoint of a demo run and the token table of its routing cube."""
    from capture.load import load_model
    from storage import cube as cubes

    ckpts = sorted((run / "model" / "checkpoints").glob("step_*"))
    if not ckpts:
        raise FileNotFoundError(f"{run}/model/checkpoints: no demo checkpoints (run the demo first)")
    ds = cubes.open_routing(run / "routing.zarr", complete_only=False)
    tokens = ds.drop_vars(list(ds.data_vars)).drop_dims([d for d in ds.dims if d != "token"]).load()
    return load_model(ckpts[-1]), tokens, f"demo checkpoint {ckpts[-1].name} of {run}"


def _batches(tokens, batch_size: int):
    from capture.run import sample_spans

    spans = sample_spans(tokens)
    token_id = np.asarray(tokens["token_id"].values).astype(np.int64)
    out = []
    for i in range(0, len(spans), batch_size):
        g = spans[i:i + batch_size]
        lens = g[:, 1] - g[:, 0]
        ids = np.zeros((len(g), int(lens.max())), dtype=np.int64)
        for b, (a, z) in enumerate(g):
            ids[b, : z - a] = token_id[a:z]
        mask = np.arange(ids.shape[1])[None, :] < lens[:, None]
        out.append((torch.from_numpy(ids), torch.from_numpy(mask.astype(np.int64)), lens))
    return out


def _forward(model, batches):
    with torch.inference_mode():
        for ids, mask, _ in batches:
            model(input_ids=ids, attention_mask=mask, use_cache=False)


def _capture(model, tokens, batch_size, **kw):
    from capture.run import MemorySink, capture_model

    sink = MemorySink()
    capture_model(model, tokens, sink, batch_size=batch_size, progress=False, **kw)
    return sink


def _dump(model, batches, folder: Path) -> int:
    """Forward with all hidden states, each batch's states saved with safetensors; bytes written."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        for i, (ids, mask, lens) in enumerate(batches):
            out = model(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True)
            tensors = {f"h{j}": h.contiguous() for j, h in enumerate(out.hidden_states)}
            tensors["input_ids"] = ids
            tensors["lengths"] = torch.from_numpy(lens)
            save_file(tensors, str(folder / f"batch_{i:05d}.safetensors"))
    return sum(p.stat().st_size for p in folder.iterdir())


def _dump_lens(model, folder: Path, layers: list[int]) -> np.ndarray:
    """Read the dumps back and apply the lens: (layer, token) log p(next token), NaN at each sample's end."""
    from safetensors.torch import load_file

    from capture.lens import find_lens_head, target_logprob

    head = find_lens_head(model)
    n_layers = model.config.num_hidden_layers
    cols = []
    with torch.inference_mode():
        for path in sorted(folder.glob("batch_*.safetensors")):
            t = load_file(str(path))
            ids, lens = t["input_ids"], t["lengths"]
            B, S = ids.shape
            real = torch.arange(S)[None, :] < lens[:, None]
            has = torch.arange(S)[None, :] < (lens[:, None] - 1)
            b, p = has.nonzero(as_tuple=True)
            rows = []
            for layer in layers:
                h = t[f"h{layer + 1}"]  # h0 = embeddings
                if layer == n_layers - 1:
                    # transformers returns the last hidden state already normalised: do not normalise twice
                    lp = torch.log_softmax(head.lm_head(h[b, p]).float(), dim=-1).gather(
                        1, ids[b, p + 1][:, None]).squeeze(1)
                else:
                    lp = target_logprob(head, h[b, p], ids[b, p + 1])
                full = torch.full((B, S), float("nan"))
                full[b, p] = lp
                rows.append(full[real])
            cols.append(torch.stack(rows).numpy())
    return np.concatenate(cols, axis=1)


def _zarr_bytes(array: np.ndarray, folder: Path) -> int:
    """Bytes on disk of ``array`` as a Zarr v3 array with the default codecs (as lens_logprob is stored)."""
    import zarr

    z = zarr.create_array(store=str(folder), shape=array.shape, dtype=array.dtype,
                          chunks=(1, array.shape[1]), fill_value=np.nan)
    z[...] = array
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def bench(model, tokens, *, label: str, reps: int, batch_size: int) -> dict:
    from capture.load import describe_model

    info = describe_model(model)
    batches = _batches(tokens, batch_size)
    can_js = "aligned_token" in tokens.coords and (np.asarray(tokens["aligned_token"].values) >= 0).any()
    tmp = Path(tempfile.mkdtemp(prefix="bench-lens-"))
    methods = ["forward", "capture", "capture_lens"] + (["capture_lens_js"] if can_js else []) + ["dump"]
    times = {m: [] for m in methods + ["dump_lens"]}
    results = {}
    try:
        # One untimed round first: allocator, kernels and file-system caches warm up.
        for r in range(-1, reps):
            order = methods[r % len(methods):] + methods[: r % len(methods)]
            for m in order:
                t0 = time.perf_counter()
                if m == "forward":
                    _forward(model, batches)
                elif m == "capture":
                    _capture(model, tokens, batch_size)
                elif m == "capture_lens":
                    results["lens"] = _capture(model, tokens, batch_size, keep_lens=True).get("lens_logprob")
                elif m == "capture_lens_js":
                    _capture(model, tokens, batch_size, keep_lens=True, keep_js=True)
                elif m == "dump":
                    shutil.rmtree(tmp / "dump", ignore_errors=True)
                    results["dump_bytes"] = _dump(model, batches, tmp / "dump")
                    if r >= 0:
                        times[m].append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    results["dump_lens"] = _dump_lens(model, tmp / "dump", info.moe_layers)
                    m = "dump_lens"
                if r >= 0:
                    times[m].append(time.perf_counter() - t0)
        lens_bytes = _zarr_bytes(results["lens"].astype(np.float32), tmp / "lens.zarr")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = {m: statistics.median(v) for m, v in times.items()}
    diff = np.abs(results["lens"] - results["dump_lens"])
    n_tokens = int(tokens.sizes["token"])
    return {
        "model": label,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "moe_layers": list(info.moe_layers),
        "vocab": int(info.vocab_size),
        "tokens": n_tokens,
        "samples": int(len(np.unique(tokens["sample"].values))),
        "batch_size": batch_size,
        "repetitions": reps,
        "warmup_rounds": 1,
        "seconds_median": {m: round(v, 4) for m, v in med.items()},
        "seconds_all": {m: [round(x, 4) for x in v] for m, v in times.items()},
        "ratios": {
            "capture_lens / forward": round(med["capture_lens"] / med["forward"], 3),
            "capture_lens / capture": round(med["capture_lens"] / med["capture"], 3),
            **({"capture_lens_js / capture": round(med["capture_lens_js"] / med["capture"], 3)} if can_js else {}),
            "(dump + dump_lens) / capture_lens": round((med["dump"] + med["dump_lens"]) / med["capture_lens"], 3),
        },
        "bytes_on_disk": {
            "dump_hidden_states_safetensors": int(results["dump_bytes"]),
            "lens_logprob_zarr": int(lens_bytes),
            "lens_logprob_raw_float32": int(results["lens"].size * 4),
            "dump / lens_zarr": round(results["dump_bytes"] / lens_bytes, 1),
        },
        "max_abs_diff_capture_lens_vs_dump_lens": float(np.nanmax(diff)),
        "nan_pattern_equal": bool((np.isnan(results["lens"]) == np.isnan(results["dump_lens"])).all()),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, help="a demo run directory (its last checkpoint and routing.zarr tokens)")
    ap.add_argument("--model", choices=sorted(SIZES), help="a random Mixtral of this size with random paired tokens")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a shared machine more threads than free cores "
                         "make timings swing by orders of magnitude)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.run and not args.model:
        ap.error("give --run DIR and/or --model SIZE")
    load0 = os.getloadavg()
    out = {"machine": {"python": platform.python_version(), "torch": torch.__version__,
                       "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                       "loadavg_before": [round(x, 2) for x in load0]}, "benchmarks": []}
    if args.run:
        model, tokens, label = _from_run(args.run)
        out["benchmarks"].append(bench(model, tokens, label=label, reps=args.reps, batch_size=args.batch_size))
    if args.model:
        model, tokens, label = _synthetic(args.model)
        out["benchmarks"].append(bench(model, tokens, label=label, reps=args.reps, batch_size=args.batch_size))
    out["machine"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
