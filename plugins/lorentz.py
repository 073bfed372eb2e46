"""``lorentz`` geometry: the hyperboloid model, radial function ``sinh r`` (seed 002).

Derivatives follow the exact Z/2 cycle sinh -> cosh -> sinh.
"""

from __future__ import annotations

import numpy as np

from rbe_core import Geometry, hookimpl

_CYCLE = (np.sinh, np.cosh)


class Lorentz(Geometry):
    name = "lorentz"
    cycle = 2

    def radial(self, r, order: int = 0) -> np.ndarray:
        return _CYCLE[int(order) % 2](np.asarray(r, dtype=np.float64))

    def time_component(self, r) -> np.ndarray:
        """The hyperboloid's time coordinate ``cosh r`` (= d/dr sinh r, one step along the cycle)."""
        return self.radial(r, 1)


@hookimpl
def rbe_register_geometries(register):
    register(Lorentz())
