"""Shared by the capture tests: a seeded token table and a sink that keeps every batch."""

from __future__ import annotations

import numpy as np

from capture.run import MemorySink
from storage.schema import token_table


def seeded_tokens(lengths, seed=0, *, low=3, high=100):
    """A token table of ``len(lengths)`` samples with random ids in [low, high)."""
    rng = np.random.default_rng(seed)
    sample = np.repeat(np.arange(len(lengths)), lengths)
    position = np.concatenate([np.arange(n) for n in lengths])
    return token_table(sample=sample, position=position, token_id=rng.integers(low, high, size=len(sample)))


#: Collects what capture appends; ``result()`` joins it along tokens (the library's in-memory sink).
ListSink = MemorySink
