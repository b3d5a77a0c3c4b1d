"""storage.atomic: one helper for every atomic write (file, JSON, directory replacement)."""

import json

import pytest

from storage import atomic
from storage.ownership import TEMP_RE


def test_write_json_and_text_are_whole_and_leave_no_temporary(tmp_path):
    atomic.write_json(tmp_path / "sub" / "a.json", {"b": [1, 2]}, sort_keys=True, indent=None, newline=True)
    assert (tmp_path / "sub" / "a.json").read_text() == '{"b": [1, 2]}\n'
    atomic.write_text(tmp_path / "t.txt", "é")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "é"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.json", "sub", "t.txt"]


def test_staged_replaces_a_directory_and_keeps_the_old_one_on_failure(tmp_path):
    target = tmp_path / "store"
    with atomic.staged(target) as tmp:
        tmp.mkdir()
        (tmp / "x").write_text("1")
    with atomic.staged(target) as tmp:
        tmp.mkdir()
        (tmp / "x").write_text("2")
    assert (target / "x").read_text() == "2"
    with pytest.raises(RuntimeError):
        with atomic.staged(target) as tmp:
            tmp.mkdir()
            raise RuntimeError("killed")
    assert (target / "x").read_text() == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["store"]  # no temporary, no .old- left


@pytest.mark.parametrize("tag,hidden", [("", False), ("import", False), ("", True)])
def test_temporary_names_are_the_ones_ownership_may_remove(tmp_path, tag, hidden):
    name = atomic.temp_path(tmp_path / "routing.zarr", tag, hidden=hidden).name
    m = TEMP_RE.match(name)
    assert m and m.group("base") == (".routing.zarr" if hidden else "routing.zarr")
    with pytest.raises(ValueError):
        atomic.temp_path(tmp_path / "a", "Bad-1")
    assert json.loads(json.dumps(name))
