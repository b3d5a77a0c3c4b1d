"""Reading text traces as real tools write them: JSONL lines and table cells with their quirks.

Files written by loggers and research scripts carry a UTF-8 byte-order mark,
CRLF line ends, trailing whitespace, blank lines, a last line cut off when the
writer was killed, extra fields, integers written as floats (``3.0``) or
strings (``"3"``), and lists written as ``[1, 5]``, ``1 5`` or ``1;5`` in CSV
cells. These helpers accept all of that and refuse anything else with one line
naming the file and the line (or record) and the field.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ._core import TraceError, fail
from ._jsonstream import JsonStream

PHASE_NAMES = {
    "prefill": "prefill", "prompt": "prefill", "context": "prefill", "prompt_processing": "prefill",
    "decode": "decode", "generate": "decode", "generation": "decode", "gen": "decode", "decoding": "decode",
}


def phase_name(value, where: str, field_name: str = "phase") -> str:
    """A source's phase label -> "prefill" / "decode"; "" for an empty/None value."""
    if value is None:
        return ""
    text = str(value).strip().lower()
    if text == "":
        return ""
    try:
        return PHASE_NAMES[text]
    except KeyError:
        raise fail(where, field_name, f"{value!r} is not a phase (expected prefill/prompt or decode/generate)") from None


def ends_with_line_break(path: Path) -> bool:
    """Whether the file's last byte ends a line (an empty file counts as ending one): else it was cut off."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if not size:
            return True
        f.seek(size - 1)
        return f.read(1) in (b"\n", b"\r")


def iter_jsonl(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, decoded value) of each non-blank line of a JSON-lines file.

    A BOM, CRLF and surrounding whitespace are accepted. A line that does not
    decode is refused by number; when it is the file's last line and the file
    does not end with a newline, the message says the file was cut off there.
    """
    ends_with_newline = ends_with_line_break(path)
    with open(path, "r", encoding="utf-8-sig", newline=None) as f:
        pending: tuple[int, str, json.JSONDecodeError] | None = None
        for i, line in enumerate(f, start=1):
            if pending is not None:  # a bad line followed by more lines: not a truncation
                n, _, exc = pending
                raise TraceError(f"{path}: line {n}: not valid JSON ({exc.msg} at column {exc.colno})")
            text = line.strip()
            if not text:
                continue
            try:
                yield i, json.loads(text)
            except json.JSONDecodeError as exc:
                pending = (i, text, exc)
            except UnicodeDecodeError as exc:  # pragma: no cover - raised by the file iterator instead
                raise TraceError(f"{path}: line {i}: not UTF-8 text ({exc.reason})") from None
        if pending is not None:
            n, _, exc = pending
            if not ends_with_newline:
                raise TraceError(f"{path}: line {n}: truncated last line (the file ends inside a record: {exc.msg}); "
                                 "the writer was interrupted - remove the line to import the rest")
            raise TraceError(f"{path}: line {n}: not valid JSON ({exc.msg} at column {exc.colno})")


_INT_TEXT = re.compile(r"^[+-]?\d+(\.0*)?$")


def to_int(value, where: str, field_name: str) -> int:
    """An integer written as int, integral float, or string ("3", "3.0"); anything else refused."""
    if isinstance(value, bool) or value is None:
        raise fail(where, field_name, f"expected an integer, got {value!r}")
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        if math.isfinite(value) and float(value).is_integer():
            return int(value)
        raise fail(where, field_name, f"expected an integer, got {value!r}")
    if isinstance(value, str) and _INT_TEXT.match(value.strip()):
        return int(float(value.strip())) if "." in value else int(value.strip())
    raise fail(where, field_name, f"expected an integer, got {value!r}")


_SPLIT = re.compile(r"[\s,;]+")


def _cell_items(value: str, where: str, field_name: str) -> list[str]:
    text = value.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    elif text.startswith("(") and text.endswith(")"):
        text = text[1:-1]
    text = text.strip()
    if not text:
        return []
    return [t.strip().strip("'\"") for t in _SPLIT.split(text) if t.strip()]


def _list_items(value, where: str, field_name: str, what: str) -> list:
    """The items of a list value: a JSON/Parquet list or a text cell "[1, 5]" / "1 5" / "1;5" / "1,5"."""
    if isinstance(value, str):
        return _cell_items(value, where, field_name)
    if isinstance(value, (list, tuple, np.ndarray)):
        return list(value)
    raise fail(where, field_name, f"expected a list of {what}, got {value!r}")


def int_list(value, where: str, field_name: str) -> list[int]:
    """A list of integers: a JSON/Parquet list (ints, integral floats, digit strings) or a text cell
    "[1, 5]" / "1 5" / "1;5" / "1,5"."""
    return [to_int(x, where, field_name) for x in _list_items(value, where, field_name, "expert ids")]


def float_list(value, where: str, field_name: str) -> list[float]:
    """A list of finite floats, as :func:`int_list` accepts lists."""
    items = _list_items(value, where, field_name, "numbers")
    out = []
    for x in items:
        if isinstance(x, bool) or x is None:
            raise fail(where, field_name, f"expected numbers, got {x!r}")
        try:
            v = float(x)
        except (TypeError, ValueError):
            raise fail(where, field_name, f"expected numbers, got {x!r}") from None
        if not math.isfinite(v):
            raise fail(where, field_name, f"non-finite value {x!r}")
        out.append(v)
    return out


class BomJsonStream(JsonStream):
    """:class:`JsonStream` that steps over a UTF-8 byte-order mark at the start of the file."""

    def __init__(self, path: str | Path, chunk: int = 1 << 20):
        super().__init__(path, chunk)
        self._fill()
        if self.buf.startswith("\ufeff"):
            self.pos = 1
