"""Line tokens up across the two conditions of each pair, by canonical content.

Two samples of a pair (same ``pair`` id, conditions A and B) hold the same
content produced two ways. Their tokenizations may differ (other whitespace,
other merges, a context before the content), so tokens are paired through the
*canonical* (non-whitespace) characters they cover:

1. per sample, the non-whitespace characters of the text, in order, form the
   canonical string; each token covers a contiguous range of it (the
   non-whitespace characters of its span); whitespace-only and special tokens
   cover none;
2. the two canonical strings are matched character by character: identical
   strings map one to one; otherwise the matching blocks of
   ``difflib.SequenceMatcher`` (no junk heuristic) of at least ``min_match``
   characters are kept (extra context in one condition, truncation, edits);
3. a token of A and a token of B are aligned when A's range maps onto exactly
   B's range. Several tokens may cover the same characters (a byte-level
   tokenizer splits a multi-byte character into tokens that all report the
   whole character): equal-sized groups are paired in order, groups of unequal
   size are left unaligned.

Tables without character offsets (``char_start`` = -1, e.g. read from
``pair_tokens.json``) are aligned by canonical rank instead: the n-th
canonical token of A with the n-th of B, which requires equal counts.

The result is symmetric and one to one: ``aligned_token[aligned_token[t]] == t``.
"""

from __future__ import annotations

import difflib
import json
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass

import numpy as np
import xarray as xr

__all__ = ["AlignmentStats", "align_tokens", "canonical_ranges", "last_canonical", "match_canonical"]


@dataclass
class AlignmentStats:
    """What the alignment found (stored as the cube attribute ``alignment``)."""

    condition_a: str
    condition_b: str
    pairs: int = 0
    """pair ids with one sample in each condition"""
    unpaired_samples: int = 0
    """samples of condition A or B whose pair has no sample in the other condition"""
    canonical_a: int = 0
    canonical_b: int = 0
    aligned: int = 0
    """aligned token pairs"""
    method: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def last_canonical(sample: np.ndarray, canonical: np.ndarray) -> np.ndarray:
    """Boolean (token,) mask of each sample's last canonical token.

    Parameters
    ----------
    sample : (token,) sample ids, samples contiguous.
    canonical : (token,) bool.
    """
    sample = np.asarray(sample)
    canonical = np.asarray(canonical, dtype=bool)
    out = np.zeros(sample.shape[0], dtype=bool)
    idx = np.flatnonzero(canonical)
    if idx.size:
        # the last canonical index of each sample: where the sample id changes in the next canonical token
        ends = np.r_[sample[idx[1:]] != sample[idx[:-1]], True]
        out[idx[ends]] = True
    return out


def canonical_ranges(token_text, char_start, char_end, *, where: str = "sample") -> tuple[str, np.ndarray]:
    """The canonical string of one sample and the range each token covers in it.

    Parameters
    ----------
    token_text : (n,) str, ``text[char_start:char_end]`` of each token.
    char_start, char_end : (n,) int character offsets into the sample text.

    Returns
    -------
    canonical : str, the sample's non-whitespace characters in text order.
    ranges : (n, 2) int64, [first, last] canonical index covered by each token
        (inclusive), -1 for tokens covering no non-whitespace character.

    Raises
    ------
    ValueError when a token's text is not as long as its span, or two tokens
    claim different characters at one offset.
    """
    chars: dict[int, str] = {}
    n = len(token_text)
    for i in range(n):
        a, b, s = int(char_start[i]), int(char_end[i]), str(token_text[i])
        if b - a != len(s):
            raise ValueError(f"{where}: token {i} spans characters [{a}, {b}) but its text {s!r} has {len(s)} "
                             f"characters (token_text must be text[char_start:char_end])")
        for j, ch in enumerate(s):
            if not ch.isspace():
                prev = chars.setdefault(a + j, ch)
                if prev != ch:
                    raise ValueError(f"{where}: character offset {a + j} is {prev!r} in one token and {ch!r} in "
                                     f"token {i}")
    offsets = np.array(sorted(chars), dtype=np.int64)
    canonical = "".join(chars[o] for o in offsets)
    ranges = np.full((n, 2), -1, dtype=np.int64)
    for i in range(n):
        a, b = int(char_start[i]), int(char_end[i])
        lo, hi = np.searchsorted(offsets, a), np.searchsorted(offsets, b)  # canonical chars in [a, b)
        if hi > lo:
            ranges[i] = (lo, hi - 1)
    return canonical, ranges


def match_canonical(a: str, b: str, *, min_match: int = 4) -> np.ndarray:
    """Map each character of canonical string ``a`` to its partner in ``b``.

    Returns
    -------
    (len(a),) int64: index into ``b``, or -1 for characters without a partner.
    Identical strings map one to one; otherwise only matching blocks of at
    least ``min_match`` characters count (shorter ones are coincidences).
    """
    out = np.full(len(a), -1, dtype=np.int64)
    if a == b:
        out[:] = np.arange(len(a))
        return out
    sm = difflib.SequenceMatcher(None, a, b, autojunk=False)
    for i, j, size in sm.get_matching_blocks():
        if size >= min_match:
            out[i:i + size] = np.arange(j, j + size)
    return out


def _groups(ranges: np.ndarray, tokens: np.ndarray) -> dict[tuple[int, int], list[int]]:
    g: dict[tuple[int, int], list[int]] = defaultdict(list)
    for (lo, hi), t in zip(ranges, tokens):
        if lo >= 0:
            g[(int(lo), int(hi))].append(int(t))
    return g


def _align_by_chars(ra: np.ndarray, ta: np.ndarray, rb: np.ndarray, tb: np.ndarray, mapping: np.ndarray,
                    out: np.ndarray) -> int:
    gb = _groups(rb, tb)
    n = 0
    for (lo, hi), toks in _groups(ra, ta).items():
        m = mapping[lo:hi + 1]
        # the whole range must land on one contiguous range of B, in order
        if m[0] < 0 or (m != np.arange(m[0], m[0] + hi - lo + 1)).any():
            continue
        partners = gb.get((int(m[0]), int(m[-1])))
        if partners is None or len(partners) != len(toks):
            continue
        for x, y in zip(toks, partners):
            out[x], out[y] = y, x
            n += 1
    return n


def align_tokens(tokens: xr.Dataset, condition_a: str = "", condition_b: str = "", *, min_match: int = 4,
                 where: str = "token table") -> tuple[xr.Dataset, AlignmentStats]:
    """Set the ``aligned_token`` and ``last_canonical`` coordinates of a token table.

    Parameters
    ----------
    tokens : token table (dim ``token``; coords sample, canonical, condition,
        pair, token_text, char_start, char_end), samples contiguous, ``token``
        numbered 0..n-1 as in the routing cube.
    condition_a, condition_b : the two conditions to pair; both '' = no pairing
        (``aligned_token`` all -1, ``last_canonical`` still set).
    min_match : shortest matching block of canonical characters that counts
        when the two canonical strings differ.

    Returns
    -------
    (tokens with both coordinates set, AlignmentStats)

    Raises
    ------
    ValueError naming the pair: a condition is named but absent, A == B, a pair
    holds several samples of one condition, token texts disagree with their
    spans, or (rank alignment) two samples have different canonical counts.
    """
    n = tokens.sizes["token"]
    if not np.array_equal(np.asarray(tokens["token"].values), np.arange(n)):
        raise ValueError(f"{where}: coordinate 'token' must run 0..{n - 1} (aligned_token indexes it)")
    sample = np.asarray(tokens["sample"].values)
    canonical = np.asarray(tokens["canonical"].values, dtype=bool)
    aligned = np.full(n, -1, dtype=np.int64)
    stats = AlignmentStats(condition_a, condition_b)
    if bool(condition_a) != bool(condition_b):
        raise ValueError(f"{where}: name both conditions or neither (got A={condition_a!r}, B={condition_b!r})")
    if condition_a:
        if condition_a == condition_b:
            raise ValueError(f"{where}: conditions A and B are both {condition_a!r}; name two different conditions")
        aligned = _align(tokens, sample, canonical, condition_a, condition_b, min_match, stats, where)
    out = tokens.assign_coords(
        aligned_token=("token", aligned),
        last_canonical=("token", last_canonical(sample, canonical)),
    )
    from storage.schema import TOKEN_COORDS

    for name in ("aligned_token", "last_canonical"):
        out[name].attrs["description"] = TOKEN_COORDS[name][1]
    return out, stats


def _align(tokens, sample, canonical, cond_a, cond_b, min_match, stats, where) -> np.ndarray:
    n = sample.shape[0]
    condition = np.asarray(tokens["condition"].values).astype(str)
    pair = np.asarray(tokens["pair"].values).astype(str)
    present = sorted(set(condition.tolist()) - {""})
    for c in (cond_a, cond_b):
        if c not in present:
            raise ValueError(f"{where}: no sample has condition {c!r} (conditions present: {present or 'none'}); "
                             f"check [conditions] in the experiment and the 'condition' field of the data")
    starts = np.flatnonzero(np.r_[True, sample[1:] != sample[:-1]])
    stops = np.r_[starts[1:], n]
    by_pair: dict[str, dict[str, tuple[int, int]]] = defaultdict(dict)
    for a, z in zip(starts, stops):
        c, p = str(condition[a]), str(pair[a])
        if c not in (cond_a, cond_b):
            continue
        if not p:
            raise ValueError(f"{where}: sample {sample[a]} has condition {c!r} but no 'pair' id")
        if c in by_pair[p]:
            raise ValueError(f"{where}: pair {p!r} has more than one sample of condition {c!r} "
                             f"(samples {sample[by_pair[p][c][0]]} and {sample[a]})")
        by_pair[p][c] = (int(a), int(z))

    has_offsets = bool((np.asarray(tokens["char_start"].values) >= 0).any())
    stats.method = ("canonical characters (char offsets)" if has_offsets
                    else "canonical rank (no char offsets: n-th canonical token of A with n-th of B)")
    aligned = np.full(n, -1, dtype=np.int64)
    text = np.asarray(tokens["token_text"].values) if has_offsets else None
    c0 = np.asarray(tokens["char_start"].values)
    c1 = np.asarray(tokens["char_end"].values)
    for p, members in sorted(by_pair.items()):
        if len(members) < 2:
            stats.unpaired_samples += 1
            continue
        (a0, a1), (b0, b1) = members[cond_a], members[cond_b]
        stats.pairs += 1
        stats.canonical_a += int(canonical[a0:a1].sum())
        stats.canonical_b += int(canonical[b0:b1].sum())
        if has_offsets:
            sa, ra = canonical_ranges(text[a0:a1], c0[a0:a1], c1[a0:a1], where=f"{where}: pair {p!r} ({cond_a})")
            sb, rb = canonical_ranges(text[b0:b1], c0[b0:b1], c1[b0:b1], where=f"{where}: pair {p!r} ({cond_b})")
            mapping = match_canonical(sa, sb, min_match=min_match)
            stats.aligned += _align_by_chars(ra, np.arange(a0, a1), rb, np.arange(b0, b1), mapping, aligned)
        else:
            ia = a0 + np.flatnonzero(canonical[a0:a1])
            ib = b0 + np.flatnonzero(canonical[b0:b1])
            if ia.size != ib.size:
                raise ValueError(f"{where}: pair {p!r}: condition {cond_a!r} has {ia.size} canonical tokens, "
                                 f"{cond_b!r} has {ib.size}; without character offsets they are paired by rank, "
                                 f"which needs equal counts")
            aligned[ia], aligned[ib] = ib, ia
            stats.aligned += int(ia.size)
    if stats.pairs == 0:
        raise ValueError(f"{where}: no pair id has a sample of both conditions {cond_a!r} and {cond_b!r}")
    if stats.unpaired_samples:
        warnings.warn(f"{where}: {stats.unpaired_samples} pair id(s) have a sample of only one of the conditions "
                      f"{cond_a!r}/{cond_b!r}; their tokens stay unaligned", stacklevel=3)
    return aligned
