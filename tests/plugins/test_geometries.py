"""Geometry plugins: registration, derivative cycles, derivatives against finite differences."""

from __future__ import annotations

import numpy as np
import pytest

import rbe_core
from rbe_core import Geometry

NAMES = ("poincare", "lorentz", "klein")


@pytest.fixture(params=NAMES)
def geometry(request):
    entry = rbe_core.registry().lookup("geometries", request.param)
    assert entry is not None, f"geometry {request.param} not registered"
    return entry.obj


def test_registered_through_entry_points(geometry):
    assert isinstance(geometry, Geometry)
    assert rbe_core.registry().lookup("geometries", geometry.name).dist == "rbe"


def test_radial_functions():
    r = np.linspace(0, 3, 7)
    get = lambda n: rbe_core.registry().lookup("geometries", n).obj  # noqa: E731
    np.testing.assert_allclose(get("poincare").radial(r), np.tanh(r / 2))
    np.testing.assert_allclose(get("lorentz").radial(r), np.sinh(r))
    np.testing.assert_allclose(get("klein").radial(r), 2 * r / (1 + r * r))


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_radial_derivatives_match_finite_differences(geometry, order):
    r = np.linspace(-2.5, 2.5, 41)
    h = 1e-5
    numeric = (geometry.radial(r + h, order - 1) - geometry.radial(r - h, order - 1)) / (2 * h)
    np.testing.assert_allclose(geometry.radial(r, order), numeric, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("order", [1, 2, 3, 4, 5])
def test_angular_derivatives_match_finite_differences(order):
    theta = np.linspace(-4, 4, 33)
    h = 1e-5
    numeric = (Geometry.angular(theta + h, order - 1) - Geometry.angular(theta - h, order - 1)) / (2 * h)
    np.testing.assert_allclose(Geometry.angular(theta, order), numeric, rtol=1e-6, atol=1e-8)


def test_real_cycles_only():
    theta, r = np.linspace(-3, 3, 13), np.linspace(-2, 2, 9)
    for n in range(4):
        np.testing.assert_array_equal(Geometry.angular(theta, n + 4), Geometry.angular(theta, n))
    lorentz = rbe_core.registry().lookup("geometries", "lorentz").obj
    assert lorentz.cycle == 2
    np.testing.assert_array_equal(lorentz.radial(r, 2), lorentz.radial(r, 0))
    np.testing.assert_array_equal(lorentz.radial(r, 1), np.cosh(r))
    for name in ("poincare", "klein"):
        g = rbe_core.registry().lookup("geometries", name).obj
        assert g.cycle is None
        assert not np.allclose(g.radial(r, 4), g.radial(r, 0))
    # tanh's closed form: d/dr tanh(r/2) = (1 - tanh²(r/2)) / 2
    p = rbe_core.registry().lookup("geometries", "poincare").obj
    np.testing.assert_allclose(p.radial(r, 1), (1 - np.tanh(r / 2) ** 2) / 2)


def test_basis_is_polar(geometry):
    r, theta = np.array([0.3, 1.2]), np.array([0.1, 2.0])
    c, s = geometry.basis(r, theta)
    f = geometry.radial(r)
    np.testing.assert_allclose(c, f * np.cos(theta))
    np.testing.assert_allclose(s, f * np.sin(theta))
