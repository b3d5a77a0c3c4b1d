"""Configuration and CPU training of the demo's tiny Mixtral-style MoE language model.

The model is a ``transformers`` ``MixtralForCausalLM`` built from a ``MixtralConfig``
(no download), trained from a seeded initialisation with the language-modelling loss plus
the Switch-style auxiliary load-balancing loss (``output_router_logits=True``,
``router_aux_loss_coef``), in transformers' definition: it counts all k slots, so it reads
≈ k (2 here) at perfect balance, where the ``balance`` analysis' ``lb_loss`` (top-1
fractions) reads 1; the analysis reproduces it as ``lb_loss_hf_all_layers``. Each training
sequence is ``<|bos|>`` followed by ``seq_len - 1`` tokens from one domain's token stream
(documents joined by ``<|eos|>``);
each batch holds an equal share of every domain, so the balancing loss sees all domains
at once and leaves the router free to split them.

``torch`` and ``transformers`` are imported inside functions: importing this module (for
``DemoConfig``) must stay cheap. No ``from __future__ import annotations`` here: the
dataclass field types stay real types (``int``, ``float``, ``list[int]``) for validators
that read ``dataclasses.fields(DemoConfig)``.
"""

import dataclasses
import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from storage import atomic

from .corpus import DOMAINS


def _default_checkpoint_steps() -> list[int]:
    return [0, 50, 150, 300]


@dataclass(frozen=True)
class DemoConfig:
    """Everything that determines the demo model and data (the ``[model.demo]`` table).

    Two configs that compare equal produce the same artefacts on the same machine; a
    manifest records ``dataclasses.asdict(cfg)`` and is reused only for an equal config.
    """

    seed: int = 0
    """Seed for corpus sampling, data order and model initialisation."""
    steps: int = 300
    """Optimizer steps."""
    checkpoint_steps: list[int] = field(default_factory=_default_checkpoint_steps)
    """Steps after which a checkpoint is saved; must include 0 (initialisation) and ``steps``."""
    hidden_size: int = 64
    """Model width."""
    intermediate_size: int = 128
    """Hidden width of each expert's gated MLP."""
    num_layers: int = 4
    """Decoder layers, each with an MoE block."""
    num_heads: int = 4
    """Attention heads (``hidden_size / num_heads`` must be even, for rotary embeddings)."""
    num_experts: int = 8
    """Experts per MoE layer."""
    top_k: int = 2
    """Experts selected per token."""
    vocab_size: int = 2048
    """Target BPE vocabulary size, special tokens included (at least 259)."""
    seq_len: int = 128
    """Training sequence length in tokens (BOS included); also the model's context size."""
    batch_size: int = 16
    """Sequences per step; split evenly over the four domains."""
    lr: float = 3e-3
    """Peak AdamW learning rate (linear warm-up, cosine decay to 10 %)."""
    warmup_steps: int = 20
    """Linear learning-rate warm-up steps."""
    aux_loss_coef: float = 0.02
    """Weight of the auxiliary load-balancing loss (``router_aux_loss_coef``; transformers' definition, ≈ top_k
    at balance)."""
    eval_samples_per_domain: int = 16
    """Held-out evaluation samples per domain."""
    eval_max_chars: int = 600
    """Maximum characters per evaluation sample (also cut to fit ``seq_len`` tokens)."""
    train_chars_per_domain: int = 300_000
    """Upper bound on training characters per domain."""
    num_threads: int = 1
    """Torch CPU threads while training (0 = all cores, at most 8); 1 keeps results machine-independent."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "checkpoint_steps":
                if not isinstance(value, (list, tuple)) or not all(
                    isinstance(v, int) and not isinstance(v, bool) for v in value
                ):
                    raise ValueError(f"DemoConfig.checkpoint_steps must be a list of int; got {value!r}")
                # A private copy: the dataclass is frozen, the caller's list is not.
                object.__setattr__(self, "checkpoint_steps", [int(v) for v in value])
                continue
            expected = {int: int, float: (int, float)}[f.type]
            if isinstance(value, bool) or not isinstance(value, expected):
                raise ValueError(
                    f"DemoConfig.{f.name} must be {f.type.__name__}; got {value!r} ({type(value).__name__})"
                )
            if f.type is float:
                object.__setattr__(self, f.name, float(value))
        self._validate()

    def _validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"DemoConfig: {msg}")

        need(self.steps >= 1, f"steps must be >= 1; got {self.steps}")
        cs = self.checkpoint_steps
        need(len(cs) > 0 and 0 in cs, f"checkpoint_steps must include 0 (the untrained initialisation); got {cs}")
        need(
            max(cs) <= self.steps,
            f"checkpoint_steps has step {max(cs)} beyond steps={self.steps}; raise steps or drop that checkpoint",
        )
        need(min(cs) >= 0, f"checkpoint_steps must be >= 0; got {cs}")
        need(self.steps in cs, f"checkpoint_steps must include the final step steps={self.steps}; got {cs}")
        need(cs == sorted(set(cs)), f"checkpoint_steps must be strictly increasing without repeats; got {cs}")
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_experts", "top_k",
                     "batch_size", "eval_samples_per_domain"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1; got {getattr(self, name)}")
        need(self.num_experts >= 2, f"num_experts must be >= 2; got {self.num_experts}")
        need(self.top_k <= self.num_experts, f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        need(
            self.hidden_size % self.num_heads == 0 and (self.hidden_size // self.num_heads) % 2 == 0,
            f"hidden_size={self.hidden_size} must split into num_heads={self.num_heads} heads of even size",
        )
        need(self.vocab_size >= 259, f"vocab_size must be >= 259 (256 bytes + 3 special tokens); got {self.vocab_size}")
        need(self.seq_len >= 8, f"seq_len must be >= 8; got {self.seq_len}")
        need(
            self.batch_size % len(DOMAINS) == 0,
            f"batch_size={self.batch_size} must be a multiple of the {len(DOMAINS)} domains (equal share per batch)",
        )
        need(self.lr > 0 and math.isfinite(self.lr), f"lr must be a positive number; got {self.lr}")
        need(0 <= self.warmup_steps <= self.steps, f"warmup_steps must be in [0, steps]; got {self.warmup_steps}")
        need(self.aux_loss_coef >= 0, f"aux_loss_coef must be >= 0; got {self.aux_loss_coef}")
        need(self.eval_max_chars >= 100, f"eval_max_chars must be >= 100; got {self.eval_max_chars}")
        need(
            self.train_chars_per_domain >= 5_000,
            f"train_chars_per_domain must be >= 5000; got {self.train_chars_per_domain}",
        )
        need(self.num_threads >= 0, f"num_threads must be >= 0 (0 = automatic); got {self.num_threads}")

    def __hash__(self) -> int:  # the list field makes the generated hash fail
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def to_dict(self) -> dict:
        """Plain JSON-able dict of all fields (the manifest's ``config``)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DemoConfig":
        """Build from a mapping (e.g. a TOML table); unknown keys raise ``ValueError``."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"DemoConfig: unknown field(s) {unknown}; expected some of {sorted(names)}")
        return cls(**data)

    @classmethod
    def tiny(cls, **overrides) -> "DemoConfig":
        """A config that prepares in a few seconds, for tests (:data:`TINY`, then ``overrides``)."""
        return cls(**{**TINY, **overrides})


#: The fields of :meth:`DemoConfig.tiny` that differ from the defaults: the tiny demo of tests and smoke
#: benchmarks (``experiments/tiny.py`` writes it as an experiment's ``[model.demo]`` table).
TINY = dict(
    steps=12,
    checkpoint_steps=[0, 6, 12],
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=2,
    num_experts=4,
    top_k=2,
    vocab_size=384,
    seq_len=64,
    batch_size=8,
    lr=1e-2,
    warmup_steps=2,
    eval_samples_per_domain=3,
    eval_max_chars=300,
    train_chars_per_domain=20_000,
)


def checkpoint_name(step: int) -> str:
    """Directory name of the checkpoint after ``step`` optimizer steps (``step_0050``)."""
    return f"step_{step:04d}"


@contextmanager
def torch_threads(n: int):
    """Use ``n`` torch CPU threads inside the block (0 = all cores, at most 8), then restore."""
    import torch

    before = torch.get_num_threads()
    want = n if n > 0 else max(1, min(os.cpu_count() or 1, 8))
    torch.set_num_threads(want)
    try:
        yield want
    finally:
        torch.set_num_threads(before)


def build_model_config(cfg: DemoConfig, tokenizer):
    """The ``MixtralConfig`` of the demo model.

    Parameters
    ----------
    cfg : DemoConfig
    tokenizer : transformers tokenizer
        Supplies the real vocabulary size and the special-token ids.
    """
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.seq_len,
        num_local_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k,
        router_aux_loss_coef=cfg.aux_loss_coef,
        router_jitter_noise=0.0,
        output_router_logits=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )


def pack_sequences(token_docs: list[list[int]], seq_len: int, bos_id: int, eos_id: int):
    """Pack one domain's documents into training sequences.

    Parameters
    ----------
    token_docs : list of list of int
        Token ids of each document, without special tokens.
    seq_len, bos_id, eos_id : int

    Returns
    -------
    torch.LongTensor, shape (n_sequences, seq_len)
        Each row is ``bos_id`` then ``seq_len - 1`` consecutive tokens of the stream
        ``doc_0 <eos> doc_1 <eos> ...``; the incomplete tail is dropped.
    """
    import torch

    stream: list[int] = []
    for ids in token_docs:
        stream.extend(ids)
        stream.append(eos_id)
    body = seq_len - 1
    n = len(stream) // body
    if n == 0:
        raise ValueError(f"training text of one domain gives {len(stream)} tokens, fewer than seq_len-1={body}")
    t = torch.tensor(stream[: n * body], dtype=torch.long).view(n, body)
    return torch.cat([torch.full((n, 1), bos_id, dtype=torch.long), t], dim=1)


def batch_schedule(sizes: list[int], steps: int, per_domain: int, seed: int):
    """Deterministic row indices per step and domain.

    Parameters
    ----------
    sizes : list of int
        Sequences available per domain.
    steps, per_domain, seed : int

    Returns
    -------
    numpy.ndarray, shape (steps, n_domains, per_domain)
        Row indices into each domain's sequences. Each domain walks through fresh
        seeded permutations (epochs) of its own rows, so a small domain repeats sooner.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    out = np.empty((steps, len(sizes), per_domain), dtype=np.int64)
    for d, n in enumerate(sizes):
        need = steps * per_domain
        order = np.concatenate([rng.permutation(n) for _ in range(-(-need // n))])[:need]
        out[:, d, :] = order.reshape(steps, per_domain)
    return out


def router_entropy(router_logits) -> dict[str, float]:
    """{"router_entropy/layer_<i>": mean over tokens of the entropy (nat) of layer i's router softmax}."""
    import torch

    out = {}
    with torch.no_grad():
        for i, logits in enumerate(router_logits or ()):
            logp = torch.log_softmax(logits.detach().float(), dim=-1)
            out[f"router_entropy/layer_{i}"] = float(-(logp.exp() * logp).sum(-1).mean())
    return out


def lr_at(step: int, cfg: DemoConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up, cosine to 10 %."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def eval_nll_by_domain(model, eval_ids: dict[str, list[list[int]]], pad_id: int,
                       acc_out: dict | None = None) -> dict[str, float]:
    """Mean next-token NLL (nats per predicted token) of each domain's evaluation samples.

    Parameters
    ----------
    model : MixtralForCausalLM
    eval_ids : dict
        Domain -> token ids per sample (BOS included), each at most the model's context.
    pad_id : int
    acc_out : dict, optional
        Filled with domain -> next-token accuracy (share of predicted tokens whose argmax is the next token).

    Returns
    -------
    dict[str, float]
    """
    import torch

    was_training = model.training
    model.eval()
    out = {}
    with torch.no_grad():
        for domain, seqs in eval_ids.items():
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for i, s in enumerate(seqs):
                ids[i, : len(s)] = torch.tensor(s)
                mask[i, : len(s)] = 1
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
            ).view(len(seqs), width - 1)
            valid = mask[:, 1:].bool()
            out[domain] = float(nll[valid].mean())
            if acc_out is not None:  # next-token accuracy (argmax = the next token), the demo's second score
                hit = logits[:, :-1].argmax(-1) == ids[:, 1:]
                acc_out[domain] = float(hit[valid].float().mean())
    model.train(was_training)
    return out


# Written into every checkpoint directory the demo saves: what proves a later save may replace it.
SAVED_BY = "moe_atlas_demo_checkpoint.json"


def save_checkpoint_atomic(model, tokenizer, final_dir: Path) -> None:
    """Save model (safetensors) and tokenizer to ``final_dir`` via a temp dir and a rename.

    A directory named like a checkpoint is therefore always complete. A stale one from
    an earlier run is replaced only if this function saved it (it holds
    :data:`SAVED_BY`, written before the rename); any other directory of that name
    is left alone and the save refused, so a user's files are never deleted.
    """
    from transformers.utils import logging as hf_logging

    if final_dir.exists() and not (final_dir / SAVED_BY).is_file():
        raise FileExistsError(
            f"{final_dir}: exists and was not saved by the moe-atlas demo (no {SAVED_BY}); not replacing it. "
            "Move it away or use another output_dir."
        )
    # A fresh name: nothing of that name can exist, so nothing needs removing first. An existing
    # final_dir is ours (it holds SAVED_BY, checked above): staged() moves it aside and deletes it.
    with atomic.staged(final_dir, hidden=True) as tmp:
        # transformers' own per-save progress bar would interleave with the training bar.
        bars_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            model.save_pretrained(str(tmp), safe_serialization=True)
        finally:
            if bars_on:
                hf_logging.enable_progress_bar()
        tokenizer.save_pretrained(str(tmp))
        (tmp / SAVED_BY).write_text(json.dumps({"saved_by": "moe-atlas demo", "checkpoint": final_dir.name}) + "\n")


def train_demo_model(
    cfg: DemoConfig,
    train_docs: dict[str, list[str]],
    eval_texts: dict[str, list[str]],
    tokenizer,
    checkpoints_dir: Path,
    progress: bool = True,
) -> dict:
    """Train the demo MoE model and save every checkpoint in ``cfg.checkpoint_steps``.

    Parameters
    ----------
    cfg : DemoConfig
    train_docs : dict
        Domain -> training documents (every domain in ``DOMAINS``).
    eval_texts : dict
        Domain -> held-out sample texts; their NLL is logged at every checkpoint.
    tokenizer : transformers tokenizer
        The demo tokenizer (saved into every checkpoint directory too).
    checkpoints_dir : Path
        Receives ``step_XXXX/`` directories.
    progress : bool
        Show a tqdm bar on stderr.

    Returns
    -------
    dict
        The training log: per step ``loss`` (LM cross-entropy), ``aux_loss`` (load
        balancing, unscaled, transformers' ``load_balancing_loss_func`` over all layers:
        ≈ top_k at perfect balance, not 1 as the ``balance`` analysis' ``lb_loss``; the
        log's ``aux_loss_name``/``aux_loss_label``/``aux_loss_description``/``aux_loss_ideal``
        say so) and ``lr``; per checkpoint the held-out NLL by domain; sequence counts
        and wall time.
    """
    import numpy as np
    import torch
    from tqdm.auto import tqdm
    from transformers import MixtralForCausalLM

    missing = [d for d in DOMAINS if not train_docs.get(d)]
    if missing:
        raise ValueError(f"train_demo_model: no training documents for domain(s) {missing}")
    t0 = time.perf_counter()
    backend = tokenizer.backend_tokenizer
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    packed = []
    for d in DOMAINS:
        encs = backend.encode_batch(train_docs[d], add_special_tokens=False)
        packed.append(pack_sequences([e.ids for e in encs], cfg.seq_len, bos, eos))
    eval_ids = {
        d: [e.ids for e in backend.encode_batch(eval_texts[d], add_special_tokens=True)]
        for d in DOMAINS
        if eval_texts.get(d)
    }
    per_domain = cfg.batch_size // len(DOMAINS)
    schedule = batch_schedule([len(p) for p in packed], cfg.steps, per_domain, cfg.seed)

    log: dict = {
        "steps": [],
        "checkpoints": [],
        "train_sequences_per_domain": {d: int(len(p)) for d, p in zip(DOMAINS, packed)},
        "tokens_per_step": cfg.batch_size * cfg.seq_len,
        "aux_loss_coef": cfg.aux_loss_coef,
        # the model's aux_loss is transformers' definition (all k slots, ≈ top_k at balance): it must not
        # be read against the balance analysis' lb_loss (top-1, 1 at balance); name it as the analysis does
        "aux_loss_name": "lb_loss_hf_all_layers",
        "aux_loss_label": f"aux loss, transformers' definition (≈ k = {cfg.top_k} at balance)",
        "aux_loss_description": (
            "transformers' load_balancing_loss_func over every layer's router logits, unscaled (before "
            "router_aux_loss_coef): E · Σ_e f_e · P_e with f_e counting all k slots of each token, so it reads "
            f"≈ k = {cfg.top_k} at perfect balance and E = {cfg.num_experts} at collapse. Not the balance analysis' "
            "lb_loss (top-1 fractions, 1 at balance); that analysis' lb_loss_hf_all_layers is this quantity"
        ),
        "aux_loss_ideal": float(cfg.top_k),
    }
    wanted = set(cfg.checkpoint_steps)

    with torch_threads(cfg.num_threads) as n_threads, torch.random.fork_rng(devices=[]):
        log["torch_threads"] = n_threads
        torch.manual_seed(cfg.seed)
        model = MixtralForCausalLM(build_model_config(cfg, tokenizer))
        model.train()
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr,
            betas=(0.9, 0.95),
        )

        def checkpoint(step: int) -> None:
            save_checkpoint_atomic(model, tokenizer, checkpoints_dir / checkpoint_name(step))
            entry = {"step": step, "name": checkpoint_name(step)}
            if eval_ids:
                entry["eval_acc"] = {}
                entry["eval_nll"] = eval_nll_by_domain(model, eval_ids, pad, acc_out=entry["eval_acc"])
            log["checkpoints"].append(entry)

        if 0 in wanted:
            checkpoint(0)
        bar = tqdm(total=cfg.steps, desc="demo MoE training", disable=not progress, unit="step", leave=False)
        try:
            for step in range(cfg.steps):
                batch = torch.cat([packed[d][torch.from_numpy(schedule[step, d])] for d in range(len(DOMAINS))])
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, cfg)
                out = model(input_ids=batch, labels=batch, output_router_logits=True)
                # out.loss already includes coef * aux_loss; the LM part is logged separately.
                aux = out.aux_loss
                lm = out.loss - cfg.aux_loss_coef * aux
                opt.zero_grad(set_to_none=True)
                out.loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                rec = {
                    "step": step + 1,
                    "loss": float(lm.detach()),
                    "aux_loss": float(aux.detach()),
                    "lr": lr_at(step, cfg),
                    # what training logs of MoE runs carry (LibMoE's entropy trends): mean entropy of each
                    # layer's router softmax over the batch's tokens, from the logits the aux loss used
                    **router_entropy(out.router_logits),
                }
                if not all(math.isfinite(v) for v in (rec["loss"], rec["aux_loss"])):
                    raise FloatingPointError(f"demo training diverged at step {step + 1}: {rec}")
                log["steps"].append(rec)
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", aux_hf=f"{rec['aux_loss']:.3f}")
                if step + 1 in wanted:
                    checkpoint(step + 1)
        finally:
            bar.close()
    log["wall_s"] = round(time.perf_counter() - t0, 2)
    log["eval_sequences_per_domain"] = {d: len(v) for d, v in eval_ids.items()}
    log["loss_first"] = float(np.mean([r["loss"] for r in log["steps"][: max(1, cfg.steps // 10)]]))
    log["loss_last"] = float(np.mean([r["loss"] for r in log["steps"][-max(1, cfg.steps // 10):]]))
    return log
