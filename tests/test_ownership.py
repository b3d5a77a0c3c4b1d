"""Run folders: moe-atlas starts only in its own (or an empty) folder, belongs to one experiment, and deletes
only what it can prove it wrote. A user's folder with look-alike names is refused and left as it was."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tasks
from experiments.spec import load_experiment
from pipeline_helpers import build, tiny_experiment
from run_builder import IDENTITY, build_run, files, template
from storage import cube as cubes
from storage.ownership import (MARKER, RunRefused, check_output_dir, claim_run, precheck_run,
                               remove_own_temporaries)


def _user_folder(root: Path) -> Path:
    """A folder holding someone's files, named like what moe-atlas cleans up."""
    root.mkdir(parents=True)
    (root / "x.tmp-1").write_text("mine")
    (root / "y.old-2").write_text("mine too")
    (root / "routing.zarr.tmp-0123abcd").mkdir()
    (root / "routing.zarr.tmp-0123abcd" / "data.bin").write_bytes(b"\1\2")
    (root / "routing.zarr").mkdir()  # no zarr.json
    (root / "routing.zarr" / "notes.txt").write_text("not a cube")
    (root / "model" / "checkpoints" / "step_5").mkdir(parents=True)
    (root / "model" / "checkpoints" / "step_5" / "weights.bin").write_bytes(b"\0" * 16)
    (root / "model" / "checkpoints" / "step_0000").mkdir()
    (root / "model" / "checkpoints" / "step_0000" / "config.json").write_text("{}")
    return root


def test_user_folder_is_refused_by_the_pipeline_and_left_untouched(tmp_path):
    user = _user_folder(tmp_path / "mine")
    before = files(user)
    exp = tmp_path / "tiny.toml"
    exp.write_text(tiny_experiment(user, port=18960))
    ok, errors = build(exp)
    assert not ok
    msgs = [str(e) for e in errors]
    assert any(isinstance(e, RunRefused) for e in errors), msgs
    msg = next(str(e) for e in errors if isinstance(e, RunRefused))
    assert str(user) in msg and "not empty" in msg and "not a moe-atlas run" in msg and "output_dir" in msg
    assert "\n" not in msg
    assert files(user) == before  # nothing deleted, nothing added (no .lock, no marker)
    assert sorted(p.name for p in user.iterdir()) == sorted(["x.tmp-1", "y.old-2", "routing.zarr.tmp-0123abcd",
                                                             "routing.zarr", "model"])


def test_each_deleting_code_path_leaves_a_user_folder_alone(tmp_path):
    """Before: clean_temporaries, prepare_routing's rmtree and the demo's checkpoint save deleted these."""
    from capture.demo.train import save_checkpoint_atomic
    from storage.schema import mock_cube

    user = _user_folder(tmp_path / "mine")
    before = files(user)
    assert cubes.clean_temporaries(user) == []
    assert remove_own_temporaries(user) == []
    with pytest.raises(cubes.CubeError, match="does not delete them"):
        cubes.prepare_routing(user / "routing.zarr", template(mock_cube(n_checkpoints=2, n_samples=3)))
    for step in ("step_5", "step_0000"):
        with pytest.raises(FileExistsError, match="not saved by the moe-atlas demo"):
            save_checkpoint_atomic(None, None, user / "model" / "checkpoints" / step)
    with pytest.raises(cubes.CubeError, match="not a result moe-atlas wrote"):
        import xarray as xr

        cubes.write_result(xr.Dataset({"a": ("x", [1.0])}), user / "routing.zarr", fingerprint="f")
    assert files(user) == before


def test_own_temporaries_are_removed_only_in_a_claimed_run(tmp_path):
    root = tmp_path / "run"
    claim_run(root, IDENTITY)
    ours = [root / "routing.zarr.tmp-0123abcd", root / "routing.zarr.old-89abcdef",
            root / "routing.zarr.tmp-import-0a1b2c3d", root / "summary.json.tmp-4242"]
    for p in ours:
        if p.name.startswith("routing.zarr."):
            p.mkdir()  # a store being written
        else:
            p.write_text("{")  # a JSON file being written
    theirs = [root / "x.tmp-1", root / "y.old-2", root / "notes.zarr.tmp-0123abcd", root / "routing.zarr.tmp-zz"]
    for p in theirs:
        p.write_text("keep")
    removed = cubes.clean_temporaries(root)
    assert sorted(removed) == sorted(ours)
    assert all(p.read_text() == "keep" for p in theirs)


@pytest.mark.parametrize("raw", ["", "  ", "/", "~", str(Path.home()), str(Path.home().parent)])
def test_output_dir_that_no_run_may_own_is_refused(raw):
    with pytest.raises(RunRefused, match="output_dir") as err:
        check_output_dir(raw, where="exp.toml")
    assert str(err.value).startswith("exp.toml: ") and "\n" not in str(err.value)


def test_empty_output_dir_refused_by_the_pipeline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exp = tmp_path / "tiny.toml"
    exp.write_text(tiny_experiment(tmp_path / "unused", port=18961).replace(f'"{tmp_path / "unused"}"', '""'))
    assert load_experiment(exp).output_dir == ""
    ok, errors = build(exp)
    assert not ok and any("output_dir is empty" in str(e) for e in errors), [str(e) for e in errors]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.toml"]


def test_another_experiment_is_refused_with_how_to_proceed(tmp_path):
    run = build_run(tmp_path / "run")
    before = files(run.layout.root)
    exp = tmp_path / "tiny.toml"
    exp.write_text(tiny_experiment(run.layout.root, port=18962))
    ok, errors = build(exp)
    assert not ok
    msg = next(str(e) for e in errors if isinstance(e, RunRefused))
    # Before: the second experiment's stages ran in the first one's folder and mixed into its cubes.
    assert f"{run.layout.root} belongs to experiment 'built'" in msg and "'tiny'" in msg
    assert "Use a new output_dir, or delete that run folder to start over." in msg
    assert files(run.layout.root) == before


def test_two_experiments_racing_for_one_empty_folder(tmp_path):
    root = tmp_path / "run"
    a = dict(IDENTITY, experiment="a")
    b = dict(IDENTITY, experiment="b")
    assert precheck_run(root, a) is False and precheck_run(root, b) is False  # both see it empty
    claim_run(root, a)  # the first to hold the run lock claims it
    with pytest.raises(RunRefused, match="belongs to experiment 'a'"):
        claim_run(root, b)
    assert claim_run(root, a)["experiment"] == "a"  # the same experiment continues
    assert json.loads((root / MARKER).read_text())["identity_parts"] == a


CHECKPOINTS = """
name = "sweep"
output_dir = "{out}"
[model]
source = "checkpoints"
tokenizer = "{tok}"
{ckpts}
[[datasets]]
name = "{ds}"
path = "{data}"
[analyses]
run = {analyses}
"""


def _spec(tmp_path, *, ckpts=("a",), ds="eval", analyses=("usage",)):
    text = CHECKPOINTS.format(
        out=tmp_path / "run", tok=tmp_path / "tok", ds=ds, data=tmp_path / "eval.jsonl",
        analyses=json.dumps(list(analyses)),
        ckpts="".join(f'[[model.checkpoints]]\nname = "{c}"\npath = "{tmp_path / c}"\nstep = {i}\n'
                      for i, c in enumerate(ckpts)),
    )
    p = tmp_path / f"e{abs(hash(text)) % 10**8}.toml"
    p.write_text(text)
    return load_experiment(p)


def test_identity_is_stable_under_added_checkpoints_and_analyses(tmp_path):
    base = tasks.run_identity(_spec(tmp_path))
    # The README's promise: adding a checkpoint (or an analysis) later continues the same run.
    assert tasks.run_identity(_spec(tmp_path, ckpts=("a", "b"), analyses=("usage", "change"))) == base
    # Another dataset is another experiment.
    assert tasks.run_identity(_spec(tmp_path, ds="other")) != base
