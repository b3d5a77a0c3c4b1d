"""Benchmark (issues 5 and 11): what capturing routing costs on top of a plain forward.

Models (``--preset``), randomly initialised from their config (routing cost
does not depend on trained weights):

``demo``              the demo's Mixtral (``capture.demo.DemoConfig`` defaults: 4 layers, 8 experts,
                      top-2, hidden 64, vocabulary 2048, context 128), float32
``olmoe-1b-7b``       OLMoE-1B-7B's shape: 16 MoE layers × 64 experts, top-8, hidden 2048, vocabulary 50304
``qwen3-30b-a3b``     Qwen3-30B-A3B's shape: 48 MoE layers × 128 experts, top-8, hidden 2048, vocabulary 151936
``deepseek-v2-lite``  DeepSeek-V2-Lite's shape: 26 MoE layers (+1 dense) × 64 routed experts (+2 shared),
                      top-6, MLA attention, hidden 2048, vocabulary 102400

The real-size presets run in bfloat16 on ``--device cuda``. ``--shrink`` keeps
a preset's routing shape (MoE layers × experts × top-k: what capture copies
and writes) but makes every width small (hidden 64, vocabulary 2048), so that
it runs on a CPU; it is the default on CPU.

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
``+logits+nll+lens``  … + the logit lens (``keep_lens``; demo preset only)
``…+js``              … + the lens Jensen-Shannon divergence at aligned positions (``keep_js``; demo only)
``…->zarr``           a variant into a real ``storage.cube.RoutingWriter`` (one checkpoint region of a
                      routing.zarr with just that variant's variables, rewritten each repetition):
                      the whole cost, write included. ``--written fullest`` (demo default): the
                      fullest variant only; ``each`` (real presets): every capture variant.

On a GPU every timed variant ends with ``torch.cuda.synchronize()``.

Prints JSON: per variant the median seconds, tokens/s, the ratio to ``plain``
(ratio of medians, and the per-repetition ratios), every repeat.

Run from the repository root::

    python -m bench.capture            # demo, 24,576 tokens in samples of 64..128 tokens, 7 repeats
    python -m bench.capture --device cuda --preset qwen3-30b-a3b   # 49,500 tokens, 16 × ≤1024, bf16
    python -m bench.capture --preset olmoe-1b-7b --shrink --tokens 4096 --max-len 256   # the same on a CPU
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


# name -> (transformers config class, model class, config keywords of the real model)
PRESETS = {
    "olmoe-1b-7b": ("OlmoeConfig", "OlmoeForCausalLM", dict(
        vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16,
        num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, max_position_embeddings=4096,
        pad_token_id=1, bos_token_id=None, eos_token_id=50279)),
    "qwen3-30b-a3b": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
        num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=40960, tie_word_embeddings=False)),
    "deepseek-v2-lite": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, first_k_dense_replace=1, num_attention_heads=16, num_key_value_heads=16,
        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, kv_lora_rank=512, q_lora_rank=None,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, topk_method="greedy", n_group=1, topk_group=1,
        routed_scaling_factor=1.0, max_position_embeddings=163840)),
}
# --shrink: the routing shape stays (layers, experts, top-k), every width becomes small.
SHRINK = dict(vocab_size=2048, hidden_size=64, intermediate_size=64, moe_intermediate_size=32, num_attention_heads=4,
              num_key_value_heads=4, head_dim=16, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
              v_head_dim=16, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def preset_model(name: str, *, shrink: bool, seed: int = 0):
    """A randomly initialised model of a real MoE's shape (``PRESETS``), eval mode; and its config keywords."""
    import torch
    import transformers

    cfg_cls, model_cls, kw = PRESETS[name]
    cfg_cls = getattr(transformers, cfg_cls)
    kw = dict(kw)
    if shrink:
        accepted = set(inspect.signature(cfg_cls.__init__).parameters)
        kw.update({k: v for k, v in SHRINK.items() if k in accepted and (k in kw or k in ("head_dim",))})
        if "intermediate_size" in kw and "moe_intermediate_size" not in accepted:
            kw["intermediate_size"] = SHRINK["moe_intermediate_size"]  # OLMoE: every MLP is an expert
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg_cls(**kw))
    return model.eval(), kw


def plain_forward(model, tokens, *, batch_size: int) -> int:
    """The forward passes ``capture_model`` makes, without hooks or copies. Returns tokens seen."""
    import torch

    from capture.run import batches, sample_spans

    device = next(iter(model.parameters())).device
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
            input_ids = torch.from_numpy(ids).to(device)
            mask = (torch.arange(S)[None, :] < torch.from_numpy(lens)[:, None]).long().to(device)
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
    device = torch.device(args.device)
    if args.preset == "demo":
        model, cfg = demo_model(seed=args.seed)
        max_len, vocab = min(args.max_len, cfg.seq_len), cfg.vocab_size
        config_note = "capture.demo.DemoConfig() defaults, random init"
        widths = {"hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size}
    else:
        model, kw = preset_model(args.preset, shrink=args.shrink, seed=args.seed)
        max_len, vocab = min(args.max_len, kw["max_position_embeddings"]), kw["vocab_size"]
        config_note = f"{args.preset} shape{' (--shrink: small widths, same routing shape)' if args.shrink else ''}, random init"
        widths = {"hidden_size": kw["hidden_size"], "vocab_size": kw["vocab_size"]}
    dtype = getattr(torch, args.dtype)
    model = model.to(device=device, dtype=dtype)
    tokens = token_table(args.tokens, min_len=args.min_len, max_len=max_len, vocab=vocab, seed=args.seed)
    n_tokens = int(tokens.sizes["token"])
    lens_kws = lens_options() if args.preset == "demo" else []
    extra = {} if args.background == "auto" else {"background": args.background == "on"}

    capture_variants = {
        "ids_weights": dict(keep_logits=False, keep_nll=False),
        "+logits": dict(keep_logits=True, keep_nll=False),
        "+logits+nll": dict(keep_logits=True, keep_nll=True),
    }
    opts, label = dict(keep_logits=True, keep_nll=True), "+logits+nll"
    for kw_ in lens_kws:
        opts = {**opts, kw_: True}
        label += "+" + kw_.replace("keep_", "")
        capture_variants[label] = opts
    fullest = list(capture_variants)[-1]
    written = args.written or ("fullest" if args.preset == "demo" else "each")
    to_write = [fullest] if written == "fullest" else list(capture_variants)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    work = Path(tempfile.mkdtemp(prefix="moe-atlas-bench-capture-"))
    try:
        info = describe_model(model, where=f"bench {args.preset} model")
        stores = {}
        for i, name in enumerate(to_write):
            o = capture_variants[name]
            stores[name] = work / f"routing-{i}.zarr"
            template = empty_routing(
                tokens, checkpoints=["bench"], steps=[0], layers=list(info.moe_layers),
                num_experts=info.num_experts, top_k=info.top_k, keep_logits=o["keep_logits"],
                keep_nll=o["keep_nll"], keep_lens=bool(o.get("keep_lens")), keep_js=bool(o.get("keep_js")),
                attrs={"model_family": info.family, "router_semantics": info.router_semantics,
                       "source": "bench.capture"},
            )
            cubes.prepare_routing(stores[name], template)

        def capture_into(sink, opts):
            capture_model(model, tokens, sink, batch_size=args.batch_size, progress=False, **opts, **extra)
            sync()

        def zarr_run(name):
            with cubes.RoutingWriter(stores[name], "bench") as writer:
                capture_into(writer, capture_variants[name])

        def plain():
            plain_forward(model, tokens, batch_size=args.batch_size)
            sync()

        variants = {"plain": plain}
        for name, opts in capture_variants.items():
            variants[name] = (lambda o=opts: capture_into(DiscardSink(), o))
        for name in to_write:
            variants[f"{name}->zarr"] = (lambda n=name: zarr_run(n))

        for name, fn in variants.items():  # warm-up: allocator, kernels, first Zarr write
            fn()
        names = list(variants)
        times = {n: [] for n in names}
        cpu = {n: [] for n in names}  # CPU seconds of this process (all its threads): steadier on a loaded host
        for r in range(args.repeats):
            order = names[r % len(names):] + names[: r % len(names)]
            for name in order:
                t, c = time.perf_counter(), time.process_time()
                variants[name]()
                times[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - c)
            log(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names))
        zarr_bytes, finite = {}, {}
        for name, store in stores.items():
            if cubes.completed_checkpoints(store) != ["bench"]:
                raise RuntimeError(f"{store}: the RoutingWriter variant '{name}' did not complete its region")
            zarr_bytes[name] = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
            written_ds = cubes.open_routing(store)
            # How much of each optional variable holds numbers: shows the lens/JS variants really computed something.
            finite[name] = {v: float(np.isfinite(written_ds[v].values).mean())
                            for v in ("nll", "lens_logprob", "lens_js") if v in written_ds}
            written_ds.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    plain_s = statistics.median(times["plain"])
    plain_cpu = statistics.median(cpu["plain"])
    results = {}
    for name in names:
        med = statistics.median(times[name])
        results[name] = {
            **summary(times[name]),
            "tokens_per_s": n_tokens / med,
            "ratio_to_plain": med / plain_s,
            "ratio_to_plain_per_repeat": [a / b for a, b in zip(times[name], times["plain"])],
            "cpu_s_median": statistics.median(cpu[name]),
            "cpu_ratio_to_plain": statistics.median(cpu[name]) / plain_cpu if plain_cpu > 0 else None,
        }
    return {
        "model": {
            "preset": args.preset, "config": config_note, "family": info.family,
            "moe_layers": list(info.moe_layers), "num_experts": info.num_experts, "top_k": info.top_k, **widths,
            "parameters": int(sum(p.numel() for p in model.parameters())), "dtype": args.dtype,
        },
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "background_writer": args.background,
        "inputs": {"samples": int(np.unique(tokens["sample"].values).size), "tokens": n_tokens,
                   "batch_size": args.batch_size, "sample_length": [args.min_len, max_len],
                   "paired": "conditions plain/chat, content aligned (aligned_token), as bench.analyses generates"},
        "torch_threads": args.threads,
        "lens_options": lens_kws,
        "lens_note": None if lens_kws else ("lens variants run with the demo preset only" if args.preset != "demo"
                                            else "capture_model has no logit-lens option yet; the lens variants are left out"),
        "variant_options": capture_variants,
        "zarr_bytes_after_run": sum(zarr_bytes.values()),
        "zarr_bytes_per_variant": zarr_bytes,
        "zarr_finite_fraction": finite[to_write[-1]] if finite else {},
        "variants": results,
        "storage_cost_ratio": statistics.median(times[f"{fullest}->zarr"]) / statistics.median(times[fullest]),
        "storage_cost_note": f"median '{fullest}->zarr' / median '{fullest}' (same capture, RoutingWriter vs discard)",
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=["demo", *PRESETS], default="demo")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1)")
    p.add_argument("--dtype", default=None, help="model dtype (default: bfloat16 for real presets on a GPU, "
                                                 "float32 otherwise)")
    p.add_argument("--shrink", action=argparse.BooleanOptionalAction, default=None,
                   help="real presets: small widths, same routing shape (default: on for a CPU)")
    p.add_argument("--tokens", type=int, default=None,
                   help="tokens in the token table (paired samples; default 24,576 demo, 49,500 real presets)")
    p.add_argument("--min-len", type=int, default=None, help="default 64 (demo), 512 (real presets)")
    p.add_argument("--max-len", type=int, default=None, help="default 128 (demo), 1024 (real presets)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=None, help="default 7 (demo), 3 (real presets)")
    p.add_argument("--written", choices=["fullest", "each"], default=None,
                   help="which capture variants also run into a routing.zarr (default: fullest for demo, each "
                        "for real presets)")
    p.add_argument("--background", choices=["auto", "on", "off"], default="auto",
                   help="capture_model's background writer (auto: its default, on CUDA only)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the Dask capture workers use 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="120 tokens in short samples, 1 repeat (smoke test)")
    args = p.parse_args(argv)
    real = args.preset != "demo"
    on_gpu = args.device.startswith("cuda")
    defaults = dict(tokens=49500, min_len=512, max_len=1024, repeats=3) if real else \
        dict(tokens=24576, min_len=64, max_len=128, repeats=7)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.shrink is None:
        args.shrink = real and not on_gpu
    if args.dtype is None:
        args.dtype = "bfloat16" if real and on_gpu else "float32"
    if args.tiny:
        args.tokens, args.min_len, args.max_len, args.batch_size, args.repeats = 120, 8, 24, 4, 1
    if min(args.tokens, args.min_len, args.batch_size, args.repeats, args.threads) < 1 or args.max_len < args.min_len:
        raise SystemExit("--tokens, --min-len, --batch-size, --repeats, --threads must be >= 1 and --max-len >= --min-len")
    import torch

    if not isinstance(getattr(torch, args.dtype, None), torch.dtype):
        raise SystemExit(f"--dtype {args.dtype}: not a torch dtype")
    if on_gpu and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available on this machine")
    doc = {"benchmark": "capture", "issue": [5, 11], "machine_start": machine(),
           "argv": sys.argv[1:] if argv is None else argv}
    doc.update(run(args))
    doc["machine_end"] = machine()
    emit(doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
