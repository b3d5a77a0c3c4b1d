"""Decode one large JSON document value by value, without loading the whole file.

LibMoE analyst logs, SGLang response lists and segment-routing reports are
single JSON documents whose bulk is one array. :class:`JsonStream` walks the
document's structure and decodes the array's elements one at a time with
``json.JSONDecoder.raw_decode``, reading the file in growing chunks, so memory
is bounded by the largest element rather than by the file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from ._core import TraceError

_WS = " \t\n\r"


class JsonStream:
    """Sequential reader of one JSON document in ``path``.

    Offsets in error messages are character offsets into the file.
    """

    def __init__(self, path: str | Path, chunk: int = 1 << 20):
        self.path = Path(path)
        self.f = open(self.path, "r", encoding="utf-8")
        self.chunk = chunk
        self.buf = ""
        self.pos = 0
        self.base = 0  # file offset of buf[0]
        self.eof = False
        self._dec = json.JSONDecoder()

    def close(self) -> None:
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # -- buffer
    def _fill(self, at_least: int = 0) -> None:
        if self.pos:
            self.base += self.pos
            self.buf = self.buf[self.pos:]
            self.pos = 0
        want = max(self.chunk, at_least)
        try:
            data = self.f.read(want)
        except UnicodeDecodeError as exc:
            raise TraceError(f"{self.path}: not UTF-8 text near character {self.base + len(self.buf)} ({exc.reason})") from None
        if not data:
            self.eof = True
        self.buf += data

    def offset(self) -> int:
        return self.base + self.pos

    def _skip_ws(self) -> None:
        while True:
            n = len(self.buf)
            while self.pos < n and self.buf[self.pos] in _WS:
                self.pos += 1
            if self.pos < n or self.eof:
                return
            self._fill()

    def peek(self) -> str:
        self._skip_ws()
        return self.buf[self.pos] if self.pos < len(self.buf) else ""

    def expect(self, ch: str, what: str) -> None:
        c = self.peek()
        if c != ch:
            found = repr(c) if c else "end of file (truncated?)"
            raise TraceError(f"{self.path}: {what}: expected {ch!r} at character {self.offset()}, found {found}")
        self.pos += 1

    # -- values
    def value(self, what: str = "value"):
        """Decode the next JSON value."""
        self._skip_ws()
        while True:
            try:
                obj, end = self._dec.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as exc:
                incomplete = exc.msg.startswith("Unterminated string") or exc.pos >= len(self.buf) - 8
                if incomplete and not self.eof:
                    self._fill(at_least=len(self.buf))  # doubling: a huge value costs O(size), not O(size^2)
                    continue
                cause = "file ends inside it (truncated)" if (incomplete and self.eof) else exc.msg
                raise TraceError(f"{self.path}: {what} at character {self.base + self.pos}: {cause}") from None
            if end == len(self.buf) and not self.eof:
                self._fill(at_least=len(self.buf))  # a number may go on in the next chunk
                continue
            self.pos = end
            return obj

    def items(self, what: str = "document") -> Iterator[str]:
        """Keys of the object that starts here; the caller consumes each key's value before the next."""
        self.expect("{", what)
        if self.peek() == "}":
            self.pos += 1
            return
        while True:
            key = self.value(f"{what} key")
            if not isinstance(key, str):
                raise TraceError(f"{self.path}: {what}: expected a string key at character {self.offset()}")
            self.expect(":", f"{what} after key {key!r}")
            yield key
            if not self._another("}", what, f"after key {key!r}"):
                return

    def array(self, what: str = "array") -> Iterator[tuple[int, object]]:
        """(index, element) for the array that starts here, decoded one element at a time."""
        self.expect("[", what)
        if self.peek() == "]":
            self.pos += 1
            return
        i = 0
        while True:
            yield i, self.value(f"{what} element {i}")
            if not self._another("]", what, f"after element {i}"):
                return
            i += 1

    def _another(self, close: str, what: str, after: str) -> bool:
        """After a member of an object or array: True at ',' (another member follows), False at ``close``
        (the end); both consumed. Anything else is refused with its position."""
        c = self.peek()
        if c in (",", close):
            self.pos += 1
            return c == ","
        found = repr(c) if c else "end of file (truncated?)"
        raise TraceError(f"{self.path}: {what}: expected ',' or '{close}' at character {self.offset()} {after}, "
                         f"found {found}")

    def end(self) -> None:
        """Check that nothing but whitespace follows the document."""
        c = self.peek()
        if c:
            raise TraceError(f"{self.path}: unexpected data after the JSON document at character {self.offset()}")
