"""Realistic sample requests for demos, tests and the benchmark, built with the real contracts."""

from __future__ import annotations

from datetime import date

import numpy as np
import orjson

from contracts.qnn import build_predict_body
from contracts.requests import (
    AnyRequest,
    ForecastRequest,
    GridSwitchRequest,
    SimulationRequest,
    StorageRequest,
)
from qnn_emulator.settings import DEFAULT_MODEL_ID

SAMPLE_DATE = date(2025, 1, 6)


def synthetic_load(steps: int, resolution_minutes: int = 60, seed: int = 0) -> list[float]:
    """Regional load in MW: a daily cycle peaking in the evening, a weekend dip, and noise."""
    rng = np.random.default_rng(seed)
    hours = np.arange(steps) * resolution_minutes / 60.0
    weekend = ((hours // 24) % 7 >= 5).astype(np.float64)
    load = (
        900.0
        + 250.0 * np.sin(2 * np.pi * (hours - 8.0) / 24.0)
        - 120.0 * weekend
        + rng.normal(0.0, 15.0, steps)
    )
    return [round(float(v), 2) for v in np.maximum(load, 0.0)]


def forecast_request(
    request_id: str = "sample-forecast",
    *,
    steps: int = 168,
    resolution_minutes: int = 60,
    horizon: int = 24,
    seed: int = 0,
    loads: list[float] | None = None,
    temperature_c: list[float] | None = None,
) -> ForecastRequest:
    payload: dict[str, object] = {
        "historical_loads": loads
        if loads is not None
        else synthetic_load(steps, resolution_minutes, seed),
        "resolution_minutes": resolution_minutes,
        "horizon_steps": horizon,
    }
    if temperature_c is not None:
        payload["temperature_c"] = temperature_c
    return ForecastRequest(
        request_id=request_id,
        request_type="forecast",
        region="sample",
        forecast_date=SAMPLE_DATE,
        payload=payload,
    )


def storage_request(
    request_id: str = "sample-storage", *, with_load: bool = True
) -> StorageRequest:
    """A 200 kWh battery against a day of hourly time-of-use prices."""
    prices = [0.08] * 7 + [0.22] * 3 + [0.12] * 7 + [0.30] * 4 + [0.10] * 3
    payload: dict[str, object] = {
        "capacity_kwh": 200.0,
        "max_charge_kw": 50.0,
        "max_discharge_kw": 50.0,
        "efficiency": 0.9,
        "soc_initial_kwh": 100.0,
        "soc_min_kwh": 20.0,
        "soc_max_kwh": 190.0,
        "price_schedule": prices,
        "resolution_minutes": 60,
    }
    if with_load:
        payload["load_forecast"] = [
            60.0 + 30.0 * np.sin(2 * np.pi * (h - 8) / 24) for h in range(len(prices))
        ]
    return StorageRequest(
        request_id=request_id,
        request_type="storage",
        region="sample",
        forecast_date=SAMPLE_DATE,
        payload=payload,
    )


def grid_switch_request(
    request_id: str = "sample-grid", *, peak_kw: float = 900.0
) -> GridSwitchRequest:
    """A day of hourly load covered from solar, wind, grid and gas."""
    load = [round(peak_kw * (0.6 + 0.4 * np.sin(np.pi * h / 24)), 2) for h in range(24)]
    sources = [
        {"name": "grid", "kind": "grid", "capacity_kw": 300.0, "cost_per_kwh": 0.15},
        {"name": "solar", "kind": "solar", "capacity_kw": 200.0, "cost_per_kwh": 0.02},
        {"name": "gas", "kind": "gas", "capacity_kw": 400.0, "cost_per_kwh": 0.25},
        {"name": "wind", "kind": "wind", "capacity_kw": 150.0, "cost_per_kwh": 0.03},
    ]
    return GridSwitchRequest(
        request_id=request_id,
        request_type="grid_switch",
        region="sample",
        forecast_date=SAMPLE_DATE,
        payload={"load_forecast": load, "resolution_minutes": 60, "sources": sources},
    )


def simulation_request(
    request_id: str = "sample-simulation", *, base: AnyRequest | None = None
) -> SimulationRequest:
    """Three scenarios over a base request (a storage request by default)."""
    base = base or storage_request()
    return SimulationRequest(
        request_id=request_id,
        request_type="simulation",
        region="sample",
        forecast_date=SAMPLE_DATE,
        payload={
            "base": {"request_type": base.request_type, "payload": base.payload.model_dump()},
            "scenarios": [
                {"name": "baseline"},
                {"name": "hot-and-busy", "load_scale": 1.2, "temperature_delta_c": 5.0},
                {"name": "price-shock", "price_scale": 2.0},
            ],
        },
    )


def predict_body(
    request: AnyRequest,
    *,
    model_id: str = DEFAULT_MODEL_ID,
    mode: str = "quantum",
    optimization_level: int = 1,
) -> bytes:
    """The body the worker would send for `request`."""
    return orjson.dumps(
        build_predict_body(
            request, model_id=model_id, mode=mode, optimization_level=optimization_level
        )
    )
