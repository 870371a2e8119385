"""One entry point per request type: validated payload in, result fields and problem size out."""

from __future__ import annotations

from dataclasses import dataclass

from contracts.requests import (
    ForecastPayload,
    GridSwitchPayload,
    SimulationPayload,
    StoragePayload,
)
from qnn_emulator.arrays import FloatArray
from qnn_emulator.runners import run_forecast, run_grid_switch, run_storage
from qnn_emulator.simulation import simulate

AnyPayload = ForecastPayload | StoragePayload | GridSwitchPayload | SimulationPayload

# Rough microseconds per unit of problem size, to keep big solves off the event loop.
_COST_PER_UNIT_US = {"forecast": 1.0, "storage": 20.0, "grid_switch": 0.05}
INLINE_BUDGET_US = 5_000.0


@dataclass(frozen=True)
class Prediction:
    """A computed result plus what monitoring needs to know about it."""

    result: dict[str, object]
    load_residuals: FloatArray | None = None  # in-sample forecast residuals, newest last
    unserved_fraction: float = 0.0  # share of the load that capacity could not cover


def problem_size(payload: AnyPayload) -> int:
    """Values the model conditions on; feeds the circuit formulas in `execution`."""
    if isinstance(payload, ForecastPayload):
        return len(payload.historical_loads) + payload.horizon_steps
    if isinstance(payload, StoragePayload):
        return 3 * len(payload.price_schedule)  # charge, discharge and SoC per step
    if isinstance(payload, GridSwitchPayload):
        return len(payload.load_forecast) * len(payload.sources)
    return problem_size(payload.base.payload)


def circuits(payload: AnyPayload) -> int:
    """Circuit evaluations needed: one per scenario for a simulation, else one."""
    return len(payload.scenarios) if isinstance(payload, SimulationPayload) else 1


def runs_inline(payload: AnyPayload) -> bool:
    """Whether the work is small enough to do on the event loop rather than in a thread."""
    base: AnyPayload = payload
    if isinstance(payload, SimulationPayload):
        base = payload.base.payload
    if isinstance(base, ForecastPayload):
        kind = "forecast"
    elif isinstance(base, StoragePayload):
        kind = "storage"
    else:
        kind = "grid_switch"
    estimate = _COST_PER_UNIT_US[kind] * problem_size(base) * circuits(payload)
    return estimate <= INLINE_BUDGET_US


def predict(payload: AnyPayload) -> Prediction:
    """Run the model for the payload's request type."""
    if isinstance(payload, ForecastPayload):
        fc = run_forecast(payload)
        return Prediction(fc.to_result(), load_residuals=fc.residuals)
    if isinstance(payload, StoragePayload):
        return Prediction(run_storage(payload).to_result())
    if isinstance(payload, GridSwitchPayload):
        dispatch = run_grid_switch(payload)
        total = float(sum(payload.load_forecast))
        unserved = float(dispatch.unserved_kw.sum()) / total if total > 0 else 0.0
        return Prediction(dispatch.to_result(), unserved_fraction=unserved)
    return Prediction(simulate(payload))
