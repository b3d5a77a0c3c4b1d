"""pair_tokens.json (the earlier workflow's pre-tokenized pairs) read into a token table and aligned."""

from __future__ import annotations

import json

import numpy as np
import pytest

from capture.align import align_tokens
from capture.pairs import read_pair_tokens


def _write(tmp_path, data, name="pair_tokens.json"):
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return p


SHARED = [
    {"id": "HumanEval/0", "domain": "code", "agentic_ids": [1, 10, 11, 12, 13], "assisted_aligned_ids": [1, 20, 11, 22, 13],
     "canonical_non_ws_positions": [1, 2, 4]},
    {"task_id": "HumanEval/1", "agentic_ids": [1, 5, 6], "assisted_ids": [1, 7, 6], "canonical_positions": [2]},
]


def test_shared_positions_pair_position_by_position(tmp_path):
    tokens = read_pair_tokens(_write(tmp_path, SHARED), condition_a="agentic", condition_b="assisted", dataset="he")
    assert tokens["sample"].values.tolist() == [0] * 5 + [1] * 5 + [2] * 3 + [3] * 3
    assert tokens["condition"].values.tolist() == ["agentic"] * 5 + ["assisted"] * 5 + ["agentic"] * 3 + ["assisted"] * 3
    assert tokens["pair"].values.tolist() == ["HumanEval/0"] * 10 + ["HumanEval/1"] * 6
    assert tokens["token_id"].values.tolist() == [1, 10, 11, 12, 13, 1, 20, 11, 22, 13, 1, 5, 6, 1, 7, 6]
    assert tokens["domain"].values.tolist()[:10] == ["code"] * 10 and tokens["domain"].values[-1] == ""
    assert (tokens["char_start"].values == -1).all()
    aligned, stats = align_tokens(tokens, "agentic", "assisted")
    got = aligned["aligned_token"].values
    # positions 1, 2, 4 of sample 0 <-> the same positions of sample 1; position 2 of sample 2 <-> of sample 3
    expected = np.full(16, -1)
    for a, b in ((1, 6), (2, 7), (4, 9), (12, 15)):
        expected[a], expected[b] = b, a
    np.testing.assert_array_equal(got, expected)
    assert stats.pairs == 2 and stats.aligned == 4
    assert aligned["last_canonical"].values.nonzero()[0].tolist() == [4, 9, 12, 15]


def test_per_condition_positions_and_samples_wrapper(tmp_path):
    data = {"samples": [{"id": "x", "a_ids": [1, 2, 3, 4], "b_token_ids": [1, 9, 2, 3],
                         "a_canonical_non_ws_positions": [1, 3], "b_canonical_non_ws_positions": [2, 3]}]}
    tokens = read_pair_tokens(_write(tmp_path, data), condition_a="a", condition_b="b", dataset="d")
    got = align_tokens(tokens, "a", "b")[0]["aligned_token"].values
    assert got.tolist() == [-1, 6, -1, 7, -1, -1, 1, 3]


def test_token_text_from_the_tokenizer(tmp_path):
    class Tok:
        def decode(self, ids):
            return "".join(f"<{i}>" for i in ids)

    tokens = read_pair_tokens(_write(tmp_path, SHARED[:1]), condition_a="agentic", condition_b="assisted",
                              dataset="he", tokenizer=Tok())
    assert tokens["token_text"].values.tolist()[:3] == ["<1>", "<10>", "<11>"]


@pytest.mark.parametrize(
    ("entry", "pattern"),
    [
        ({"id": "s", "A_ids": [1, 2, 3], "B_ids": [1, 2], "canonical_non_ws_positions": [1]},
         r"'A_ids' has 3 ids and 'B_ids' has 2; one shared 'canonical_non_ws_positions' list needs equal lengths"),
        ({"id": "s", "A_ids": [1, 2, 3], "B_ids": [1, 2], "A_canonical_non_ws_positions": [1, 2],
          "B_canonical_non_ws_positions": [1]}, r"lists 2 positions and 'B_canonical_non_ws_positions' lists 1"),
        ({"id": "s", "A_ids": [1, 2], "B_ids": [1, 2], "canonical_non_ws_positions": [1, 2]},
         r"has position 2, outside the 2 token ids"),
        ({"id": "s", "A_ids": [1, 2, 3], "B_ids": [1, 2, 3], "canonical_non_ws_positions": [2, 1]},
         r"must be strictly increasing"),
        ({"id": "s", "A_ids": [1, 2], "canonical_non_ws_positions": [1]}, r"no token ids for condition 'B'"),
        ({"id": "s", "A_ids": [1, "x"], "B_ids": [1, 2], "canonical_non_ws_positions": [1]},
         r"field 'A_ids' must be a list of integers"),
        ({"id": "s", "A_ids": [1, 2], "B_ids": [1, 2]}, r"no canonical positions"),
        ({"id": "s", "A_ids": [], "B_ids": [1, 2], "canonical_non_ws_positions": []}, r"field 'A_ids' is empty"),
    ],
)
def test_bad_entries_name_file_sample_and_field(tmp_path, entry, pattern):
    path = _write(tmp_path, [entry])
    with pytest.raises(ValueError, match=pattern) as e:
        read_pair_tokens(path, condition_a="A", condition_b="B", dataset="d")
    assert str(path) in str(e.value) and "sample 0 ('s')" in str(e.value)


def test_file_level_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_pair_tokens(tmp_path / "nope.json", condition_a="A", condition_b="B", dataset="d")
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(ValueError, match="invalid JSON"):
        read_pair_tokens(bad, condition_a="A", condition_b="B", dataset="d")
    with pytest.raises(ValueError, match="non-empty JSON list"):
        read_pair_tokens(_write(tmp_path, {"x": 1}), condition_a="A", condition_b="B", dataset="d")
    entry = {"id": "s", "A_ids": [1, 2, 3], "B_ids": [1, 2, 3], "canonical_non_ws_positions": [1]}
    with pytest.raises(ValueError, match="duplicate pair id 's'"):
        read_pair_tokens(_write(tmp_path, [entry, entry]), condition_a="A", condition_b="B", dataset="d")
    with pytest.raises(ValueError, match="more than capture.max_length=2"):
        read_pair_tokens(_write(tmp_path, [entry]), condition_a="A", condition_b="B", dataset="d", max_length=2)
    with pytest.raises(ValueError, match="two different condition names"):
        read_pair_tokens(_write(tmp_path, [entry]), condition_a="A", condition_b="A", dataset="d")
    assert read_pair_tokens(_write(tmp_path, [entry, {**entry, "id": "t"}]), condition_a="A", condition_b="B",
                            dataset="d", max_samples=1).sizes["token"] == 6


@pytest.mark.parametrize(
    ("body", "pattern"),
    [
        ('[conditions]\na = "x"\n', r"'\[conditions\]' needs both 'a' and 'b'"),
        ('[conditions]\na = "x"\nb = "x"\n', r"a and b are both 'x'"),
        ('[capture]\njs_divergence = true\n', r"'capture.js_divergence' needs the two conditions"),
        ('[[datasets]]\nname = "d"\npath = "p"\nformat = "csv"\n', r"'format' must be 'jsonl' or 'pair_tokens'"),
        ('[[datasets]]\nname = "d"\npath = "p"\nformat = "pair_tokens"\n', r"format 'pair_tokens', which needs"),
    ],
)
def test_experiment_spec_checks_conditions_and_formats(tmp_path, body, pattern):
    from experiments.spec import SpecError, load_experiment

    p = tmp_path / "x.toml"
    p.write_text(f'name = "t"\noutput_dir = "{tmp_path / "o"}"\n' + body)
    with pytest.raises(SpecError, match=pattern) as e:
        load_experiment(p)
    assert str(p) in str(e.value)
