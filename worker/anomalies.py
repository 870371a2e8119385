"""Anomaly detection for completed runs: pure functions over a validated request and its result.

Nothing here does I/O; the worker calls `detect_run_anomalies` on every completed run and stores
what it returns. Three families of checks (docs/anomalies.md has the method and the measured
precision/recall):

* Input anomalies in a load series (forecast `historical_loads`, storage/grid_switch
  `load_forecast`): zero runs, flatlines of a stuck meter, then spikes and drops scored by a robust
  z-score against a seasonal baseline built from the same time of neighbouring days.
* Result anomalies: forecasts outside the historical envelope or peaking far above it, negative or
  non-finite values, storage schedules that break power or state-of-charge limits (SoC recomputed
  from charge/discharge and efficiency), grid dispatch above capacity and unserved load.
* Operational anomalies: QNN latency or cost far above its recent baseline.

Every threshold is a module constant below; severities grade by them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import AliasChoices, BaseModel

from contracts.requests import (
    AnyRequest,
    ForecastPayload,
    GridSwitchPayload,
    StoragePayload,
)
from contracts.results import ForecastResult, GridSwitchResult, StorageResult

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]
Severity = Literal["low", "medium", "high", "critical"]

__all__ = [
    "Anomaly",
    "SeriesEvent",
    "detect_cost_anomaly",
    "detect_forecast_result_anomalies",
    "detect_grid_switch_result_anomalies",
    "detect_input_anomalies",
    "detect_latency_anomaly",
    "detect_operational_anomaly",
    "detect_run_anomalies",
    "detect_storage_result_anomalies",
    "find_flatlines",
    "find_input_events",
    "find_spikes_and_drops",
    "find_zero_runs",
    "spike_scores",
]

# --------------------------------------------------------------------------- anomaly codes

INPUT_SPIKE: Final = "input_spike"
INPUT_DROP: Final = "input_drop"
INPUT_FLATLINE: Final = "input_flatline"
INPUT_ZERO_RUN: Final = "input_zero_run"
FORECAST_OUTSIDE_ENVELOPE: Final = "forecast_outside_envelope"
FORECAST_PEAK_ABOVE_HISTORY: Final = "forecast_peak_above_history"
RESULT_NON_FINITE: Final = "result_non_finite"
RESULT_NEGATIVE: Final = "result_negative"
STORAGE_LIMIT_VIOLATION: Final = "storage_limit_violation"
GRID_CAPACITY_VIOLATION: Final = "grid_capacity_violation"
GRID_UNSERVED_LOAD: Final = "grid_unserved_load"
QNN_LATENCY_HIGH: Final = "qnn_latency_high"
QNN_COST_HIGH: Final = "qnn_cost_high"

# --------------------------------------------------------------------------- thresholds

MAD_TO_SIGMA: Final = 1.4826

# Spikes and drops. Scores are robust z-scores of log-load residuals, so a residual of 0.015 is
# about 1.5 % of the local level. The scale is the residual MAD, floored at SPIKE_SCALE_FLOOR: on
# very smooth series (real regional demand) a z of 6 then still means a deviation of >= 9 %.
SPIKE_SCALE_FLOOR: Final = 0.015
SPIKE_Z_LOW: Final = 6.0  # detection threshold
SPIKE_Z_MEDIUM: Final = 8.0
SPIKE_Z_HIGH: Final = 12.0  # input spikes/drops are never critical: the run still completed
SPIKE_Z_EXTEND: Final = 3.0  # an event extends over neighbouring readings down to this |z|
SPIKE_MAX_HOURS: Final = 2.0  # longest deviation the baselines are built to see through
NEIGHBOUR_DAYS: Final = (1, 2, 7)  # days before/after compared: adjacent days and a week apart
NEIGHBOURS_USED: Final = 3  # best-matching neighbour days whose residuals are median-combined
MATCH_GUARD_HOURS: Final = SPIKE_MAX_HOURS  # neighbours are ranked on the fit 2-5 h around a
MATCH_RING_HOURS: Final = 5.0  # reading, so the reading's own deviation cannot pick them
PEEL_ROUNDS: Final = 8  # strongest-first passes before the remaining events are taken as found
MIN_SEASONAL_DAYS: Final = 3  # fewer days: a robust harmonic fit of the daily shape instead
HARMONIC_TERMS: Final = 3  # daily harmonics (24, 12, 8 h) of that fit
HARMONIC_IRLS_ITERATIONS: Final = 6
BISQUARE_TUNING: Final = 4.685
HARMONIC_SMALL_SAMPLE: Final = 1.0  # scale inflation for MADs from few readings (see below)

# Flatlines: consecutive readings within FLATLINE_REL_TOLERANCE of the typical level (a stuck
# meter repeats its last value), lasting at least FLATLINE_MIN_HOURS. Severity by duration.
FLATLINE_REL_TOLERANCE: Final = 1e-4
FLATLINE_MIN_HOURS: Final = 3.0
FLATLINE_HOURS_MEDIUM: Final = 6.0
FLATLINE_HOURS_HIGH: Final = 12.0
FLATLINE_HOURS_CRITICAL: Final = 24.0

# Zero runs: readings at or below ZERO_REL_THRESHOLD of the median, in a series whose other
# readings stay far from zero (their ZERO_FAR_QUANTILE is at least ZERO_FAR_FRACTION of the
# median) and that is near zero at most ZERO_MAX_SHARE of the time (else zero is its normal
# state, e.g. a solar site at night). Any such reading is reported; severity by run duration.
ZERO_REL_THRESHOLD: Final = 0.01
ZERO_MAX_SHARE: Final = 0.25
ZERO_FAR_QUANTILE: Final = 0.05
ZERO_FAR_FRACTION: Final = 0.2
ZERO_HOURS_MEDIUM: Final = 1.0
ZERO_HOURS_HIGH: Final = 3.0
ZERO_HOURS_CRITICAL: Final = 12.0

# Forecast results against the history (scaled by a simulation scenario's load_scale).
ENVELOPE_UPPER_RATIO: Final = 1.5  # above 1.5 x the historical max ...
ENVELOPE_LOWER_RATIO: Final = 0.5  # ... or below 0.5 x the historical min
ENVELOPE_MIN_FRACTION: Final = 0.1  # for at least 10 % of the horizon (and 2 steps): medium
ENVELOPE_FRACTION_HIGH: Final = 0.25
ENVELOPE_FRACTION_CRITICAL: Final = 0.5
PEAK_RATIO_LOW: Final = 1.2  # forecast peak / historical max
PEAK_RATIO_MEDIUM: Final = 1.35
PEAK_RATIO_HIGH: Final = 1.5
PEAK_RATIO_CRITICAL: Final = 2.0
NEGATIVE_CRITICAL_FRACTION: Final = 0.1  # a negative load beyond 10 % of the typical level

# Limit violations (storage power/SoC, grid capacity): relative excess over the limit (or, for
# state of charge, over the battery capacity) graded low/medium/high/critical.
LIMIT_TOLERANCE: Final = 1e-4  # solver slack, relative to the limit
SOC_TOLERANCE_FRACTION: Final = 2e-3  # of capacity_kwh, for recomputed vs reported SoC
VIOLATION_MEDIUM: Final = 0.01
VIOLATION_HIGH: Final = 0.05
VIOLATION_CRITICAL: Final = 0.2

# Unserved load: share of the load's energy left unserved.
UNSERVED_MEDIUM: Final = 0.01
UNSERVED_HIGH: Final = 0.05
UNSERVED_CRITICAL: Final = 0.2

# Operational: current value against the last OP_WINDOW recent values.
OP_WINDOW: Final = 100
OP_MIN_SAMPLES: Final = 10
OP_Z_THRESHOLD: Final = 5.0
OP_RATIO_LOW: Final = 1.5  # current / recent median, needed besides the z-score
OP_RATIO_MEDIUM: Final = 2.0
OP_RATIO_HIGH: Final = 3.0
OP_RATIO_CRITICAL: Final = 5.0
OP_SCALE_FLOOR_FRACTION: Final = 0.05  # of the recent median: identical recent values

MAX_EVENTS_REPORTED: Final = 20  # per anomaly; details also carry the full count

_SEVERITIES: Final[tuple[Severity, ...]] = ("low", "medium", "high", "critical")


@dataclass(frozen=True)
class Anomaly:
    """One finding about a run; `details` is JSON-ready (plain numbers, strings, lists)."""

    anomaly_type: str
    severity: Severity
    description: str
    suggested_actions: tuple[str, ...]
    details: dict[str, Any] = field(hash=False)


@dataclass(frozen=True)
class SeriesEvent:
    """A contiguous stretch of anomalous readings, indices inclusive."""

    anomaly_type: str
    start: int
    end: int
    score: float  # peak robust z for spikes/drops, 0 otherwise

    @property
    def steps(self) -> int:
        return self.end - self.start + 1


def _grade(value: float, medium: float, high: float, critical: float) -> Severity:
    """`low` below `medium`, then medium/high/critical at each threshold reached."""
    if value >= critical:
        return "critical"
    if value >= high:
        return "high"
    if value >= medium:
        return "medium"
    return "low"


def _worst(severities: Iterable[Severity]) -> Severity:
    return max(severities, key=_SEVERITIES.index, default="low")


def _r(value: float, digits: int = 4) -> float:
    """A JSON-safe rounded float (non-finite becomes 0.0; details never carry NaN)."""
    return round(float(value), digits) if math.isfinite(value) else 0.0


# --------------------------------------------------------------------------- array helpers


def _steps(hours: float, resolution_minutes: int) -> int:
    return max(1, round(hours * 60.0 / resolution_minutes))


def _odd(n: int) -> int:
    return n if n % 2 else n + 1


def _rolling_median(x: FloatArray, window: int, *, odd: bool = False) -> FloatArray:
    """Centred rolling median. Edges see a mirror image of the series (`odd`: point-mirrored
    about the end reading, which continues a trend instead of folding it back)."""
    half = window // 2
    if len(x) <= half:
        return np.full(len(x), float(np.median(x)))
    padded = np.pad(x, half, mode="reflect", reflect_type="odd" if odd else "even")
    windows = np.lib.stride_tricks.sliding_window_view(padded, window)
    return np.asarray(np.median(windows, axis=1), dtype=np.float64)


def _box_sum(values: FloatArray, half: int) -> FloatArray:
    """Row-wise sum over the columns j with |j - i| <= half of each column i (zeros beyond)."""
    rows = values.shape[0]
    padded = np.concatenate([np.zeros((rows, half + 1)), values, np.zeros((rows, half))], axis=1)
    csum = np.cumsum(padded, axis=1)
    return np.asarray(csum[:, 2 * half + 1 :] - csum[:, : -(2 * half + 1)], dtype=np.float64)


def _ring_mean(values: FloatArray, guard: int, reach: int) -> FloatArray:
    """Row-wise mean over the neighbours guard < |j| <= reach of each column, ignoring NaN.

    Columns with no finite neighbour get inf."""
    finite = np.isfinite(values)
    filled = np.where(finite, values, 0.0)
    counts = finite.astype(np.float64)
    total = _box_sum(filled, reach) - _box_sum(filled, guard)
    count = _box_sum(counts, reach) - _box_sum(counts, guard)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(count > 0.5, total / np.maximum(count, 1.0), np.inf)


def _runs(mask: BoolArray) -> list[tuple[int, int]]:
    """(start, end) inclusive of each run of True."""
    if not mask.any():
        return []
    padded = np.concatenate([[False], mask, [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return [(int(a), int(b) - 1) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def _robust_scale(residuals: FloatArray, floor: float) -> float:
    finite = residuals[np.isfinite(residuals)]
    if finite.size == 0:
        return floor
    mad = float(np.median(np.abs(finite - np.median(finite))))
    return max(MAD_TO_SIGMA * mad, floor)


def _typical_level(values: FloatArray) -> float:
    return float(np.median(np.abs(values))) if values.size else 0.0


# --------------------------------------------------------------------------- input: zero runs


def _far_from_zero(values: FloatArray, near_zero: BoolArray, level: float) -> bool:
    others = values[~near_zero]
    if level <= 0.0 or others.size == 0 or near_zero.mean() > ZERO_MAX_SHARE:
        return False
    return float(np.quantile(others, ZERO_FAR_QUANTILE)) >= ZERO_FAR_FRACTION * level


def find_zero_runs(values: Sequence[float] | FloatArray) -> list[SeriesEvent]:
    """Runs of (near-)zero readings in a load that is otherwise far from zero."""
    y = np.asarray(values, dtype=np.float64)
    if y.size == 0:
        return []
    level = _typical_level(y)
    near_zero = np.abs(y) <= ZERO_REL_THRESHOLD * level
    if not near_zero.any() or not _far_from_zero(y, near_zero, level):
        return []
    return [SeriesEvent(INPUT_ZERO_RUN, a, b, 0.0) for a, b in _runs(near_zero)]


# --------------------------------------------------------------------------- input: flatlines


def find_flatlines(
    values: Sequence[float] | FloatArray,
    resolution_minutes: int,
    *,
    exclude: BoolArray | None = None,
) -> list[SeriesEvent]:
    """Runs of at least FLATLINE_MIN_HOURS of near-identical consecutive readings.

    Near-zero readings never form a flatline: in a load that is otherwise far from zero they are
    a zero run, and in one that is often zero (a solar site at night) they are normal.
    """
    y = np.asarray(values, dtype=np.float64)
    min_readings = math.ceil(FLATLINE_MIN_HOURS * 60.0 / resolution_minutes)
    if y.size < min_readings:
        return []
    level = _typical_level(y)
    skip = np.abs(y) <= ZERO_REL_THRESHOLD * level
    if exclude is not None:
        skip |= exclude
    same = np.abs(np.diff(y)) <= FLATLINE_REL_TOLERANCE * level  # readings i and i+1 agree
    same &= ~(skip[1:] | skip[:-1])
    events = []
    for a, b in _runs(same):
        if b - a + 2 >= min_readings:  # b - a + 1 agreeing pairs span b - a + 2 readings
            events.append(SeriesEvent(INPUT_FLATLINE, a, b + 1, 0.0))
    return events


# --------------------------------------------------------------------------- input: spikes, drops


def _impute(x: FloatArray, mask: BoolArray, steps_per_day: int) -> FloatArray:
    """Masked runs filled from the same hours of a neighbouring day, shifted to this day's level.

    The level offset between the two days is taken just before and just after the run and
    interpolated linearly across it, so a filled run neither jumps at its edges nor drags its
    surroundings (through the local level adjustment) towards the other day's level. Without a
    clean neighbour day the run is interpolated linearly between its edges.
    """
    if not mask.any():
        return x
    out = x.copy()
    n = len(x)
    fill = float(np.median(x[~mask])) if (~mask).any() else 0.0
    for a, b in _runs(mask):
        idx = np.arange(a, b + 1)
        edges = [i for i in (a - 1, b + 1) if 0 <= i < n and not mask[i]]
        for shift in (-steps_per_day, steps_per_day, -2 * steps_per_day, 2 * steps_per_day):
            ref = idx + shift
            if ref[0] < 0 or ref[-1] >= n or mask[ref].any():
                continue
            known = [(i, x[i] - x[i + shift]) for i in edges if 0 <= i + shift < n]
            known = [(i, off) for i, off in known if not mask[i + shift]]
            if len(known) == 2:
                offset = np.interp(idx, [known[0][0], known[1][0]], [known[0][1], known[1][1]])
            else:
                offset = np.full(idx.size, known[0][1] if known else 0.0)
            out[a : b + 1] = x[ref] + offset
            break
        else:
            if len(edges) == 2:
                out[a : b + 1] = np.interp(idx, edges, x[edges])
            else:
                out[a : b + 1] = x[edges[0]] if edges else fill
    return out


def _seasonal_residuals(
    x: FloatArray, steps_per_day: int, resolution_minutes: int, imputed: BoolArray
) -> FloatArray:
    """Log-load minus a baseline from the best-matching neighbour days, level-adjusted locally.

    For each neighbour offset k (NEIGHBOUR_DAYS, before and after) the candidate residual is
    x[t] - x[t+k] - median(x[j] - x[j+k] for j within SPIKE_MAX_HOURS of t): the deviation from
    that day's reading at the same time after removing the local level difference between the
    two days (weekends, weather). The window is wider than twice the longest deviation scored, so
    the deviation cannot shift the median, and at the ends of the series it is point-mirrored,
    which continues a ramp instead of folding it back. Candidates are ranked per reading by how
    well they fit MATCH_GUARD_HOURS-MATCH_RING_HOURS around it, and the residuals of the
    NEIGHBOURS_USED best are median-combined, so one mismatched day type or one anomalous
    neighbour does not decide. `imputed` readings (masked and filled) do not count in the fit.
    """
    n = len(x)
    level_window = _odd(2 * _steps(SPIKE_MAX_HOURS, resolution_minutes) + 1)
    rows: list[FloatArray] = []
    for days in NEIGHBOUR_DAYS:
        shift = days * steps_per_day
        overlap = n - shift
        if overlap < level_window:
            continue
        diff = x[:overlap] - x[shift:]
        resid = diff - _rolling_median(diff, level_window, odd=True)
        ahead = np.full(n, np.nan)
        ahead[:overlap] = resid  # reading t against t + shift
        behind = np.full(n, np.nan)
        behind[shift:] = -resid  # reading t against t - shift
        rows += [ahead, behind]
    if not rows:
        return np.zeros(n)
    cand = np.vstack(rows)
    misfit = np.abs(cand)
    misfit[:, imputed] = np.nan  # an imputed reading fits the day it was copied from by design
    fit = _ring_mean(
        misfit,
        _steps(MATCH_GUARD_HOURS, resolution_minutes),
        _steps(MATCH_RING_HOURS, resolution_minutes),
    )
    fit = np.where(np.isfinite(cand), fit, np.inf)
    order = np.argsort(fit, axis=0, kind="stable")[:NEIGHBOURS_USED]
    chosen = np.take_along_axis(cand, order, axis=0)
    chosen_fit = np.take_along_axis(fit, order, axis=0)
    chosen = np.where(np.isfinite(chosen_fit), chosen, np.nan)
    count = np.isfinite(chosen).sum(axis=0)
    ordered = np.sort(chosen, axis=0)  # NaN sort last
    first = ordered[0]
    mid = ordered[1] if len(ordered) > 1 else first
    resid = np.where(count >= 3, mid, np.where(count == 2, (first + mid) / 2, first))
    return np.asarray(np.nan_to_num(resid, nan=0.0), dtype=np.float64)


def _robust_harmonic_residuals(
    x: FloatArray, steps_per_day: int, weights: BoolArray
) -> tuple[FloatArray, float] | None:
    """Residuals of a bisquare-IRLS fit of level, trend and HARMONIC_TERMS daily harmonics.

    For series too short for neighbour days (one or two days of a load forecast). Returns the
    residuals and the factor for their MAD scale: it undoes the shrinkage of the residuals by the
    fitted parameters (1 / sqrt(1 - p/n)) and allows for the uncertainty of a MAD taken from few
    residuals (1 + HARMONIC_SMALL_SAMPLE / sqrt(n - p)). None when the series is too short for
    the fit (fewer than 2 readings per parameter).
    """
    n = len(x)
    t = np.arange(n, dtype=np.float64)
    columns = [np.ones(n), t / n - 0.5]
    for k in range(1, HARMONIC_TERMS + 1):
        angle = 2.0 * np.pi * k * t / steps_per_day
        columns += [np.cos(angle), np.sin(angle)]
    design = np.column_stack(columns)
    params = design.shape[1]
    if int(weights.sum()) < 2 * params:
        return None
    w = weights.astype(np.float64)
    resid = x
    for _ in range(HARMONIC_IRLS_ITERATIONS):
        weighted = design.T * w  # normal equations: tiny and BLAS-thread free
        gram = weighted @ design + 1e-9 * np.eye(params)
        beta = np.linalg.solve(gram, weighted @ x)
        resid = x - design @ beta
        scale = max(MAD_TO_SIGMA * float(np.median(np.abs(resid[weights]))), 1e-9)
        u = resid / (BISQUARE_TUNING * scale)
        w = np.where((np.abs(u) < 1.0) & weights, (1.0 - u * u) ** 2, 0.0)
    inflation = (1.0 + HARMONIC_SMALL_SAMPLE / math.sqrt(n - params)) / math.sqrt(1.0 - params / n)
    return np.asarray(resid, dtype=np.float64), inflation


def spike_scores(
    values: Sequence[float] | FloatArray,
    resolution_minutes: int,
    *,
    exclude: BoolArray | None = None,
) -> FloatArray:
    """Robust z-score of every reading's log-deviation from its local baseline (0 where excluded).

    With at least MIN_SEASONAL_DAYS days of readings the baseline is seasonal (see
    `_seasonal_residuals`); shorter series use a robust harmonic fit of the daily shape (see
    `_robust_harmonic_residuals`). Series that legitimately reach zero (near-zero readings that
    are not a flagged zero run) and series too short to fit are not scored.
    """
    y = np.asarray(values, dtype=np.float64)
    n = y.size
    mask = np.zeros(n, dtype=bool) if exclude is None else exclude.copy()
    level = _typical_level(y[~mask]) if (~mask).any() else 0.0
    if n < 5 or level <= 0.0:
        return np.zeros(n)
    positive = y > ZERO_REL_THRESHOLD * level
    if not (positive | mask).all():
        return np.zeros(n)  # near-zero readings that are not a flagged zero run
    steps_per_day = max(1, 1440 // resolution_minutes)
    x = np.log(np.where(mask, level, np.maximum(y, ZERO_REL_THRESHOLD * level)))
    x = _impute(x, mask, steps_per_day)
    if n >= MIN_SEASONAL_DAYS * steps_per_day:
        resid = _seasonal_residuals(x, steps_per_day, resolution_minutes, mask)
        scale_inflation = 1.0
    else:
        fitted = _robust_harmonic_residuals(x, steps_per_day, ~mask)
        if fitted is None:
            return np.zeros(n)
        resid, scale_inflation = fitted
    resid[mask] = np.nan
    z = resid / max(_robust_scale(resid, 0.0) * scale_inflation, SPIKE_SCALE_FLOOR)
    return np.asarray(np.nan_to_num(z, nan=0.0), dtype=np.float64)


def _grow_events(z: FloatArray) -> list[SeriesEvent]:
    """Events around each |z| >= SPIKE_Z_LOW reading, grown while |z| >= SPIKE_Z_EXTEND."""
    n = len(z)
    events: list[SeriesEvent] = []
    covered_to = -1
    for i in np.flatnonzero(np.abs(z) >= SPIKE_Z_LOW):
        if i <= covered_to:
            continue
        sign = float(np.sign(z[i]))
        a = b = int(i)
        while a > 0 and sign * z[a - 1] >= SPIKE_Z_EXTEND:
            a -= 1
        while b < n - 1 and sign * z[b + 1] >= SPIKE_Z_EXTEND:
            b += 1
        covered_to = b
        peak = float(np.max(sign * z[a : b + 1]))
        events.append(SeriesEvent(INPUT_SPIKE if sign > 0 else INPUT_DROP, a, b, peak))
    return events


def find_spikes_and_drops(
    values: Sequence[float] | FloatArray,
    resolution_minutes: int,
    *,
    exclude: BoolArray | None = None,
) -> list[SeriesEvent]:
    """Spikes (z >= SPIKE_Z_LOW) and drops (z <= -SPIKE_Z_LOW), found by peeling.

    An anomaly also disturbs the baselines of other readings: the same hours of neighbouring
    days (which then look anomalous with the opposite sign) and readings next to it (through the
    local level adjustment). Those echoes are always weaker than their cause, so events are
    accepted strongest first, each masked before the scores are recomputed; echoes vanish with
    their cause. A clean series costs one pass; at most PEEL_ROUNDS passes are made, after
    which every remaining event is accepted as it stands.
    """
    y = np.asarray(values, dtype=np.float64)
    mask = np.zeros(y.size, dtype=bool) if exclude is None else exclude.copy()
    accepted: list[SeriesEvent] = []
    for _ in range(PEEL_ROUNDS):
        events = _grow_events(spike_scores(y, resolution_minutes, exclude=mask))
        if not events:
            break
        strongest = max(events, key=lambda e: e.score)
        accepted.append(strongest)
        mask[strongest.start : strongest.end + 1] = True
    else:
        accepted += _grow_events(spike_scores(y, resolution_minutes, exclude=mask))
    return sorted(accepted, key=lambda e: e.start)


# --------------------------------------------------------------------------- input: anomalies

_INPUT_ACTIONS: Final[dict[str, tuple[str, ...]]] = {
    INPUT_SPIKE: (
        "Check the meter or telemetry feed for the flagged interval.",
        "Replace or interpolate the flagged readings before relying on the forecast.",
    ),
    INPUT_DROP: (
        "Check for a telemetry outage or a partial feeder reading in the flagged interval.",
        "Replace or interpolate the flagged readings before relying on the forecast.",
    ),
    INPUT_FLATLINE: (
        "Check whether the meter or data feed was stuck repeating its last value.",
        "Backfill the interval from a redundant source, or drop it from the history.",
    ),
    INPUT_ZERO_RUN: (
        "Treat the zero readings as missing data: check the data pipeline for gaps.",
        "Backfill or drop the interval; zeros bias forecasts and schedules downward.",
    ),
}


def _event_details(event: SeriesEvent, y: FloatArray, resolution_minutes: int) -> dict[str, Any]:
    seg = y[event.start : event.end + 1]
    out: dict[str, Any] = {
        "start_index": event.start,
        "end_index": event.end,
        "steps": event.steps,
        "hours": _r(event.steps * resolution_minutes / 60.0, 2),
        "min_value": _r(float(seg.min())),
        "max_value": _r(float(seg.max())),
    }
    if event.anomaly_type in (INPUT_SPIKE, INPUT_DROP):
        out["peak_z"] = _r(event.score, 2)
    return out


def _event_severity(event: SeriesEvent, resolution_minutes: int) -> Severity:
    hours = event.steps * resolution_minutes / 60.0
    if event.anomaly_type == INPUT_FLATLINE:
        return _grade(hours, FLATLINE_HOURS_MEDIUM, FLATLINE_HOURS_HIGH, FLATLINE_HOURS_CRITICAL)
    if event.anomaly_type == INPUT_ZERO_RUN:
        return _grade(hours, ZERO_HOURS_MEDIUM, ZERO_HOURS_HIGH, ZERO_HOURS_CRITICAL)
    return _grade(event.score, SPIKE_Z_MEDIUM, SPIKE_Z_HIGH, math.inf)


_INPUT_WORDS: Final = {
    INPUT_SPIKE: ("spike", "spikes"),
    INPUT_DROP: ("drop", "drops"),
    INPUT_FLATLINE: ("flatline (stuck readings)", "flatlines (stuck readings)"),
    INPUT_ZERO_RUN: ("run of zero readings", "runs of zero readings"),
}


def find_input_events(
    values: Sequence[float] | FloatArray, resolution_minutes: int
) -> list[SeriesEvent]:
    """All input events, in order: zero runs, flatlines, then spikes/drops outside them."""
    y = np.asarray(values, dtype=np.float64)
    if y.size == 0 or not np.isfinite(y).all():
        return []
    events = find_zero_runs(y)
    mask = np.zeros(y.size, dtype=bool)
    for e in events:
        mask[e.start : e.end + 1] = True
    flat = find_flatlines(y, resolution_minutes, exclude=mask)
    for e in flat:
        mask[e.start : e.end + 1] = True
    return events + flat + find_spikes_and_drops(y, resolution_minutes, exclude=mask)


def detect_input_anomalies(
    values: Sequence[float] | FloatArray,
    resolution_minutes: int,
    *,
    field_name: str = "historical_loads",
    measured: bool = True,
) -> list[Anomaly]:
    """One Anomaly per input anomaly type found in a load series, listing its events.

    `measured` is False for a requester's own forecast (`load_forecast`): a forecast that is
    constant throughout is then likely a deliberate placeholder and only graded low.
    """
    y = np.asarray(values, dtype=np.float64)
    events = find_input_events(y, resolution_minutes)
    anomalies = []
    for kind in (INPUT_ZERO_RUN, INPUT_FLATLINE, INPUT_SPIKE, INPUT_DROP):
        found = [e for e in events if e.anomaly_type == kind]
        if not found:
            continue
        severity = _worst(_event_severity(e, resolution_minutes) for e in found)
        one, many = _INPUT_WORDS[kind]
        worst = max(found, key=lambda e: (e.score, e.steps))
        hours = worst.steps * resolution_minutes / 60.0
        what = f"peak robust z {worst.score:.1f}" if worst.score else f"longest {hours:g} h"
        description = (
            f"{len(found)} {one if len(found) == 1 else many} in {field_name} "
            f"({what}, first at index {found[0].start})"
        )
        if kind == INPUT_FLATLINE and found[0].steps == y.size and not measured:
            severity = "low"
            description = f"{field_name} is constant at {y[0]:g} for all {y.size} steps"
        anomalies.append(
            Anomaly(
                anomaly_type=kind,
                severity=severity,
                description=description,
                suggested_actions=_INPUT_ACTIONS[kind],
                details={
                    "field": field_name,
                    "resolution_minutes": resolution_minutes,
                    "event_count": len(found),
                    "events": [
                        _event_details(e, y, resolution_minutes)
                        for e in found[:MAX_EVENTS_REPORTED]
                    ],
                },
            )
        )
    return anomalies


# --------------------------------------------------------------------------- result parsing


def _aliases(model: type[BaseModel], name: str) -> tuple[str, ...]:
    alias = model.model_fields[name].validation_alias
    names = [name]
    if isinstance(alias, AliasChoices):
        names += [c for c in alias.choices if isinstance(c, str) and c != name]
    return tuple(names)


def _field(raw: Mapping[str, Any], model: type[BaseModel], name: str) -> Any:
    for key in _aliases(model, name):
        if key in raw:
            return raw[key]
    return None


def _floats(raw: Any) -> FloatArray | None:
    """A list of numbers as floats; anything non-numeric becomes NaN. None if not a list."""
    if not isinstance(raw, list | tuple):
        return None
    try:
        array = np.asarray(raw, dtype=np.float64)
        if array.ndim == 1:
            return array
    except (TypeError, ValueError):
        pass
    out = np.full(len(raw), np.nan)
    for i, v in enumerate(raw):
        if isinstance(v, int | float) and not isinstance(v, bool):
            out[i] = float(v)
    return out


def _non_finite(series: Mapping[str, FloatArray]) -> Anomaly | None:
    bad = {name: int((~np.isfinite(v)).sum()) for name, v in series.items()}
    bad = {k: v for k, v in bad.items() if v}
    if not bad:
        return None
    where = ", ".join(f"{k} ({v})" for k, v in bad.items())
    return Anomaly(
        anomaly_type=RESULT_NON_FINITE,
        severity="critical",
        description=f"result has non-finite or non-numeric values in {where}",
        suggested_actions=(
            "Do not use this result; rerun the request.",
            "Report the response to the QNN provider with the request id.",
        ),
        details={"non_finite_counts": bad},
    )


def _negative(
    series: Mapping[str, FloatArray], typical: float, *, what: str = "values"
) -> Anomaly | None:
    found: dict[str, dict[str, Any]] = {}
    worst = 0.0
    for name, v in series.items():
        finite = v[np.isfinite(v)]
        neg = finite < -LIMIT_TOLERANCE * max(typical, 1.0)
        if neg.any():
            low = float(finite.min())
            worst = min(worst, low)
            found[name] = {"count": int(neg.sum()), "min": _r(low)}
    if not found:
        return None
    critical = typical > 0 and -worst > NEGATIVE_CRITICAL_FRACTION * typical
    return Anomaly(
        anomaly_type=RESULT_NEGATIVE,
        severity="critical" if critical else "high",
        description=f"negative {what} in " + ", ".join(found),
        suggested_actions=(
            "Do not act on the negative values; rerun the request or clip and review.",
            "Check the model's output constraints with the QNN provider.",
        ),
        details={"fields": found, "typical_level": _r(typical)},
    )


# --------------------------------------------------------------------------- result: forecast


def _history_range(history: FloatArray) -> tuple[float, float, float] | None:
    """(min, max, median) of the history without zero-run readings (they are missing data);
    None without a history (a `dataset_ref` not resolved into `historical_loads`)."""
    history = history[np.isfinite(history)]
    if history.size == 0:
        return None
    zero_mask = np.zeros(history.size, dtype=bool)
    for e in find_zero_runs(history):
        zero_mask[e.start : e.end + 1] = True
    kept = history[~zero_mask] if (~zero_mask).any() else history
    return float(kept.min()), float(kept.max()), float(np.median(kept))


def detect_forecast_result_anomalies(
    payload: ForecastPayload, result: Mapping[str, Any], *, load_scale: float = 1.0
) -> list[Anomaly]:
    """Non-finite/negative forecasts, forecasts outside the (scaled) historical envelope.

    Without a history in the payload (an unresolved `dataset_ref`) only the value checks run.
    """
    forecast = _floats(_field(result, ForecastResult, "forecast"))
    if forecast is None or forecast.size == 0:
        return []
    series = {"forecast": forecast}
    for name in ("lower", "upper"):
        bound = _floats(_field(result, ForecastResult, name))
        if bound is not None:
            series[name] = bound
    anomalies: list[Anomaly] = []
    f = forecast[np.isfinite(forecast)]
    history = _history_range(np.asarray(payload.historical_loads, dtype=np.float64))
    if history is None:
        typical = _typical_level(f)
    else:
        hist_min, hist_max, typical = (v * load_scale for v in history)
    if (bad := _non_finite(series)) is not None:
        anomalies.append(bad)
    if (neg := _negative({"forecast": forecast}, typical, what="load forecast")) is not None:
        anomalies.append(neg)
    if f.size == 0 or history is None:
        return anomalies

    upper, lower = ENVELOPE_UPPER_RATIO * hist_max, ENVELOPE_LOWER_RATIO * hist_min
    above, below = int((f > upper).sum()), int((f < lower).sum())
    outside = above + below
    needed = max(2, math.ceil(ENVELOPE_MIN_FRACTION * f.size))
    if outside >= min(needed, f.size):
        share = outside / f.size
        anomalies.append(
            Anomaly(
                anomaly_type=FORECAST_OUTSIDE_ENVELOPE,
                severity=_grade(share, 0.0, ENVELOPE_FRACTION_HIGH, ENVELOPE_FRACTION_CRITICAL),
                description=(
                    f"{outside} of {f.size} forecast steps lie outside "
                    f"[{ENVELOPE_LOWER_RATIO:g} x historical min, "
                    f"{ENVELOPE_UPPER_RATIO:g} x historical max]"
                ),
                suggested_actions=(
                    "Review the forecast before dispatch; compare with a persistence forecast.",
                    "Check the history for anomalies and the request's units and resolution.",
                ),
                details={
                    "steps_above": above,
                    "steps_below": below,
                    "share_outside": _r(share),
                    "envelope_low": _r(lower),
                    "envelope_high": _r(upper),
                    "historical_min": _r(hist_min),
                    "historical_max": _r(hist_max),
                    "forecast_min": _r(float(f.min())),
                    "forecast_max": _r(float(f.max())),
                    "load_scale": load_scale,
                },
            )
        )
    peak = float(f.max())
    ratio = peak / hist_max if hist_max > 0 else math.inf
    if ratio >= PEAK_RATIO_LOW:
        anomalies.append(
            Anomaly(
                anomaly_type=FORECAST_PEAK_ABOVE_HISTORY,
                severity=_grade(ratio, PEAK_RATIO_MEDIUM, PEAK_RATIO_HIGH, PEAK_RATIO_CRITICAL),
                description=(
                    f"forecast peak {peak:g} is {ratio:.2f} x the historical maximum {hist_max:g}"
                ),
                suggested_actions=(
                    "Confirm the peak against weather and event data before committing capacity.",
                    "Check the history for drops or missing data that understate the maximum.",
                ),
                details={
                    "forecast_peak": _r(peak),
                    "peak_index": int(np.argmax(f)),
                    "historical_max": _r(hist_max),
                    "ratio": _r(ratio),
                    "load_scale": load_scale,
                },
            )
        )
    return anomalies


# --------------------------------------------------------------------------- result: storage


def _excess(values: FloatArray, limit: float, scale: float) -> tuple[int, float]:
    """Steps above `limit` (beyond tolerance) and the worst excess as a fraction of `scale`."""
    over = values - limit
    bad = over > LIMIT_TOLERANCE * max(abs(limit), 1.0)
    if not bad.any():
        return 0, 0.0
    return int(bad.sum()), float(over[bad].max()) / max(scale, 1e-12)


def _soc_paths(
    payload: StoragePayload, charge: FloatArray, discharge: FloatArray
) -> dict[str, FloatArray]:
    """SoC recomputed from charge/discharge under the usual efficiency conventions."""
    dt = payload.resolution_minutes / 60.0
    eff = payload.efficiency
    half = math.sqrt(eff)
    conventions = {
        "split_sqrt": (half, half),  # round-trip efficiency split evenly (the emulator's)
        "on_charge": (eff, 1.0),
        "on_discharge": (1.0, eff),
    }
    return {
        name: payload.soc_initial_kwh + np.cumsum(eta_c * charge * dt - discharge * dt / eta_d)
        for name, (eta_c, eta_d) in conventions.items()
    }


def detect_storage_result_anomalies(
    payload: StoragePayload, result: Mapping[str, Any], *, load_scale: float = 1.0
) -> list[Anomaly]:
    """Non-finite/negative series and schedules breaking the battery's power or SoC limits."""
    raw = {
        name: _floats(_field(result, StorageResult, name))
        for name in ("charge_kw", "discharge_kw", "soc_kwh")
    }
    series = {k: v for k, v in raw.items() if v is not None}
    anomalies: list[Anomaly] = []
    if (bad := _non_finite(series)) is not None:
        anomalies.append(bad)
    if (neg := _negative(series, payload.capacity_kwh, what="power or energy")) is not None:
        anomalies.append(neg)
    charge, discharge, soc = raw["charge_kw"], raw["discharge_kw"], raw["soc_kwh"]
    if charge is None or discharge is None or soc is None:
        return anomalies
    n = min(charge.size, discharge.size, soc.size, len(payload.price_schedule))
    charge, discharge, soc = charge[:n], discharge[:n], soc[:n]
    if n == 0 or not all(np.isfinite(a).all() for a in (charge, discharge, soc)):
        return anomalies

    cap = payload.capacity_kwh
    violations: dict[str, dict[str, Any]] = {}

    def note(name: str, steps: int, excess: float, **extra: Any) -> None:
        if steps:
            violations[name] = {"steps": steps, "worst_excess_fraction": _r(excess), **extra}

    note("charge_above_max", *_excess(charge, payload.max_charge_kw, payload.max_charge_kw))
    note(
        "discharge_above_max",
        *_excess(discharge, payload.max_discharge_kw, payload.max_discharge_kw),
    )
    note("soc_above_max", *_excess(soc, payload.soc_max_kwh, cap))
    note("soc_below_min", *_excess(-soc, -payload.soc_min_kwh, cap))

    paths = _soc_paths(payload, charge, discharge)
    errors = {name: float(np.max(np.abs(path - soc))) for name, path in paths.items()}
    best = min(errors, key=lambda k: errors[k])
    tol = SOC_TOLERANCE_FRACTION * cap
    if errors[best] > tol:
        note(
            "soc_inconsistent_with_schedule",
            int((np.abs(paths[best] - soc) > tol).sum()),
            errors[best] / cap,
            closest_convention=best,
            max_abs_error_kwh=_r(errors[best]),
        )
    else:
        path = paths[best]
        note("recomputed_soc_above_max", *_excess(path, payload.soc_max_kwh, cap))
        note("recomputed_soc_below_min", *_excess(-path, -payload.soc_min_kwh, cap))
    if not violations:
        return anomalies
    worst = max(v["worst_excess_fraction"] for v in violations.values())
    anomalies.append(
        Anomaly(
            anomaly_type=STORAGE_LIMIT_VIOLATION,
            severity=_grade(worst, VIOLATION_MEDIUM, VIOLATION_HIGH, VIOLATION_CRITICAL),
            description="storage schedule breaks battery limits: " + ", ".join(violations),
            suggested_actions=(
                "Do not send this schedule to the battery controller as is.",
                "Clip to the limits and re-optimise, or rerun the request.",
            ),
            details={"violations": violations, "capacity_kwh": cap, "load_scale": load_scale},
        )
    )
    return anomalies


# --------------------------------------------------------------------------- result: grid


def detect_grid_switch_result_anomalies(
    payload: GridSwitchPayload, result: Mapping[str, Any], *, load_scale: float = 1.0
) -> list[Anomaly]:
    """Non-finite/negative dispatch, sources above capacity and load left unserved."""
    raw_dispatch = _field(result, GridSwitchResult, "dispatch_kw")
    if not isinstance(raw_dispatch, Mapping):
        return []
    dispatch = {str(k): v for k, v in raw_dispatch.items()}
    series = {f"dispatch_kw.{k}": a for k, v in dispatch.items() if (a := _floats(v)) is not None}
    unserved = _floats(_field(result, GridSwitchResult, "unserved_kw"))
    if unserved is not None:
        series["unserved_kw"] = unserved
    load = np.asarray(payload.load_forecast, dtype=np.float64) * load_scale
    typical = _typical_level(load)
    anomalies: list[Anomaly] = []
    if (bad := _non_finite(series)) is not None:
        anomalies.append(bad)
    if (neg := _negative(series, typical, what="dispatch")) is not None:
        anomalies.append(neg)

    n = load.size
    supplied = np.zeros(n)
    over: dict[str, dict[str, Any]] = {}
    capacity = {s.name: s.capacity_kw for s in payload.sources}
    for name, raw_series in dispatch.items():
        values = _floats(raw_series)
        if values is None:
            continue
        values = np.nan_to_num(values[:n], nan=0.0, posinf=0.0, neginf=0.0)
        supplied[: values.size] += values
        if name in capacity:
            steps, excess = _excess(values, capacity[name], capacity[name])
            if steps:
                over[name] = {
                    "steps": steps,
                    "capacity_kw": capacity[name],
                    "max_dispatch_kw": _r(float(values.max())),
                    "worst_excess_fraction": _r(excess),
                }
    if over:
        worst = max(v["worst_excess_fraction"] for v in over.values())
        anomalies.append(
            Anomaly(
                anomaly_type=GRID_CAPACITY_VIOLATION,
                severity=_grade(worst, VIOLATION_MEDIUM, VIOLATION_HIGH, VIOLATION_CRITICAL),
                description="dispatch exceeds source capacity for " + ", ".join(over),
                suggested_actions=(
                    "Do not issue this dispatch; cap each source at its capacity and re-solve.",
                    "Check the source capacities sent with the request.",
                ),
                details={"sources": over, "load_scale": load_scale},
            )
        )

    reported = np.zeros(n)
    if unserved is not None:
        u = np.nan_to_num(unserved[:n], nan=0.0, posinf=0.0, neginf=0.0)
        reported[: u.size] = u
    shortfall = np.maximum(np.maximum(reported, load - supplied), 0.0)
    short = shortfall > LIMIT_TOLERANCE * np.maximum(load, 1.0)
    if short.any():
        share = float(shortfall.sum() / load.sum()) if load.sum() > 0 else 1.0
        hours = payload.resolution_minutes / 60.0
        anomalies.append(
            Anomaly(
                anomaly_type=GRID_UNSERVED_LOAD,
                severity=_grade(share, UNSERVED_MEDIUM, UNSERVED_HIGH, UNSERVED_CRITICAL),
                description=(
                    f"{share:.1%} of the load's energy is unserved over {int(short.sum())} steps"
                ),
                suggested_actions=(
                    "Arrange additional supply (imports, reserves) or demand response.",
                    "Check source availability and capacities against the load forecast.",
                ),
                details={
                    "steps": int(short.sum()),
                    "unserved_kwh": _r(float(shortfall.sum() * hours)),
                    "unserved_share": _r(share),
                    "peak_unserved_kw": _r(float(shortfall.max())),
                    "implied_by_balance": bool((load - supplied > reported + 1e-9)[short].any()),
                    "load_scale": load_scale,
                },
            )
        )
    return anomalies


# --------------------------------------------------------------------------- operational


def detect_operational_anomaly(
    current: float | None,
    recent: Sequence[float] | FloatArray,
    *,
    anomaly_type: str,
    metric: str,
    unit: str,
) -> Anomaly | None:
    """`current` far above the last OP_WINDOW `recent` values: robust z >= OP_Z_THRESHOLD and
    at least OP_RATIO_LOW x their median. None below OP_MIN_SAMPLES usable recent values."""
    if current is None or not math.isfinite(current):
        return None
    history = np.asarray(recent, dtype=np.float64)[-OP_WINDOW:]
    history = history[np.isfinite(history)]
    if history.size < OP_MIN_SAMPLES:
        return None
    median = float(np.median(history))
    mad = float(np.median(np.abs(history - median)))
    scale = max(MAD_TO_SIGMA * mad, OP_SCALE_FLOOR_FRACTION * abs(median), 1e-12)
    z = (current - median) / scale
    ratio = current / median if median > 0 else (math.inf if current > 0 else 0.0)
    if z < OP_Z_THRESHOLD or ratio < OP_RATIO_LOW:
        return None
    severity: Severity = (
        "medium"
        if median <= 0
        else _grade(ratio, OP_RATIO_MEDIUM, OP_RATIO_HIGH, OP_RATIO_CRITICAL)
    )
    times = f"{ratio:.1f} x" if math.isfinite(ratio) else "above a zero"
    actions = {
        QNN_LATENCY_HIGH: (
            "Check the QNN provider's status and queue times.",
            "Consider lowering concurrency or switching to a faster device/model.",
        ),
        QNN_COST_HIGH: (
            "Check the request's problem size and scenario count against its cost.",
            "Review the QNN device/model choice and the provider's pricing.",
        ),
    }.get(anomaly_type, ("Investigate the change against the recent baseline.",))
    return Anomaly(
        anomaly_type=anomaly_type,
        severity=severity,
        description=(
            f"QNN {metric} {current:g} {unit} is {times} the recent median {median:g} {unit} "
            f"(robust z {z:.1f})"
        ),
        suggested_actions=actions,
        details={
            "value": _r(current, 6),
            "recent_median": _r(median, 6),
            "recent_mad": _r(mad, 6),
            "robust_z": _r(z, 2),
            "ratio": _r(ratio, 3) if math.isfinite(ratio) else None,
            "samples": int(history.size),
        },
    )


def detect_latency_anomaly(
    latency_ms: float | None, recent_latency_ms: Sequence[float] | FloatArray
) -> Anomaly | None:
    """QNN latency far above its recent baseline."""
    return detect_operational_anomaly(
        latency_ms, recent_latency_ms, anomaly_type=QNN_LATENCY_HIGH, metric="latency", unit="ms"
    )


def detect_cost_anomaly(
    cost_usd: float | None, recent_cost_usd: Sequence[float] | FloatArray
) -> Anomaly | None:
    """QNN cost far above its recent baseline (pass recent costs of comparable requests)."""
    return detect_operational_anomaly(
        cost_usd, recent_cost_usd, anomaly_type=QNN_COST_HIGH, metric="cost", unit="USD"
    )


# --------------------------------------------------------------------------- entry point


AnyPayload = ForecastPayload | StoragePayload | GridSwitchPayload


def _input_anomalies(payload: AnyPayload) -> list[Anomaly]:
    if isinstance(payload, ForecastPayload):
        return detect_input_anomalies(
            payload.historical_loads, payload.resolution_minutes, field_name="historical_loads"
        )
    if payload.load_forecast is None:
        return []
    return detect_input_anomalies(
        payload.load_forecast,
        payload.resolution_minutes,
        field_name="load_forecast",
        measured=False,
    )


def _result_anomalies(
    payload: AnyPayload,
    result: Mapping[str, Any],
    load_scale: float = 1.0,
) -> list[Anomaly]:
    if isinstance(payload, ForecastPayload):
        return detect_forecast_result_anomalies(payload, result, load_scale=load_scale)
    if isinstance(payload, StoragePayload):
        return detect_storage_result_anomalies(payload, result, load_scale=load_scale)
    return detect_grid_switch_result_anomalies(payload, result, load_scale=load_scale)


def _in_scenario(anomaly: Anomaly, name: str) -> Anomaly:
    return Anomaly(
        anomaly_type=anomaly.anomaly_type,
        severity=anomaly.severity,
        description=f"scenario {name}: {anomaly.description}",
        suggested_actions=anomaly.suggested_actions,
        details={"scenario": name, **anomaly.details},
    )


def detect_run_anomalies(
    request: AnyRequest,
    result: dict[str, Any],
    *,
    latency_ms: float | None = None,
    recent_latency_ms: Sequence[float] = (),
    cost_usd: float | None = None,
    recent_cost_usd: Sequence[float] = (),
) -> list[Anomaly]:
    """Every anomaly of a completed run: its input, its result (each scenario's, for a
    simulation) and the QNN call's latency and cost against their recent baselines."""
    anomalies: list[Anomaly] = []
    if request.request_type == "simulation":
        base = request.payload.base
        anomalies += _input_anomalies(base.payload)
        scales = {s.name: s.load_scale for s in request.payload.scenarios}
        outcomes = result.get("scenarios")
        for outcome in outcomes if isinstance(outcomes, list) else []:
            if not isinstance(outcome, Mapping) or not isinstance(outcome.get("result"), Mapping):
                continue
            name = str(outcome.get("name", "?"))
            scale = scales.get(name, 1.0)
            # Scenarios scale loads (never battery limits), as the QNN applies them.
            found = _result_anomalies(base.payload, outcome["result"], scale)
            anomalies += [_in_scenario(a, name) for a in found]
    else:
        anomalies += _input_anomalies(request.payload)
        anomalies += _result_anomalies(request.payload, result)
    for op in (
        detect_latency_anomaly(latency_ms, recent_latency_ms),
        detect_cost_anomaly(cost_usd, recent_cost_usd),
    ):
        if op is not None:
            anomalies.append(op)
    return anomalies
