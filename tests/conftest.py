"""Shared fixtures: a small seeded cube with holes, and its lazy copy (helpers in cube_helpers.py)."""

from __future__ import annotations

import pytest

from cube_helpers import lazy, punch_holes, small_cube


@pytest.fixture(scope="session")
def cube():
    return punch_holes(small_cube())


@pytest.fixture(scope="session")
def lazy_cube(cube):
    return lazy(cube)
