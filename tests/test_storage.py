"""Zarr I/O of the routing cube: template, region writes, completion, results."""

import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st

from storage import cube as cubes
from storage.schema import FILL_ID, empty_routing, mock_cube, validate_routing


def _tokens(ds):
    return ds.drop_vars(list(ds.data_vars)).drop_dims(["checkpoint", "layer", "k", "expert"])


def _template(m, names, logits=True):
    return empty_routing(
        _tokens(m), checkpoints=names, steps=[int(n[4:]) for n in names], layers=list(m.layer.values),
        num_experts=m.sizes["expert"], top_k=m.sizes["k"], keep_logits=logits,
        attrs={"model_family": "mock", "router_semantics": "softmax", "source": "test"},
    )


def _fill(path, m, c, name, batch=53):
    T = m.sizes["token"]
    with cubes.RoutingWriter(path, name) as w:
        for s in range(0, T, batch):
            e = min(T, s + batch)
            w.append(
                expert_ids=m.expert_ids.values[c][:, s:e], expert_weights=m.expert_weights.values[c][:, s:e],
                router_logits=m.router_logits.values[c][:, s:e], nll=m.nll.values[c][s:e],
            )


def test_template_reads_as_fill_and_nothing_complete(tmp_path):
    m = mock_cube(n_checkpoints=2, n_samples=6)
    p = tmp_path / "routing.zarr"
    assert cubes.prepare_routing(p, _template(m, ["step0", "step100"]), token_chunk=40) == ["step0", "step100"]
    ds = cubes.open_routing(p, complete_only=False)
    assert (ds.expert_ids.values == FILL_ID).all()
    assert np.isnan(ds.expert_weights.values).all()
    assert cubes.completed_checkpoints(p) == []
    assert cubes.open_routing(p).sizes["checkpoint"] == 0
    validate_routing(ds)


def test_region_writes_roundtrip_and_extend(tmp_path):
    m = mock_cube(n_checkpoints=3, n_samples=8)
    p = tmp_path / "routing.zarr"
    cubes.prepare_routing(p, _template(m, ["step0", "step100"]), token_chunk=64)
    _fill(p, m, 0, "step0")
    assert cubes.completed_checkpoints(p) == ["step0"]
    # Adding a checkpoint extends the cube and leaves the captured region alone.
    assert cubes.prepare_routing(p, _template(m, ["step0", "step100", "step200"])) == ["step200"]
    _fill(p, m, 2, "step200", batch=500)
    ds = cubes.open_routing(p)
    assert list(ds.checkpoint.values) == ["step0", "step200"]
    np.testing.assert_array_equal(ds.expert_ids.values, m.expert_ids.values[[0, 2]])
    np.testing.assert_array_equal(ds.router_logits.values, m.router_logits.values[[0, 2]])
    np.testing.assert_allclose(ds.nll.values, m.nll.values[[0, 2]])
    assert ds.expert_ids.chunks[2][0] == 64  # chunk-aligned token regions
    assert list(ds.token_text.values[:3]) == list(m.token_text.values[:3])


def test_killed_capture_is_never_complete(tmp_path):
    m = mock_cube(n_checkpoints=1, n_samples=8)
    p = tmp_path / "routing.zarr"
    cubes.prepare_routing(p, _template(m, ["step0"]), token_chunk=32)
    with pytest.raises(RuntimeError):
        with cubes.RoutingWriter(p, "step0") as w:
            w.append(
                expert_ids=m.expert_ids.values[0][:, :40], expert_weights=m.expert_weights.values[0][:, :40],
                router_logits=m.router_logits.values[0][:, :40], nll=m.nll.values[0][:40],
            )
            raise RuntimeError("killed")
    assert cubes.completed_checkpoints(p) == []
    # Closing with too few tokens is refused too.
    w = cubes.RoutingWriter(p, "step0")
    w.append(
        expert_ids=m.expert_ids.values[0][:, :10], expert_weights=m.expert_weights.values[0][:, :10],
        router_logits=m.router_logits.values[0][:, :10], nll=m.nll.values[0][:10],
    )
    with pytest.raises(cubes.CubeError, match="not marking it complete"):
        w.close()
    assert cubes.completed_checkpoints(p) == []


def test_bad_region_input_is_refused(tmp_path):
    m = mock_cube(n_checkpoints=1, n_samples=4)
    p = tmp_path / "routing.zarr"
    cubes.prepare_routing(p, _template(m, ["step0"]))
    w = cubes.RoutingWriter(p, "step0")
    bad = m.expert_ids.values[0][:, :5].copy()
    bad[0, 0, 0] = 8
    with pytest.raises(cubes.CubeError, match="expert id out of range"):
        w.append(expert_ids=bad, expert_weights=m.expert_weights.values[0][:, :5],
                 router_logits=m.router_logits.values[0][:, :5], nll=m.nll.values[0][:5])
    with pytest.raises(cubes.CubeError, match="did not provide"):
        w.append(expert_ids=m.expert_ids.values[0][:, :5])
    with pytest.raises(cubes.CubeError, match="not in the cube template"):
        cubes.RoutingWriter(p, "nope")


def test_mismatched_inputs_refused(tmp_path):
    m = mock_cube(n_checkpoints=1, n_samples=4, seed=1)
    other = mock_cube(n_checkpoints=1, n_samples=5, seed=2)
    p = tmp_path / "routing.zarr"
    cubes.prepare_routing(p, _template(m, ["step0"]))
    with pytest.raises(cubes.CubeError, match="inputs_hash"):
        cubes.prepare_routing(p, _template(other, ["step0"]))
    with pytest.raises(cubes.CubeError, match="variables differ"):
        cubes.prepare_routing(p, _template(m, ["step0"], logits=False))


def test_truncated_store_gives_clear_error(tmp_path):
    p = tmp_path / "routing.zarr"
    with pytest.raises(cubes.CubeError, match="zarr.json missing"):
        cubes.open_routing(p)
    m = mock_cube(n_checkpoints=1, n_samples=4)
    cubes.prepare_routing(p, _template(m, ["step0"]))
    (p / "zarr.json").write_text("{ truncated")
    with pytest.raises(cubes.CubeError, match=str(p)):
        cubes.open_routing(p)


def test_results_atomic_with_fingerprint(tmp_path):
    p = tmp_path / "analyses" / "x.zarr"
    ds = xr.Dataset({"a": (("layer",), np.arange(3.0))}, attrs={"definition": "d"})
    assert cubes.result_fingerprint(p) is None
    cubes.write_result(ds, p, fingerprint="abc")
    assert cubes.result_fingerprint(p) == "abc"
    cubes.write_result(ds * 2, p, fingerprint="def")
    assert cubes.result_fingerprint(p) == "def"
    np.testing.assert_array_equal(cubes.open_result(p).a.values, [0, 2, 4])
    assert sorted(x.name for x in p.parent.iterdir()) == ["x.zarr"]


@settings(max_examples=15, deadline=None)
@given(batch=st.integers(1, 300), chunk=st.integers(1, 200))
def test_any_batching_gives_the_same_cube(tmp_path_factory, batch, chunk):
    m = mock_cube(n_checkpoints=1, n_samples=6, seed=3)
    p = tmp_path_factory.mktemp("cube") / "routing.zarr"
    cubes.prepare_routing(p, _template(m, ["step0"]), token_chunk=chunk)
    _fill(p, m, 0, "step0", batch=batch)
    np.testing.assert_array_equal(cubes.open_routing(p).expert_ids.values, m.expert_ids.values)


def test_open_routing_reads_whole_stored_chunks_several_layers_per_task(tmp_path, monkeypatch):
    """Dask blocks span several stored layer chunks (fewer tasks), never part of one, and
    every analysis gives the same numbers as with one block per stored chunk."""
    import analyses
    from analyses.runner import compute_analysis

    m = mock_cube(n_checkpoints=2, n_layers=4, num_experts=6, top_k=2, n_samples=12, seq_len=30, seed=5)
    p = tmp_path / "routing.zarr"
    cubes.prepare_routing(p, _template(m, ["step0", "step100"]), token_chunk=64)
    for c, name in enumerate(["step0", "step100"]):
        _fill(p, m, c, name)
    stored = cubes.open_routing(p, chunks={})
    assert stored.expert_ids.chunks[1] == (1, 1, 1, 1)
    auto = cubes.open_routing(p)
    assert len(auto.expert_ids.chunks[1]) < 4  # layers merged per task
    assert auto.expert_ids.chunks[2] == stored.expert_ids.chunks[2]  # token chunks as stored
    monkeypatch.setattr(cubes, "TASK_BYTES", 1)  # one layer per task at least, never a fraction
    assert cubes.open_routing(p).expert_ids.chunks[1] == (1, 1, 1, 1)
    monkeypatch.undo()
    for name in ("usage", "balance", "temporal", "coactivation"):
        params = {**analyses.get(name).params, "n_boot": 20}
        merged = compute_analysis(p, name, params)
        monkeypatch.setattr(cubes, "TASK_BYTES", 1)
        single = compute_analysis(p, name, params)
        monkeypatch.undo()
        xr.testing.assert_allclose(merged, single, rtol=1e-12)
