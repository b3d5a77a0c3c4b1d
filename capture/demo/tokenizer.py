"""Byte-level BPE tokenizer for the demo model, trained on the demo's training text only.

The saved directory loads offline with ``transformers.AutoTokenizer.from_pretrained`` as a
fast tokenizer. Encoding adds ``<|bos|>`` in front of every text (as the model was trained)
and nothing at the end.

Offsets (``return_offsets_mapping=True``) are *character* offsets into the original text:
the byte-level pre-tokenizer maps byte offsets back to characters, and the post-processor
is a plain template (no ``ByteLevel(trim_offsets=True)``), so a token ``"Ġthe"`` spans the
leading space too and the spans of the non-special tokens tile the text. A character
encoded as several bytes may be split over several tokens; each of them then reports the
whole character's span (spans may repeat, never cross). Special tokens report ``(0, 0)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)
"""Special tokens, with ids 0, 1, 2 in this order."""

# 256 byte symbols plus the special tokens must fit before any merge is learnt.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Train a byte-level BPE tokenizer and wrap it for ``transformers``.

    Parameters
    ----------
    texts : iterable of str
        Training documents (never evaluation text).
    vocab_size : int
        Target vocabulary size including the special tokens; at least ``MIN_VOCAB_SIZE``.
        BPE may stop short of it on a small corpus, so read ``len(tokenizer)`` afterwards.

    Returns
    -------
    transformers.PreTrainedTokenizerFast
        With ``bos``/``eos``/``pad`` set and a BOS-prepending post-processor.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"tokenizer vocab_size must be >= {MIN_VOCAB_SIZE} (256 bytes + specials); got {vocab_size}")

    tok = Tokenizer(models.BPE())
    # No prefix space: the first token of a text must not claim a character that is
    # not there, and code/data texts do not start with a word boundary anyway.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    for i, s in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(s) != i:
            raise RuntimeError(f"special token {s!r} got id {tok.token_to_id(s)}, expected {i}")
    bos_id = tok.token_to_id(BOS_TOKEN)
    # A template, not ByteLevel(trim_offsets=True): trimming would drop the leading
    # space from "Ġword" spans and break character alignment across conditions.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
        model_max_length=1_000_000,
    )


def save_tokenizer(tokenizer, directory: Path) -> None:
    """``save_pretrained`` into ``directory`` (created if missing)."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(directory))


def load_tokenizer(directory: Path):
    """Load a saved demo tokenizer offline with ``AutoTokenizer``.

    Raises
    ------
    FileNotFoundError
        If ``directory/tokenizer.json`` is missing.
    """
    from transformers import AutoTokenizer

    if not (Path(directory) / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{directory}/tokenizer.json: no saved tokenizer there")
    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
