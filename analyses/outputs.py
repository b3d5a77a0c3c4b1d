"""Outputs declared as data: one table per analysis says what each result variable means.

The way ``storage/schema.py`` declares the routing cube, an analysis module declares
its results::

    OUTPUTS = {
        "share": Output("routing share", "1", "fraction of routed slots sent to the expert",
                        chance="1/num_experts"),
        "entropy": Output("routing entropy", "nat", "...", nan_where="no token routed in the cell"),
    }

and :func:`apply_outputs` stamps those attrs on the result. Bootstrap bounds
``<name>_lo`` / ``<name>_hi`` take their attrs from ``<name>`` (the bound is said in
``long_name``), so they are not declared twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import xarray as xr

BOUND_SUFFIXES = {"_lo": "lower", "_hi": "upper"}


@dataclass(frozen=True)
class Output:
    """What one result variable means.

    Attributes
    ----------
    long_name, units, description : CF-style attrs (units "1" for a ratio, "count", "nat", "bit" ...).
    chance : the value under uniform random routing (a number or a formula in words), when one exists.
    nan_where : when the variable may legitimately hold NaN; None means it must be finite.
    """

    long_name: str
    units: str
    description: str
    chance: float | str | None = None
    nan_where: str | None = None

    def attrs(self) -> dict:
        out = {"long_name": self.long_name, "units": self.units, "description": self.description}
        if self.chance is not None:
            out["chance"] = self.chance if isinstance(self.chance, str) else float(self.chance)
        if self.nan_where is not None:
            out["nan_where"] = self.nan_where
        return out


def declared(name: str, outputs: Mapping[str, Output]) -> tuple[Output, str | None] | None:
    """The declaration covering variable ``name`` and, for a bootstrap bound, which bound."""
    if name in outputs:
        return outputs[name], None
    for suffix, bound in BOUND_SUFFIXES.items():
        if name.endswith(suffix) and name[: -len(suffix)] in outputs:
            return outputs[name[: -len(suffix)]], bound
    return None


def apply_outputs(result: xr.Dataset, outputs: Mapping[str, Output], *, where: str = "result") -> xr.Dataset:
    """``result`` with every data variable's attrs taken from ``outputs``.

    Raises ValueError naming the variables that ``outputs`` does not declare, so a
    new variable cannot reach a cube undocumented.
    """
    undeclared = [v for v in result.data_vars if declared(str(v), outputs) is None]
    if undeclared:
        raise ValueError(f"{where}: variable(s) {undeclared} not declared in its OUTPUTS table")
    result = result.copy()
    for vname in result.data_vars:
        spec, bound = declared(str(vname), outputs)
        attrs = spec.attrs()
        if bound is not None:  # as analyses.bootstrap.add_interval words it, which also stamps ci and n_boot
            ci = result[vname].attrs.get("ci")
            level = f"{100 * float(ci):g} % CI {bound} bound" if ci is not None else f"{bound} bound of the bootstrap interval"
            attrs["long_name"] = f"{spec.long_name}, {level}"
            attrs.pop("chance", None)
            attrs.pop("description", None)  # the bound's own: which percentile of how many replicates
            attrs["nan_where"] = (spec.nan_where + "; or every bootstrap replicate undefined" if spec.nan_where
                                  else "every bootstrap replicate undefined (e.g. a group whose samples have no token)")
        # keep what the computation itself stamped (e.g. a per-variable 'ci' level), the table wins on clashes
        result[vname].attrs = {**result[vname].attrs, **attrs}
    return result
