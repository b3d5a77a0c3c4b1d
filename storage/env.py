"""Numbers set through environment variables, checked where they are read."""

from __future__ import annotations

import os


def env_number(name: str, default, *, unit: str, minimum=0, parse=float):
    """``parse`` of environment variable ``name``, or ``default`` when it is unset or empty.

    A value that does not parse, or is below ``minimum``, raises ``ValueError`` with one line naming
    the variable, its value and what was expected (``unit``: "seconds", "bytes").
    """
    raw = os.environ.get(name, "")
    if not raw:
        return default
    try:
        value = parse(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r}: expected a number of {unit}") from None
    if value < minimum:
        raise ValueError(f"environment variable {name}={raw!r}: expected {unit} >= {minimum}")
    return value
