"""The demo's two-condition dataset: the same held-out code with and without a tool-use context.

Researchers compare how a model routes *the same content* produced two ways,
e.g. code an agent wrote through a tool call vs the same code written with
assistance. The demo builds that comparison from held-out standard-library
code that neither training nor the evaluation set uses:

``tool_context``
    a one-line tool call of an agent writing the file, then the code::

        {"tool": "write_file", "path": "json/decoder.py"}
        <code>

    (shorter forms of the same call when that line would take more than a
    third of a small model's context: the file's base name only, then
    ``# tool: write_file decoder.py``);

``plain``
    the code alone.

The code is identical in both conditions, so every canonical (non-whitespace)
character of ``plain`` has a partner in ``tool_context``; only the context in
front differs, and ``capture.align`` pairs the code tokens through their
characters. Differences in routing at those tokens are the effect of the
context. Each pair fits the demo model's context (``seq_len`` tokens, BOS
included) with the context in front; the code is cut at a line boundary.

JSONL rows (pairs adjacent, A first)::

    {"id": "pair-000-tool_context", "text": ..., "domain": "code",
     "condition": "tool_context", "pair": "code-pair-000", "source": "json/decoder.py"}
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["CONDITION_A", "CONDITION_B", "PAIRED_VERSION", "build_paired", "tool_context", "write_paired_jsonl"]

PAIRED_VERSION = "1"
"""Bumped whenever the paired data would come out differently (demo runs then rebuild it)."""
CONDITION_A = "tool_context"
CONDITION_B = "plain"
MIN_CODE_CHARS = 40
"""Shortest code (characters) worth a pair after trimming."""


def tool_context(source: str, tokenizer=None, max_tokens: int | None = None) -> str:
    """The tool-use context put before the code of ``source`` (a stdlib-relative path).

    With ``tokenizer`` and ``max_tokens``: the most explicit form whose tokens
    (BOS included) fit ``max_tokens``, else the shortest form.
    """
    base = source.rsplit("/", 1)[-1]
    forms = [
        json.dumps({"tool": "write_file", "path": source}) + "\n",
        json.dumps({"tool": "write_file", "path": base}) + "\n",
        f"# tool: write_file {base}\n",
    ]
    if tokenizer is None or max_tokens is None:
        return forms[0]
    for form in forms:
        if len(tokenizer(form)["input_ids"]) <= max_tokens:
            return form
    return forms[-1]


def _fit_code(tokenizer, context: str, code: str, max_tokens: int) -> str:
    """The longest prefix of ``code`` (whole lines) with ``context + code`` within ``max_tokens`` tokens."""
    lines = code.rstrip().split("\n")
    while lines:
        text = "\n".join(lines).rstrip()
        if text and len(tokenizer(context + text)["input_ids"]) <= max_tokens:
            return text
        # drop lines from the end; binary steps would be faster but samples are short
        lines.pop()
    return ""


def build_paired(corpus, tokenizer, *, n_pairs: int, seq_len: int) -> list[dict]:
    """Paired rows from held-out code candidates that the evaluation set does not use.

    Parameters
    ----------
    corpus : ``capture.demo.corpus.Corpus`` after ``select_eval`` (its
        ``eval_sources`` tell which files the evaluation set took).
    tokenizer : the demo tokenizer (adds BOS).
    n_pairs : pairs wanted.
    seq_len : the model's context in tokens, BOS included.

    Returns
    -------
    list of 2·n_pairs JSONL rows (see module docstring), pairs adjacent, A first.

    Raises
    ------
    ValueError when fewer than ``n_pairs`` usable candidates remain.
    """
    used = set(corpus.eval_sources.get("code", []))
    eval_texts = {s["text"] for s in corpus.eval_samples}
    # Same leakage guard as the evaluation set: nothing that occurs verbatim in training text.
    haystack = "\x00".join(t for docs in corpus.train.values() for t in docs)
    rows: list[dict] = []
    seen: set[str] = set()
    for source, text in corpus.candidates.get("code", []):
        if len(rows) == 2 * n_pairs:
            break
        if source in used:
            continue
        context = tool_context(source, tokenizer, seq_len // 3)
        code = _fit_code(tokenizer, context, text.strip("\n"), seq_len)
        if len(code) < MIN_CODE_CHARS or code in seen or code in eval_texts or code in haystack:
            continue
        seen.add(code)
        i = len(rows) // 2
        for cond, body in ((CONDITION_A, context + code), (CONDITION_B, code)):
            rows.append({"id": f"pair-{i:03d}-{cond}", "text": body, "domain": "code", "condition": cond,
                         "pair": f"code-pair-{i:03d}", "source": source})
    if len(rows) < 2 * n_pairs:
        raise ValueError(f"demo paired data: only {len(rows) // 2} held-out code samples are left for pairs, "
                         f"{n_pairs} requested (eval_samples_per_domain), with at least {MIN_CODE_CHARS} "
                         f"characters of code after the tool call within seq_len={seq_len} tokens")
    return rows


def write_paired_jsonl(rows: list[dict], path: Path) -> None:
    """One JSON object per line (UTF-8)."""
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False))
            f.write("\n")
