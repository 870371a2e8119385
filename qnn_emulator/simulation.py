"""What-if sweeps: the base request re-run under each scenario, with a few headline numbers."""

from __future__ import annotations

import numpy as np

from contracts.requests import (
    BaseForecast,
    BaseGridSwitch,
    BaseStorage,
    Scenario,
    SimulationPayload,
)
from qnn_emulator.runners import run_forecast, run_grid_switch, run_storage

Outcome = tuple[dict[str, object], dict[str, float]]  # (result fields, summary numbers)


def _forecast_outcome(base: BaseForecast, sc: Scenario) -> Outcome:
    fc = run_forecast(
        base.payload, load_scale=sc.load_scale, temperature_delta_c=sc.temperature_delta_c
    )
    hours = fc.resolution_minutes / 60.0
    summary = {
        "peak_mw": float(fc.forecast.max()),
        "mean_mw": float(fc.forecast.mean()),
        "energy_mwh": float(fc.forecast.sum() * hours),
        "mean_interval_width_mw": float(np.mean(fc.upper - fc.lower)),
    }
    return fc.to_result(), summary


def _storage_outcome(base: BaseStorage, sc: Scenario) -> Outcome:
    schedule = run_storage(base.payload, load_scale=sc.load_scale, price_scale=sc.price_scale)
    hours = base.payload.resolution_minutes / 60.0
    summary = {
        "baseline_cost": schedule.baseline_cost,
        "optimized_cost": schedule.optimized_cost,
        "savings": schedule.savings,
        "throughput_kwh": float((schedule.charge_kw + schedule.discharge_kw).sum() * hours),
    }
    return schedule.to_result(), summary


def _grid_outcome(base: BaseGridSwitch, sc: Scenario) -> Outcome:
    dispatch = run_grid_switch(base.payload, load_scale=sc.load_scale, price_scale=sc.price_scale)
    hours = base.payload.resolution_minutes / 60.0
    served_kwh = float(sum(v.sum() for v in dispatch.dispatch_kw.values()) * hours)
    summary = {
        "total_cost": dispatch.total_cost,
        "served_kwh": served_kwh,
        "unserved_kwh": float(dispatch.unserved_kw.sum() * hours),
        "mean_cost_per_kwh": dispatch.total_cost / served_kwh if served_kwh > 0 else 0.0,
    }
    return dispatch.to_result(), summary


def _knobs(base: BaseForecast | BaseStorage | BaseGridSwitch, sc: Scenario) -> tuple[str, str]:
    """The scenario knobs the base model reads (exact, as hex: -0.0 and 0.0 stay apart)."""
    if isinstance(base, BaseForecast):
        return sc.load_scale.hex(), sc.temperature_delta_c.hex()
    return sc.load_scale.hex(), sc.price_scale.hex()


def simulate(payload: SimulationPayload) -> dict[str, object]:
    """The SimulationResult fields: one outcome per scenario, in the order given.

    Scenarios that differ only in knobs their base model ignores (price for a forecast) or only
    in name get the same outcome; it is computed once per request.
    """
    outcomes = []
    base = payload.base
    computed: dict[tuple[str, str], Outcome] = {}
    for sc in payload.scenarios:
        knobs = _knobs(base, sc)
        outcome = computed.get(knobs)
        if outcome is None:
            if isinstance(base, BaseForecast):
                outcome = _forecast_outcome(base, sc)
            elif isinstance(base, BaseStorage):
                outcome = _storage_outcome(base, sc)
            else:
                outcome = _grid_outcome(base, sc)
            computed[knobs] = outcome
        result, summary = outcome
        rounded = {k: round(v, 6) + 0.0 for k, v in summary.items()}
        outcomes.append({"name": sc.name, "result": result, "summary": rounded})
    return {"base_type": base.request_type, "scenarios": outcomes}
