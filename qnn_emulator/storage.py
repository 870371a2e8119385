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

import functools
import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
from numpy.typing import NDArray
from scipy.optimize import linprog

from qnn_emulator.arrays import FloatArray, frozen, wire_floats

IntArray = NDArray[np.int32]

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
    lp = _schedule_lp(battery, price, dt, load)
    x = _solve_direct(lp)
    if x is None:
        # Anything but a clean optimum goes through linprog, for its exact status and message.
        res = _solve_linprog(lp)
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


# --------------------------------------------------------------------------- the LP
#
# `linprog(method="highs")` spends most of its time outside the solver: building and stacking
# sparse blocks, validating inputs, checking every option, and reading duals and the basis we
# never use. The schedule LP has a fixed sparsity pattern per (steps, with load), so the CSC
# arrays are built from a cached pattern and handed to the same HiGHS build scipy ships, with
# the options linprog sets. Same model, same options, same solver: the same solution, bit for
# bit. Whatever is not a clean optimum is re-solved through `linprog` itself, so its statuses
# and messages (including its own feasibility check) are exactly linprog's.


@dataclass(frozen=True)
class _LP:
    """min cost @ x  s.t.  row_lower <= A x <= row_upper,  col_lower <= x <= col_upper.

    Rows: the `n_ub` inequality rows (`A_ub x <= b_ub`) first, then the equality rows, the
    order `linprog` stacks them in. A is in CSC form (`indptr`, `indices`, `data`).
    """

    cost: FloatArray
    indptr: IntArray
    indices: IntArray
    data: FloatArray
    row_lower: FloatArray
    row_upper: FloatArray
    col_lower: FloatArray
    col_upper: FloatArray
    n_ub: int


@dataclass(frozen=True)
class _Pattern:
    """Where the nonzeros of the schedule LP's constraint matrix sit, for one shape."""

    indptr: IntArray
    indices: IntArray
    # The matrix data is `coefficients[kind]`, kind per nonzero (the _K_* codes below).
    kind: NDArray[np.intp]


# Nonzero kinds: 1/max_charge, 1/max_discharge, -eta*dt, dt/eta, 1, -1.
_K_INV_CHARGE, _K_INV_DISCHARGE, _K_CHARGE_EQ, _K_DISCHARGE_EQ, _K_ONE, _K_MINUS_ONE = range(6)


@functools.lru_cache(maxsize=64)
def _pattern(steps: int, with_load: bool) -> _Pattern:
    """The CSC pattern of [A_ub; A_eq] for variables [c_0..c_{T-1}, d_0..d_{T-1}, s_0..s_{T-1}].

    Rows: `steps` mutual-exclusion rows, one terminal-SoC row, `steps` no-export rows (only with
    a load), then `steps` SoC balance rows. Row indices ascend within each column.
    """
    t = np.arange(steps)
    n_ub = steps + 1 + (steps if with_load else 0)
    load_row = steps + 1 + t
    eq_row = n_ub + t
    if with_load:
        c_rows = np.stack([t, load_row, eq_row], axis=1)
        d_rows = c_rows
        c_kind = [_K_INV_CHARGE, _K_MINUS_ONE, _K_CHARGE_EQ]
        d_kind = [_K_INV_DISCHARGE, _K_ONE, _K_DISCHARGE_EQ]
    else:
        c_rows = np.stack([t, eq_row], axis=1)
        d_rows = c_rows
        c_kind = [_K_INV_CHARGE, _K_CHARGE_EQ]
        d_kind = [_K_INV_DISCHARGE, _K_DISCHARGE_EQ]
    per = c_rows.shape[1]
    indices: list[int] = [*c_rows.ravel().tolist(), *d_rows.ravel().tolist()]
    kinds: list[int] = c_kind * steps + d_kind * steps
    counts = [per] * (2 * steps)
    # s_t: +1 in its own balance row, -1 in the next one (s_{t+1} = s_t + ...); the last SoC
    # also appears, with -1, in the terminal row (s_T >= s_0 written as -s_T <= -s_0).
    for k in range(steps):
        if k < steps - 1:
            indices += [n_ub + k, n_ub + k + 1]
            kinds += [_K_ONE, _K_MINUS_ONE]
            counts.append(2)
        else:
            indices += [steps, n_ub + k]
            kinds += [_K_MINUS_ONE, _K_ONE]
            counts.append(2)
    indptr = np.zeros(3 * steps + 1, dtype=np.int32)
    np.cumsum(counts, out=indptr[1:])
    return _Pattern(
        indptr=frozen(indptr),
        indices=frozen(np.asarray(indices, dtype=np.int32)),
        kind=frozen(np.asarray(kinds, dtype=np.intp)),
    )


def _schedule_lp(battery: Battery, price: FloatArray, dt: float, load: FloatArray | None) -> _LP:
    """The schedule LP (formulation in the module doc) in HiGHS' input form."""
    steps = len(price)
    eta = float(np.sqrt(battery.efficiency))
    pattern = _pattern(steps, load is not None)
    # Each value computed exactly as the sparse-block formulation did (e.g. `eye / max_charge`
    # is 1.0 / max_charge, `-eta * dt * eye` is (-eta * dt) * 1.0).
    coefficients = np.array(
        [
            1.0 / battery.max_charge_kw,
            1.0 / battery.max_discharge_kw,
            -eta * dt * 1.0,
            (dt / eta) * 1.0,
            1.0,
            -1.0,
        ]
    )
    data = coefficients[pattern.kind]

    ub_parts = [np.ones(steps), np.array([-battery.soc_initial_kwh])]
    if load is not None:
        ub_parts.append(load)
    b_ub = np.concatenate(ub_parts)
    b_eq = np.zeros(steps)
    b_eq[0] = battery.soc_initial_kwh
    n_ub = len(b_ub)

    scale = max(float(np.max(np.abs(price))), 1e-6) * THROUGHPUT_TIE_BREAK
    cost = np.concatenate([price * dt + scale, -price * dt + scale, np.zeros(steps)])
    col_lower = np.empty(3 * steps)
    col_upper = np.empty(3 * steps)
    col_lower[: 2 * steps] = 0.0
    col_upper[:steps] = battery.max_charge_kw
    col_upper[steps : 2 * steps] = battery.max_discharge_kw
    col_lower[2 * steps :] = battery.soc_min_kwh
    col_upper[2 * steps :] = battery.soc_max_kwh
    row_lower = np.concatenate([np.full(n_ub, -np.inf), b_eq])
    row_upper = np.concatenate([b_ub, b_eq])
    return _LP(
        cost=cost,
        indptr=pattern.indptr,
        indices=pattern.indices,
        data=data,
        row_lower=row_lower,
        row_upper=row_upper,
        col_lower=col_lower,
        col_upper=col_upper,
        n_ub=n_ub,
    )


def _solve_linprog(lp: _LP) -> Any:
    """The same LP through `scipy.optimize.linprog(method="highs")` (the reference path)."""
    n_rows = len(lp.row_upper)
    a = sp.csc_matrix((lp.data, lp.indices, lp.indptr), shape=(n_rows, len(lp.cost)))
    a_ub = a[: lp.n_ub]
    a_eq = a[lp.n_ub :]
    bounds = np.column_stack([lp.col_lower, lp.col_upper])
    return linprog(
        lp.cost,
        A_ub=a_ub,
        b_ub=lp.row_upper[: lp.n_ub],
        A_eq=a_eq,
        b_eq=lp.row_upper[lp.n_ub :],
        bounds=bounds,
        method="highs",
    )


# linprog's post-solve feasibility tolerance: sqrt(tol) * 10 with its default tol of 1e-9.
_LINPROG_CHECK_TOL = float(np.sqrt(1e-9) * 10)


def _load_highs() -> tuple[Any, Any] | None:
    """SciPy's bundled HiGHS bindings and the options `linprog(method="highs")` sets."""
    try:
        core = importlib.import_module("scipy.optimize._highspy._core")
        options = core.HighsOptions()
        options.presolve = "on"
        options.highs_debug_level = core.HighsDebugLevel.kHighsDebugLevelNone
        options.log_to_console = False
        options.output_flag = False
        options.simplex_strategy = core.simplex_constants.SimplexStrategy.kSimplexStrategyDual
    except (ImportError, AttributeError, TypeError):  # a SciPy that moved its internals
        return None
    return core, options


_HIGHS = _load_highs()


def _solve_direct(lp: _LP) -> FloatArray | None:
    """x at a clean optimum (one linprog would accept), else None (the caller asks linprog)."""
    if _HIGHS is None:
        return None
    core, options = _HIGHS
    n_cols = len(lp.cost)
    n_rows = len(lp.row_upper)
    model = core.HighsLp()
    model.num_col_ = n_cols
    model.num_row_ = n_rows
    model.a_matrix_.num_col_ = n_cols
    model.a_matrix_.num_row_ = n_rows
    model.a_matrix_.format_ = core.MatrixFormat.kColwise
    # Lists convert to the bindings' std::vector faster than arrays do (same doubles).
    model.col_cost_ = lp.cost.tolist()
    model.col_lower_ = lp.col_lower.tolist()
    model.col_upper_ = lp.col_upper.tolist()
    model.row_lower_ = lp.row_lower.tolist()
    model.row_upper_ = lp.row_upper.tolist()
    model.a_matrix_.start_ = lp.indptr.tolist()
    model.a_matrix_.index_ = lp.indices.tolist()
    model.a_matrix_.value_ = lp.data.tolist()
    highs = core._Highs()
    error = core.HighsStatus.kError
    if highs.passOptions(options) == error or highs.passModel(model) == error:
        return None
    if highs.run() == error or highs.getModelStatus() != core.HighsModelStatus.kOptimal:
        return None
    solution = highs.getSolution()
    fun = float(highs.getInfo().objective_function_value)
    x = np.array(solution.col_value, dtype=np.float64)
    residual = lp.row_upper - np.array(solution.row_value, dtype=np.float64)
    slack = residual[: lp.n_ub]
    con = residual[lp.n_ub :]
    tol = _LINPROG_CHECK_TOL
    clean = (
        len(x) == n_cols
        and not (np.isnan(x).any() or np.isnan(fun) or np.isnan(residual).any())
        and bool(np.all((x >= lp.col_lower - tol) & (x <= lp.col_upper + tol)))
        and not (slack < -tol).any()
        and not (np.abs(con) > tol).any()
    )
    return x if clean else None
