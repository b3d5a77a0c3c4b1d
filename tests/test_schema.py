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
