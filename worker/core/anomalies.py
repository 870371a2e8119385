"""Anomaly detection for completed runs: pure functions over a validated request and its result.

Nothing here does I/O; the worker calls `detect_run_anomalies` on every completed run and stores
what it returns. Three families of checks (docs/anomalies.md has the method and the measured
precision/recall):

* Input anomalies in a load series (forecast `historical_loads`, storage/grid_switch
  `load_forecast`): zero runs, flatlines of a stuck meter, then spikes and drops scored by a robust
  z-score against a seasonal baseline built from the same time of neighbouring days.
* Result anomalies, on results core/result_checks.py has accepted (it owns the hard limits:
  finite, non-negative, within every stated limit): forecasts outside the historical envelope or
  peaking far above it, storage schedules whose SoC does not follow from their charge and
  discharge (or, recomputed, leaves the battery's limits), and unserved load.
* Operational anomalies: QNN latency or cost far above its recent baseline.

Every threshold is a module constant below; severities grade by them.

The worker runs this on every run, so the hot paths are vectorised: index plans cached per series
length and resolution, selection networks for rolling medians, one partition per median.
tests/unit/test_anomalies.py holds them to the
straightforward computations, bit for bit (up to the sign of a zero score).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from contracts.requests import (
    AnyRequest,
    ForecastPayload,
    GridSwitchPayload,
    StoragePayload,
)
from contracts.vocabulary import SEVERITIES, Severity

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]
IntArray = NDArray[np.intp]

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
STORAGE_LIMIT_VIOLATION: Final = "storage_limit_violation"
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
    return max(severities, key=SEVERITIES.index, default="low")


def _r(value: float, digits: int = 4) -> float:
    """A JSON-safe rounded float (non-finite becomes 0.0; details never carry NaN)."""
    return round(float(value), digits) if math.isfinite(value) else 0.0


# --------------------------------------------------------------------------- array helpers


def _steps(hours: float, resolution_minutes: int) -> int:
    return max(1, round(hours * 60.0 / resolution_minutes))


def _odd(n: int) -> int:
    return n if n % 2 else n + 1


def _median(values: FloatArray, *, overwrite: bool = False) -> float:
    """`np.median` of a 1-D float array, bit for bit (NaN if any is NaN), without its overhead.

    One partition: the middle element(s) and the maximum, which is NaN if any value is.
    `overwrite`: partition `values` itself (a temporary) instead of a copy."""
    n = values.size
    if n == 0:
        return float(np.median(values))  # NaN, with numpy's warning
    half = n // 2
    part = values if overwrite else values.copy()  # as np.partition
    # np.median takes the mean of the middle value(s): a sum that starts from 0.0 (-0.0 + 0.0
    # is 0.0), over the count.
    if n % 2:
        part.partition((half, n - 1))
        middle = 0.0 + float(part[half])
    else:
        part.partition((half - 1, half, n - 1))
        middle = (0.0 + float(part[half - 1]) + float(part[half])) / 2.0
    return math.nan if math.isnan(part[n - 1]) else middle


def _med3(a: FloatArray, b: FloatArray, c: FloatArray) -> FloatArray:
    """Element-wise median of three (NaN if any is NaN)."""
    return np.maximum(np.minimum(a, b), np.minimum(np.maximum(a, b), c))


def _sliding_median(x: FloatArray, window: int) -> FloatArray:
    """Median of every `window` consecutive values (odd `window`), as `np.median` gives it
    (which adds the middle value to 0.0: no -0.0).

    Windows of 5 and 9 (hourly and half-hourly level windows) use exact selection networks on
    shared sorted pairs/triples of neighbours: a few whole-array min/max operations instead of
    one partition per window."""
    if window == 9 and x.size >= 9:
        # Sort each triple; the median of three sorted triples is the median of (the largest
        # minimum, the median of the medians, the smallest maximum).
        a, b, c = x[:-2], x[1:-1], x[2:]
        low_ab, high_ab = np.minimum(a, b), np.maximum(a, b)
        lows, highs = np.minimum(low_ab, c), np.maximum(high_ab, c)
        mids = np.maximum(low_ab, np.minimum(high_ab, c))
        largest_low = np.maximum(np.maximum(lows[:-6], lows[3:-3]), lows[6:])
        smallest_high = np.minimum(np.minimum(highs[:-6], highs[3:-3]), highs[6:])
        return _med3(largest_low, _med3(mids[:-6], mids[3:-3], mids[6:]), smallest_high) + 0.0
    if window == 5 and x.size >= 5:
        # Pairs (0, 1) and (3, 4): their smaller minimum and larger maximum cannot be the
        # median, which is then the median of the other two and the middle value.
        lows, highs = np.minimum(x[:-1], x[1:]), np.maximum(x[:-1], x[1:])
        lower, upper = np.maximum(lows[:-3], lows[3:]), np.minimum(highs[:-3], highs[3:])
        return _med3(lower, x[2:-2], upper) + 0.0
    # Other windows: one partition of all windows, at np.median's positions (the middle and the
    # maximum, NaN if any value is).
    half = window // 2
    part = np.partition(np.lib.stride_tricks.sliding_window_view(x, window), (half, -1), axis=1)
    return np.where(np.isnan(part[:, -1]), np.nan, part[:, half] + 0.0)


def _any(mask: BoolArray) -> bool:
    """`mask.any()`, in a third of the time on short arrays."""
    return int(np.count_nonzero(mask)) > 0


def _all_finite(values: FloatArray) -> bool:
    """`np.isfinite(values).all()`, faster on short arrays."""
    return int(np.count_nonzero(np.isfinite(values))) == values.size


def _runs(mask: BoolArray) -> list[tuple[int, int]]:
    """(start, end) inclusive of each run of True."""
    if not _any(mask):
        return []
    padded = np.concatenate([[False], mask, [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return [(int(a), int(b) - 1) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def _robust_scale(residuals: FloatArray, floor: float) -> float:
    finite = residuals if _all_finite(residuals) else residuals[np.isfinite(residuals)]
    if finite.size == 0:
        return floor
    mad = _median(np.abs(finite - _median(finite)), overwrite=True)
    return max(MAD_TO_SIGMA * mad, floor)


def _typical_level(values: FloatArray) -> float:
    return _median(np.abs(values), overwrite=True) if values.size else 0.0


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
    return _zero_runs(y, np.abs(y) <= ZERO_REL_THRESHOLD * level, level)


def _zero_runs(y: FloatArray, near_zero: BoolArray, level: float) -> list[SeriesEvent]:
    """`find_zero_runs` given the typical level and the readings near zero."""
    if not _any(near_zero) or not _far_from_zero(y, near_zero, level):
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
    if y.size < math.ceil(FLATLINE_MIN_HOURS * 60.0 / resolution_minutes):
        return []
    level = _typical_level(y)
    skip = np.abs(y) <= ZERO_REL_THRESHOLD * level
    return _flatlines(y, resolution_minutes, level, skip if exclude is None else skip | exclude)


def _flatlines(
    y: FloatArray, resolution_minutes: int, level: float, skip: BoolArray
) -> list[SeriesEvent]:
    """`find_flatlines` given the typical level and the readings that cannot be in one."""
    min_readings = math.ceil(FLATLINE_MIN_HOURS * 60.0 / resolution_minutes)
    if y.size < min_readings:
        return []
    same = np.abs(y[1:] - y[:-1]) <= FLATLINE_REL_TOLERANCE * level  # readings i and i+1 agree
    if _any(skip):
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
    fill = _median(x[~mask], overwrite=True) if _any(~mask) else 0.0
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


@dataclass(frozen=True)
class _SeasonalPlan:
    """Index arrays of `_seasonal_residuals` for one series length and resolution (cached).

    The level differences x[j] - x[j + shift] of every neighbour offset are laid out one after
    the other, each point-mirrored at both ends for the rolling median; candidates form a
    (rows, n) matrix, rows in NEIGHBOUR_DAYS order (ahead, behind).
    """

    rows: int  # candidates per reading: ahead and behind per neighbour offset used
    window: int  # rolling-median window of the level adjustment (odd)
    guard: int  # ring of the neighbour fit: guard < |j| <= reach
    reach: int
    minuend: IntArray  # padded differences: x[minuend] - x[subtrahend] ...
    subtrahend: IntArray
    pad: IntArray  # ... then point-mirrored: d[pad] = 2 * d[pad_edge] - d[pad]
    pad_edge: IntArray
    starts: IntArray  # first window position of each difference's rolling median
    centres: IntArray  # each difference itself (starts + window // 2)
    put_ahead: IntArray  # flat positions in the candidate matrix: reading t against t + shift
    put_behind: IntArray  # ... and reading t + shift against t (negated)
    exists: BoolArray  # (rows, n): the candidate exists (the neighbour day is in the series)
    valid: BoolArray  # ... and has readings in its fit ring (nothing imputed)
    count: FloatArray  # max(1, readings in the fit ring) (nothing imputed)
    columns: IntArray  # (1, n): 0 .. n - 1
    missing: BoolArray  # ~exists
    three: BoolArray  # readings with at least 3 candidates with a fit (nothing imputed)
    pairs: IntArray  # readings with only 2 ...
    singles: IntArray  # ... with only 1 ...
    unfit: IntArray  # ... with none


def _frozen(array: NDArray[Any]) -> NDArray[Any]:
    array.setflags(write=False)
    return array


def _ring_sums(values: FloatArray, guard: int, reach: int) -> FloatArray:
    """Row-wise sum over the neighbours guard < |j| <= reach of each column, zeros beyond the
    ends. The same additions in the same order as two cumulative-sum box filters (radius reach
    minus radius guard), so bit-identical to them: one cumulative sum serves both, since leading
    zeros do not change a prefix sum."""
    n = values.shape[1]
    padded = np.zeros((values.shape[0], n + 2 * reach + 1))
    padded[:, reach + 1 : reach + 1 + n] = values
    csum = np.add.accumulate(padded, axis=1, out=padded)  # np.cumsum, less overhead
    lo, hi = reach - guard, reach + guard + 1
    outer = csum[:, 2 * reach + 1 :] - csum[:, :n]
    return np.asarray(outer - (csum[:, hi : hi + n] - csum[:, lo : lo + n]), dtype=np.float64)


@functools.lru_cache(maxsize=128)
def _seasonal_plan(n: int, steps_per_day: int, resolution_minutes: int) -> _SeasonalPlan:
    window = _odd(2 * _steps(SPIKE_MAX_HOURS, resolution_minutes) + 1)
    half = window // 2
    shifts = [days * steps_per_day for days in NEIGHBOUR_DAYS if n - days * steps_per_day >= window]
    rows = 2 * len(shifts)
    parts: dict[str, list[IntArray]] = {
        k: [] for k in ("src", "shift", "pad", "edge", "starts", "ahead", "behind")
    }
    exists = np.zeros((rows, n), dtype=bool)
    offset = 0
    for k, shift in enumerate(shifts):
        overlap = n - shift
        j = np.arange(overlap)
        mirrored = np.arange(half)
        # np.pad(d, half, mode="reflect", reflect_type="odd"): d[half..1] | d | d[-2..-half-1]
        src = np.concatenate([half - mirrored, j, overlap - 2 - mirrored])
        parts["src"].append(src)
        parts["shift"].append(src + shift)
        parts["pad"].append(offset + np.concatenate([mirrored, half + overlap + mirrored]))
        parts["edge"].append(
            offset + np.concatenate([np.full(half, half), np.full(half, half + overlap - 1)])
        )
        parts["starts"].append(offset + j)
        parts["ahead"].append(2 * k * n + j)
        parts["behind"].append((2 * k + 1) * n + shift + j)
        exists[2 * k, :overlap] = True
        exists[2 * k + 1, shift:] = True
        offset += overlap + 2 * half
    joined = {k: np.concatenate(v) if v else np.zeros(0, dtype=np.intp) for k, v in parts.items()}
    guard = _steps(MATCH_GUARD_HOURS, resolution_minutes)
    reach = _steps(MATCH_RING_HOURS, resolution_minutes)
    count = _ring_sums(exists.astype(np.float64), guard, reach)
    valid = (count > 0.5) & exists
    fitted = valid.sum(axis=0)
    return _SeasonalPlan(
        rows=rows,
        window=window,
        guard=guard,
        reach=reach,
        minuend=_frozen(joined["src"]),
        subtrahend=_frozen(joined["shift"]),
        pad=_frozen(joined["pad"]),
        pad_edge=_frozen(joined["edge"]),
        starts=_frozen(joined["starts"]),
        centres=_frozen(joined["starts"] + half),
        put_ahead=_frozen(joined["ahead"]),
        put_behind=_frozen(joined["behind"]),
        exists=_frozen(exists),
        valid=_frozen(valid),
        count=_frozen(np.maximum(count, 1.0)),
        columns=_frozen(np.arange(n)[None, :]),
        missing=_frozen(~exists),
        three=_frozen(fitted >= 3),
        pairs=_frozen(np.flatnonzero(fitted == 2)),
        singles=_frozen(np.flatnonzero(fitted == 1)),
        unfit=_frozen(np.flatnonzero(fitted == 0)),
    )


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

    All offsets are computed together (one gather, one rolling median, one cumulative sum); the
    index arrays come from a plan cached per series length and resolution.
    """
    n = len(x)
    plan = _seasonal_plan(n, steps_per_day, resolution_minutes)
    rows = plan.rows
    if rows == 0:
        return np.zeros(n)
    diffs = x[plan.minuend] - x[plan.subtrahend]
    diffs[plan.pad] = 2 * diffs[plan.pad_edge] - diffs[plan.pad]
    level = _sliding_median(diffs, plan.window)[plan.starts]
    resid = diffs[plan.centres] - level
    flat = np.full(rows * n, np.nan)
    flat[plan.put_ahead] = resid  # reading t against t + shift
    flat[plan.put_behind] = -resid  # reading t against t - shift
    cand = flat.reshape(rows, n)
    misfit = np.abs(cand)
    usual = not _any(imputed) and _all_finite(resid)
    if usual:
        # Which candidates exist and how many readings each fit ring holds depend only on the
        # plan (candidates are finite where they exist).
        valid = plan.valid
        misfit[plan.missing] = 0.0
        fit = np.where(valid, _ring_sums(misfit, plan.guard, plan.reach) / plan.count, np.inf)
    else:
        exists = np.isfinite(cand)
        usable = exists.copy()
        usable[:, imputed] = False  # an imputed reading fits the day it was copied from
        misfit[~usable] = 0.0
        sums = _ring_sums(np.concatenate([misfit, usable]), plan.guard, plan.reach)
        total, count = sums[:rows], sums[rows:]
        valid = (count > 0.5) & exists
        fit = np.where(valid, total / np.maximum(count, 1.0), np.inf)
    # The NEIGHBOURS_USED (3) best-fitting candidates, ties to the earlier row. Those without a
    # fit (missing neighbours: inf, as misfits are finite) sort last and do not count.
    picks = np.argsort(fit.T, axis=1, kind="stable")[:, :NEIGHBOURS_USED].T * n + plan.columns
    if usual and rows >= 3:
        # Median of the three, or of as many as have a fit (known from the plan; those without
        # sort last, so they need no masking).
        first, second, third = flat[picks]
        combined = _med3(first, second, third)
        if plan.pairs.size:
            combined = np.where(plan.three, combined, (first + second) / 2)
        if plan.singles.size:
            combined[plan.singles] = first[plan.singles]
        if plan.unfit.size:
            combined[plan.unfit] = 0.0
        return combined
    chosen = np.where(valid, cand, np.nan).ravel()[picks]
    first = chosen[0]
    if len(chosen) < 3:
        combined = first if len(chosen) < 2 else (first + chosen[1]) / 2
        combined = np.where(np.isfinite(chosen[-1]), combined, first)
    else:
        second, third = chosen[1], chosen[2]
        combined = np.where(np.isfinite(second), (first + second) / 2, first)
        combined = np.where(np.isfinite(third), _med3(first, second, third), combined)
    if not _all_finite(combined):
        combined = np.nan_to_num(combined, nan=0.0)
    return np.asarray(combined, dtype=np.float64)


def _lapack_solve() -> Callable[..., Any] | None:
    """numpy's LAPACK solve gufunc for a matrix and a vector, the core of np.linalg.solve."""
    try:
        from numpy.linalg import _umath_linalg
    except ImportError:  # pragma: no cover - another numpy layout: np.linalg.solve instead
        return None
    solve1: Callable[..., Any] | None = getattr(_umath_linalg, "solve1", None)
    return solve1


_SOLVE1: Final = _lapack_solve()


def _singular(_err: str, _flag: int) -> None:
    raise np.linalg.LinAlgError("Singular matrix")


def _solve(matrix: FloatArray, rhs: FloatArray) -> FloatArray:
    """`np.linalg.solve(matrix, rhs)` for a float64 matrix and vector, bit for bit: numpy's own
    LAPACK gufunc under numpy's error state, without the argument handling that costs 3 times
    the solve of a tiny system (the robust fit makes HARMONIC_IRLS_ITERATIONS solves per score).
    """
    if _SOLVE1 is None:
        return np.asarray(np.linalg.solve(matrix, rhs), dtype=np.float64)
    with np.errstate(
        call=_singular, invalid="call", over="ignore", divide="ignore", under="ignore"
    ):
        return np.asarray(_SOLVE1(matrix, rhs, signature="dd->d"), dtype=np.float64)


@functools.lru_cache(maxsize=64)
def _harmonic_design(
    n: int, steps_per_day: int
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """Design matrix of level, trend and HARMONIC_TERMS daily harmonics (cached per length and
    resolution), its ridge term, and the weighted design and normal-equations matrix of the first
    IRLS step when no reading is masked (all weights 1)."""
    t = np.arange(n, dtype=np.float64)
    columns = [np.ones(n), t / n - 0.5]
    for k in range(1, HARMONIC_TERMS + 1):
        angle = 2.0 * np.pi * k * t / steps_per_day
        columns += [np.cos(angle), np.sin(angle)]
    design = np.column_stack(columns)
    ridge = 1e-9 * np.eye(design.shape[1])
    weighted = design.T * np.ones(n)
    gram = weighted @ design + ridge
    return _frozen(design), _frozen(ridge), _frozen(weighted), _frozen(gram)


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
    design, ridge, unweighted, unweighted_gram = _harmonic_design(n, steps_per_day)
    params = design.shape[1]
    kept = int(np.count_nonzero(weights))
    if kept < 2 * params:
        return None
    every = kept == n
    w = weights.astype(np.float64)
    resid = x
    for step in range(HARMONIC_IRLS_ITERATIONS):
        if step == 0 and every:
            weighted, gram = unweighted, unweighted_gram
        else:
            weighted = design.T * w  # normal equations: tiny and BLAS-thread free
            gram = weighted @ design + ridge
        resid = x - design @ _solve(gram, weighted @ x)
        if step == HARMONIC_IRLS_ITERATIONS - 1:
            break  # the last weights would go unused
        spread = _median(np.abs(resid if every else resid[weights]), overwrite=True)
        scale = max(MAD_TO_SIGMA * spread, 1e-9)
        u = resid / (BISQUARE_TUNING * scale)
        # Bisquare weights (1 - u^2)^2 inside |u| < 1 (exactly where u * u < 1), else 0.
        w = np.square(np.maximum(1.0 - u * u, 0.0))
        if not every:
            w[~weights] = 0.0
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
    return _spike_scores(
        y, resolution_minutes, np.zeros(y.size, dtype=bool) if exclude is None else exclude
    )


def _spike_scores(
    y: FloatArray, resolution_minutes: int, mask: BoolArray, level: float | None = None
) -> FloatArray:
    """`spike_scores` of an array; `level` is the typical level, if known, of an unmasked `y`."""
    n = y.size
    masked = _any(mask)
    if masked:
        kept = ~mask
        level = _typical_level(y[kept]) if _any(kept) else 0.0
    elif level is None:
        level = _typical_level(y)
    if n < 5 or level <= 0.0:
        return np.zeros(n)
    floor = ZERO_REL_THRESHOLD * level
    positive = y > floor
    if masked:
        positive |= mask
    if np.count_nonzero(positive) < n:
        return np.zeros(n)  # near-zero readings that are not a flagged zero run
    steps_per_day = max(1, 1440 // resolution_minutes)
    if masked:
        x = _impute(np.log(np.where(mask, level, np.maximum(y, floor))), mask, steps_per_day)
    else:
        x = np.log(np.maximum(y, floor))
    if n >= MIN_SEASONAL_DAYS * steps_per_day:
        resid = _seasonal_residuals(x, steps_per_day, resolution_minutes, mask)
        scale_inflation = 1.0
    else:
        fitted = _robust_harmonic_residuals(x, steps_per_day, ~mask)
        if fitted is None:
            return np.zeros(n)
        resid, scale_inflation = fitted
    scale = _robust_scale(resid[~mask] if masked else resid, 0.0)
    z = resid / max(scale * scale_inflation, SPIKE_SCALE_FLOOR)
    if masked:
        z[mask] = 0.0
    if not _all_finite(z):
        z = np.nan_to_num(z, nan=0.0)
    return np.asarray(z, dtype=np.float64)


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
    return _spikes_and_drops(y, resolution_minutes, mask)


def _spikes_and_drops(
    y: FloatArray, resolution_minutes: int, mask: BoolArray, level: float | None = None
) -> list[SeriesEvent]:
    """`find_spikes_and_drops` of an array; `mask` (updated in place) holds the excluded
    readings, `level` the typical level of `y` if known and nothing is excluded."""
    accepted: list[SeriesEvent] = []
    for _ in range(PEEL_ROUNDS):
        events = _grow_events(_spike_scores(y, resolution_minutes, mask, level))
        if not events:
            break
        strongest = max(events, key=lambda e: e.score)
        accepted.append(strongest)
        mask[strongest.start : strongest.end + 1] = True
    else:
        accepted += _grow_events(_spike_scores(y, resolution_minutes, mask))
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
    if y.size == 0 or not _all_finite(y):
        return []
    magnitude = np.abs(y)
    level = _median(magnitude)  # the typical level, shared by the three detectors
    near_zero = magnitude <= ZERO_REL_THRESHOLD * level
    events = _zero_runs(y, near_zero, level)
    mask = np.zeros(y.size, dtype=bool)
    for e in events:
        mask[e.start : e.end + 1] = True
    flat = _flatlines(y, resolution_minutes, level, near_zero | mask)
    for e in flat:
        mask[e.start : e.end + 1] = True
    spikes = _spikes_and_drops(y, resolution_minutes, mask, None if events or flat else level)
    return events + flat + spikes


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


# --------------------------------------------------------------------------- result: forecast
#
# Results reach these checks only after core/result_checks.py accepted them: canonical field
# names, finite values, no negative load, power or dispatch, every limit the request states held
# (to 1e-6). What is left to find is what a valid result can still show.


def _series(result: Mapping[str, Any], name: str) -> FloatArray:
    return np.asarray(result[name], dtype=np.float64)


def _history_range(history: FloatArray) -> tuple[float, float, float] | None:
    """(min, max, median) of the history without zero-run readings (they are missing data);
    None without a history (a `dataset_ref` not resolved into `historical_loads`)."""
    if history.size == 0:
        return None
    zero_runs = find_zero_runs(history)
    kept = history
    if zero_runs:
        zero_mask = np.zeros(history.size, dtype=bool)
        for e in zero_runs:
            zero_mask[e.start : e.end + 1] = True
        if (~zero_mask).any():
            kept = history[~zero_mask]
    return float(kept.min()), float(kept.max()), _median(kept)


def detect_forecast_result_anomalies(
    payload: ForecastPayload, result: Mapping[str, Any], *, load_scale: float = 1.0
) -> list[Anomaly]:
    """A checked forecast outside the (scaled) historical envelope, or peaking far above it.

    Nothing to compare with without a history in the payload (an unresolved `dataset_ref`).
    """
    history = _history_range(np.asarray(payload.historical_loads, dtype=np.float64))
    return _forecast_result_anomalies(result, history, load_scale)


def _forecast_result_anomalies(
    result: Mapping[str, Any], history: tuple[float, float, float] | None, load_scale: float
) -> list[Anomaly]:
    """`detect_forecast_result_anomalies` given the history's `_history_range`."""
    f = _series(result, "forecast")
    if f.size == 0 or history is None:
        return []
    hist_min, hist_max, _ = (v * load_scale for v in history)
    anomalies: list[Anomaly] = []
    upper, lower = ENVELOPE_UPPER_RATIO * hist_max, ENVELOPE_LOWER_RATIO * hist_min
    f_min, peak = float(f.min()), float(f.max())  # no step beyond a bound its extreme is within
    above = int(np.count_nonzero(f > upper)) if peak > upper else 0
    below = int(np.count_nonzero(f < lower)) if f_min < lower else 0
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
                    "forecast_min": _r(f_min),
                    "forecast_max": _r(peak),
                    "load_scale": load_scale,
                },
            )
        )
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
    tolerance = LIMIT_TOLERANCE * max(abs(limit), 1.0)
    # Rounding is monotonic, so no step is over the limit if the largest value is not.
    if values.size == 0 or float(values.max()) - limit <= tolerance:
        return 0, 0.0
    over = values - limit
    bad = over > tolerance
    return int(np.count_nonzero(bad)), float(over[bad].max()) / max(scale, 1e-12)


def _shortfall(values: FloatArray, limit: float, scale: float) -> tuple[int, float]:
    """`_excess(-values, -limit, scale)`: steps below `limit` and the worst shortfall."""
    return _excess(-values, -limit, scale)


# Efficiency conventions of the recomputed SoC, in the order of `_soc_paths`' rows.
_SOC_CONVENTIONS: Final = ("split_sqrt", "on_charge", "on_discharge")


@functools.lru_cache(maxsize=256)
def _efficiencies(efficiency: float) -> tuple[FloatArray, FloatArray]:
    """Charge and discharge efficiency (columns) of each of the _SOC_CONVENTIONS."""
    half = math.sqrt(efficiency)
    # round-trip efficiency split evenly (the emulator's), all on charge, all on discharge
    eta_c = np.array([[half], [efficiency], [1.0]])
    eta_d = np.array([[half], [1.0], [efficiency]])
    return _frozen(eta_c), _frozen(eta_d)


def _soc_paths(payload: StoragePayload, charge: FloatArray, discharge: FloatArray) -> FloatArray:
    """SoC recomputed from charge/discharge under the usual efficiency conventions, one row
    each (_SOC_CONVENTIONS)."""
    dt = payload.resolution_minutes / 60.0
    eta_c, eta_d = _efficiencies(payload.efficiency)
    steps = eta_c * charge * dt - discharge * dt / eta_d
    soc = np.add.accumulate(steps, axis=1)  # np.cumsum, less overhead
    return np.asarray(payload.soc_initial_kwh + soc, dtype=np.float64)


def detect_storage_result_anomalies(
    payload: StoragePayload, result: Mapping[str, Any], *, load_scale: float = 1.0
) -> list[Anomaly]:
    """A checked schedule whose reported SoC does not follow from its charge and discharge
    under any usual efficiency convention, or whose recomputed SoC leaves the battery's limits
    (the reported one is within them, or result_checks would have refused it)."""
    charge, discharge, soc = (
        _series(result, name) for name in ("charge_kw", "discharge_kw", "soc_kwh")
    )
    if soc.size == 0:
        return []
    cap = payload.capacity_kwh
    violations: dict[str, dict[str, Any]] = {}

    def note(name: str, steps: int, excess: float, **extra: Any) -> None:
        if steps:
            violations[name] = {"steps": steps, "worst_excess_fraction": _r(excess), **extra}

    paths = _soc_paths(payload, charge, discharge)
    errors = np.abs(paths - soc)
    largest: list[float] = errors.max(axis=1).tolist()
    error = min(largest)
    best = largest.index(error)  # the first of equally close conventions
    tol = SOC_TOLERANCE_FRACTION * cap
    if error > tol:
        note(
            "soc_inconsistent_with_schedule",
            int(np.count_nonzero(errors[best] > tol)),
            error / cap,
            closest_convention=_SOC_CONVENTIONS[best],
            max_abs_error_kwh=_r(error),
        )
    else:
        path = paths[best]
        note("recomputed_soc_above_max", *_excess(path, payload.soc_max_kwh, cap))
        note("recomputed_soc_below_min", *_shortfall(path, payload.soc_min_kwh, cap))
    if not violations:
        return []
    worst = max(v["worst_excess_fraction"] for v in violations.values())
    return [
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
    ]


# --------------------------------------------------------------------------- result: grid


def detect_grid_switch_result_anomalies(
    payload: GridSwitchPayload, result: Mapping[str, Any], *, load_scale: float = 1.0
) -> list[Anomaly]:
    """Load a checked dispatch leaves unserved."""
    loads = np.asarray(payload.load_forecast, dtype=np.float64)
    return _grid_switch_result_anomalies(payload, result, load_scale, loads)


def _grid_switch_result_anomalies(
    payload: GridSwitchPayload, result: Mapping[str, Any], load_scale: float, loads: FloatArray
) -> list[Anomaly]:
    """`detect_grid_switch_result_anomalies` given the load forecast as an array."""
    load = loads * load_scale
    if result.get("unserved_kw") is None:
        return []
    # result_checks holds supply + unserved to the load, so what is unserved is what is reported.
    unserved = _series(result, "unserved_kw")
    short = unserved > LIMIT_TOLERANCE * np.maximum(load, 1.0)
    steps = int(np.count_nonzero(short))
    if not steps:
        return []
    unserved_total, load_total = unserved.sum(), load.sum()
    share = float(unserved_total / load_total) if load_total > 0 else 1.0
    hours = payload.resolution_minutes / 60.0
    return [
        Anomaly(
            anomaly_type=GRID_UNSERVED_LOAD,
            severity=_grade(share, UNSERVED_MEDIUM, UNSERVED_HIGH, UNSERVED_CRITICAL),
            description=f"{share:.1%} of the load's energy is unserved over {steps} steps",
            suggested_actions=(
                "Arrange additional supply (imports, reserves) or demand response.",
                "Check source availability and capacities against the load forecast.",
            ),
            details={
                "steps": steps,
                "unserved_kwh": _r(float(unserved_total * hours)),
                "unserved_share": _r(share),
                "peak_unserved_kw": _r(float(unserved.max())),
                "load_scale": load_scale,
            },
        )
    ]


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
    if isinstance(recent, list | tuple):  # (the worker passes a tuple of up to 200)
        history = np.asarray(recent[-OP_WINDOW:], dtype=np.float64)
    else:
        history = np.asarray(recent, dtype=np.float64)[-OP_WINDOW:]
    if not _all_finite(history):
        history = history[np.isfinite(history)]
    if history.size < OP_MIN_SAMPLES:
        return None
    median = _median(history)
    ratio = current / median if median > 0 else (math.inf if current > 0 else 0.0)
    if ratio < OP_RATIO_LOW:
        return None  # the usual case, known before the spread is
    mad = _median(np.abs(history - median), overwrite=True)
    scale = max(MAD_TO_SIGMA * mad, OP_SCALE_FLOOR_FRACTION * abs(median), 1e-12)
    z = (current - median) / scale
    if z < OP_Z_THRESHOLD:
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


@dataclass(frozen=True)
class _RunInput:
    """A payload's load series as an array, converted once per run: a forecast's history (and
    its `_history_range`), else the load forecast."""

    payload: AnyPayload
    loads: FloatArray | None
    history: tuple[float, float, float] | None

    @classmethod
    def of(cls, payload: AnyPayload) -> _RunInput:
        if isinstance(payload, ForecastPayload):
            loads = np.asarray(payload.historical_loads, dtype=np.float64)
            return cls(payload, loads, _history_range(loads))
        if payload.load_forecast is None:
            return cls(payload, None, None)
        return cls(payload, np.asarray(payload.load_forecast, dtype=np.float64), None)


def _input_anomalies(run: _RunInput) -> list[Anomaly]:
    payload = run.payload
    if run.loads is None:
        return []
    if isinstance(payload, ForecastPayload):
        return detect_input_anomalies(
            run.loads, payload.resolution_minutes, field_name="historical_loads"
        )
    return detect_input_anomalies(
        run.loads,
        payload.resolution_minutes,
        field_name="load_forecast",
        measured=False,
    )


def _result_anomalies(
    run: _RunInput,
    result: Mapping[str, Any],
    load_scale: float = 1.0,
) -> list[Anomaly]:
    payload = run.payload
    if isinstance(payload, ForecastPayload):
        return _forecast_result_anomalies(result, run.history, load_scale)
    if isinstance(payload, StoragePayload):
        return detect_storage_result_anomalies(payload, result, load_scale=load_scale)
    loads = run.loads if run.loads is not None else np.asarray(payload.load_forecast, np.float64)
    return _grid_switch_result_anomalies(payload, result, load_scale, loads)


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
        run = _RunInput.of(request.payload.base.payload)
        anomalies += _input_anomalies(run)
        scales = {s.name: s.load_scale for s in request.payload.scenarios}
        for outcome in result["scenarios"]:
            name = outcome["name"]
            scale = scales[name]
            # Scenarios scale loads (never battery limits), as the QNN applies them.
            found = _result_anomalies(run, outcome["result"], scale)
            anomalies += [_in_scenario(a, name) for a in found]
    else:
        run = _RunInput.of(request.payload)
        anomalies += _input_anomalies(run)
        anomalies += _result_anomalies(run, result)
    for op in (
        detect_latency_anomaly(latency_ms, recent_latency_ms),
        detect_cost_anomaly(cost_usd, recent_cost_usd),
    ):
        if op is not None:
            anomalies.append(op)
    return anomalies
