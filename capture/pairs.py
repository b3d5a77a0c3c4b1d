"""Read pre-tokenized pairs (the ``pair_tokens.json`` of earlier workflows) into a token table.

The file holds token ids, not text: for each sample, the ids of condition A,
the ids of condition B, and which positions hold canonical (non-whitespace)
content. Accepted shape (a list, or an object with a ``samples`` list)::

    [{"id": "HumanEval/0", "domain": "code",
      "agentic_ids": [1, 517, ...],
      "assisted_aligned_ids": [1, 517, ...],
      "canonical_non_ws_positions": [1, 2, 5, ...]}, ...]

- ids of condition ``c``: the first of ``<c>_ids``, ``<c>_aligned_ids``,
  ``<c>_input_ids``, ``<c>_token_ids``;
- positions: either one list for both conditions (``canonical_non_ws_positions``,
  ``canonical_nonws_positions`` or ``canonical_positions``), which requires
  both id lists to have the same length, or one list per condition
  (``<c>_canonical_non_ws_positions``, ...), which must have the same length;
  the n-th canonical position of A is aligned with the n-th of B;
- ``id`` (or ``pair``, ``task_id``, ``name``) names the pair (default: the
  index); ``domain`` is optional.

Each entry becomes two samples (A, then B) sharing the ``pair`` id. Without
text there are no character offsets (``char_start`` = -1), so
``capture.align`` pairs them by canonical rank, which is exactly the pairing
the file describes. ``token_text`` is each id decoded on its own when a
tokenizer is given.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from storage.schema import token_table

__all__ = ["read_pair_tokens", "ID_KEYS", "POSITION_KEYS"]

ID_KEYS = ("{c}_ids", "{c}_aligned_ids", "{c}_input_ids", "{c}_token_ids")
POSITION_KEYS = ("canonical_non_ws_positions", "canonical_nonws_positions", "canonical_positions")
NAME_KEYS = ("id", "pair", "task_id", "name")


def _int_list(value, where: str, field: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{where}: field '{field}' must be a list of integers")
    return value


def _ids(entry: dict, cond: str, where: str) -> tuple[str, list[int]]:
    for pattern in ID_KEYS:
        key = pattern.format(c=cond)
        if key in entry:
            ids = _int_list(entry[key], where, key)
            if not ids:
                raise ValueError(f"{where}: field '{key}' is empty")
            return key, ids
    raise ValueError(f"{where}: no token ids for condition {cond!r} (expected one of "
                     f"{', '.join(p.format(c=cond) for p in ID_KEYS)}; fields present: {sorted(entry)})")


def _positions(entry: dict, cond: str | None, n: int, where: str) -> tuple[str, list[int]] | None:
    for base in POSITION_KEYS:
        key = base if cond is None else f"{cond}_{base}"
        if key in entry:
            pos = _int_list(entry[key], where, key)
            if any(p < 0 or p >= n for p in pos):
                bad = next(p for p in pos if p < 0 or p >= n)
                raise ValueError(f"{where}: field '{key}' has position {bad}, outside the {n} token ids")
            if any(b <= a for a, b in zip(pos, pos[1:])):
                raise ValueError(f"{where}: field '{key}' must be strictly increasing")
            return key, pos
    return None


def read_pair_tokens(path, *, condition_a: str, condition_b: str, dataset: str, tokenizer=None,
                     max_length: int | None = None, start_sample: int = 0, max_samples: int = 0) -> xr.Dataset:
    """Token table of a ``pair_tokens.json`` file (see the module docstring for the shape).

    Parameters
    ----------
    path : the JSON file.
    condition_a, condition_b : the condition names used in the field names.
    dataset : stored in the ``dataset`` coordinate.
    tokenizer : optional; decodes each id into ``token_text``.
    max_length : refuse samples longer than this (truncating would break the
        pairing the file describes).
    start_sample : global index of the first sample.
    max_samples : keep only the first N entries (0 = all).

    Returns
    -------
    xr.Dataset, dim ``token``: per entry the A sample then the B sample;
    ``canonical`` True exactly at the listed positions, ``pair`` and ``sample_id`` = the entry's id,
    ``condition`` = A or B, ``char_start``/``char_end`` = -1.

    Raises
    ------
    FileNotFoundError for a missing file; ValueError naming the file, entry and
    field for bad JSON, missing ids, positions out of range or unsorted, ids of
    different lengths under one shared position list, per-condition position
    lists of different lengths, duplicate pair ids, or samples over max_length.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"pair_tokens file {p} does not exist")
    if not condition_a or not condition_b or condition_a == condition_b:
        raise ValueError(f"{p}: reading pair tokens needs two different condition names ([conditions] a and b), "
                         f"got {condition_a!r} and {condition_b!r}")
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 0:
        # a negative N would slice off the last entries instead of keeping the first
        raise ValueError(f"{p}: max_samples must be an integer >= 0 (0 = all), got {max_samples!r}")
    from .tokenize import decode_text, parse_json  # one-line errors for bad bytes and hostile nesting

    data = parse_json(decode_text(p.read_bytes(), str(p)), str(p))
    if isinstance(data, dict) and "samples" in data:
        data = data["samples"]
    if not isinstance(data, list) or not data:
        raise ValueError(f"{p}: expected a non-empty JSON list of samples (or an object with a 'samples' list)")
    if max_samples:
        data = data[:max_samples]

    cols = {k: [] for k in ("sample", "sample_id", "position", "token_id", "domain", "condition", "pair",
                            "canonical")}
    seen: set[str] = set()
    s = start_sample - 1
    for i, entry in enumerate(data):
        where = f"{p}: sample {i}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(entry).__name__}")
        name = next((str(entry[k]) for k in NAME_KEYS if k in entry), str(i))
        where = f"{p}: sample {i} ({name!r})"
        if name in seen:
            raise ValueError(f"{where}: duplicate pair id {name!r}")
        seen.add(name)
        domain = entry.get("domain", "")
        if not isinstance(domain, str):
            raise ValueError(f"{where}: field 'domain' must be a string")
        (ka, ids_a), (kb, ids_b) = _ids(entry, condition_a, where), _ids(entry, condition_b, where)
        shared = _positions(entry, None, min(len(ids_a), len(ids_b)), where)
        if shared is not None:
            if len(ids_a) != len(ids_b):
                raise ValueError(f"{where}: '{ka}' has {len(ids_a)} ids and '{kb}' has {len(ids_b)}; one shared "
                                 f"'{shared[0]}' list needs equal lengths (or give per-condition lists "
                                 f"'{condition_a}_{shared[0]}' and '{condition_b}_{shared[0]}')")
            pos_a = pos_b = shared[1]
        else:
            pa = _positions(entry, condition_a, len(ids_a), where)
            pb = _positions(entry, condition_b, len(ids_b), where)
            if pa is None or pb is None:
                raise ValueError(f"{where}: no canonical positions (expected '{POSITION_KEYS[0]}' or "
                                 f"'{condition_a}_{POSITION_KEYS[0]}' and '{condition_b}_{POSITION_KEYS[0]}')")
            if len(pa[1]) != len(pb[1]):
                raise ValueError(f"{where}: '{pa[0]}' lists {len(pa[1])} positions and '{pb[0]}' lists "
                                 f"{len(pb[1])}; aligned canonical positions must pair one to one")
            pos_a, pos_b = pa[1], pb[1]
        for cond, ids, pos in ((condition_a, ids_a, pos_a), (condition_b, ids_b, pos_b)):
            if max_length is not None and len(ids) > max_length:
                raise ValueError(f"{where}: condition {cond!r} has {len(ids)} token ids, more than "
                                 f"capture.max_length={max_length} (pre-tokenized pairs are not truncated)")
            s += 1
            n = len(ids)
            flag = np.zeros(n, dtype=bool)
            flag[pos] = True
            cols["sample"] += [s] * n
            cols["sample_id"] += [name] * n
            cols["position"] += range(n)
            cols["token_id"] += ids
            cols["canonical"] += flag.tolist()
            cols["domain"] += [domain] * n
            cols["condition"] += [cond] * n
            cols["pair"] += [name] * n
    token_id = np.asarray(cols["token_id"], dtype=np.int64)
    text = None
    if tokenizer is not None:
        vocab = np.unique(token_id)
        pieces = {int(t): tokenizer.decode([int(t)]) for t in vocab}
        text = np.array([pieces[int(t)] for t in token_id], dtype=object)
    n = token_id.size
    return token_table(
        sample=np.asarray(cols["sample"], dtype=np.int32),
        sample_id=np.asarray(cols["sample_id"], dtype=object),
        position=np.asarray(cols["position"], dtype=np.int32),
        token_id=token_id.astype(np.int32),
        token_text=text,
        dataset=np.full(n, dataset, dtype=object),
        domain=np.asarray(cols["domain"], dtype=object),
        condition=np.asarray(cols["condition"], dtype=object),
        pair=np.asarray(cols["pair"], dtype=object),
        canonical=np.asarray(cols["canonical"], dtype=bool),
    )
