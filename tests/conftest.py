"""Shared fixtures. The backend under test is the one named by RBE_BACKEND (nox sets it)."""

from __future__ import annotations

import os

import numpy as np
import pytest

import rbe_core


@pytest.fixture
def backend():
    """The backend the suite was asked to test, as the registry holds it now (tests that reload the
    plugins make new backend objects); never a silent substitute."""
    requested = os.environ.get("RBE_BACKEND")
    chosen = rbe_core.get_backend()
    if requested:
        assert chosen.name == requested, f"asked for backend {requested!r}, got {chosen.name!r}"
    return chosen


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
