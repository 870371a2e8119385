"""The emulator's fast paths answer exactly what the straightforward formulations answer.

Each shortcut (HiGHS called directly with a cached LP pattern, LAPACK called directly for the
forecast fit, cached weighted designs, de-duplicated simulation scenarios, in-place rounding) is
checked bit for bit against the formulation it replaced, kept here as the reference.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.linalg import cho_factor, cho_solve
from scipy.optimize import linprog

from contracts.requests import SimulationPayload
from qnn_emulator import forecasting
from qnn_emulator.arrays import wire_floats
from qnn_emulator.samples import forecast_request, storage_request
from qnn_emulator.simulation import _forecast_outcome, _storage_outcome, simulate
from qnn_emulator.storage import (
    THROUGHPUT_TIE_BREAK,
    Battery,
    StorageSchedule,
    _idle,
    _schedule_lp,
    _solve_direct,
    _solve_linprog,
    optimise_storage,
)

# --- storage --------------------------------------------------------------------------------


def _reference_blocks(
    battery: Battery, price: np.ndarray, dt: float, load: np.ndarray | None
) -> tuple[
    sp.csr_matrix, np.ndarray, sp.csr_matrix, np.ndarray, np.ndarray, list[tuple[float, float]]
]:
    """The LP as sparse blocks, the way the schedule was first written."""
    steps = len(price)
    eta = float(np.sqrt(battery.efficiency))
    eye = sp.identity(steps, format="csr")
    shift = sp.eye(steps, k=-1, format="csr")
    a_eq = sp.hstack([-eta * dt * eye, (dt / eta) * eye, eye - shift], format="csr")
    b_eq = np.zeros(steps)
    b_eq[0] = battery.soc_initial_kwh
    rows = [
        sp.hstack(
            [
                eye / battery.max_charge_kw,
                eye / battery.max_discharge_kw,
                sp.csr_matrix((steps, steps)),
            ]
        )
    ]
    rhs = [np.ones(steps)]
    rows.append(sp.csr_matrix(([-1.0], ([0], [3 * steps - 1])), shape=(1, 3 * steps)))
    rhs.append(np.array([-battery.soc_initial_kwh]))
    if load is not None:
        rows.append(sp.hstack([-eye, eye, sp.csr_matrix((steps, steps))]))
        rhs.append(load)
    a_ub = sp.vstack(rows, format="csr")
    b_ub = np.concatenate(rhs)
    scale = max(float(np.max(np.abs(price))), 1e-6) * THROUGHPUT_TIE_BREAK
    cost = np.concatenate([price * dt + scale, -price * dt + scale, np.zeros(steps)])
    bounds = (
        [(0.0, battery.max_charge_kw)] * steps
        + [(0.0, battery.max_discharge_kw)] * steps
        + [(battery.soc_min_kwh, battery.soc_max_kwh)] * steps
    )
    return a_ub, b_ub, a_eq, b_eq, cost, bounds


def _reference_optimise(
    battery: Battery, price: np.ndarray, resolution_minutes: int, load: np.ndarray | None
) -> StorageSchedule:
    """`optimise_storage` as first written: sparse blocks through `linprog(method="highs")`."""
    steps = len(price)
    dt = resolution_minutes / 60.0
    baseline = float(price @ load) * dt if load is not None else 0.0
    a_ub, b_ub, a_eq, b_eq, cost, bounds = _reference_blocks(battery, price, dt, load)
    res = linprog(cost, A_ub=a_ub, b_ub=b_ub, A_eq=a_eq, b_eq=b_eq, bounds=bounds, method="highs")
    if res.status != 0 or res.x is None:
        return _idle(battery, steps, baseline, f"fallback_idle: {res.message}")
    x = np.asarray(res.x, dtype=np.float64)
    charge = np.clip(x[:steps], 0.0, battery.max_charge_kw)
    discharge = np.clip(x[steps : 2 * steps], 0.0, battery.max_discharge_kw)
    soc = np.clip(x[2 * steps :], battery.soc_min_kwh, battery.soc_max_kwh)
    grid = charge - discharge if load is None else load + charge - discharge
    optimized = float(price @ grid) * dt
    if optimized > baseline:
        return _idle(battery, steps, baseline, "fallback_idle: no improvement")
    return StorageSchedule(charge, discharge, soc, baseline, optimized, "optimal")


def _random_case(
    rng: np.random.Generator,
) -> tuple[Battery, np.ndarray, int, np.ndarray | None]:
    cap = rng.uniform(10, 500)
    lo, hi = sorted(rng.uniform(0, cap, 2))
    battery = Battery(
        rng.uniform(1, 100),
        rng.uniform(1, 100),
        rng.uniform(0.5, 1.0),
        rng.choice([lo, hi, rng.uniform(lo, hi)]),
        lo,
        hi,
    )
    steps = int(rng.choice([1, 2, 3, 24, 48, 96, int(rng.integers(1, 200))]))
    prices = rng.normal(0.15, 0.1, steps)
    if rng.random() < 0.2:
        prices = np.round(prices, 1)  # ties, which make the LP degenerate
    load = rng.uniform(0, 80, steps) if rng.random() < 0.5 else None
    return battery, prices, int(rng.choice([15, 30, 60])), load


def _same_schedule(a: StorageSchedule, b: StorageSchedule) -> None:
    for name in ("charge_kw", "discharge_kw", "soc_kwh"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.tobytes() == y.tobytes(), name
    assert (a.baseline_cost, a.optimized_cost, a.solver_status) == (
        b.baseline_cost,
        b.optimized_cost,
        b.solver_status,
    )


def test_storage_lp_arrays_match_the_sparse_block_formulation() -> None:
    """The cached CSC pattern and bounds are exactly what linprog hands HiGHS."""
    rng = np.random.default_rng(11)
    for _ in range(60):
        battery, prices, res, load = _random_case(rng)
        dt = res / 60.0
        a_ub, b_ub, a_eq, b_eq, cost, bounds = _reference_blocks(battery, prices, dt, load)
        stacked = sp.csc_array(sp.vstack((a_ub, a_eq)))
        lp = _schedule_lp(battery, prices, dt, load)
        assert lp.indptr.tobytes() == stacked.indptr.astype(np.int32).tobytes()
        assert lp.indices.tobytes() == stacked.indices.astype(np.int32).tobytes()
        assert lp.data.tobytes() == stacked.data.tobytes()
        assert lp.cost.tobytes() == cost.tobytes()
        assert lp.row_upper.tobytes() == np.concatenate([b_ub, b_eq]).tobytes()
        assert np.all(np.isneginf(lp.row_lower[: len(b_ub)]))
        assert lp.row_lower[len(b_ub) :].tobytes() == b_eq.tobytes()
        bound_array = np.asarray(bounds, dtype=np.float64)
        assert lp.col_lower.tobytes() == bound_array[:, 0].tobytes()
        assert lp.col_upper.tobytes() == bound_array[:, 1].tobytes()


def test_storage_direct_solve_matches_linprog_bit_for_bit() -> None:
    """Random batteries, prices and loads: the schedule is the one linprog gave, exactly."""
    rng = np.random.default_rng(5)
    for _ in range(60):
        battery, prices, res, load = _random_case(rng)
        fast = optimise_storage(battery, prices, resolution_minutes=res, load_kw=load)
        _same_schedule(fast, _reference_optimise(battery, prices, res, load))
        lp = _schedule_lp(battery, prices, res / 60.0, load)
        x = _solve_direct(lp)
        assert x is not None
        assert x.tobytes() == np.asarray(_solve_linprog(lp).x).tobytes()


def test_storage_sample_request_matches_linprog() -> None:
    for with_load in (True, False):
        p = storage_request(with_load=with_load).payload
        battery = Battery(
            p.max_charge_kw,
            p.max_discharge_kw,
            p.efficiency,
            p.soc_initial_kwh,
            p.soc_min_kwh,
            p.soc_max_kwh,
        )
        prices = np.asarray(p.price_schedule)
        load = None if p.load_forecast is None else np.asarray(p.load_forecast)
        fast = optimise_storage(
            battery, prices, resolution_minutes=p.resolution_minutes, load_kw=load
        )
        _same_schedule(fast, _reference_optimise(battery, prices, p.resolution_minutes, load))


def test_storage_infeasible_lp_falls_back_with_linprogs_message() -> None:
    """A start above the SoC ceiling cannot be held: same idle fallback and message as before."""
    battery = Battery(10.0, 10.0, 0.9, soc_initial_kwh=50.0, soc_min_kwh=0.0, soc_max_kwh=20.0)
    prices = np.array([0.1, 0.3, 0.2])
    lp = _schedule_lp(battery, prices, 1.0, None)
    assert _solve_direct(lp) is None
    fast = optimise_storage(battery, prices, resolution_minutes=60)
    assert fast.solver_status.startswith("fallback_idle: ")
    _same_schedule(fast, _reference_optimise(battery, prices, 60, None))


# --- forecast -------------------------------------------------------------------------------


def test_cholesky_solve_matches_scipy_bit_for_bit() -> None:
    rng = np.random.default_rng(3)
    for n in (1, 2, 5, 26, 104):
        a = rng.normal(size=(3 * n, n))
        gram = a.T @ a + 1e-3 * np.eye(n)
        for rhs in (rng.normal(size=n), np.eye(n)):
            ours = forecasting._cholesky_solve(gram, rhs)
            theirs = cho_solve(cho_factor(gram), rhs)
            assert ours.tobytes() == np.asarray(theirs).tobytes()


def test_cholesky_solve_fails_like_scipy() -> None:
    """Not positive definite: LinAlgError (so `_solve` falls back to lstsq); NaN: ValueError."""
    singular = np.array([[1.0, 2.0], [2.0, 1.0]])
    with pytest.raises(np.linalg.LinAlgError):
        cho_factor(singular)
    with pytest.raises(np.linalg.LinAlgError):
        forecasting._cholesky_solve(singular, np.ones(2))
    solved = forecasting._solve(singular, np.ones(2))
    expected = np.linalg.lstsq(singular, np.ones(2), rcond=None)[0]
    assert solved.tobytes() == expected.tobytes()
    bad = np.array([[1.0, np.nan], [np.nan, 1.0]])
    with pytest.raises(ValueError):
        cho_factor(bad)
    with pytest.raises(ValueError):
        forecasting._cholesky_solve(bad, np.ones(2))


def _reference_fit(y: np.ndarray, spec: forecasting._Spec, temps: np.ndarray) -> np.ndarray:
    """The temperature fit as first written (x * w formed per call, penalty built per call)."""
    basis = forecasting._basis(len(y), spec)
    x = np.hstack([basis.x, forecasting._degree_terms(temps)])
    xw = x * basis.weights[:, None]
    penalty = forecasting._penalty(spec, x.shape[1], float(basis.weights.sum()))
    gram = x.T @ xw + np.diag(penalty)
    beta = np.asarray(cho_solve(cho_factor(gram), xw.T @ y), dtype=np.float64)
    resid: np.ndarray = y - x @ beta
    return resid


@pytest.mark.parametrize(("steps", "resolution"), [(168, 60), (336, 60), (672, 30), (288, 15)])
def test_temperature_fit_matches_the_direct_formulation(steps: int, resolution: int) -> None:
    rng = np.random.default_rng(steps)
    y = np.asarray(
        forecast_request(steps=steps, resolution_minutes=resolution).payload.historical_loads
    )
    temps = 15.0 + 10.0 * np.sin(np.arange(steps) / 7.0) + rng.normal(0, 2, steps)
    spec = forecasting._spec(steps, 1440 // resolution, True)
    assert spec.temperature
    fit = forecasting._fit(y, spec, temps)
    assert fit.residuals.tobytes() == _reference_fit(y, spec, temps).tobytes()


def test_shape_cache_is_bounded_by_bytes_and_evicts_oldest() -> None:
    cache = forecasting._ShapeCache(max_bytes=3000)
    made: list[int] = []

    def make(i: int) -> object:
        made.append(i)
        return np.zeros(125)  # 1000 bytes

    def size(v: object) -> int:
        return int(np.asarray(v).nbytes)

    for i in range(3):
        cache.get(i, functools.partial(make, i), size)
    cache.get(0, lambda: make(0), size)  # hit: 0 becomes the newest
    cache.get(3, lambda: make(3), size)  # evicts 1, the oldest
    cache.get(0, lambda: make(0), size)
    cache.get(1, lambda: make(1), size)
    assert made == [0, 1, 2, 3, 1]


# --- simulation and wire rounding -----------------------------------------------------------


def test_duplicate_scenarios_get_the_outcome_computed_alone() -> None:
    """Scenarios equal in what the model reads share one computation, with equal answers."""
    scenarios = [
        {"name": "base"},
        {"name": "dear", "price_scale": 2.0},  # a forecast ignores prices
        {"name": "hot", "temperature_delta_c": 5.0},
        {"name": "base-again"},
        {"name": "neg-zero", "temperature_delta_c": -0.0},
    ]
    for base in (forecast_request(steps=336), storage_request()):
        payload = SimulationPayload.model_validate(
            {
                "base": {"request_type": base.request_type, "payload": base.payload.model_dump()},
                "scenarios": scenarios,
            }
        )
        got = simulate(payload)["scenarios"]
        assert isinstance(got, list)
        one = _forecast_outcome if payload.base.request_type == "forecast" else _storage_outcome
        for sc, out in zip(payload.scenarios, got, strict=True):
            result, summary = one(payload.base, sc)  # type: ignore[arg-type]
            assert out["name"] == sc.name
            assert out["result"] == result
            assert out["summary"] == {k: round(v, 6) + 0.0 for k, v in summary.items()}


def test_wire_floats_matches_round_plus_zero() -> None:
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.normal(0, 1000, 500), [-0.0, 0.0, -1e-9, 1e-9, -4e-7, 5e-7]])
    for decimals in (4, 6):
        expected = (np.round(values, decimals) + 0.0).tolist()
        got = wire_floats(values, decimals)
        assert got == expected
        assert [np.signbit(v) for v in got] == [np.signbit(v) for v in expected]
    assert values[-6] == 0.0 and np.signbit(values[-6])  # the input is left alone
