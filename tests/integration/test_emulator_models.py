"""Unit tests for the emulator's numeric models: forecast, storage LP, dispatch, simulation."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from pmdarima.datasets import load_taylor

from contracts.requests import SimulationPayload
from contracts.results import ForecastResult, GridSwitchResult, SimulationResult, StorageResult
from qnn_emulator.execution import circuit_shape, cost_usd, execution_report
from qnn_emulator.forecasting import forecast_load
from qnn_emulator.grid_switch import Source, dispatch_sources
from qnn_emulator.samples import (
    forecast_request,
    grid_switch_request,
    simulation_request,
    storage_request,
    synthetic_load,
)
from qnn_emulator.simulation import simulate
from qnn_emulator.storage import Battery, optimise_storage

HALF_HOURS_PER_DAY = 48
WEEK = 7 * HALF_HOURS_PER_DAY


# --- forecast -------------------------------------------------------------------------------


@pytest.mark.parametrize("history_weeks", [2, 3, 4])
def test_forecast_beats_seasonal_naive_on_taylor(history_weeks: int) -> None:
    """Day-ahead MAE on England & Wales demand beats same-time-yesterday, with sane coverage."""
    y = np.asarray(load_taylor(), dtype=np.float64)
    origins = [4 * WEEK + 2 * HALF_HOURS_PER_DAY * k for k in range(21)]
    assert origins[-1] + HALF_HOURS_PER_DAY <= len(y)
    model_ae, naive_ae, weekly_ae, covered, model_ape, naive_ape = [], [], [], [], [], []
    for o in origins:
        actual = y[o : o + HALF_HOURS_PER_DAY]
        fc = forecast_load(
            y[o - history_weeks * WEEK : o], resolution_minutes=30, horizon_steps=HALF_HOURS_PER_DAY
        )
        naive = y[o - HALF_HOURS_PER_DAY : o]
        model_ae.append(np.abs(fc.forecast - actual))
        naive_ae.append(np.abs(naive - actual))
        weekly_ae.append(np.abs(y[o - WEEK : o - WEEK + HALF_HOURS_PER_DAY] - actual))
        model_ape.append(np.abs(fc.forecast - actual) / actual)
        naive_ape.append(np.abs(naive - actual) / actual)
        covered.append((fc.lower <= actual) & (actual <= fc.upper))
    mae, naive_mae = float(np.mean(model_ae)), float(np.mean(naive_ae))
    coverage = float(np.mean(covered))
    print(
        f"\ntaylor, {history_weeks} weeks history, {len(origins)} origins, horizon 48: "
        f"model MAE {mae:.0f} MW (MAPE {100 * np.mean(model_ape):.2f}%), "
        f"seasonal-naive MAE {naive_mae:.0f} MW (MAPE {100 * np.mean(naive_ape):.2f}%), "
        f"weekly-naive MAE {np.mean(weekly_ae):.0f} MW, 90% interval coverage {coverage:.3f}"
    )
    assert mae < naive_mae
    assert mae < float(np.mean(weekly_ae))
    assert 0.7 <= coverage <= 1.0


def test_forecast_shape_and_bounds() -> None:
    """Lengths match the horizon, bounds are ordered and non-negative, intervals widen."""
    history = synthetic_load(14 * 24)
    fc = forecast_load(history, resolution_minutes=60, horizon_steps=48)
    for arr in (fc.forecast, fc.lower, fc.upper):
        assert arr.shape == (48,)
        assert np.all(np.isfinite(arr))
        assert np.all(arr >= 0)
    assert np.all(fc.lower <= fc.forecast)
    assert np.all(fc.forecast <= fc.upper)
    width = fc.upper - fc.lower
    assert width[-1] >= width[0]
    result = ForecastResult.model_validate(fc.to_result())
    assert result.interval_level == 0.9
    assert result.resolution_minutes == 60


def test_forecast_follows_daily_cycle() -> None:
    """On a clean daily sine the forecast reproduces the next day closely."""
    t = np.arange(10 * 96)
    signal = 500 + 100 * np.sin(2 * np.pi * t / 96)
    fc = forecast_load(signal, resolution_minutes=15, horizon_steps=96)
    future = 500 + 100 * np.sin(2 * np.pi * np.arange(len(t), len(t) + 96) / 96)
    assert np.max(np.abs(fc.forecast - future)) < 1.0


@pytest.mark.parametrize(
    ("history", "resolution"),
    [([0.0] * 24, 60), ([42.0] * 200, 30), (synthetic_load(24, 15), 15), ([5.0, 0.0] * 12, 60)],
)
def test_forecast_degenerate_histories(history: list[float], resolution: int) -> None:
    """Short, constant, all-zero or alternating histories still give finite ordered output."""
    fc = forecast_load(history, resolution_minutes=resolution, horizon_steps=30)
    assert np.all(np.isfinite(fc.forecast)) and np.all(np.isfinite(fc.upper))
    assert np.all((fc.lower >= 0) & (fc.lower <= fc.forecast) & (fc.forecast <= fc.upper))


def test_forecast_uses_temperature() -> None:
    """With cooling-driven load, a warmer forecast period raises the forecast."""
    rng = np.random.default_rng(1)
    steps = 21 * 24
    hours = np.arange(steps)
    temps = 24 + 6 * np.sin(2 * np.pi * (hours - 9) / 24) + rng.normal(0, 3, steps).cumsum() * 0.1
    load = 800 + 80 * np.maximum(temps - 22, 0) + 50 * np.sin(2 * np.pi * hours / 24)
    base = forecast_load(load, resolution_minutes=60, horizon_steps=24, temperature_c=temps)
    hot = forecast_load(
        load, resolution_minutes=60, horizon_steps=24, temperature_c=temps, temperature_delta_c=5.0
    )
    assert float(np.mean(hot.forecast - base.forecast)) > 100.0


def test_forecast_is_fast_on_the_largest_payload() -> None:
    """Eight weeks of 15-minute history, two-week horizon: well under the request budget."""
    history = synthetic_load(8 * 7 * 96, resolution_minutes=15)
    forecast_load(history, resolution_minutes=15, horizon_steps=2016)  # warm the basis cache
    started = time.perf_counter()
    fc = forecast_load(history, resolution_minutes=15, horizon_steps=2016)
    assert time.perf_counter() - started < 0.1
    assert fc.forecast.shape == (2016,)


# --- storage --------------------------------------------------------------------------------


def _check_schedule(
    battery: Battery, prices: np.ndarray, res: int, load: np.ndarray | None = None
) -> float:
    sched = optimise_storage(battery, prices, resolution_minutes=res, load_kw=load)
    dt = res / 60
    eta = math.sqrt(battery.efficiency)
    tol = 1e-5
    assert np.all(sched.charge_kw >= 0) and np.all(sched.charge_kw <= battery.max_charge_kw + tol)
    assert np.all(sched.discharge_kw >= 0)
    assert np.all(sched.discharge_kw <= battery.max_discharge_kw + tol)
    assert np.all(sched.soc_kwh >= battery.soc_min_kwh - tol)
    assert np.all(sched.soc_kwh <= battery.soc_max_kwh + tol)
    previous = np.concatenate([[battery.soc_initial_kwh], sched.soc_kwh[:-1]])
    expected = previous + eta * sched.charge_kw * dt - sched.discharge_kw * dt / eta
    np.testing.assert_allclose(sched.soc_kwh, expected, atol=1e-4)
    assert sched.soc_kwh[-1] >= battery.soc_initial_kwh - tol
    if load is not None:
        assert np.all(sched.discharge_kw - sched.charge_kw <= load + tol)
        assert sched.baseline_cost == pytest.approx(float(prices @ load) * dt)
    grid = (0 if load is None else load) + sched.charge_kw - sched.discharge_kw
    assert sched.optimized_cost == pytest.approx(float(prices @ grid) * dt, abs=1e-6)
    assert sched.savings >= 0
    StorageResult.model_validate(sched.to_result())
    return sched.savings


BATTERY = Battery(
    max_charge_kw=50,
    max_discharge_kw=40,
    efficiency=0.9,
    soc_initial_kwh=60,
    soc_min_kwh=10,
    soc_max_kwh=180,
)


def test_storage_earns_on_a_price_spread() -> None:
    """Cheap nights and dear evenings: the LP finds real savings within every limit."""
    prices = np.array([0.05] * 8 + [0.2] * 8 + [0.35] * 4 + [0.1] * 4)
    assert _check_schedule(BATTERY, prices, 60) > 1.0
    load = np.full(24, 30.0)
    assert _check_schedule(BATTERY, prices, 60, load) > 1.0


@pytest.mark.parametrize("price", [0.0, 0.17])
def test_storage_flat_prices_save_nothing(price: float) -> None:
    """With no spread, cycling only loses energy, so the schedule saves ~0 and stays idle."""
    prices = np.full(48, price)
    assert _check_schedule(BATTERY, prices, 30) == pytest.approx(0.0, abs=1e-6)
    assert _check_schedule(BATTERY, prices, 30, np.full(48, 25.0)) == pytest.approx(0, abs=1e-6)


def test_storage_random_cases_respect_every_constraint() -> None:
    """Random batteries, prices (some negative) and loads never break a limit or lose money."""
    rng = np.random.default_rng(7)
    for _ in range(20):
        cap = rng.uniform(10, 500)
        lo, hi = sorted(rng.uniform(0, cap, 2))
        battery = Battery(
            rng.uniform(1, 100),
            rng.uniform(1, 100),
            rng.uniform(0.5, 1.0),
            rng.uniform(lo, hi),
            lo,
            hi,
        )
        steps = int(rng.integers(1, 97))
        prices = rng.normal(0.15, 0.1, steps)
        load = rng.uniform(0, 80, steps) if rng.random() < 0.5 else None
        _check_schedule(battery, prices, int(rng.choice([15, 30, 60])), load)


def test_storage_largest_problem_solves_quickly() -> None:
    """2016 steps (two weeks at 10-minute-ish granularity) solve in well under a second."""
    prices = 0.15 + 0.1 * np.sin(np.arange(2016) * 2 * np.pi / 96)
    started = time.perf_counter()
    assert _check_schedule(BATTERY, prices, 15) > 0
    assert time.perf_counter() - started < 2.0


# --- grid switch ----------------------------------------------------------------------------


SOURCES = [
    Source("gas", 400, 0.25),
    Source("solar", 200, 0.02),
    Source("grid", 300, 0.15),
    Source("wind", 150, 0.03),
]


def test_dispatch_merit_order_and_balance() -> None:
    """Capacities hold, supply plus unserved equals load, cheaper sources fill first."""
    load = np.array([0, 100, 300, 600, 1000, 1200], dtype=float)
    result = dispatch_sources(load, SOURCES, resolution_minutes=30)
    supplied = sum(result.dispatch_kw.values())
    np.testing.assert_allclose(supplied + result.unserved_kw, load)
    for src in SOURCES:
        assert np.all(result.dispatch_kw[src.name] <= src.capacity_kw + 1e-9)
        assert np.all(result.dispatch_kw[src.name] >= 0)
    by_cost = sorted(SOURCES, key=lambda s: s.cost_per_kwh)
    for i, dearer in enumerate(by_cost):
        used = result.dispatch_kw[dearer.name] > 0
        for cheaper in by_cost[:i]:
            assert np.all(result.dispatch_kw[cheaper.name][used] == cheaper.capacity_kw)
    np.testing.assert_allclose(result.unserved_kw, [0, 0, 0, 0, 0, 150])
    expected_cost = sum(
        float(result.dispatch_kw[s.name].sum()) * s.cost_per_kwh * 0.5 for s in SOURCES
    )
    assert result.total_cost == pytest.approx(expected_cost)
    assert result.merit_order == ["solar", "wind", "grid", "gas"]
    assert list(result.dispatch_kw) == [s.name for s in SOURCES]
    GridSwitchResult.model_validate(result.to_result())


def test_dispatch_uses_negative_cost_source_first() -> None:
    """A source that is paid to run (negative cost) is dispatched before the rest."""
    sources = [Source("grid", 100, 0.1), Source("curtail", 50, -0.05)]
    result = dispatch_sources([120.0], sources, resolution_minutes=60)
    assert result.dispatch_kw["curtail"].tolist() == [50.0]
    assert result.dispatch_kw["grid"].tolist() == [70.0]
    assert result.total_cost == pytest.approx(70 * 0.1 - 50 * 0.05)


# --- simulation -----------------------------------------------------------------------------


def _simulate(base: object) -> SimulationResult:
    request = simulation_request(base=base)  # type: ignore[arg-type]
    assert isinstance(request.payload, SimulationPayload)
    return SimulationResult.model_validate(simulate(request.payload))


def test_simulation_over_storage_scales_with_prices() -> None:
    """Doubling prices doubles the storage savings (same LP, scaled objective)."""
    sim = _simulate(storage_request())
    by_name = {s.name: s for s in sim.scenarios}
    assert list(by_name) == ["baseline", "hot-and-busy", "price-shock"]
    base, shock = by_name["baseline"].summary, by_name["price-shock"].summary
    assert base["savings"] > 0
    assert shock["savings"] == pytest.approx(2 * base["savings"], rel=1e-3)
    for outcome in sim.scenarios:
        StorageResult.model_validate(outcome.result)
        assert all(math.isfinite(v) for v in outcome.summary.values())


def test_simulation_over_forecast_scales_with_load() -> None:
    """Scaling the load history by 1.2 scales the (linear) forecast by 1.2."""
    sim = _simulate(forecast_request(steps=14 * 24))
    by_name = {s.name: s for s in sim.scenarios}
    base = ForecastResult.model_validate(by_name["baseline"].result)
    busy = ForecastResult.model_validate(by_name["hot-and-busy"].result)
    np.testing.assert_allclose(busy.forecast, np.array(base.forecast) * 1.2, rtol=1e-5)
    assert by_name["hot-and-busy"].summary["peak_mw"] > by_name["baseline"].summary["peak_mw"]


def test_simulation_over_grid_switch_reports_costs_and_shortfall() -> None:
    """More load costs more and, past total capacity, leaves load unserved."""
    sim = _simulate(grid_switch_request(peak_kw=1000))
    by_name = {s.name: s.summary for s in sim.scenarios}
    assert by_name["hot-and-busy"]["total_cost"] > by_name["baseline"]["total_cost"]
    assert by_name["hot-and-busy"]["unserved_kwh"] > by_name["baseline"]["unserved_kwh"]
    assert by_name["price-shock"]["total_cost"] == pytest.approx(
        2 * by_name["baseline"]["total_cost"]
    )


# --- execution metadata ---------------------------------------------------------------------


def test_circuit_formulas() -> None:
    """Qubits grow with log2(problem size); higher optimization levels give shallower circuits."""
    shape = circuit_shape(192, 1)
    assert shape.n_qubits == 9  # ceil(log2 192) + 1
    assert shape.circuit_depth == math.ceil((2 * 9 + 4 * 9) * 0.85)
    assert circuit_shape(4096, 1).n_qubits > shape.n_qubits
    depths = [circuit_shape(192, level).circuit_depth for level in range(4)]
    assert depths == sorted(depths, reverse=True)
    assert cost_usd(shape, 3) == pytest.approx(3 * 1024 * 9 * shape.circuit_depth * 2e-8)
    meta = execution_report(
        model_id="m",
        mode="hybrid",
        problem_size=192,
        circuits=1,
        optimization_level=1,
        execution_time_ms=1.23456,
    ).to_json()
    assert meta["n_qubits"] == 9 and meta["mode"] == "hybrid" and meta["model_id"] == "m"
    assert meta["execution_time_ms"] == 1.235
