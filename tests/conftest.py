"""Shared fixtures. The backend under test is the one named by RBE_BACKEND (nox sets it)."""

from __future__ import annotations

import os

import numpy as np
import pytest

import rbe_core


@pytest.fixture(scope="session")
def backend():
    """The backend the suite was asked to test; never a silent substitute."""
    requested = os.environ.get("RBE_BACKEND")
    chosen = rbe_core.get_backend()
    if requested:
        assert chosen.name == requested, f"asked for backend {requested!r}, got {chosen.name!r}"
    return chosen


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
