"""Battery scheduling as a linear program: charge when energy is cheap, discharge when dear.

Variables per step t: charge c_t, discharge d_t (kW) and state of charge s_t (kWh, end of step).

    minimise   sum_t price_t * (c_t - d_t) * dt  (+ a negligible throughput tie-break)
    subject to s_t = s_{t-1} + eta * c_t * dt - d_t * dt / eta      eta = sqrt(round-trip eff.)
               soc_min <= s_t <= soc_max,  0 <= c_t <= max_charge,  0 <= d_t <= max_discharge
               c_t / max_charge + d_t / max_discharge <= 1   (no full charge and discharge at once)
               s_T >= s_0                                       (no selling the initial charge)
               d_t - c_t <= load_t                              (only with a load: no export)

Without a load forecast the battery trades with the grid at the price (export allowed) and the
baseline cost is 0; with one, the baseline is the cost of the load alone. Doing nothing is always
feasible, so the optimum never costs more than the baseline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.optimize import linprog

from qnn_emulator.arrays import FloatArray, wire_floats

# Breaks ties toward doing nothing (e.g. zero prices) without changing any priced decision.
THROUGHPUT_TIE_BREAK = 1e-7


@dataclass(frozen=True)
class Battery:
    """The physical limits of one battery."""

    max_charge_kw: float
    max_discharge_kw: float
    efficiency: float  # round trip
    soc_initial_kwh: float
    soc_min_kwh: float
    soc_max_kwh: float


@dataclass(frozen=True)
class StorageSchedule:
    """An optimised schedule and what it costs against doing nothing."""

    charge_kw: FloatArray
    discharge_kw: FloatArray
    soc_kwh: FloatArray
    baseline_cost: float
    optimized_cost: float
    solver_status: str

    @property
    def savings(self) -> float:
        return max(self.baseline_cost - self.optimized_cost, 0.0)

    def to_result(self) -> dict[str, object]:
        """The StorageResult fields, as plain JSON-ready values."""
        return {
            "charge_kw": wire_floats(self.charge_kw),
            "discharge_kw": wire_floats(self.discharge_kw),
            "soc_kwh": wire_floats(self.soc_kwh),
            "baseline_cost": round(self.baseline_cost, 6),
            "optimized_cost": round(self.optimized_cost, 6),
            "savings": round(self.savings, 6),
            "solver_status": self.solver_status,
        }


def _idle(battery: Battery, steps: int, baseline: float, status: str) -> StorageSchedule:
    zeros = np.zeros(steps)
    soc = np.full(steps, battery.soc_initial_kwh)
    return StorageSchedule(zeros, zeros.copy(), soc, baseline, baseline, status)


def optimise_storage(
    battery: Battery,
    prices: Sequence[float] | FloatArray,
    *,
    resolution_minutes: int,
    load_kw: Sequence[float] | FloatArray | None = None,
) -> StorageSchedule:
    """Solve the schedule LP with HiGHS; fall back to idling if the solver does not succeed."""
    price = np.asarray(prices, dtype=np.float64)
    steps = len(price)
    dt = resolution_minutes / 60.0
    load = None if load_kw is None else np.asarray(load_kw, dtype=np.float64)
    baseline = float(price @ load) * dt if load is not None else 0.0
    eta = float(np.sqrt(battery.efficiency))

    # Variable layout: [c_0..c_{T-1}, d_0..d_{T-1}, s_0..s_{T-1}].
    eye = sp.identity(steps, format="csr")
    shift = sp.eye(steps, k=-1, format="csr")  # picks s_{t-1}
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
    terminal = sp.csr_matrix(([-1.0], ([0], [3 * steps - 1])), shape=(1, 3 * steps))
    rows.append(terminal)
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
        # Only solver tolerance can get here; idling is then the honest answer.
        return _idle(battery, steps, baseline, "fallback_idle: no improvement")
    return StorageSchedule(charge, discharge, soc, baseline, optimized, "optimal")
