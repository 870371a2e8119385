"""Day-ahead load forecasting: weighted harmonic regression with calibrated prediction intervals.

The model is a least-squares fit on a recent window of history:

    load(t) = level + damped trend + daily Fourier terms
              + (with >= 2 weeks of history) weekly Fourier terms and their sidebands
              + (with temperatures) heating/cooling degree terms
              + an AR(1) correction of the last residual, decaying with horizon.

The weekly sidebands (frequencies 7k +/- j cycles per week) let the daily shape differ between
weekdays and weekends without knowing the calendar. Observations are weighted with an exponential
half-life so the fit follows level shifts, and a small ridge penalty keeps short histories solvable.

Intervals come from in-sample residuals (the spread of the AR-corrected error at each horizon),
rescaled so that a held-out backtest of the most recent day reaches the nominal coverage: in-sample
residuals alone are too optimistic because the fit partly interpolates the data it is scored on.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.linalg import cho_factor, cho_solve, get_lapack_funcs

from qnn_emulator.arrays import FloatArray, frozen, wire_floats

MAX_DAILY_HARMONICS = 12
WEEKLY_HARMONICS = 3
SIDEBAND_DAILY_HARMONICS = 6
HALF_LIFE_DAYS = 3.0
WINDOW_WEEKS = 4  # older history barely moves a 3-day half-life fit but costs time
RIDGE = 1e-3
HEATING_BASE_C = 15.5
COOLING_BASE_C = 22.0
MIN_CALIBRATION_STEPS = 12
QUANTILE_KNOTS = 8
MIN_PAIRS = 30
# Design matrices are kept per shape (history length, terms), up to this many bytes in all. A
# count limit thrashed: one calibration fit per request doubles the shapes, and requests cycling
# through more shapes than the limit evicted every entry before its next use.
CACHE_BYTES = 64 * 1024 * 1024
CALIBRATION_DAYS = 1
MAX_CALIBRATION_FACTOR = 5.0


@dataclass(frozen=True)
class LoadForecast:
    """Point forecast, interval and the in-sample residuals (for anomaly detection)."""

    forecast: FloatArray
    lower: FloatArray
    upper: FloatArray
    interval_level: float
    resolution_minutes: int
    residuals: FloatArray  # aligned with the last len(residuals) history values
    n_parameters: int

    def to_result(self) -> dict[str, object]:
        """The ForecastResult fields, as plain JSON-ready values."""
        return {
            "forecast": wire_floats(self.forecast, 4),
            "lower": wire_floats(self.lower, 4),
            "upper": wire_floats(self.upper, 4),
            "interval_level": self.interval_level,
            "resolution_minutes": self.resolution_minutes,
        }


@dataclass(frozen=True)
class _Spec:
    """Which terms a history of a given length can support."""

    steps_per_day: int
    frequencies: tuple[float, ...]  # cycles per step
    trend: bool
    temperature: bool

    @property
    def n_parameters(self) -> int:
        return 1 + int(self.trend) + 2 * len(self.frequencies) + 2 * int(self.temperature)


def _spec(n: int, steps_per_day: int, has_temperature: bool) -> _Spec:
    week = 7 * steps_per_day
    # Fewer harmonics than the data can pin down would just extrapolate noise.
    daily = min(MAX_DAILY_HARMONICS, steps_per_day // 2 - 1, max(1, (n - 2) // 6))
    freqs = [k / steps_per_day for k in range(1, daily + 1)]
    if n >= 2 * week:
        freqs += [j / week for j in range(1, WEEKLY_HARMONICS + 1)]
        freqs += [
            (7 * k + s * j) / week
            for k in range(1, min(SIDEBAND_DAILY_HARMONICS, daily) + 1)
            for j in range(1, WEEKLY_HARMONICS + 1)
            for s in (-1, 1)
        ]
    return _Spec(
        steps_per_day=steps_per_day,
        frequencies=tuple(freqs),
        trend=n >= 3 * steps_per_day,
        temperature=has_temperature and n >= 2 * steps_per_day,
    )


def _degree_terms(temps: FloatArray) -> FloatArray:
    heating = np.maximum(HEATING_BASE_C - temps, 0.0) / 10.0
    cooling = np.maximum(temps - COOLING_BASE_C, 0.0) / 10.0
    return np.column_stack([heating, cooling])


def _calendar_design(spec: _Spec, t: FloatArray, trend: FloatArray) -> FloatArray:
    angles = (2.0 * np.pi) * np.outer(t, np.asarray(spec.frequencies))
    cols = [np.ones((len(t), 1))]
    if spec.trend:
        cols.append(trend[:, None])
    cols += [np.cos(angles), np.sin(angles)]
    return np.hstack(cols)


def _penalty(spec: _Spec, n_columns: int, weight_sum: float) -> FloatArray:
    penalty = np.full(n_columns, RIDGE * weight_sum)
    penalty[: 1 + int(spec.trend)] = 0.0  # level and trend are never shrunk
    return penalty


@dataclass(frozen=True)
class _Basis:
    """The data-independent part of a fit, shared by every request with the same shape."""

    x: FloatArray
    weights: FloatArray
    # (X'WX + ridge)^-1: without temperature terms the coefficients are this times X'Wy.
    gram_inverse: FloatArray
    xw: FloatArray  # x * weights[:, None]
    # The ridge penalty as a diagonal matrix for x plus the two degree-day columns.
    temperature_penalty: FloatArray


# The LAPACK routines `scipy.linalg.cho_factor`/`cho_solve` call, without their per-call
# argument handling (a sizeable share of a fit at these sizes).
_POTRF, _POTRS = get_lapack_funcs(("potrf", "potrs"), (np.empty((1, 1)),))


def _cholesky_solve(gram: FloatArray, rhs: FloatArray) -> FloatArray:
    """`cho_solve(cho_factor(gram), rhs)`: the same LAPACK calls, with the same checks."""
    if not (np.isfinite(gram).all() and np.isfinite(rhs).all()):
        raise ValueError("array must not contain infs or NaNs")
    if gram.size == 0 or rhs.size == 0:
        # Degenerate shapes: leave them to SciPy's own handling.
        return np.asarray(cho_solve(cho_factor(gram), rhs), dtype=np.float64)
    factor, info = _POTRF(gram, lower=False, overwrite_a=False, clean=False)
    if info > 0:
        raise np.linalg.LinAlgError(
            f"{info}-th leading minor of the array is not positive definite"
        )
    if info < 0:
        raise ValueError(
            f"LAPACK reported an illegal value in {-info}-th argument on entry to POTRF."
        )
    solution, info = _POTRS(factor, rhs, lower=False, overwrite_b=False)
    if info != 0:
        raise ValueError(f"illegal value in {-info}th argument of internal potrs")
    return np.asarray(solution, dtype=np.float64)


def _solve(gram: FloatArray, rhs: FloatArray) -> FloatArray:
    try:
        return _cholesky_solve(gram, rhs)
    except np.linalg.LinAlgError:
        return np.asarray(np.linalg.lstsq(gram, rhs, rcond=None)[0], dtype=np.float64)


class _ShapeCache:
    """A thread-safe LRU of data-independent arrays, bounded by their total size in bytes.

    Entries are at most ~2 MB (four weeks at 15 minutes, ~100 terms); typical ones are tens to
    hundreds of kB. A miss computes outside the lock (two threads may both compute one entry;
    the results are identical).
    """

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._bytes = 0
        self._items: OrderedDict[Hashable, tuple[object, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(
        self, key: Hashable, make: Callable[[], object], size: Callable[[object], int]
    ) -> object:
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return hit[0]
        value = make()
        nbytes = size(value)
        with self._lock:
            if key not in self._items:
                self._items[key] = (value, nbytes)
                self._bytes += nbytes
                while self._bytes > self._max_bytes and len(self._items) > 1:
                    _, (_, dropped) = self._items.popitem(last=False)
                    self._bytes -= dropped
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


_CACHE = _ShapeCache(CACHE_BYTES)


def _basis(n: int, spec: _Spec) -> _Basis:
    """The cached `_make_basis(n, spec)`."""
    value = _CACHE.get(("basis", n, spec), lambda: _make_basis(n, spec), _basis_bytes)
    assert isinstance(value, _Basis)
    return value


def _basis_bytes(value: object) -> int:
    assert isinstance(value, _Basis)
    arrays = (value.x, value.weights, value.gram_inverse, value.xw, value.temperature_penalty)
    return sum(a.nbytes for a in arrays)


def _future_design(n: int, horizon: int, spec: _Spec) -> FloatArray:
    """The cached `_make_future_design(n, horizon, spec)`."""
    value = _CACHE.get(
        ("future", n, horizon, spec),
        lambda: _make_future_design(n, horizon, spec),
        lambda v: int(np.asarray(v).nbytes),
    )
    assert isinstance(value, np.ndarray)
    return value


def _make_basis(n: int, spec: _Spec) -> _Basis:
    t = np.arange(n, dtype=np.float64)
    week = 7 * spec.steps_per_day
    x = _calendar_design(spec, t, (t - (n - 1)) / week)
    w = 0.5 ** ((n - 1 - t) / (HALF_LIFE_DAYS * spec.steps_per_day))
    xw = x * w[:, None]
    weight_sum = float(w.sum())
    gram = x.T @ xw + np.diag(_penalty(spec, x.shape[1], weight_sum))
    inverse = _solve(gram, np.eye(len(gram)))
    temperature_penalty = np.diag(_penalty(spec, x.shape[1] + 2, weight_sum))
    return _Basis(
        frozen(x), frozen(w), frozen(inverse), frozen(xw), frozen(temperature_penalty)
    )


def _make_future_design(n: int, horizon: int, spec: _Spec) -> FloatArray:
    h = np.arange(1, horizon + 1, dtype=np.float64)
    week = 7 * spec.steps_per_day
    # Damped with a one-day time constant: a trend fitted on days must not run away over weeks.
    damp = 1.0 - 1.0 / spec.steps_per_day
    trend = damp * (1.0 - damp**h) / (1.0 - damp) / week
    return frozen(_calendar_design(spec, (n - 1) + h, trend))


def _future_temperatures(temps: FloatArray, steps_per_day: int, horizon: int) -> FloatArray:
    """Persistence of the last observed day's temperature profile (no weather feed is given)."""
    day = temps[-steps_per_day:] if len(temps) >= steps_per_day else temps[-1:]
    return np.resize(day, horizon)


@dataclass(frozen=True)
class _Fit:
    spec: _Spec
    beta: FloatArray
    residuals: FloatArray
    phi: float


def _fit(y: FloatArray, spec: _Spec, temps: FloatArray | None) -> _Fit:
    basis = _basis(len(y), spec)
    if spec.temperature and temps is not None:
        degree = _degree_terms(temps)
        x = np.hstack([basis.x, degree])
        # Element for element the products of x * weights[:, None], the calendar part cached.
        xw = np.hstack([basis.xw, degree * basis.weights[:, None]])
        gram = x.T @ xw + basis.temperature_penalty
        beta = _solve(gram, xw.T @ y)
    else:
        x = basis.x
        beta = basis.gram_inverse @ (x.T @ (basis.weights * y))
    resid = y - x @ beta
    denom = float(resid[:-1] @ resid[:-1])
    phi = float(resid[1:] @ resid[:-1]) / denom if denom > 0 else 0.0
    return _Fit(spec, beta, resid, min(max(phi, 0.0), 0.99))


def _predict(fit: _Fit, n: int, horizon: int, temps: FloatArray | None) -> FloatArray:
    x = _future_design(n, horizon, fit.spec)
    if fit.spec.temperature and temps is not None:
        x = np.hstack([x, _degree_terms(temps)])
    decay = fit.phi ** np.arange(1, horizon + 1, dtype=np.float64)
    point: FloatArray = x @ fit.beta + fit.residuals[-1] * decay
    return point


def _sorted_quantiles(ordered: FloatArray, q: float) -> FloatArray:
    """Linear-interpolation quantile along the last axis of already sorted rows."""
    pos = q * (ordered.shape[-1] - 1)
    i = int(pos)
    j = min(i + 1, ordered.shape[-1] - 1)
    result: FloatArray = ordered[..., i] + (ordered[..., j] - ordered[..., i]) * (pos - i)
    return result


@functools.lru_cache(maxsize=256)
def _knots(horizon: int) -> tuple[int, ...]:
    count = min(horizon, QUANTILE_KNOTS)
    return tuple(sorted({round(v) for v in np.geomspace(1, horizon, count)}))


def _horizon_quantiles(
    resid: FloatArray, phi: float, horizon: int, level: float
) -> tuple[FloatArray, FloatArray]:
    """Quantiles of r[t+h] - phi^h r[t] over the sample, at log-spaced h, interpolated.

    Horizons too long to pair within the sample use the residuals' own spread, which is what
    the AR correction decays to.
    """
    alpha = (1.0 - level) / 2.0
    n = len(resid)
    knots = np.asarray(_knots(horizon))
    # Pair horizons up to half the sample, so that every paired horizon has n/2+ samples.
    paired = knots[knots <= min(n // 2, n - MIN_PAIRS)]
    lo = np.empty(len(knots))
    hi = np.empty(len(knots))
    if len(paired):
        ends = np.arange(int(paired[-1]), n)
        earlier = resid[ends[None, :] - paired[:, None]]
        err = resid[ends][None, :] - (phi**paired)[:, None] * earlier
        err.sort(axis=1)
        lo[: len(paired)] = _sorted_quantiles(err, alpha)
        hi[: len(paired)] = _sorted_quantiles(err, 1.0 - alpha)
    if len(paired) < len(knots):
        ordered = np.sort(resid)
        lo[len(paired) :] = _sorted_quantiles(ordered, alpha)
        hi[len(paired) :] = _sorted_quantiles(ordered, 1.0 - alpha)
    h = np.arange(1, horizon + 1, dtype=np.float64)
    return (
        np.interp(h, knots, np.minimum(lo, 0.0)),
        np.interp(h, knots, np.maximum(hi, 0.0)),
    )


def _calibration_factor(
    y: FloatArray, spec: _Spec, temps: FloatArray | None, horizon: int, level: float
) -> float:
    """How much in-sample quantiles must widen to cover recent days when they are held out.

    A split-conformal step: each of the last CALIBRATION_DAYS days is forecast from the history
    before it, and the factor is the `level` quantile of |error| / in-sample half-width.
    """
    n = len(y)
    hold = min(horizon, spec.steps_per_day, n // 4)
    if hold < MIN_CALIBRATION_STEPS:
        # Too little data to hold any out: correct for the parameters the fit spent instead.
        return float(np.sqrt(n / max(n - spec.n_parameters, 1)))
    floor = 1e-9 + 1e-6 * float(np.mean(np.abs(y)))
    ratios = []
    for d in range(CALIBRATION_DAYS):
        train = n - hold - d * spec.steps_per_day
        if train < max(24, 2 * hold):
            break
        fit = _fit(y[:train], spec, None if temps is None else temps[:train])
        # Persistence temperatures, as a real forecast would have, not the observed ones.
        future_t = None
        if temps is not None:
            future_t = _future_temperatures(temps[:train], spec.steps_per_day, hold)
        errors = y[train : train + hold] - _predict(fit, train, hold, future_t)
        lo, hi = _horizon_quantiles(fit.residuals, fit.phi, hold, level)
        ratios.append(np.abs(errors) / np.maximum(np.where(errors >= 0, hi, -lo), floor))
    if not ratios:
        return float(np.sqrt(n / max(n - spec.n_parameters, 1)))
    factor = float(_sorted_quantiles(np.sort(np.concatenate(ratios)), level))
    return min(max(factor, 1.0), MAX_CALIBRATION_FACTOR)


def forecast_load(
    history: Sequence[float] | FloatArray,
    *,
    resolution_minutes: int,
    horizon_steps: int,
    temperature_c: Sequence[float] | FloatArray | None = None,
    temperature_delta_c: float = 0.0,
    interval_level: float = 0.9,
) -> LoadForecast:
    """Forecast the next `horizon_steps` loads with an `interval_level` prediction interval.

    `temperature_delta_c` shifts the assumed future temperatures only (a what-if on the forecast
    period); shifting the observed history as well would just be absorbed by the fit.
    """
    steps_per_day = 1440 // resolution_minutes
    window = WINDOW_WEEKS * 7 * steps_per_day
    y = np.asarray(history, dtype=np.float64)[-window:]
    temps = None
    if temperature_c is not None:
        temps = np.asarray(temperature_c, dtype=np.float64)[-window:]
    n = len(y)
    spec = _spec(n, steps_per_day, temps is not None)
    use_temps = temps if spec.temperature else None
    future_temps = None
    if use_temps is not None:
        future_temps = (
            _future_temperatures(use_temps, steps_per_day, horizon_steps) + temperature_delta_c
        )
    fit = _fit(y, spec, use_temps)
    point = _predict(fit, n, horizon_steps, future_temps)
    lo, hi = _horizon_quantiles(fit.residuals, fit.phi, horizon_steps, interval_level)
    scale = _calibration_factor(y, spec, use_temps, horizon_steps, interval_level)
    point = np.maximum(point, 0.0)
    lower = np.minimum(np.maximum(point + scale * lo, 0.0), point)
    upper = np.maximum(point + scale * hi, point)
    return LoadForecast(
        forecast=point,
        lower=lower,
        upper=upper,
        interval_level=interval_level,
        resolution_minutes=resolution_minutes,
        residuals=fit.residuals,
        n_parameters=spec.n_parameters,
    )
