"""Precision and recall of the input anomaly detectors on real electricity demand (not a test).

    python -m benchmarks.anomaly_quality [--windows 400] [--seed 20240601]

Data: `pmdarima.datasets.load_taylor()`, 4032 half-hourly readings of England & Wales electricity
demand in MW from Monday 2000-06-05 (12 weeks), shipped inside the pmdarima package. The hourly
variant averages consecutive pairs of readings.

Method: cut random windows of 7-14 whole days (what the worker sees as `historical_loads`). Each
window is scored twice: clean, where every detection is a false positive, and with 1-3 labelled
anomalies injected at random, non-overlapping positions (at least 6 hours apart):

* spike: 1.5 h at most, readings multiplied by 1 + U(0.15, 0.40);
* drop: 2 h at most, readings multiplied by 1 - U(0.15, 0.40);
* flatline: U(3, 8) hours of readings stuck at the value just before the span;
* zero run: up to 3 h of zero readings.

A detection is a true positive if its span overlaps an injected span of the same type, otherwise
a false positive (also when it overlaps an injection of another type). Recall counts injected
spans with at least one true-positive detection.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from worker.core.anomalies import (
    INPUT_DROP,
    INPUT_FLATLINE,
    INPUT_SPIKE,
    INPUT_ZERO_RUN,
    SeriesEvent,
    find_input_events,
)

FloatArray = NDArray[np.float64]

TYPES = (INPUT_SPIKE, INPUT_DROP, INPUT_FLATLINE, INPUT_ZERO_RUN)
MIN_DAYS, MAX_DAYS = 7, 14
MAGNITUDE = (0.15, 0.40)  # spikes and drops, fraction of the local reading
SPIKE_MAX_HOURS = 1.5
DROP_MAX_HOURS = 2.0
FLATLINE_HOURS = (3.0, 8.0)
ZERO_MAX_HOURS = 3.0
SEPARATION_HOURS = 6.0
DEFAULT_WINDOWS = 1000
DEFAULT_SEED = 20240601


@dataclass(frozen=True)
class Injection:
    anomaly_type: str
    start: int
    end: int  # inclusive
    magnitude: float  # relative change for spikes/drops, hours for flatlines and zero runs


@dataclass
class Tally:
    """Detections and injections per anomaly type."""

    true_positives: Counter[str] = field(default_factory=Counter)
    false_positives: Counter[str] = field(default_factory=Counter)
    injected: Counter[str] = field(default_factory=Counter)
    found: Counter[str] = field(default_factory=Counter)
    clean_windows: int = 0
    clean_windows_flagged: int = 0
    seconds: list[float] = field(default_factory=list)
    missed: list[Injection] = field(default_factory=list)

    def precision(self, kind: str) -> float:
        flagged = self.true_positives[kind] + self.false_positives[kind]
        return self.true_positives[kind] / flagged if flagged else 1.0

    def recall(self, kind: str) -> float:
        return self.found[kind] / self.injected[kind] if self.injected[kind] else 1.0


def taylor_series(resolution_minutes: int = 30) -> FloatArray:
    """The Taylor demand series at 30-minute or (pair-averaged) 60-minute resolution."""
    from pmdarima.datasets import load_taylor

    y = np.asarray(load_taylor(), dtype=np.float64)
    if resolution_minutes == 30:
        return y
    if resolution_minutes == 60:
        return np.asarray(y.reshape(-1, 2).mean(axis=1), dtype=np.float64)
    raise ValueError("resolution_minutes must be 30 or 60")


def _steps(hours: float, resolution_minutes: int) -> int:
    return max(1, round(hours * 60.0 / resolution_minutes))


def random_window(
    series: FloatArray, resolution_minutes: int, rng: np.random.Generator
) -> FloatArray:
    per_day = 1440 // resolution_minutes
    length = int(rng.integers(MIN_DAYS, MAX_DAYS + 1)) * per_day
    start = int(rng.integers(0, len(series) - length + 1))
    return series[start : start + length].copy()


def inject(
    window: FloatArray, resolution_minutes: int, rng: np.random.Generator
) -> tuple[FloatArray, list[Injection]]:
    """A copy of `window` with 1-3 labelled anomalies at random non-overlapping positions."""
    y = window.copy()
    n = len(y)
    gap = _steps(SEPARATION_HOURS, resolution_minutes)
    taken = np.zeros(n, dtype=bool)
    injections: list[Injection] = []
    for _ in range(int(rng.integers(1, 4))):
        kind = TYPES[int(rng.integers(len(TYPES)))]
        if kind == INPUT_SPIKE:
            length = int(rng.integers(1, _steps(SPIKE_MAX_HOURS, resolution_minutes) + 1))
            magnitude = float(rng.uniform(*MAGNITUDE))
        elif kind == INPUT_DROP:
            length = int(rng.integers(1, _steps(DROP_MAX_HOURS, resolution_minutes) + 1))
            magnitude = float(rng.uniform(*MAGNITUDE))
        elif kind == INPUT_FLATLINE:
            magnitude = float(rng.uniform(*FLATLINE_HOURS))
            length = _steps(magnitude, resolution_minutes)
        else:
            length = int(rng.integers(1, _steps(ZERO_MAX_HOURS, resolution_minutes) + 1))
            magnitude = length * resolution_minutes / 60.0
        for _attempt in range(50):
            start = int(rng.integers(1, n - length + 1))
            lo, hi = max(0, start - gap), min(n, start + length + gap)
            if not taken[lo:hi].any():
                break
        else:
            continue
        taken[start : start + length] = True
        end = start + length - 1
        if kind == INPUT_SPIKE:
            y[start : end + 1] *= 1.0 + magnitude
        elif kind == INPUT_DROP:
            y[start : end + 1] *= 1.0 - magnitude
        elif kind == INPUT_FLATLINE:
            y[start : end + 1] = y[start - 1]
        else:
            y[start : end + 1] = 0.0
        injections.append(Injection(kind, start, end, magnitude))
    return y, injections


def _overlaps(event: SeriesEvent, injection: Injection) -> bool:
    return event.start <= injection.end and injection.start <= event.end


def _score(
    window: FloatArray, resolution_minutes: int, injections: Sequence[Injection], tally: Tally
) -> list[SeriesEvent]:
    started = time.perf_counter()
    events = find_input_events(window, resolution_minutes)
    tally.seconds.append(time.perf_counter() - started)
    for event in events:
        hit = any(
            inj.anomaly_type == event.anomaly_type and _overlaps(event, inj) for inj in injections
        )
        (tally.true_positives if hit else tally.false_positives)[event.anomaly_type] += 1
    for inj in injections:
        tally.injected[inj.anomaly_type] += 1
        if any(e.anomaly_type == inj.anomaly_type and _overlaps(e, inj) for e in events):
            tally.found[inj.anomaly_type] += 1
        else:
            tally.missed.append(inj)
    return events


def evaluate(
    windows: int = DEFAULT_WINDOWS, seed: int = DEFAULT_SEED, resolution_minutes: int = 30
) -> Tally:
    """Score `windows` clean and `windows` injected windows of the Taylor series."""
    series = taylor_series(resolution_minutes)
    rng = np.random.default_rng([seed, resolution_minutes])
    tally = Tally()
    for _ in range(windows):
        window = random_window(series, resolution_minutes, rng)
        before = sum(tally.false_positives.values())
        _score(window, resolution_minutes, (), tally)
        tally.clean_windows += 1
        tally.clean_windows_flagged += sum(tally.false_positives.values()) > before
        injected, injections = inject(window, resolution_minutes, rng)
        _score(injected, resolution_minutes, injections, tally)
    return tally


def format_table(results: dict[int, Tally]) -> str:
    """A markdown table: per resolution and type, counts, precision and recall."""
    lines = [
        "| resolution | type | injected | found | detections | false positives "
        "| precision | recall |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for resolution, tally in results.items():
        for kind in TYPES:
            detections = tally.true_positives[kind] + tally.false_positives[kind]
            lines.append(
                f"| {resolution} min | {kind} | {tally.injected[kind]} | {tally.found[kind]} "
                f"| {detections} | {tally.false_positives[kind]} "
                f"| {tally.precision(kind):.3f} | {tally.recall(kind):.3f} |"
            )
    return "\n".join(lines)


def _recall_by_magnitude(tally: Tally) -> str:
    bins = ((0.15, 0.20), (0.20, 0.30), (0.30, 0.40))
    missed = Counter(
        (m.anomaly_type, lo)
        for m in tally.missed
        for lo, hi in bins
        if m.anomaly_type in (INPUT_SPIKE, INPUT_DROP) and lo <= m.magnitude < hi
    )
    parts = []
    for kind in (INPUT_SPIKE, INPUT_DROP):
        parts.append(
            f"{kind} misses by magnitude: "
            + ", ".join(f"{lo:.0%}-{hi:.0%}: {missed[(kind, lo)]}" for lo, hi in bins)
        )
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--windows", type=int, default=DEFAULT_WINDOWS)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)
    results = {res: evaluate(args.windows, args.seed, res) for res in (30, 60)}
    print(
        f"Taylor (pmdarima) England & Wales demand, {args.windows} clean + {args.windows} "
        f"injected windows of {MIN_DAYS}-{MAX_DAYS} days per resolution, seed {args.seed}\n"
    )
    print(format_table(results))
    print()
    for resolution, tally in results.items():
        print(
            f"{resolution} min: clean windows with any detection "
            f"{tally.clean_windows_flagged}/{tally.clean_windows}"
        )
        print(_recall_by_magnitude(tally))
    print()
    print(timing_table())


def timing_table(calls: int = 200, seed: int = DEFAULT_SEED) -> str:
    """Wall time of `find_input_events` on 7- and 14-day half-hourly windows, clean and injected."""
    series = taylor_series(30)
    rng = np.random.default_rng([seed, 7])
    lines = ["| readings | window | median ms | p95 ms |", "| ---: | --- | ---: | ---: |"]
    for days in (7, 14):
        clean: list[float] = []
        injected: list[float] = []
        for _ in range(calls):
            start = int(rng.integers(0, len(series) - days * 48 + 1))
            window = series[start : start + days * 48].copy()
            for target, values in ((clean, window), (injected, inject(window, 30, rng)[0])):
                started = time.perf_counter()
                find_input_events(values, 30)
                target.append((time.perf_counter() - started) * 1000.0)
        for label, ms in (("clean", clean), ("with 1-3 anomalies", injected)):
            lines.append(
                f"| {days * 48} | {label} | {np.median(ms):.3f} | {np.percentile(ms, 95):.3f} |"
            )
    return "\n".join(lines)

if __name__ == "__main__":
    main()
