"""Token table from JSONL with a byte-level BPE tokenizer trained here."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from capture.load import load_tokenizer
from capture.tokenize import tokenize_jsonl
from storage.schema import TOKEN_COORDS

CORPUS = [
    "def add(a, b):\n    return a + b\n\n",
    "The cat sat on the mat.  The dog did not.\n",
    "Héllo wörld, naïve café!\t\tDone.",
]


def _train(path, *, bos: bool):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<bos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 10, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", pad_token="<pad>").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("tok"), bos=False)


@pytest.fixture(scope="module")
def bos_dir(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("tok_bos"), bos=True)


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


ROWS = [
    {"id": "s0", "text": "The cat  sat\n\n   on it.", "domain": "prose"},
    {"id": "s1", "text": "def f(x):\n    return x", "domain": "code", "condition": "A", "pair": "p1"},
    {"id": "s2", "text": "naïve café", "domain": "prose", "condition": "B", "pair": "p1"},
]


def test_spans_and_canonical_flags(tok_dir, tmp_path):
    f = _write(tmp_path / "d.jsonl", ROWS)
    ds = tokenize_jsonl(f, tok_dir, dataset="demo", max_length=64, start_sample=10)
    assert ds.sizes["token"] > 0 and set(TOKEN_COORDS) <= set(ds.coords)
    tok = load_tokenizer(tok_dir)
    for i, row in enumerate(ROWS):
        sel = ds.where(ds.sample == 10 + i, drop=True)
        ids = sel.token_id.values.astype(int).tolist()
        assert ids == tok(row["text"])["input_ids"]
        assert tok.decode(ids) == row["text"]
        np.testing.assert_array_equal(sel.position.values, np.arange(len(ids)))
        text = row["text"]
        starts, ends = sel.char_start.values.astype(int), sel.char_end.values.astype(int)
        spans = [text[a:b] for a, b in zip(starts, ends)]
        assert list(sel.token_text.values) == spans
        # byte-level BPE without trimming: spans tile the text (multi-byte chars may share a span)
        assert starts[0] == 0 and ends[-1] == len(text) and (starts[1:] <= ends[:-1]).all()
        assert list(sel.canonical.values) == [any(not c.isspace() for c in s) for s in spans]
        assert set(sel.domain.values) == {row["domain"]}
        assert set(sel.condition.values) == {row.get("condition", "")}
        assert set(sel.pair.values) == {row.get("pair", "")}
        assert set(sel.dataset.values) == {"demo"}
    # whitespace-only tokens exist in this text and are not canonical; words are
    s0 = ds.where(ds.sample == 10, drop=True)
    texts = list(s0.token_text.values)
    flags = dict(zip(texts, s0.canonical.values))
    assert any(t.strip() == "" for t in texts) and not any(flags[t] for t in texts if t.strip() == "")
    assert flags["The"] and flags[" cat"]


def test_special_tokens_have_empty_non_canonical_spans(bos_dir, tmp_path):
    f = _write(tmp_path / "d.jsonl", ROWS[:1])
    ds = tokenize_jsonl(f, bos_dir, dataset="demo", max_length=64)
    assert int(ds.token_id[0]) == 1  # <bos>
    assert (int(ds.char_start[0]), int(ds.char_end[0]), ds.token_text.values[0]) == (0, 0, "")
    assert not bool(ds.canonical[0]) and bool(ds.canonical[1])


def test_truncation_keeps_max_length_and_warns(bos_dir, tmp_path):
    f = _write(tmp_path / "d.jsonl", ROWS)
    with pytest.warns(UserWarning, match="truncated to max_length=4"):
        ds = tokenize_jsonl(f, bos_dir, dataset="demo", max_length=4)
    counts = np.bincount(ds.sample.values)
    assert counts.max() == 4
    assert (ds.token_id.values[ds.position.values == 0] == 1).all()  # bos kept by the tokenizer's truncation


def test_blank_lines_skipped_and_domain_optional(tok_dir, tmp_path):
    f = _write(tmp_path / "d.jsonl", ["", {"text": "a b"}, "   ", {"text": "c"}])
    ds = tokenize_jsonl(f, tok_dir, dataset="x", max_length=8, domain_field=None)
    assert sorted(set(ds.sample.values.tolist())) == [0, 1]
    assert set(ds.domain.values) == {""}


@pytest.mark.parametrize("rows, pattern", [
    ([ROWS[0], '{"text": "oops", '], r"d\.jsonl:2: invalid JSON"),
    ([ROWS[0], ROWS[1], {"domain": "x"}], r"d\.jsonl:3: field 'text' is missing"),
    ([{"text": "", "domain": "x"}], r"d\.jsonl:1: field 'text' is empty"),
    ([{"text": 5, "domain": "x"}], r"d\.jsonl:1: field 'text' is int, expected a string"),
    ([{"text": "hi"}], r"d\.jsonl:1: field 'domain' is missing"),
    ([{"text": "hi", "domain": "x", "condition": ["A"]}], r"d\.jsonl:1: field 'condition' is list"),
    (["[1, 2]"], r"d\.jsonl:1: expected a JSON object"),
    ([], r"d\.jsonl: no samples"),
    (["", "  "], r"d\.jsonl: no samples"),
])
def test_bad_jsonl_names_file_line_and_field(tok_dir, tmp_path, rows, pattern):
    f = _write(tmp_path / "d.jsonl", rows)
    with pytest.raises(ValueError, match=pattern):
        tokenize_jsonl(f, tok_dir, dataset="x", max_length=8)


def test_missing_inputs(tok_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        tokenize_jsonl(tmp_path / "nope.jsonl", tok_dir, dataset="x", max_length=8)
    f = _write(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(FileNotFoundError, match="no_tok"):
        tokenize_jsonl(f, tmp_path / "no_tok", dataset="x", max_length=8)


def test_jsonl_ids_become_the_sample_id_coordinate(tok_dir, tmp_path):
    rows = [dict(ROWS[0]), {"text": "no id here", "domain": "prose"}, {"id": 17, "text": "x = 1", "domain": "code"},
            {"id": None, "text": "null id", "domain": "code"}]
    ds = tokenize_jsonl(_write(tmp_path / "ids.jsonl", rows), tok_dir, dataset="demo", max_length=64)
    per_sample = {int(s): set(map(str, ds.sample_id.values[ds.sample.values == s])) for s in np.unique(ds.sample)}
    assert per_sample == {0: {"s0"}, 1: {""}, 2: {"17"}, 3: {""}}
    with pytest.raises(ValueError, match=r"ids2.jsonl:1: field 'id' is list"):
        tokenize_jsonl(_write(tmp_path / "ids2.jsonl", [{"id": [1], "text": "t", "domain": "d"}]), tok_dir,
                       dataset="demo", max_length=64)
