"""Writing experiment TOML from Python values (the standard library reads TOML, it does not write it).

:func:`dumps` writes what :func:`tomllib.loads` reads back: scalars, lists, sub-tables and
arrays of tables. Used by ``moe-atlas new`` (every option, commented), the tiny demo
(``experiments/tiny.py``) and the benchmarks that turn the demo into a user's experiment.
"""

from __future__ import annotations

import json
import re

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def toml_key(k) -> str:
    """A key as TOML writes it: bare when it may be, else quoted."""
    k = str(k)
    return k if _BARE_KEY.fullmatch(k) else toml_value(k)


def toml_value(v) -> str:
    """One TOML value: bool, int, float, str, list/tuple, dict (as an inline table)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        # JSON's escapes are TOML's; TOML wants DEL escaped too (and no surrogate pairs: ensure_ascii=False)
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise ValueError(f"cannot write {type(v).__name__} {v!r} as a TOML value")


def _is_tables(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def to_toml(table: dict, prefix: str = "") -> list[str]:
    """Lines of TOML for ``table``: its plain keys first (TOML puts every key after a header into that
    table), then each sub-table as ``[name]`` and each list of tables as ``[[name]]``."""
    lines = [f"{toml_key(k)} = {toml_value(v)}" for k, v in table.items()
             if not isinstance(v, dict) and not _is_tables(v)]
    for k, v in table.items():
        name = prefix + toml_key(k)
        if isinstance(v, dict):
            lines += [f"[{name}]"] + to_toml(v, f"{name}.")
        elif _is_tables(v):
            for item in v:
                lines += [f"[[{name}]]"] + to_toml(item, f"{name}.")
    return lines


def dumps(table: dict) -> str:
    """``table`` as the text of a TOML file."""
    return "\n".join(to_toml(table)) + "\n"
