"""analyses.outputs: OUTPUTS tables stamped on results (templates, chance functions, bounds), and that every
registered analysis declares its variables as data."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

import analyses
from analyses.outputs import Output, apply_outputs, k_of_experts, per_expert

TABLE = {
    "usage": Output("expert usage", "share", "usage < {dead_fraction:g} / E of {a}", chance=per_expert,
                    nan_where="no token of {a}", extra={"ideal": lambda c: float(c["top_k"])}),
    "overlap": Output("overlap", "fraction of k", "plain text, no template", chance=k_of_experts),
    "count": Output("slots", "slots", "literal {{braces}} stay"),
}
CONTEXT = {"num_experts": 8, "top_k": 2, "dead_fraction": 0.01, "a": "code"}


def _result():
    x = xr.DataArray(np.zeros(3), dims="expert")
    out = {"usage": x, "overlap": x, "count": x}
    for side in ("lo", "hi"):  # as analyses.bootstrap.add_interval stamps a bound
        out[f"usage_{side}"] = x.copy()
        out[f"usage_{side}"].attrs = {"ci": 0.9, "n_boot": 7, "description": f"the {side} percentile"}
    return xr.Dataset(out)


def test_templates_and_chance_functions_are_filled_from_the_context():
    res = apply_outputs(_result(), TABLE, context=CONTEXT)
    assert res["usage"].attrs == {"long_name": "expert usage", "units": "share",
                                  "description": "usage < 0.01 / E of code", "chance": 1 / 8,
                                  "nan_where": "no token of code", "ideal": 2.0}
    assert res["overlap"].attrs["chance"] == 2 / 8
    assert res["count"].attrs["description"] == "literal {braces} stay"


def test_a_bound_takes_its_variables_declaration_without_chance_or_extras():
    lo = apply_outputs(_result(), TABLE, context=CONTEXT)["usage_lo"].attrs
    assert lo == {"long_name": "expert usage, 90 % CI lower bound", "units": "share", "ci": 0.9, "n_boot": 7,
                  "description": "the lo percentile",
                  "nan_where": "no token of code; or every bootstrap replicate undefined"}


def test_without_a_context_the_text_is_stamped_as_written():
    res = apply_outputs(_result()[["count"]], TABLE)
    assert res["count"].attrs["description"] == "literal {{braces}} stay"


def test_a_template_key_missing_from_the_context_names_the_variable():
    with pytest.raises(ValueError, match="'usage' needs 'a'"):
        apply_outputs(_result(), TABLE, context={k: v for k, v in CONTEXT.items() if k != "a"})


def test_an_undeclared_variable_is_refused():
    with pytest.raises(ValueError, match=r"\['extra'\] not declared"):
        apply_outputs(_result().assign(extra=xr.DataArray([1.0], dims="x")), TABLE, context=CONTEXT)


@pytest.mark.parametrize("name", sorted(analyses.REGISTRY))
def test_every_registered_analysis_declares_its_outputs(name):
    outputs = analyses.get(name).outputs
    assert outputs and all(isinstance(o, Output) for o in outputs.values())
