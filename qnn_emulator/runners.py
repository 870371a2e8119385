"""Adapters from validated contract payloads to the numeric models, with what-if knobs.

The knobs are how simulation scenarios reach the models: `load_scale` multiplies loads,
`price_scale` multiplies prices (or source costs), `temperature_delta_c` shifts the assumed
temperatures of the forecast period.
"""

from __future__ import annotations

import numpy as np

from contracts.requests import ForecastPayload, GridSwitchPayload, StoragePayload
from qnn_emulator.forecasting import LoadForecast, forecast_load
from qnn_emulator.grid_switch import Dispatch, Source, dispatch_sources
from qnn_emulator.storage import Battery, StorageSchedule, optimise_storage


def run_forecast(
    payload: ForecastPayload, *, load_scale: float = 1.0, temperature_delta_c: float = 0.0
) -> LoadForecast:
    """Forecast from the payload's history (scaled by `load_scale`)."""
    history = np.asarray(payload.historical_loads, dtype=np.float64) * load_scale
    return forecast_load(
        history,
        resolution_minutes=payload.resolution_minutes,
        horizon_steps=payload.horizon_steps,
        temperature_c=payload.temperature_c,
        temperature_delta_c=temperature_delta_c,
    )


def run_storage(
    payload: StoragePayload, *, load_scale: float = 1.0, price_scale: float = 1.0
) -> StorageSchedule:
    """Schedule the payload's battery against its (scaled) prices and load."""
    battery = Battery(
        max_charge_kw=payload.max_charge_kw,
        max_discharge_kw=payload.max_discharge_kw,
        efficiency=payload.efficiency,
        soc_initial_kwh=payload.soc_initial_kwh,
        soc_min_kwh=payload.soc_min_kwh,
        soc_max_kwh=payload.soc_max_kwh,
    )
    prices = np.asarray(payload.price_schedule, dtype=np.float64) * price_scale
    load = None
    if payload.load_forecast is not None:
        load = np.asarray(payload.load_forecast, dtype=np.float64) * load_scale
    return optimise_storage(
        battery, prices, resolution_minutes=payload.resolution_minutes, load_kw=load
    )


def run_grid_switch(
    payload: GridSwitchPayload, *, load_scale: float = 1.0, price_scale: float = 1.0
) -> Dispatch:
    """Dispatch the payload's sources against its (scaled) load at (scaled) costs."""
    sources = [Source(s.name, s.capacity_kw, s.cost_per_kwh * price_scale) for s in payload.sources]
    load = np.asarray(payload.load_forecast, dtype=np.float64) * load_scale
    return dispatch_sources(load, sources, resolution_minutes=payload.resolution_minutes)
