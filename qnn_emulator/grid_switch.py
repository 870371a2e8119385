"""Least-cost dispatch of supply sources against a load, step by step.

Each step is independent and the only constraints are per-source capacities and meeting the load,
so filling the load from the cheapest source up (merit order) is optimal; what capacity cannot
cover is reported as unserved. Ties in cost are broken by source order, for determinism.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from qnn_emulator.arrays import FloatArray, wire_floats


@dataclass(frozen=True)
class Source:
    """A dispatchable supply source."""

    name: str
    capacity_kw: float
    cost_per_kwh: float


@dataclass(frozen=True)
class Dispatch:
    """How much each source supplies per step, what is left unserved, and the cost."""

    dispatch_kw: dict[str, FloatArray]
    unserved_kw: FloatArray
    total_cost: float
    merit_order: list[str]

    def to_result(self) -> dict[str, object]:
        """The GridSwitchResult fields, as plain JSON-ready values."""
        return {
            "dispatch_kw": {k: wire_floats(v) for k, v in self.dispatch_kw.items()},
            "unserved_kw": wire_floats(self.unserved_kw),
            "total_cost": round(self.total_cost, 6),
            "merit_order": self.merit_order,
        }


def dispatch_sources(
    load_kw: Sequence[float] | FloatArray,
    sources: Sequence[Source],
    *,
    resolution_minutes: int,
) -> Dispatch:
    """Merit-order dispatch: the cheapest capacity serves the load first."""
    load = np.asarray(load_kw, dtype=np.float64)
    dt = resolution_minutes / 60.0
    order = sorted(range(len(sources)), key=lambda i: (sources[i].cost_per_kwh, i))
    remaining = load.copy()
    supplied: dict[str, FloatArray] = {}
    total = 0.0
    for i in order:
        src = sources[i]
        take = np.minimum(remaining, src.capacity_kw)
        remaining -= take
        supplied[src.name] = take
        total += float(take.sum()) * src.cost_per_kwh * dt
    # Report in the caller's source order, not merit order.
    dispatch = {s.name: supplied[s.name] for s in sources}
    unserved = np.maximum(remaining, 0.0)
    return Dispatch(dispatch, unserved, total, [sources[i].name for i in order])
