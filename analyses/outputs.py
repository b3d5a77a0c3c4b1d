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

What depends on the data is still declared, not computed in the entry point: the text
fields are ``str.format`` templates and ``chance`` (or an ``extra`` attr) may be a
function, both filled from a *context* that :func:`analyses.registry.finalise` builds from
the cube (``num_experts``, ``top_k``), the analysis' ``params`` and what the analysis adds::

    "dead": Output("dead expert", "boolean", "usage < {dead_fraction:g} / E"),
    "usage": Output("expert usage", "share of routing slots", "...", chance=per_expert),   # 1/E, a float
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import xarray as xr

BOUND_SUFFIXES = {"_lo": "lower", "_hi": "upper"}


@dataclass(frozen=True)
class Output:
    """What one result variable means.

    Attributes
    ----------
    long_name, units, description : CF-style attrs (units "1" for a ratio, "count", "nat", "bit" ...).
    chance : the value under uniform random routing (a number or a formula in words), when one exists;
        or a function of the context returning it (e.g. :func:`per_expert`).
    nan_where : when the variable may legitimately hold NaN; None means it must be finite.
    extra : further attrs (e.g. ``ideal``), values or functions of the context like ``chance``.

    With a context (:func:`apply_outputs`), the text fields are formatted with it
    (``str.format_map``: ``{dead_fraction:g}``; a literal brace is doubled).
    """

    long_name: str
    units: str
    description: str
    chance: float | str | Callable[[Mapping[str, Any]], Any] | None = None
    nan_where: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def attrs(self, context: Mapping[str, Any] | None = None) -> dict:
        text = (lambda s: s) if context is None else (lambda s: s.format_map(context))
        value = (lambda v: v) if context is None else (lambda v: v(context) if callable(v) else v)
        out = {"long_name": text(self.long_name), "units": self.units, "description": text(self.description)}
        if self.chance is not None:
            chance = value(self.chance)
            out["chance"] = chance if isinstance(chance, str) else float(chance)
        if self.nan_where is not None:
            out["nan_where"] = text(self.nan_where)
        out.update({key: value(v) for key, v in self.extra.items()})
        return out


# Chance levels that depend on the cube's sizes, for ``Output(chance=...)``.
def per_expert(context: Mapping[str, Any]) -> float:
    """1/E: one expert's share of the slots under uniform routing."""
    return 1.0 / context["num_experts"]


def k_of_experts(context: Mapping[str, Any]) -> float:
    """k/E: the chance that a given expert is in a token's top-k set (uniform routing)."""
    return context["top_k"] / context["num_experts"]


def declared(name: str, outputs: Mapping[str, Output]) -> tuple[Output, str | None] | None:
    """The declaration covering variable ``name`` and, for a bootstrap bound, which bound."""
    if name in outputs:
        return outputs[name], None
    for suffix, bound in BOUND_SUFFIXES.items():
        if name.endswith(suffix) and name[: -len(suffix)] in outputs:
            return outputs[name[: -len(suffix)]], bound
    return None


def apply_outputs(result: xr.Dataset, outputs: Mapping[str, Output], *, where: str = "result",
                  context: Mapping[str, Any] | None = None) -> xr.Dataset:
    """``result`` with every data variable's attrs taken from ``outputs``.

    ``context`` fills the declarations' templates and functions (:class:`Output`).
    Raises ValueError naming the variables that ``outputs`` does not declare, so a
    new variable cannot reach a cube undocumented, or a template key the context lacks.
    """
    undeclared = [v for v in result.data_vars if declared(str(v), outputs) is None]
    if undeclared:
        raise ValueError(f"{where}: variable(s) {undeclared} not declared in its OUTPUTS table")
    result = result.copy()
    for vname in result.data_vars:
        spec, bound = declared(str(vname), outputs)
        try:
            attrs = spec.attrs(context)
        except KeyError as exc:
            raise ValueError(f"{where}: the OUTPUTS entry of '{vname}' needs {exc} in its context") from None
        if bound is not None:  # as analyses.bootstrap.add_interval words it, which also stamps ci and n_boot
            ci = result[vname].attrs.get("ci")
            level = f"{100 * float(ci):g} % CI {bound} bound" if ci is not None else f"{bound} bound of the bootstrap interval"
            attrs["long_name"] = f"{attrs['long_name']}, {level}"
            for key in ("chance", *spec.extra):  # the estimate's, not the bound's
                attrs.pop(key, None)
            attrs.pop("description", None)  # the bound's own: which percentile of how many replicates
            attrs["nan_where"] = (attrs["nan_where"] + "; or every bootstrap replicate undefined" if spec.nan_where
                                  else "every bootstrap replicate undefined (e.g. a group whose samples have no token)")
        # keep what the computation itself stamped (e.g. a per-variable 'ci' level), the table wins on clashes
        result[vname].attrs = {**result[vname].attrs, **attrs}
    return result
