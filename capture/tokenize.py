"""Tokenize a JSONL corpus into the token table (``storage.schema.token_table``).

One JSON object per line::

    {"id": "a1", "text": "...", "domain": "code", "condition": "A", "pair": "p7"}

``text`` is required and non-empty; ``domain`` is required unless
``domain_field=None``; ``id`` (kept as the ``sample_id`` coordinate), ``condition``
and ``pair`` are optional ('' when absent or null).
Blank lines are skipped. Every error names the file, the 1-based line and the
field.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import xarray as xr

from storage.schema import token_table

from .load import load_tokenizer

__all__ = ["read_jsonl", "tokenize_records", "tokenize_jsonl", "decode_text", "parse_json", "check_unicode"]


def decode_text(raw: bytes, where: str) -> str:
    """``raw`` decoded as UTF-8, or ValueError ``"{where}: not valid UTF-8 at byte N"`` (N: offset in ``raw``)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not valid UTF-8 at byte {e.start} ({raw[e.start:e.start + 4]!r}); "
                         f"save the file as UTF-8") from None


def parse_json(text: str, where: str):
    """``json.loads(text)``; bad JSON or nesting too deep for the parser -> ValueError naming ``where``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        # the parser recurses once per level: a hostile or corrupt record, reported as such
        raise ValueError(f"{where}: invalid JSON (nested too deeply to parse)") from None


def check_unicode(value: str, where: str, field: str) -> str:
    """``value`` if it is encodable text; a lone surrogate (JSON "\\ud800") -> ValueError naming the field.

    JSON may escape surrogates that pair with nothing; Python keeps them, but the
    tokenizer and the Zarr writer cannot encode them, and would fail far from here.
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{where}: field '{field}' holds a lone surrogate {value[e.start]!r} at character "
                         f"{e.start}, which is not valid Unicode text") from None
    return value


def _label(row: dict, field: str, path, line: int, *, required: bool) -> str:
    if field not in row or (row[field] is None and not required):
        if required:
            raise ValueError(f"{path}:{line}: field '{field}' is missing (expected a string)")
        return ""
    v = row[field]
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise ValueError(f"{path}:{line}: field '{field}' is {type(v).__name__}, expected a string")
    return check_unicode(str(v), f"{path}:{line}", field)


def read_jsonl(path, *, text_field: str = "text", domain_field: str | None = "domain") -> list[dict]:
    """Read and validate the JSONL rows.

    Returns
    -------
    list of {"text", "id", "domain", "condition", "pair", "line"} dicts, file order
    (``id``: the sample's own id as a string, '' when the line has none).

    Raises
    ------
    FileNotFoundError for a missing file; ValueError naming file, line and field
    for bytes that are not UTF-8, bad or too deeply nested JSON, a non-object
    line, a missing/non-string/empty text, a lone surrogate in a kept field, a
    missing domain, or a file without samples.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"JSONL file {p} does not exist")
    rows = []
    with open(p, "rb") as f:  # bytes: a bad byte is reported with its line, not as a bare UnicodeDecodeError
        for line_no, raw in enumerate(f, start=1):
            line = decode_text(raw, f"{p}:{line_no}")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{line_no}: invalid JSON ({e.msg} at column {e.colno})") from e
            except RecursionError:
                raise ValueError(f"{p}:{line_no}: invalid JSON (nested too deeply to parse)") from None
            if not isinstance(row, dict):
                raise ValueError(f"{p}:{line_no}: expected a JSON object, got {type(row).__name__}")
            if text_field not in row:
                raise ValueError(f"{p}:{line_no}: field '{text_field}' is missing (expected the sample text)")
            text = row[text_field]
            if not isinstance(text, str):
                raise ValueError(f"{p}:{line_no}: field '{text_field}' is {type(text).__name__}, expected a string")
            if text == "":
                raise ValueError(f"{p}:{line_no}: field '{text_field}' is empty")
            check_unicode(text, f"{p}:{line_no}", text_field)
            rows.append({
                "text": text,
                "id": _label(row, "id", p, line_no, required=False),
                "domain": _label(row, domain_field, p, line_no, required=True) if domain_field else "",
                "condition": _label(row, "condition", p, line_no, required=False),
                "pair": _label(row, "pair", p, line_no, required=False),
                "line": line_no,
            })
    if not rows:
        raise ValueError(f"{p}: no samples (the file is empty or has only blank lines)")
    return rows


def tokenize_records(rows: list[dict], tokenizer, *, dataset: str, max_length: int, start_sample: int = 0,
                     where: str = "records") -> xr.Dataset:
    """Token table of already-validated rows (see ``read_jsonl``).

    Parameters
    ----------
    rows : dicts with "text", "domain", "condition", "pair" (optional "id": the
        ``sample_id`` coordinate, '' when absent; "line" for errors).
    tokenizer : a fast tokenizer (offsets needed).
    dataset : dataset name stored on every token.
    max_length : longest sample in tokens; longer texts are truncated (warned).
    start_sample : global index of the first sample.

    Returns
    -------
    xr.Dataset, dim ``token`` (samples contiguous, in row order), coordinates of
    ``storage.schema.TOKEN_COORDS``. ``char_start``/``char_end`` index the sample
    text; ``token_text`` = text[char_start:char_end]; ``canonical`` = that span
    holds a non-whitespace character (special tokens have empty spans: False).
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"tokenizer {type(tokenizer).__name__} is not a fast tokenizer (offsets needed)")
    texts = [r["text"] for r in rows]
    kw = dict(add_special_tokens=True, return_offsets_mapping=True, return_attention_mask=False)
    enc = tokenizer(texts, truncation=False, **kw)
    all_ids, all_offs = list(enc["input_ids"]), list(enc["offset_mapping"])
    # Re-encode only the long ones, so the tokenizer's own truncation keeps its special tokens.
    long = [i for i, ids in enumerate(all_ids) if len(ids) > max_length]
    if long:
        cut = tokenizer([texts[i] for i in long], truncation=True, max_length=max_length, **kw)
        for j, i in enumerate(long):
            all_ids[i], all_offs[i] = cut["input_ids"][j], cut["offset_mapping"][j]
    cols = {k: [] for k in ("sample", "sample_id", "position", "token_id", "token_text", "char_start", "char_end",
                            "domain", "condition", "pair", "canonical")}
    for i, (row, ids, offs) in enumerate(zip(rows, all_ids, all_offs)):
        if len(ids) == 0:
            raise ValueError(f"{where}:{row.get('line', i + 1)}: field 'text' tokenizes to no tokens")
        text = row["text"]
        n = len(ids)
        spans = [text[a:b] for a, b in offs]
        cols["sample"] += [start_sample + i] * n
        cols["sample_id"] += [str(row.get("id", ""))] * n
        cols["position"] += range(n)
        cols["token_id"] += ids
        cols["token_text"] += spans
        cols["char_start"] += [a for a, _ in offs]
        cols["char_end"] += [b for _, b in offs]
        cols["canonical"] += [bool(s.strip()) for s in spans]
        for k in ("domain", "condition", "pair"):
            cols[k] += [row[k]] * n
    if long:
        warnings.warn(f"{where}: {len(long)} of {len(rows)} samples truncated to max_length={max_length} tokens",
                      stacklevel=2)
    n = len(cols["sample"])
    return token_table(
        sample=np.asarray(cols["sample"], dtype=np.int32),
        sample_id=np.asarray(cols["sample_id"], dtype=object),
        position=np.asarray(cols["position"], dtype=np.int32),
        token_id=np.asarray(cols["token_id"], dtype=np.int32),
        token_text=np.asarray(cols["token_text"], dtype=object),
        char_start=np.asarray(cols["char_start"], dtype=np.int32),
        char_end=np.asarray(cols["char_end"], dtype=np.int32),
        dataset=np.full(n, dataset, dtype=object),
        domain=np.asarray(cols["domain"], dtype=object),
        condition=np.asarray(cols["condition"], dtype=object),
        pair=np.asarray(cols["pair"], dtype=object),
        canonical=np.asarray(cols["canonical"], dtype=bool),
    )


def tokenize_jsonl(path, tokenizer_dir, *, dataset: str, max_length: int, text_field: str = "text",
                   domain_field: str | None = "domain", start_sample: int = 0, max_samples: int = 0,
                   trust_remote_code: bool = False) -> xr.Dataset:
    """Tokenize a JSONL file into the token table.

    Parameters
    ----------
    path : JSONL file, one sample per line (see module docstring).
    tokenizer_dir : directory of a fast tokenizer.
    dataset : name stored in the ``dataset`` coordinate.
    max_length : maximum tokens per sample (longer texts are truncated, with a warning).
    text_field, domain_field : JSON keys of the text and the domain label
        (``domain_field=None``: no domain labels, '' everywhere).
    start_sample : global index of this file's first sample (to concatenate datasets).
    max_samples : keep only the first N samples (0 = all).
    trust_remote_code : passed to the tokenizer loader only when True.

    Returns
    -------
    xr.Dataset with dim ``token`` and the coordinates of ``storage.schema.TOKEN_COORDS``.
    """
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 0:
        # a negative N would slice off the last samples instead of keeping the first
        raise ValueError(f"{path}: max_samples must be an integer >= 0 (0 = all), got {max_samples!r}")
    rows = read_jsonl(path, text_field=text_field, domain_field=domain_field)
    if max_samples:
        rows = rows[:max_samples]
    tok = load_tokenizer(tokenizer_dir, trust_remote_code=trust_remote_code)
    return tokenize_records(rows, tok, dataset=dataset, max_length=max_length, start_sample=start_sample,
                            where=str(path))
