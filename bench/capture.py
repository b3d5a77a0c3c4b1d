"""Benchmark (issue 5): what capturing routing costs on top of a plain forward.

Model: the demo's Mixtral (``capture.demo.DemoConfig`` defaults: 4 layers,
8 experts, top-2, hidden 64, vocabulary 2048, context 128), randomly
initialised from its config (routing cost does not depend on trained weights).
Inputs: one synthetic token table of paired samples (``bench.analyses.synthetic_tokens``:
conditions plain/chat with aligned content, so the Jensen-Shannon lens can run); every variant runs
the *same* batches (``capture.run.batches`` over the table, right-padded, the
same attention mask).

Variants, repetitions interleaved (each repetition runs every variant once,
in a rotated order), one untimed warm-up pass each:

``plain``             ``model(input_ids=…, attention_mask=…, use_cache=False)`` under ``torch.inference_mode``
``ids_weights``       ``capture.run.capture_model`` keeping ids + weights, into a sink that discards
``+logits``           … + router logits
``+logits+nll``       … + the model's next-token NLL (what the demo pipeline stores)
``+logits+nll+lens``  … + the logit lens (``keep_lens``), when ``capture_model`` has it
``…+js``              … + the lens Jensen-Shannon divergence at aligned positions (``keep_js``), when it has it
``…→zarr``            the fullest variant into a real ``storage.cube.RoutingWriter`` (one
                      checkpoint region of a routing.zarr, rewritten each repetition):
                      the storage cost on top of the capture itself

Prints JSON: per variant the median seconds, tokens/s, the ratio to ``plain``
(ratio of medians, and the per-repetition ratios), every repeat.

Run from the repository root::

    python -m bench.capture            # 24,576 tokens in samples of 64..128 tokens, 7 repeats
    python -m bench.capture --tiny     # seconds; for the smoke test
"""

from __future__ import annotations

import argparse
import inspect
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.analyses import emit, log, machine, summary  # noqa: E402


class DiscardSink:
    """A capture sink that drops what it is given (measures capture without storage)."""

    def __init__(self):
        self.tokens = 0

    def append(self, **arrays) -> None:
        self.tokens += int(arrays["expert_ids"].shape[1])


class _Vocab:
    """The tokenizer facts ``build_model_config`` reads, without training a tokenizer."""

    def __init__(self, size: int):
        self.size = size
        self.bos_token_id, self.eos_token_id, self.pad_token_id = 1, 2, 0

    def __len__(self) -> int:
        return self.size


def demo_model(seed: int = 0, **overrides):
    """The demo's MixtralForCausalLM (DemoConfig defaults + ``overrides``), randomly initialised, eval mode."""
    import torch
    from transformers import MixtralForCausalLM

    from capture.demo import DemoConfig
    from capture.demo.train import build_model_config

    cfg = DemoConfig(**overrides)
    torch.manual_seed(seed)
    model = MixtralForCausalLM(build_model_config(cfg, _Vocab(cfg.vocab_size)))
    return model.eval(), cfg


def token_table(n_tokens: int, *, min_len: int, max_len: int, vocab: int, seed: int = 0):
    """Paired samples (conditions plain/chat, aligned content) of ``min_len..max_len`` tokens (dims: token).

    The pairing (``aligned_token``) lets the Jensen-Shannon lens variant run on the same inputs.
    """
    from bench.analyses import synthetic_tokens

    prefix = min(12, max(0, max_len - min_len))
    return synthetic_tokens(n_tokens, seed=seed, vocab=vocab, min_len=min_len, max_len=max_len - prefix,
                            max_prefix=prefix)


def plain_forward(model, tokens, *, batch_size: int) -> int:
    """The forward passes ``capture_model`` makes, without hooks or copies. Returns tokens seen."""
    import torch

    from capture.run import batches, sample_spans

    spans = sample_spans(tokens)
    token_id = np.asarray(tokens["token_id"].values).astype(np.int64)
    seen = 0
    with torch.inference_mode():
        for group in batches(spans, batch_size):
            lens = group[:, 1] - group[:, 0]
            S = int(lens.max())
            ids = np.zeros((len(group), S), dtype=np.int64)
            for b, (a, z) in enumerate(group):
                ids[b, : z - a] = token_id[a:z]
            input_ids = torch.from_numpy(ids)
            mask = (torch.arange(S)[None, :] < torch.from_numpy(lens)[:, None]).long()
            out = model(input_ids=input_ids, attention_mask=mask, use_cache=False)
            del out
            seen += int(lens.sum())
    return seen


LENS_OPTIONS = ("keep_lens", "keep_js")  # in the order they are added to the variants


def lens_options() -> list[str]:
    """The logit-lens keywords ``capture_model`` has (``keep_lens``, then ``keep_js``), if any.

    Any other keyword mentioning the lens is listed too, so that a new option shows in the JSON.
    """
    from capture.run import capture_model

    names = list(inspect.signature(capture_model).parameters)
    known = [n for n in LENS_OPTIONS if n in names]
    return known + [n for n in names if ("lens" in n.lower() or n.lower().endswith("_js")) and n not in known]


def run(args) -> dict:
    """Time every variant (see the module doc) on the same model and batches; return the JSON fields."""
    import torch

    from capture.load import describe_model
    from capture.run import capture_model
    from storage import cube as cubes
    from storage.schema import empty_routing

    torch.set_num_threads(args.threads)
    model, cfg = demo_model(seed=args.seed)
    max_len = min(args.max_len, cfg.seq_len)
    tokens = token_table(args.tokens, min_len=args.min_len, max_len=max_len, vocab=cfg.vocab_size, seed=args.seed)
    n_tokens = int(tokens.sizes["token"])
    lens_kws = lens_options()

    capture_variants = {
        "ids_weights": dict(keep_logits=False, keep_nll=False),
        "+logits": dict(keep_logits=True, keep_nll=False),
        "+logits+nll": dict(keep_logits=True, keep_nll=True),
    }
    opts, label = dict(keep_logits=True, keep_nll=True), "+logits+nll"
    for kw in lens_kws:
        opts = {**opts, kw: True}
        label += "+" + kw.replace("keep_", "")
        capture_variants[label] = opts
    fullest = list(capture_variants)[-1]

    work = Path(tempfile.mkdtemp(prefix="moe-atlas-bench-capture-"))
    try:
        routing = work / "routing.zarr"
        info = describe_model(model, where="bench demo model")
        template = empty_routing(
            tokens, checkpoints=["bench"], steps=[0], layers=list(info.moe_layers), num_experts=info.num_experts,
            top_k=info.top_k, keep_logits=True, keep_nll=True,
            keep_lens="keep_lens" in capture_variants[fullest], keep_js="keep_js" in capture_variants[fullest],
            attrs={"model_family": info.family, "router_semantics": info.router_semantics,
                   "source": "bench.capture"},
        )
        cubes.prepare_routing(routing, template)

        def capture_into(sink, opts):
            capture_model(model, tokens, sink, batch_size=args.batch_size, progress=False, **opts)

        def zarr_run():
            with cubes.RoutingWriter(routing, "bench") as writer:
                capture_into(writer, capture_variants[fullest])

        variants = {"plain": lambda: plain_forward(model, tokens, batch_size=args.batch_size)}
        for name, opts in capture_variants.items():
            variants[name] = (lambda o=opts: capture_into(DiscardSink(), o))
        variants[f"{fullest}->zarr"] = zarr_run

        for name, fn in variants.items():  # warm-up: allocator, kernels, first Zarr write
            fn()
        names = list(variants)
        times = {n: [] for n in names}
        for r in range(args.repeats):
            order = names[r % len(names):] + names[: r % len(names)]
            for name in order:
                t = time.perf_counter()
                variants[name]()
                times[name].append(time.perf_counter() - t)
            log(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names))
        if cubes.completed_checkpoints(routing) != ["bench"]:
            raise RuntimeError(f"{routing}: the RoutingWriter variant did not complete its region")
        zarr_bytes = sum(p.stat().st_size for p in routing.rglob("*") if p.is_file())
        written = cubes.open_routing(routing)
        # How much of each optional variable holds numbers: shows the lens/JS variants really computed something.
        finite = {v: float(np.isfinite(written[v].values).mean()) for v in ("nll", "lens_logprob", "lens_js")
                  if v in written}
        written.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    plain = statistics.median(times["plain"])
    results = {}
    for name in names:
        med = statistics.median(times[name])
        results[name] = {
            **summary(times[name]),
            "tokens_per_s": n_tokens / med,
            "ratio_to_plain": med / plain,
            "ratio_to_plain_per_repeat": [a / b for a, b in zip(times[name], times["plain"])],
        }
    return {
        "model": {
            "config": "capture.demo.DemoConfig() defaults, random init",
            "family": info.family, "moe_layers": list(info.moe_layers), "num_experts": info.num_experts,
            "top_k": info.top_k, "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
            "parameters": int(sum(p.numel() for p in model.parameters())),
        },
        "inputs": {"samples": int(np.unique(tokens["sample"].values).size), "tokens": n_tokens,
                   "batch_size": args.batch_size, "sample_length": [args.min_len, max_len],
                   "paired": "conditions plain/chat, content aligned (aligned_token), as bench.analyses generates"},
        "torch_threads": args.threads,
        "lens_options": lens_kws,
        "lens_note": None if lens_kws else "capture_model has no logit-lens option yet; the lens variants are left out",
        "variant_options": capture_variants,
        "zarr_bytes_after_run": zarr_bytes,
        "zarr_finite_fraction": finite,
        "variants": results,
        "storage_cost_ratio": statistics.median(times[f"{fullest}->zarr"]) / statistics.median(times[fullest]),
        "storage_cost_note": f"median '{fullest}->zarr' / median '{fullest}' (same capture, RoutingWriter vs discard)",
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=24576, help="tokens in the token table (paired samples)")
    p.add_argument("--min-len", type=int, default=64)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the Dask capture workers use 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="120 tokens in short samples, 1 repeat (smoke test)")
    args = p.parse_args(argv)
    if args.tiny:
        args.tokens, args.min_len, args.max_len, args.batch_size, args.repeats = 120, 8, 24, 4, 1
    if min(args.tokens, args.min_len, args.batch_size, args.repeats, args.threads) < 1 or args.max_len < args.min_len:
        raise SystemExit("--tokens, --min-len, --batch-size, --repeats, --threads must be >= 1 and --max-len >= --min-len")
    doc = {"benchmark": "capture", "issue": 5, "machine_start": machine(), "argv": sys.argv[1:] if argv is None else argv}
    doc.update(run(args))
    doc["machine_end"] = machine()
    emit(doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
