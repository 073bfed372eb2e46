"""``poincare`` geometry: the Poincaré ball, radial function ``tanh(r/2)`` (seed 002).

tanh has no finite derivative cycle, so derivatives use the closed form: with ``t = tanh(r/2)``,
``d/dr P(t) = P'(t) · (1 - t²) / 2``; every derivative is a polynomial in ``t``.
"""

from __future__ import annotations

import numpy as np
from numpy.polynomial import polynomial as P

from rbe_core import Geometry, hookimpl


def _tanh_half_derivative_poly(order: int) -> np.ndarray:
    """Coefficients (low to high) of the polynomial in t = tanh(r/2) equal to d^order/dr^order t."""
    poly = np.array([0.0, 1.0])
    chain = np.array([0.5, 0.0, -0.5])  # dt/dr = (1 - t²) / 2
    for _ in range(order):
        poly = P.polymul(P.polyder(poly), chain)
    return poly


class Poincare(Geometry):
    name = "poincare"
    cycle = None

    def radial(self, r, order: int = 0) -> np.ndarray:
        t = np.tanh(np.asarray(r, dtype=np.float64) / 2.0)
        if order == 0:
            return t
        return P.polyval(t, _tanh_half_derivative_poly(int(order)))


@hookimpl
def rbe_register_geometries(register):
    register(Poincare())
