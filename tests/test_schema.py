"""routing.zarr explains itself: CF long_name/units on every variable and coordinate (issue 13)."""

from __future__ import annotations

import xarray as xr

from run_builder import build_run


def test_every_variable_and_coordinate_has_long_name_and_units(tmp_path):
    from storage.schema import CF_ATTRS

    run = build_run(tmp_path / "run")
    ds = xr.open_zarr(run.layout.routing)
    missing = [n for n in ds.variables if not {"long_name", "units"} <= set(ds[n].attrs)]
    assert missing == []
    assert (ds.step.attrs["long_name"], ds.step.attrs["units"]) == CF_ATTRS["step"]
    assert ds.expert_ids.attrs["description"].startswith("selected expert")  # the long description stays
    assert ds.position.attrs["units"] == "tokens" and ds.nll.attrs["units"] == "nats"


def test_sample_ids_round_trip_through_token_tables_and_routing_zarr(tmp_path):
    """The dataset's own sample ids (JSONL ``id``) survive token table -> concatenation -> routing.zarr."""
    import numpy as np

    from capture.job import load_token_tables
    from storage import cube as cubes
    from storage.schema import CF_ATTRS, empty_routing, token_table

    def table(ids, lengths, dataset):
        sample = np.repeat(np.arange(len(ids)), lengths)
        return token_table(sample=sample, sample_id=np.asarray(ids, dtype=object)[sample],
                           position=np.concatenate([np.arange(n) for n in lengths]),
                           token_id=np.arange(sum(lengths)), dataset=np.full(sum(lengths), dataset, dtype=object))

    # ids that a positional index or a number cannot stand for: unicode, numeric-looking, empty, repeated across files
    a = table(["doc-α", "0042", ""], [3, 5, 2], "a")
    b = table(["doc-α", "b/7"], [4, 1], "b")
    paths = []
    for name, t in (("a", a), ("b", b)):
        cubes.write_result(t, tmp_path / f"{name}.zarr", fingerprint=name)
        paths.append(str(tmp_path / f"{name}.zarr"))
    tokens = load_token_tables(paths)
    expected = ["doc-α"] * 3 + ["0042"] * 5 + [""] * 2 + ["doc-α"] * 4 + ["b/7"]
    assert list(tokens.sample_id.values) == expected
    assert list(tokens.sample.values) == [0] * 3 + [1] * 5 + [2] * 2 + [3] * 4 + [4]  # renumbered; the ids are not
    tmpl = empty_routing(tokens, checkpoints=["c0"], steps=[0], layers=[0], num_experts=4, top_k=2,
                         attrs={"model_family": "mock", "router_semantics": "softmax", "source": "test"})
    cubes.prepare_routing(tmp_path / "routing.zarr", tmpl)
    back = cubes.open_routing(tmp_path / "routing.zarr", complete_only=False)
    assert list(back.sample_id.values) == expected
    assert (back.sample_id.attrs["long_name"], back.sample_id.attrs["units"]) == CF_ATTRS["sample_id"]
    raw = xr.open_zarr(tmp_path / "routing.zarr")
    assert [str(v) for v in raw.sample_id.values] == expected


def test_result_coordinates_are_labelled_and_position_bin_edges_stated(tmp_path):
    import numpy as np

    import analyses
    from storage import cube as cubes
    from storage.schema import mock_cube

    ds = mock_cube(n_checkpoints=1, n_layers=1, n_samples=4, seq_len=12, seed=3)
    result = analyses.run("usage", ds, position_bins=3, n_boot=0).compute()
    assert "long_name" not in result["position_start"].attrs  # the analysis leaves them; write_result labels them
    cubes.write_result(result, tmp_path / "usage.zarr", fingerprint="u")
    back = xr.open_zarr(tmp_path / "usage.zarr")
    assert [n for n in back.coords if not {"long_name", "units"} <= set(back[n].attrs)] == []
    assert back.position_start.attrs["units"] == "tokens" and "exclusive" in back.position_end.attrs["long_name"]
    edges = np.r_[back.position_start.values, back.position_end.values[-1]]
    assert (np.diff(edges) > 0).all() and edges[0] == 0 and edges[-1] == int(ds.position.max()) + 1
    assert back.step.attrs["long_name"] == result.step.attrs.get("long_name", "training step of the checkpoint")
