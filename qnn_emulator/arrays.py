"""Array typing, read-only cached arrays, and the one way numbers are rounded for the wire."""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]
Array = TypeVar("Array", bound=NDArray[Any])


def frozen(array: Array) -> Array:
    """The array made read-only: cached arrays are shared, and a write would corrupt them all."""
    array.setflags(write=False)
    return array


def wire_floats(values: FloatArray, decimals: int = 6) -> list[float]:
    """Rounded plain floats, with -0.0 folded into 0.0 (it reads as a sign error downstream)."""
    rounded = np.asarray(values).round(decimals)
    rounded += 0.0  # in place: -0.0 + 0.0 is 0.0, every other value is unchanged
    as_list: list[float] = rounded.tolist()
    return as_list
