"""Exact shape checks for the importers' fast paths over JSON integer arrays.

The fast paths read a nested integer array's numbers straight from the line's
text (``_core.fast_ints``) and reshape them. Counting brackets and numbers is
not enough: a ragged array (``[[1, 2, 3], [4]]``) can have the counts of a
regular one (``[[1, 2], [3, 4]]``) and would be reshaped into different
routing. :func:`regular_shape` compares the array's whole punctuation skeleton
with the one a regular array of that shape has, so a fast path accepts a line
only when ``json.loads`` would give exactly that array; anything else goes to
the strict parser, whose errors name the line and field.
"""

from __future__ import annotations

# What remains of a JSON integer array's text once the numbers and whitespace
# are removed: brackets and commas only. '+', '.', 'e' are kept, so a float or
# a '+1' (not JSON) never matches a skeleton.
_NUMBERS_AND_SPACE = str.maketrans("", "", "0123456789- \t\r\n")


def skeleton(shape: tuple[int, ...]) -> str:
    """The brackets and commas of a regular JSON array of ``shape`` (all dims >= 1)."""
    inner = "[" + "," * (shape[-1] - 1) + "]"
    for n in reversed(shape[:-1]):
        inner = "[" + ",".join([inner] * n) + "]"
    return inner


def regular_shape(text: str, n_numbers: int, leading: tuple[int, ...], ndim: int) -> tuple[int, ...] | None:
    """The shape of the regular ``ndim``-d array ``text`` whose leading dims are ``leading``, or None.

    Parameters
    ----------
    text : the array's JSON text (``_core.slice_int_array``).
    n_numbers : how many integers ``fast_ints`` read from it.
    leading : the sizes already known of the first dims (e.g. ``(n,)`` tokens);
        the remaining dims are inferred from bracket and number counts.
    ndim : number of dims (1..3).

    Returns
    -------
    The full shape when ``text`` is exactly a regular array of it (every
    sub-array of a level has the same length, no empty elements, nothing but
    integers), else None: the caller then falls back to the strict parser.
    """
    if n_numbers < 1 or any(d < 1 for d in leading):
        return None
    shape = list(leading)
    if ndim - len(shape) == 2 and len(shape) == 1:
        n = shape[0]
        opens = text.count("[")
        # [n][k][L]: 1 + n + n*k opening brackets
        if (opens - 1 - n) <= 0 or (opens - 1 - n) % n:
            return None
        shape.append((opens - 1 - n) // n)
    if ndim - len(shape) != 1:
        return None
    rows = 1
    for d in shape:
        rows *= d
    if n_numbers % rows:
        return None
    shape.append(n_numbers // rows)
    shape = tuple(shape)
    return shape if text.translate(_NUMBERS_AND_SPACE) == skeleton(shape) else None
