"""``klein`` geometry: the Klein disk, radial function ``2r / (1 + r²)`` (seed 002).

No finite derivative cycle exists; derivatives use the closed form from
``2r/(1+r²) = 1/(r+i) + 1/(r-i)``: the n-th derivative is ``2 (-1)^n n! Re[(r+i)^(-n-1)]``.
"""

from __future__ import annotations

import math

import numpy as np

from rbe_core import Geometry, hookimpl


class Klein(Geometry):
    name = "klein"
    cycle = None

    def radial(self, r, order: int = 0) -> np.ndarray:
        r = np.asarray(r, dtype=np.float64)
        n = int(order)
        if n == 0:
            return 2.0 * r / (1.0 + r * r)
        return 2.0 * (-1) ** n * math.factorial(n) * np.real((r + 1j) ** (-n - 1))


@hookimpl
def rbe_register_geometries(register):
    register(Klein())
