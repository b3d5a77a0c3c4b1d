"""Damaged stores: every lost, truncated or corrupted chunk object is found (cheaply on open, fully by verify),
named (store, variable, region, fix), never read as fill, and repaired by rerunning, never made up."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline_helpers import tiny_model  # noqa: F401  (fixture)
from run_builder import NAMES, build_run, capture, chunk, files, template
from storage import cube as cubes
from storage import manifest as manifests
from storage.verify import repair, verify_run


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_run(tmp_path_factory.mktemp("built") / "run")


@pytest.fixture
def run(built, tmp_path):
    """A private copy of the built run (same experiment file), to damage."""
    root = tmp_path / "run"
    shutil.copytree(built.layout.root, root)
    return type(built)(type(built.layout)(root), built.cube, built.experiment_file)


def _region_line(msg: str, store, var: str, checkpoint: str) -> None:
    assert "\n" not in msg
    assert str(store) in msg and f"variable '{var}'" in msg and f"checkpoint '{checkpoint}'" in msg, msg
    assert "fix: luigi --module tasks FullReport --experiment" in msg, msg


@pytest.mark.parametrize("var, index", [("expert_weights", (1, 0, 1, 0)), ("router_logits", (1, 1, 2, 0)),
                                        ("nll", (1, 2)), ("expert_ids", (1, 0, 0, 0))])
def test_missing_region_chunk_is_named_and_the_checkpoint_recaptured(run, var, index):
    before = chunk(run.routing, var, *index)
    assert before.is_file()
    before.unlink()
    # Before: a lost chunk read as fill (NaN weights/NLL, expert -1) in a checkpoint marked complete.
    with pytest.raises(cubes.CubeError) as err:
        cubes.open_routing(run.routing)
    _region_line(str(err.value), run.routing, var, "step100")
    assert f"{var}/c/{'/'.join(map(str, index))}" in str(err.value) and "missing" in str(err.value)
    # The pipeline's completeness check leaves it out, so the same command recaptures it ...
    assert cubes.completed_checkpoints(run.routing) == ["step0"]
    capture(run.routing, run.cube, 1, "step100")
    # ... and the recaptured cube holds the captured values again, verified.
    ds = cubes.open_routing(run.routing)
    assert list(ds.checkpoint.values) == NAMES
    np.testing.assert_array_equal(ds[var].values, run.cube[var].values)
    assert verify_run(run.layout.root)[0] == []


def test_truncated_chunk_names_store_variable_region_and_is_repaired_by_recapture(run):
    victim = chunk(run.routing, "nll", 0, 1)
    victim.write_bytes(victim.read_bytes()[:7])
    # Before: "Zstd decompression error" with no path, and no rerun repaired it.
    with pytest.raises(cubes.CubeError, match="truncated") as err:
        cubes.open_routing(run.routing)
    _region_line(str(err.value), run.routing, "nll", "step0")
    assert "nll/c/0/1" in str(err.value)
    assert cubes.completed_checkpoints(run.routing) == ["step100"]
    capture(run.routing, run.cube, 0, "step0")
    np.testing.assert_allclose(cubes.open_routing(run.routing).nll.values, run.cube.nll.values)


def test_lost_token_coordinate_chunk_is_refused_then_restored_byte_for_byte(run):
    victim = chunk(run.routing, "token_id", 0)
    original = victim.read_bytes()
    victim.unlink()
    # Before: token_id read as 0 everywhere, and analyses and the report ran on it.
    with pytest.raises(cubes.CubeError, match="variable 'token_id'") as err:
        cubes.open_routing(run.routing, complete_only=False)
    assert "token_id/c/0" in str(err.value) and "restores it from the token tables" in str(err.value)
    # The rerun's template stage (prepare_routing with the same token tables) puts back exactly what was written.
    assert cubes.prepare_routing(run.routing, template(run.cube)) == []
    assert victim.read_bytes() == original
    ds = cubes.open_routing(run.routing)
    np.testing.assert_array_equal(ds.token_id.values, run.cube.token_id.values)
    assert list(ds.checkpoint.values) == NAMES  # the captured regions were kept


def test_token_coordinate_is_never_fabricated_from_other_inputs(run):
    chunk(run.routing, "token_id", 0).unlink()
    other = run.cube.copy(deep=True)
    other["token_id"] = ("token", (run.cube.token_id.values + 1) % 50)
    before = files(run.routing)
    with pytest.raises(cubes.CubeError, match="do not reproduce it"):
        cubes.prepare_routing(run.routing, template(other))
    assert files(run.routing) == before


def test_lost_root_metadata_is_restored_and_intact_regions_kept(run):
    (run.routing / "zarr.json").unlink()
    with pytest.raises(cubes.CubeError, match="zarr.json missing"):
        cubes.open_routing(run.routing)
    # Before: the template stage deleted the whole cube (every checkpoint's capture) and started over.
    cubes.prepare_routing(run.routing, template(run.cube))
    ds = cubes.open_routing(run.routing)
    assert list(ds.checkpoint.values) == NAMES
    np.testing.assert_array_equal(ds.expert_ids.values, run.cube.expert_ids.values)


def test_lost_root_metadata_without_a_copy_is_refused_and_nothing_deleted(run):
    (run.routing / "zarr.json").unlink()
    manifests.state_file(run.routing, manifests.META_COPY).unlink()
    before = files(run.routing)
    with pytest.raises(cubes.CubeError) as err:
        cubes.prepare_routing(run.routing, template(run.cube))
    msg = str(err.value)
    assert "does not delete them" in msg and f"mv {run.routing} {run.routing}.damaged" in msg and "\n" not in msg
    assert files(run.routing) == before


@pytest.mark.parametrize("store, var", [("analyses/usage.zarr", "share"), ("tokens/eval.zarr", "token_id")])
def test_damaged_result_is_refused_named_and_recomputed(run, store, var):
    path = run.layout.root / store
    assert cubes.result_fingerprint(path) is not None
    victim = chunk(path, var, 0, 0) if var == "share" else chunk(path, var, 0)
    victim.write_bytes(victim.read_bytes()[:-3])
    # Before: only the fingerprint was compared, so the damaged result (token ids 0, NaN shares) was used.
    assert cubes.result_fingerprint(path) is None  # the stage is not complete: the rerun recomputes it
    with pytest.raises(cubes.CubeError) as err:
        cubes.open_result(path)
    msg = str(err.value)
    assert str(path) in msg and f"variable '{var}'" in msg and "truncated" in msg and "recomputes it" in msg
    assert "\n" not in msg


def test_same_size_corruption_is_found_by_verify_and_repair_makes_the_rerun_recapture(run):
    victim = chunk(run.routing, "expert_weights", 0, 1, 0, 0)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    # Open-time checks only list and compare sizes: the region still opens ...
    assert cubes.completed_checkpoints(run.routing) == NAMES
    problems, counts = verify_run(run.layout.root)
    assert counts == {"regions": 2, "results": 2}
    # ... the full check finds it, and says which one command fixes it.
    assert [p.variable for p in problems] == ["expert_weights"]
    line = problems[0].line()
    assert "checkpoint 'step0'" in line and "checksum" in line
    assert f"moe-atlas verify {run.layout.root} --repair && luigi --module tasks FullReport --experiment" in line
    assert any("un-marked checkpoint 'step0'" in d for d in repair(run.layout.root, problems))
    assert cubes.completed_checkpoints(run.routing) == ["step100"]
    capture(run.routing, run.cube, 0, "step0")
    assert verify_run(run.layout.root)[0] == []


def test_full_verify_reads_every_object(run):
    victim = chunk(run.layout.root / "tokens" / "eval.zarr", "token_text", 0)
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0x01
    victim.write_bytes(bytes(data))
    quick, _ = verify_run(run.layout.root, full=False)
    full, _ = verify_run(run.layout.root, full=True)
    assert quick == [] and [p.variable for p in full] == ["token_text"]
    repair(run.layout.root, full)
    assert not (run.layout.root / "tokens" / "eval.zarr").exists()  # ours, proven damaged: the rerun rebuilds it


def test_region_manifest_is_written_before_complete(tmp_path):
    """A capture killed after its data but before ``complete`` leaves no manifest, and a recapture drops the old one."""
    b = build_run(tmp_path / "run")
    region = manifests.state_file(b.routing, "region-1.json")
    assert json.loads(region.read_text())["checkpoint"] == "step100"
    w = cubes.RoutingWriter(b.routing, "step100")  # a recapture starts: un-marked, manifest dropped
    assert not region.exists() and cubes.completed_checkpoints(b.routing) == ["step0"]
    del w


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pick=st.integers(min_value=0, max_value=10**6), how=st.sampled_from(["delete", "truncate", "grow"]))
def test_any_damaged_region_object_excludes_exactly_its_checkpoint(built, tmp_path_factory, pick, how):
    root = tmp_path_factory.mktemp("prop") / "run"
    shutil.copytree(built.layout.root, root)
    routing = root / "routing.zarr"
    objs = sorted(p for var in ("expert_ids", "expert_weights", "router_logits", "nll")
                  for p in (routing / var / "c").rglob("*") if p.is_file())
    victim = objs[pick % len(objs)]
    ci = int(victim.relative_to(routing).parts[2])
    if how == "delete":
        victim.unlink()
    elif how == "truncate":
        victim.write_bytes(victim.read_bytes()[:-1])
    else:
        victim.write_bytes(victim.read_bytes() + b"\0")
    assert cubes.completed_checkpoints(routing) == [n for i, n in enumerate(NAMES) if i != ci]
    problems, _ = verify_run(root, full=False)
    assert len(problems) == 1 and problems[0].region.startswith(f"checkpoint '{NAMES[ci]}'")


# ------------------------------------------------------------------ the pipeline repairs what verify finds


@pytest.mark.slow
def test_rerun_of_the_same_command_recaptures_and_recomputes_only_the_damage(tmp_path, tiny_model):
    import xarray as xr

    from pipeline_helpers import build, checkpoint_names, new_run

    exp = new_run(tmp_path, tiny_model, port=18971)
    run = tmp_path / "run"
    ok, errors = build(exp)
    assert ok, errors
    routing = run / "routing.zarr"
    names = checkpoint_names(exp)
    before = cubes.open_routing(routing).load()
    usage = cubes.open_result(run / "analyses" / "usage.zarr")
    assert verify_run(run)[0] == []

    victim = names[1]
    chunk(routing, "nll", 1, 0).unlink()
    table = run / "tokens" / "demo_eval.zarr"
    tok = chunk(table, "token_id", 0)
    tok.write_bytes(tok.read_bytes()[:-2])
    share = next(p for p in sorted((run / "analyses" / "usage.zarr").rglob("c/*")) if p.is_file())
    share.unlink()
    found = verify_run(run, full=False)[0]
    assert {(p.store, p.variable) for p in found} == {(str(routing), "nll"), (str(table), "token_id"),
                                                     (str(run / "analyses" / "usage.zarr"), share.relative_to(
                                                         run / "analyses" / "usage.zarr").parts[0])}

    # What a stage rewrites gets a new manifest: compare them (Luigi may batch or skip tasks as it likes).
    regions = {n: manifests.state_file(routing, f"region-{i}.json") for i, n in enumerate(names)}
    stamps = {n: p.stat().st_mtime_ns for n, p in regions.items()}
    results = {p: manifests.state_file(p, manifests.RESULT_MANIFEST)
               for p in [table, *sorted((run / "analyses").glob("*.zarr"))]}
    result_stamps = {p: m.stat().st_mtime_ns for p, m in results.items()}
    ok, errors = build(exp)  # the same command
    assert ok, errors
    recaptured = [n for n, p in regions.items() if p.stat().st_mtime_ns != stamps[n]]
    assert recaptured == [victim]
    rewritten = {p.name for p, m in results.items() if m.stat().st_mtime_ns != result_stamps[p]}
    assert {"demo_eval.zarr", "usage.zarr"} <= rewritten
    assert verify_run(run)[0] == []
    after = cubes.open_routing(routing).load()
    xr.testing.assert_identical(after, before)  # the same data, never fill, and token ids not 0
    xr.testing.assert_identical(cubes.open_result(run / "analyses" / "usage.zarr"), usage)


def test_routing_head_reads_what_open_routing_does_and_refuses_the_same_damage(run):
    """The cheap read of completeness checks (attrs, checkpoint names; no xarray) agrees with open_routing."""
    attrs, names = cubes.routing_head(run.routing)
    full = cubes.open_routing(run.routing, complete_only=False)
    assert names == list(map(str, full.checkpoint.values)) == NAMES
    assert attrs["inputs_hash"] == full.attrs["inputs_hash"] and attrs["top_k"] == full.attrs["top_k"]
    chunk(run.routing, "token_id", 0).unlink()  # a lost template chunk: both refuse, naming it
    with pytest.raises(cubes.CubeError, match="token_id/c/0"):
        cubes.routing_head(run.routing)
    with pytest.raises(cubes.CubeError, match="no routing cube"):
        cubes.routing_head(run.routing.parent / "nowhere.zarr")
