"""The contract every registered analysis keeps (runs automatically for new ones)."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from PIL import Image

import analyses
from analyses.registry import RESULT_ATTRS, RESULT_DIMS, VARIABLE_ATTRS
from cube_helpers import forbid_cube_compute, lazy, punch_holes, small_cube


def _cases():
    for name, a in sorted(analyses.REGISTRY.items()):
        yield pytest.param(name, True, id=f"{name}-logits")
        if "router_logits" not in a.requires:
            yield pytest.param(name, False, id=f"{name}-no_logits")


@pytest.fixture(scope="module")
def cubes():
    # capacity_factor adds capacity_dropped (analyses that need it run too); the routing is unchanged
    ds = punch_holes(small_cube(n_checkpoints=2, seed=5, capacity_factor=1.0), seed=1)
    return {True: ds, False: ds.drop_vars("router_logits")}


def test_registry_is_complete_on_import():
    assert {"usage", "confidence", "change"} <= set(analyses.REGISTRY)
    for name, a in analyses.REGISTRY.items():
        assert a.name == name and analyses.get(name) is a
        assert a.title and len(a.caption) > 80, "the caption says how to read the figure and the chance level"
        assert isinstance(a.requires, tuple) and "expert_ids" in a.requires
        # every default parameter is a keyword of the function
        sig = inspect.signature(a.func)
        assert set(a.params) <= set(sig.parameters), name


@pytest.mark.parametrize(("name", "with_logits"), list(_cases()))
def test_contract(name, with_logits, cubes, tmp_path):
    a = analyses.get(name)
    ds = cubes[with_logits]
    assert analyses.missing_requirements(name, ds) == []
    result = analyses.run(name, ds)

    # shape of the result
    assert isinstance(result, xr.Dataset)
    analyses.check_result(result, name)
    assert set(result.dims) <= set(RESULT_DIMS)
    assert all(result.attrs[k] not in ("", None) for k in RESULT_ATTRS)
    assert result.attrs["analysis"] == name
    if "checkpoint" in result.dims:
        assert result["step"].dims == ("checkpoint",)
    for vname, var in result.data_vars.items():
        assert all(var.attrs.get(k) for k in VARIABLE_ATTRS), vname
        values = np.asarray(var.values, dtype=float)
        if "nan_where" in var.attrs:
            assert np.isfinite(values).any(), f"{vname} is NaN everywhere"
            assert not np.isinf(values).any(), vname
        else:
            assert np.isfinite(values).all(), f"{vname} has non-finite values but no 'nan_where' attr"

    # determinism
    xr.testing.assert_identical(result, analyses.run(name, ds))

    # lazy in, lazy out; computing gives the in-memory result
    lazy_ds = lazy(ds)
    with forbid_cube_compute():
        lazy_result = analyses.run(name, lazy_ds)
    assert all(v.chunks is not None for v in lazy_result.data_vars.values())
    xr.testing.assert_allclose(lazy_result.compute(), result)
    assert lazy_result.attrs == result.attrs

    # figure: non-empty PNGs at 300 dpi
    paths = a.figure(result, tmp_path)
    assert paths and all(p.suffix == ".png" and p.parent == tmp_path for p in paths)
    for p in paths:
        assert p.stat().st_size > 5_000
        with Image.open(p) as im:
            assert im.format == "PNG"
            assert im.info["dpi"] == pytest.approx((300, 300), abs=0.5)
            assert min(im.size) > 300

    # table and summary
    df = a.table(result)
    assert isinstance(df, pd.DataFrame) and len(df) > 0
    assert not df.columns.duplicated().any()
    assert set(result.dims) & set(df.columns)
    summary = a.summary(result)
    assert isinstance(summary, dict) and summary
    json.dumps(summary, allow_nan=False)


@pytest.mark.parametrize("name", sorted(analyses.REGISTRY))
def test_params_are_json_and_figure_formats(name, cubes, tmp_path):
    a = analyses.get(name)
    json.dumps(dict(a.params))
    result = analyses.run(name, cubes[True])
    json.loads(result.attrs["params"])
    paths = a.figure(result, tmp_path, ("png", "pdf"))
    assert {p.suffix for p in paths} == {".png", ".pdf"}
