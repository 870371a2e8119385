"""Array typing and the one way numbers are rounded for the wire."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]


def wire_floats(values: FloatArray, decimals: int = 6) -> list[float]:
    """Rounded plain floats, with -0.0 folded into 0.0 (it reads as a sign error downstream)."""
    rounded: list[float] = (np.round(values, decimals) + 0.0).tolist()
    return rounded
