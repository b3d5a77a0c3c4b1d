"""Hypothesis strategies shared by the tests (import: ``from strategies import SEEDS``).

Keep strategies small: every test's Hypothesis examples run on a 2-core CI machine.
"""

from __future__ import annotations

from hypothesis import strategies as st

SEEDS = st.integers(0, 10_000)
"""Seeds of ``np.random.default_rng`` / ``mock_cube`` (a seeded cube, a permutation, a sample order)."""

HOLE_FRACTIONS = st.sampled_from([0.0, 0.3])
"""Share of (layer, token) cells ``cube_helpers.punch_holes`` marks unwritten: none, or many."""

WORDS = st.sampled_from(["def", "f(x)", "return", "x+1", "café", "日本", "a,b", "#", "==", "print('hi')"])
"""Words of a code-like text, with non-ASCII and punctuation (tokenizer / alignment properties)."""

SPACES = st.sampled_from([" ", "  ", "\n", "\t", "\n    ", ""])
"""Whitespace between words, including none."""
