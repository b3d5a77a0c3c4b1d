"""Shared by the capture tests: a seeded token table and a sink that keeps every batch."""

from __future__ import annotations

import numpy as np

from storage.schema import token_table


def seeded_tokens(lengths, seed=0):
    """A token table of ``len(lengths)`` samples with random ids in [3, 100)."""
    rng = np.random.default_rng(seed)
    sample = np.repeat(np.arange(len(lengths)), lengths)
    position = np.concatenate([np.arange(n) for n in lengths])
    return token_table(sample=sample, position=position, token_id=rng.integers(3, 100, size=len(sample)))


class ListSink:
    """Collects what capture appends; ``result()`` joins it along tokens."""

    def __init__(self):
        self.parts = []

    def append(self, **arrays):
        self.parts.append(arrays)

    def result(self):
        return {k: np.concatenate([p[k] for p in self.parts], axis=0 if k == "nll" else 1) for k in self.parts[0]}
