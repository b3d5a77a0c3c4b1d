"""The embedded demo: a real (tiny) MoE language model and held-out data, built offline.

``prepare_demo(out_dir, cfg)`` builds a four-domain corpus from material on every machine
(``corpus``), trains a byte-level BPE tokenizer on its training part (``tokenizer``),
trains a small Mixtral-style MoE model on the CPU and saves checkpoints along the way
(``train``). Layout under ``out_dir``::

    data/eval.jsonl          held-out samples {"id", "text", "domain"}, all domains
    data/paired.jsonl        held-out code with and without a tool-use context (``paired``):
                             {"id", "text", "domain", "condition", "pair", "source"}
    tokenizer/               AutoTokenizer-loadable fast tokenizer
    checkpoints/step_0000/   safetensors model + config + tokenizer, one dir per checkpoint
    training_log.json        loss / aux-loss curve, held-out NLL per checkpoint
    manifest.json            written last, atomically; its presence means "complete"

Importing this package is cheap: torch and transformers load only when training runs.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from storage import atomic

from .corpus import DOMAINS, Corpus, build_corpus
from .paired import CONDITION_A, CONDITION_B, PAIRED_VERSION, build_paired, write_paired_jsonl
from .train import DemoConfig, checkpoint_name

__all__ = ["DOMAINS", "DemoConfig", "prepare_demo", "load_manifest", "build_corpus", "Corpus", "checkpoint_name",
           "demo_checkpoints", "demo_datasets"]

MANIFEST = "manifest.json"
EVAL_DATASET_NAME = "demo_eval"
PAIRED_DATASET_NAME = "demo_paired"


# The layout under ``out_dir`` (module docstring), in one place: prepare_demo writes there, the pipeline reads there.
def _eval_path(out_dir: Path) -> Path:
    return Path(out_dir) / "data" / "eval.jsonl"


def _paired_path(out_dir: Path) -> Path:
    return Path(out_dir) / "data" / "paired.jsonl"


def _checkpoints_dir(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints"


def demo_checkpoints(out_dir: Path, cfg: DemoConfig) -> list[dict]:
    """The checkpoints ``prepare_demo(out_dir, cfg)`` saves: [{name, step, path}] in step order (paths not resolved)."""
    return [{"name": checkpoint_name(s), "step": s, "path": str(_checkpoints_dir(out_dir) / checkpoint_name(s))}
            for s in cfg.checkpoint_steps]


def demo_datasets(out_dir: Path, *, paired: bool = False) -> list[dict]:
    """The held-out data sets ``prepare_demo`` writes: [{name, path}]; ``paired`` adds the two-condition set."""
    out = [{"name": EVAL_DATASET_NAME, "path": str(_eval_path(out_dir))}]
    if paired:
        out.append({"name": PAIRED_DATASET_NAME, "path": str(_paired_path(out_dir))})
    return out


def _write_json_atomic(path: Path, obj) -> None:
    atomic.write_json(path, obj, ensure_ascii=False, newline=True, fsync=True, hidden=True)


def _remove_previous_outputs(out_dir: Path) -> None:
    """Delete what an earlier (possibly interrupted) run wrote, and nothing else.

    out_dir may be shared with other files, so only the demo's own names are removed.
    The manifest goes first: a crash during the rebuild never leaves a stale
    "complete" mark.
    """

    def rm(p: Path) -> None:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()

    rm(out_dir / MANIFEST)
    rm(out_dir / "training_log.json")
    rm(_eval_path(out_dir))
    rm(_paired_path(out_dir))
    rm(out_dir / "tokenizer")
    ckpt = _checkpoints_dir(out_dir)
    if ckpt.is_dir():
        from .train import SAVED_BY

        # Only folders the demo's trainer wrote: a finished step_* holds its SAVED_BY
        # file (a user's own step_* folder is never ours to delete); a half-written one
        # carries the trainer's temporary name (.step_N.tmp-<8 hex>, storage.atomic; older
        # versions used the PID) inside this run's own, claimed model folder.
        for p in ckpt.glob("step_*"):
            if p.is_dir() and not p.is_symlink() and (p / SAVED_BY).is_file():
                rm(p)
        for p in ckpt.glob(".step_*.tmp-*"):
            if re.fullmatch(r"[0-9a-f]{8}|[0-9]{1,10}", p.name.rsplit(".tmp-", 1)[1]):
                rm(p)
    for p in list(out_dir.glob(".*.tmp-*")) + list((out_dir / "data").glob(".*.tmp-*")):
        rm(p)


def load_manifest(out_dir: Path) -> dict | None:
    """The manifest under ``out_dir`` if it exists and every path it names exists, else None.

    Raises
    ------
    ValueError
        If ``manifest.json`` exists but is not a JSON object with the expected keys.
    """
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    required = ("checkpoints", "datasets", "tokenizer", "config")
    if not isinstance(manifest, dict) or any(k not in manifest for k in required):
        raise ValueError(f"{path}: expected a JSON object with keys {list(required)}")
    try:
        paths = [c["path"] for c in manifest["checkpoints"]] + [d["path"] for d in manifest["datasets"]]
        paths.append(manifest["tokenizer"])
        if manifest.get("paired", {}).get("path"):
            paths.append(manifest["paired"]["path"])
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path}: checkpoints/datasets entries must be objects with a 'path' ({exc!r})") from exc
    if not all(Path(p).exists() for p in paths):
        return None
    return manifest


def _fit_to_context(tokenizer, max_tokens: int):
    """A function trimming a text (at a line, else word, boundary) to ``max_tokens`` tokens, BOS included."""

    def fit(text: str) -> str:
        while True:
            enc = tokenizer(text, return_offsets_mapping=True)
            if len(enc["input_ids"]) <= max_tokens:
                return text.rstrip()
            # End of the last token that still fits (< len(text), as more tokens follow),
            # so every round strictly shortens the text; cut at a boundary before it.
            limit = enc["offset_mapping"][max_tokens - 1][1]
            head = text[:limit]
            cut = head.rfind("\n")
            if cut < limit // 2:
                cut = head.rfind(" ")
            text = head[:cut] if cut > 0 else head

    return fit


def _write_paired(out_dir: Path, corpus: Corpus, tokenizer, cfg: DemoConfig) -> dict:
    """Write data/paired.jsonl (``paired.build_paired``) atomically; its manifest entry.

    A config whose context is too short for code after a tool call gets no
    paired set: the entry then says why (``error``) and has no ``path``; only
    experiments that compare conditions need it (tasks.PrepareModel checks).
    """
    path = _paired_path(out_dir)
    try:
        rows = build_paired(corpus, tokenizer, n_pairs=cfg.eval_samples_per_domain, seq_len=cfg.seq_len)
    except ValueError as exc:
        path.unlink(missing_ok=True)
        return {"name": PAIRED_DATASET_NAME, "error": str(exc), "version": PAIRED_VERSION}
    with atomic.staged(path, hidden=True) as tmp:
        write_paired_jsonl(rows, tmp)
    return {"name": PAIRED_DATASET_NAME, "path": str(path), "conditions": [CONDITION_A, CONDITION_B],
            "pairs": len(rows) // 2, "version": PAIRED_VERSION}


def prepare_demo(out_dir: Path, cfg: DemoConfig | None = None, progress: bool = True) -> dict:
    """Build (or reuse) the demo model, tokenizer and evaluation data under ``out_dir``.

    Parameters
    ----------
    out_dir : Path
        Output directory (created if missing).
    cfg : DemoConfig, optional
        Defaults to ``DemoConfig()`` (about 35 s on one CPU core).
    progress : bool
        Show a progress bar while training.

    Returns
    -------
    dict
        The manifest: ``checkpoints`` ([{name, step, path}] in step order), ``datasets``
        ([{name: "demo_eval", path}]), ``paired`` ({name: "demo_paired", path, conditions,
        pairs, version}: the two-condition set of ``paired``), ``tokenizer`` (path),
        ``config`` (``cfg`` as a dict), ``training_log`` (path), ``domains``. Paths are absolute.

    Notes
    -----
    Idempotent: if ``manifest.json`` exists, names existing paths and records a config
    equal to ``cfg``, it is returned and nothing is touched. Otherwise everything is
    rebuilt from scratch, including after an interrupted run: training is redone
    rather than resumed (no optimizer state is kept), which gives the same weights
    because data order and initialisation are seeded. Each checkpoint directory and
    each file appears atomically, and the manifest is written last.
    """
    cfg = DemoConfig() if cfg is None else cfg
    if not isinstance(cfg, DemoConfig):
        raise ValueError(f"prepare_demo: cfg must be a DemoConfig; got {type(cfg).__name__}")
    out_dir = Path(out_dir).resolve()
    try:
        existing = load_manifest(out_dir)
    except ValueError:
        existing = None  # a damaged manifest is rebuilt like a missing one
    if existing is not None and existing["config"] == cfg.to_dict():
        if existing.get("paired", {}).get("version") == PAIRED_VERSION:
            return existing
        # A model built before the paired data existed (or by an older builder): add only the data.
        corpus = build_corpus(cfg.seed, cfg.train_chars_per_domain, cfg.eval_samples_per_domain, cfg.eval_max_chars)
        from .tokenizer import load_tokenizer

        tokenizer = load_tokenizer(Path(existing["tokenizer"]))
        corpus.select_eval(cfg.eval_samples_per_domain, fit=_fit_to_context(tokenizer, cfg.seq_len))
        existing["paired"] = _write_paired(out_dir, corpus, tokenizer, cfg)
        _write_json_atomic(out_dir / MANIFEST, existing)
        return existing

    from .tokenizer import save_tokenizer, train_tokenizer
    from .train import train_demo_model

    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_previous_outputs(out_dir)

    corpus = build_corpus(cfg.seed, cfg.train_chars_per_domain, cfg.eval_samples_per_domain, cfg.eval_max_chars)
    tokenizer = train_tokenizer(corpus.iter_train_text(), cfg.vocab_size)
    # Evaluation samples must fit the model's context (seq_len tokens, BOS included).
    corpus.select_eval(cfg.eval_samples_per_domain, fit=_fit_to_context(tokenizer, cfg.seq_len))

    tok_dir = out_dir / "tokenizer"
    with atomic.staged(tok_dir, hidden=True) as tok_tmp:
        save_tokenizer(tokenizer, tok_tmp)

    with atomic.staged(_eval_path(out_dir), hidden=True) as eval_tmp:
        corpus.write_eval_jsonl(eval_tmp)
    paired = _write_paired(out_dir, corpus, tokenizer, cfg)

    eval_texts = {d: [s["text"] for s in corpus.eval_samples if s["domain"] == d] for d in DOMAINS}
    log = train_demo_model(cfg, corpus.train, eval_texts, tokenizer, _checkpoints_dir(out_dir), progress=progress)
    log["corpus"] = {
        "train_chars": corpus.train_chars(),
        "train_documents": {d: len(v) for d, v in corpus.train.items()},
        "eval_sources": corpus.eval_sources,
        "vocab_size": len(tokenizer),
    }
    _write_json_atomic(out_dir / "training_log.json", log)

    manifest = {
        "checkpoints": demo_checkpoints(out_dir, cfg),
        "datasets": demo_datasets(out_dir),
        "tokenizer": str(tok_dir),
        "paired": paired,
        "config": cfg.to_dict(),
        "training_log": str(out_dir / "training_log.json"),
        "domains": list(DOMAINS),
    }
    _write_json_atomic(out_dir / MANIFEST, manifest)
    return manifest
