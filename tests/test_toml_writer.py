"""experiments/toml_writer.py writes what tomllib reads back; experiments/tiny.py is a valid experiment."""

from __future__ import annotations

import tomllib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capture.demo import DemoConfig
from experiments.tiny import demo_section, tiny_experiment
from experiments.toml_writer import dumps, toml_value

keys = st.one_of(st.from_regex(r"[a-z_][a-z0-9_-]{0,8}", fullmatch=True), st.text(min_size=1, max_size=6))
scalars = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False),  # NaN != NaN: the round trip could not compare it
    st.text(max_size=12),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3), max_leaves=6)


def tables(depth: int = 2):
    # Plain keys, sub-tables and non-empty lists of tables, nested ``depth`` deep.
    entry = values if depth == 0 else st.one_of(values, st.deferred(lambda: tables(depth - 1)),
                                                 st.lists(st.deferred(lambda: tables(depth - 1)), min_size=1, max_size=2))
    return st.dictionaries(keys, entry, max_size=4)


@settings(max_examples=150, deadline=None)
@given(tables())
def test_dumps_round_trips_through_tomllib(table):
    assert tomllib.loads(dumps(table)) == table


@pytest.mark.parametrize("value, text", [
    (True, "true"), (3, "3"), (0.5, "0.5"), ("a\"b", '"a\\"b"'), ("\x7f", '"\\u007f"'), ([1, "x"], '[1, "x"]'),
    ({"a b": 1}, '{"a b" = 1}'),
])
def test_values(value, text):
    assert toml_value(value) == text


def test_unsupported_value_is_refused_by_type():
    with pytest.raises(ValueError, match="cannot write NoneType None"):
        toml_value(None)


def test_tiny_experiment_is_the_tiny_demo(tmp_path):
    from experiments.spec import load_experiment

    path = tmp_path / "tiny.toml"
    path.write_text(tiny_experiment(tmp_path / "run", analyses=("usage", "change"), port=1234,
                                    demo={"steps": 8, "checkpoint_steps": [0, 8]}, conditions={"a": "tool_context", "b": "plain"}))
    exp = load_experiment(str(path))
    assert DemoConfig.from_dict(tomllib.loads(path.read_text())["model"]["demo"]) == DemoConfig.tiny(steps=8, checkpoint_steps=[0, 8])
    assert exp.analyses.run == ["usage", "change"] and exp.dask.dashboard_port == 1234 and exp.dask.n_workers == 1
    assert exp.output_dir == str(tmp_path / "run")
    # the [model.demo] section alone, as the benchmarks splice it into demo.toml
    assert tomllib.loads("[model]\n" + demo_section(warmup_steps=1))["model"]["demo"] == {
        **tomllib.loads(tiny_experiment("x"))["model"]["demo"], "warmup_steps": 1}
