"""Alignment across conditions (capture/align.py) against a reference computed from the texts.

The reference keys every token by (non-whitespace characters of the text before
its span, non-whitespace characters inside it), counted on the original text,
not on the token table: two tokens with the same content position and size
cover the same canonical characters.
"""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capture.align import align_tokens, canonical_ranges, last_canonical, match_canonical
from capture.demo.tokenizer import train_tokenizer
from capture.tokenize import tokenize_records
from storage.schema import token_table, tokens_hash
from strategies import SPACES, WORDS

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "for item in items:\n\tprint(item, end='')\n",
    "naïve café, déjà vu; 日本語のテキスト — ok\n",
    "The quick brown fox jumps over the lazy dog.\n",
]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS * 20, 300)


def _table(tok, rows):
    rows = [{"domain": "x", "condition": "", "pair": "", "line": i + 1, **r} for i, r in enumerate(rows)]
    return tokenize_records(rows, tok, dataset="d", max_length=10_000)


def _nonws(s: str) -> int:
    return sum(not c.isspace() for c in s)


def _reference(tokens, texts) -> np.ndarray:
    """Aligned partner of each token by the (content offset, content size) key, equal groups paired in order."""
    sample = tokens["sample"].values
    start, end = tokens["char_start"].values, tokens["char_end"].values
    cond, pair = tokens["condition"].values.astype(str), tokens["pair"].values.astype(str)
    out = np.full(sample.size, -1)
    by_pair = {}
    for t in range(sample.size):
        by_pair.setdefault(pair[t], {}).setdefault(cond[t], []).append(t)
    for p, sides in by_pair.items():
        if p == "" or len(sides) != 2:
            continue
        groups = []
        for c in ("A", "B"):
            g = {}
            for t in sides[c]:
                text = texts[sample[t]]
                size = _nonws(text[start[t]:end[t]])
                if size:
                    g.setdefault((_nonws(text[: start[t]]), size), []).append(t)
            groups.append(g)
        for key, ta in groups[0].items():
            tb = groups[1].get(key, [])
            if len(ta) == len(tb):
                out[ta], out[tb] = tb, ta
    return out


def _check(tokens, texts, *, complete: bool = True):
    aligned, _ = align_tokens(tokens, "A", "B")
    got = aligned["aligned_token"].values
    t = np.flatnonzero(got >= 0)
    assert (got[got[t]] == t).all()  # symmetric, one to one
    text = aligned["token_text"].values
    for a in t:  # aligned tokens hold the same canonical characters
        assert "".join(text[a].split()) == "".join(text[got[a]].split())
    if complete:
        np.testing.assert_array_equal(got, _reference(tokens, texts))
    return aligned


def test_identical_texts_align_every_canonical_token(tok):
    text = CORPUS[0]
    tokens = _table(tok, [{"text": text, "condition": "A", "pair": "p"}, {"text": text, "condition": "B", "pair": "p"}])
    aligned = _check(tokens, [text, text])
    n = tokens.sizes["token"] // 2
    can = tokens["canonical"].values[:n]
    np.testing.assert_array_equal(aligned["aligned_token"].values[:n][can], np.flatnonzero(can) + n)
    assert (aligned["aligned_token"].values[:n][~can] == -1).all()


def test_whitespace_variants_and_multibyte_characters(tok):
    a = "def  add( a,b ):\n\treturn a+b\nnaïve café 日本語"
    b = "def add(a, b):\n    return a + b\n naïve  café\t日本語\n"
    tokens = _table(tok, [{"text": a, "condition": "A", "pair": "p"}, {"text": b, "condition": "B", "pair": "p"}])
    aligned = _check(tokens, [a, b])
    # Multi-byte characters are split into several tokens reporting the same span; they pair in order.
    starts = tokens["char_start"].values
    sample = tokens["sample"].values
    dup = [t for t in range(1, starts.size) if starts[t] == starts[t - 1] and sample[t] == sample[t - 1]]
    assert dup, "the tokenizer should split some multi-byte character"
    assert (aligned["aligned_token"].values[dup] >= 0).any()


def test_extra_context_before_the_content(tok):
    code = "for item in items:\n\tprint(item, end='')"
    ctx = '{"tool": "write_file", "path": "loop.py"}\n'
    tokens = _table(tok, [{"text": ctx + code, "condition": "A", "pair": "p"},
                          {"text": code, "condition": "B", "pair": "p"}])
    aligned, stats = align_tokens(tokens, "A", "B")
    got = aligned["aligned_token"].values
    start = tokens["char_start"].values
    in_a = tokens["sample"].values == 0
    ctx_tokens = in_a & (start < len(ctx)) & tokens["canonical"].values
    assert (got[ctx_tokens] == -1).all()
    b_can = (~in_a) & tokens["canonical"].values
    # all of the code's canonical tokens but the first (its merge with the newline may differ) find a partner
    assert (got[b_can] >= 0).mean() > 0.9
    assert stats.pairs == 1 and stats.aligned == int((got[b_can] >= 0).sum())


def test_groups_of_unequal_size_stay_unaligned():
    # "é" covered by two tokens in A and three in B: no one-to-one pairing exists
    def table(n_e):
        texts = ["x"] + ["é"] * n_e + ["y"]
        starts = [0] + [1] * n_e + [2]
        return texts, starts

    ta, sa = table(2)
    tb, sb = table(3)
    n = len(ta) + len(tb)
    tokens = token_table(
        sample=np.r_[[0] * len(ta), [1] * len(tb)], position=np.r_[np.arange(len(ta)), np.arange(len(tb))],
        token_id=np.zeros(n, int), token_text=np.array(ta + tb, dtype=object),
        char_start=np.r_[sa, sb], char_end=np.r_[sa, sb] + 1,
        condition=np.array(["A"] * len(ta) + ["B"] * len(tb), dtype=object), pair=np.full(n, "p", dtype=object),
    )
    got = align_tokens(tokens, "A", "B")[0]["aligned_token"].values
    np.testing.assert_array_equal(got, [len(ta), -1, -1, len(ta) + 4, 0, -1, -1, -1, 3])


@settings(max_examples=30, deadline=None)
@given(words=st.lists(WORDS, min_size=1, max_size=12), gaps=st.data())
def test_property_whitespace_never_breaks_alignment(tok, words, gaps):
    sa = "".join(w + gaps.draw(SPACES) for w in words)
    sb = gaps.draw(SPACES) + "".join(w + gaps.draw(SPACES) for w in words)
    tokens = _table(tok, [{"text": sa, "condition": "A", "pair": "p"}, {"text": sb, "condition": "B", "pair": "p"}])
    _check(tokens, [sa, sb])


def test_last_canonical_and_no_conditions(tok):
    tokens = _table(tok, [{"text": "a b  \n\n"}, {"text": "  x"}, {"text": " \n "}])
    aligned, stats = align_tokens(tokens)
    assert (aligned["aligned_token"].values == -1).all()
    last = aligned["last_canonical"].values
    text = tokens["token_text"].values
    sample = tokens["sample"].values
    for s in range(3):
        idx = np.flatnonzero(sample == s)
        can = [t for t in idx if text[t].strip()]
        assert list(np.flatnonzero(last[idx]) + idx[0]) == can[-1:]
    np.testing.assert_array_equal(last, last_canonical(sample, tokens["canonical"].values))
    # an unpaired table hashes as before the alignment existed
    assert tokens_hash(aligned) == tokens_hash(tokens)


def test_alignment_changes_the_inputs_hash(tok):
    text = CORPUS[1]
    tokens = _table(tok, [{"text": text, "condition": "A", "pair": "p"}, {"text": text, "condition": "B", "pair": "p"}])
    assert tokens_hash(align_tokens(tokens, "A", "B")[0]) != tokens_hash(tokens)


def test_match_canonical():
    np.testing.assert_array_equal(match_canonical("abc", "abc"), [0, 1, 2])
    m = match_canonical("CTXabcdefg", "abcdefg")
    np.testing.assert_array_equal(m, [-1, -1, -1, 0, 1, 2, 3, 4, 5, 6])
    # a short coincidental match does not count
    assert (match_canonical("xyzaq", "pqaxw", min_match=4) == -1).all()


def test_canonical_ranges_rejects_inconsistent_spans():
    with pytest.raises(ValueError, match="token 1 spans characters"):
        canonical_ranges(["ab", "c"], [0, 2], [2, 4])
    s, r = canonical_ranges(["a ", "b", "  "], [0, 2, 3], [2, 3, 5])
    assert s == "ab" and r.tolist() == [[0, 0], [1, 1], [-1, -1]]


def test_errors_name_the_problem(tok):
    rows = [{"text": "a", "condition": "A", "pair": "p"}, {"text": "a", "condition": "B", "pair": "p"}]
    tokens = _table(tok, rows)
    with pytest.raises(ValueError, match="no sample has condition 'C'"):
        align_tokens(tokens, "A", "C")
    with pytest.raises(ValueError, match="both 'A'"):
        align_tokens(tokens, "A", "A")
    with pytest.raises(ValueError, match="name both conditions"):
        align_tokens(tokens, "A", "")
    dup = _table(tok, rows + [{"text": "b", "condition": "A", "pair": "p"}])
    with pytest.raises(ValueError, match="pair 'p' has more than one sample of condition 'A'"):
        align_tokens(dup, "A", "B")
    nopair = _table(tok, [{"text": "a", "condition": "A"}, {"text": "a", "condition": "B"}])
    with pytest.raises(ValueError, match="no 'pair' id"):
        align_tokens(nopair, "A", "B")
    lonely = _table(tok, rows + [{"text": "c", "condition": "A", "pair": "q"}])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        _, stats = align_tokens(lonely, "A", "B")
    assert stats.unpaired_samples == 1 and any("only one of the conditions" in str(x.message) for x in w)


def test_rank_alignment_without_offsets():
    # pair_tokens tables have no character offsets: the n-th canonical token of A pairs with the n-th of B
    can_a, can_b = [False, True, True, False, True], [False, False, True, True, True, False]
    n = len(can_a) + len(can_b)
    tokens = token_table(
        sample=np.r_[[0] * 5, [1] * 6], position=np.r_[np.arange(5), np.arange(6)], token_id=np.zeros(n, int),
        condition=np.array(["A"] * 5 + ["B"] * 6, dtype=object), pair=np.full(n, "p", dtype=object),
        canonical=np.r_[can_a, can_b],
    )
    aligned, stats = align_tokens(tokens, "A", "B")
    assert aligned["aligned_token"].values.tolist() == [-1, 7, 8, -1, 9, -1, -1, 1, 2, 4, -1]
    assert stats.method.startswith("canonical rank")
    bad = tokens.assign_coords(canonical=("token", np.r_[can_a, [False, True, True, True, True, False]]))
    with pytest.raises(ValueError, match="3 canonical tokens, 'B' has 4"):
        align_tokens(bad, "A", "B")


def test_demo_paired_set_is_the_same_code_with_and_without_a_tool_call():
    from capture.demo import build_corpus
    from capture.demo.paired import CONDITION_A, CONDITION_B, build_paired

    corpus = build_corpus(0, 8_000, 3, 300)
    tokenizer = train_tokenizer(corpus.iter_train_text(), 384)
    rows = build_paired(corpus, tokenizer, n_pairs=3, seq_len=64)
    assert [r["condition"] for r in rows] == [CONDITION_A, CONDITION_B] * 3
    haystack = "\x00".join(t for docs in corpus.train.values() for t in docs)
    for a, b in zip(rows[0::2], rows[1::2]):
        assert a["pair"] == b["pair"] and a["text"].endswith(b["text"]) and a["text"] != b["text"]
        assert '"tool"' in a["text"] or "# tool:" in a["text"]
        assert b["text"] not in haystack and b["source"] not in corpus.eval_sources["code"]
        assert len(tokenizer(a["text"])["input_ids"]) <= 64
    tokens = tokenize_records([{**r, "line": i + 1} for i, r in enumerate(rows)], tokenizer, dataset="p",
                              max_length=64)
    aligned, stats = align_tokens(tokens, CONDITION_A, CONDITION_B)
    assert stats.pairs == 3 and stats.aligned >= 0.9 * stats.canonical_b
    with pytest.raises(ValueError, match="held-out code samples are left"):
        build_paired(corpus, tokenizer, n_pairs=10_000, seq_len=64)
