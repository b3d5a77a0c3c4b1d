"""storage/env.py: numbers from environment variables, with one-line errors naming the variable."""

import pytest

from storage.env import env_number

VAR = "MOE_ATLAS_TEST_NUMBER"


@pytest.mark.parametrize("raw", [None, ""])
def test_unset_or_empty_is_the_default(monkeypatch, raw):
    if raw is None:
        monkeypatch.delenv(VAR, raising=False)
    else:
        monkeypatch.setenv(VAR, raw)
    assert env_number(VAR, 7.5, unit="seconds") == 7.5


@pytest.mark.parametrize("raw, parse, value", [("0", float, 0.0), ("2.5", float, 2.5), ("12", int, 12)])
def test_parsed(monkeypatch, raw, parse, value):
    monkeypatch.setenv(VAR, raw)
    got = env_number(VAR, None, unit="bytes", parse=parse)
    assert got == value and type(got) is parse


@pytest.mark.parametrize("raw, kw, phrase", [
    ("x", {}, "expected a number of seconds"),
    ("1.5", {"parse": int}, "expected a number of seconds"),
    ("-1", {}, "expected seconds >= 0"),
    ("0", {"minimum": 1}, "expected seconds >= 1"),
])
def test_bad_values_name_the_variable(monkeypatch, raw, kw, phrase):
    monkeypatch.setenv(VAR, raw)
    with pytest.raises(ValueError) as e:
        env_number(VAR, 1.0, unit="seconds", **kw)
    assert str(e.value) == f"environment variable {VAR}={raw!r}: {phrase}"
