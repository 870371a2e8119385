"""Forecast accuracy: completed forecast runs scored against the loads that actually happened.

Alignment. A forecast request's `forecast_date` is the first forecast day: its result's values are
`horizon` consecutive steps of `resolution_minutes` starting at `forecast_date` 00:00 (the
result's own `resolution_minutes` when it states one, else the request's). The actuals are the
`energy_datasets` rows of the run's region for every day the horizon touches. Days are calendar
days as the datasets define them; nothing is converted between time zones. Actuals finer than the
forecast are averaged down to its steps (four 15-minute values make one hourly value); coarser
ones cannot score it, and the run gets a score row with `n = 0` and a `note` saying so.

A run is scored once all its days are stored, and re-scored whenever any of those rows changes
(the score records the newest `updated_at` it saw). Metrics per run:

* MAPE, percent: mean |actual - forecast| / actual over the steps whose actual is non-zero;
* RMSE and MAE in MW; R² = 1 - SSE/SST against the mean of the actuals (NULL if they are flat);
* coverage: the fraction of actuals within [lower, upper] (NULL without an interval).

`model_metrics` rolls the per-run values up per (model, region): plain means over the runs whose
forecast dates lie in the last `ROLLUP_WINDOW_DAYS` days up to that key's newest scored date (not
up to today, so a replayed historical period still has a window).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any, Final

import asyncpg
import numpy as np
import orjson
import structlog
from numpy.typing import NDArray

from contracts.requests import MAX_STEPS, ForecastRequest
from worker.core.history import MINUTES_PER_DAY

log = structlog.get_logger(__name__)

ROLLUP_WINDOW_DAYS: Final = 28
SCORE_BATCH: Final = 200
# The longest horizon (MAX_STEPS hourly steps) spans this many days: a forecast made that many
# days before an imported day can still cover it.
MAX_SPAN_DAYS: Final = math.ceil(MAX_STEPS * 60 / MINUTES_PER_DAY)
# Serialises rollup writes between concurrent scorers; any constant shared by eglo processes.
ROLLUP_LOCK_KEY: Final = 0x6567_6C6F_5343  # "egloSC"
UNKNOWN_MODEL: Final = "unknown"

FloatArray = NDArray[np.float64]


# --- metrics (pure) ----------------------------------------------------------------------------


def _pair(actual: Sequence[float], predicted: Sequence[float]) -> tuple[FloatArray, FloatArray]:
    a = np.asarray(actual, dtype=np.float64)
    p = np.asarray(predicted, dtype=np.float64)
    if a.shape != p.shape or a.ndim != 1:
        raise ValueError(f"actual and predicted differ in length: {a.shape} vs {p.shape}")
    if a.size == 0:
        raise ValueError("nothing to score")
    return a, p


def mape(actual: Sequence[float], predicted: Sequence[float]) -> float | None:
    """Mean absolute percentage error in percent; steps with a zero actual are skipped."""
    a, p = _pair(actual, predicted)
    keep = a != 0
    if not keep.any():
        return None
    return float(np.mean(np.abs((a[keep] - p[keep]) / a[keep])) * 100.0)


def rmse(actual: Sequence[float], predicted: Sequence[float]) -> float:
    a, p = _pair(actual, predicted)
    return float(np.sqrt(np.mean((a - p) ** 2)))


def mae(actual: Sequence[float], predicted: Sequence[float]) -> float:
    a, p = _pair(actual, predicted)
    return float(np.mean(np.abs(a - p)))


def r2(actual: Sequence[float], predicted: Sequence[float]) -> float | None:
    """Coefficient of determination; None when the actuals are constant (no variance to explain)."""
    a, p = _pair(actual, predicted)
    sst = float(np.sum((a - a.mean()) ** 2))
    if sst == 0:
        return None
    return 1.0 - float(np.sum((a - p) ** 2)) / sst


def coverage(actual: Sequence[float], lower: Sequence[float], upper: Sequence[float]) -> float:
    """Fraction of actuals inside their [lower, upper] interval, bounds included."""
    a, lo = _pair(actual, lower)
    _, hi = _pair(actual, upper)
    return float(np.mean((a >= lo) & (a <= hi)))


@dataclass(frozen=True, slots=True)
class ForecastScore:
    n: int
    mape: float | None
    rmse: float | None
    mae: float | None
    r2: float | None
    coverage: float | None


def score_forecast(
    actual: Sequence[float],
    forecast: Sequence[float],
    lower: Sequence[float] | None = None,
    upper: Sequence[float] | None = None,
) -> ForecastScore:
    """Every metric for one aligned forecast."""
    interval = coverage(actual, lower, upper) if lower is not None and upper is not None else None
    return ForecastScore(
        n=len(actual),
        mape=mape(actual, forecast),
        rmse=rmse(actual, forecast),
        mae=mae(actual, forecast),
        r2=r2(actual, forecast),
        coverage=interval,
    )


class Unscorable(ValueError):
    """The stored actuals cannot be lined up with the forecast (the message says why)."""


def span_days(steps: int, resolution_minutes: int) -> int:
    """Calendar days a forecast of `steps` steps starting at 00:00 touches."""
    return max(1, math.ceil(steps * resolution_minutes / MINUTES_PER_DAY))


def align_actuals(
    forecast_date: date,
    steps: int,
    resolution_minutes: int,
    days: Mapping[date, tuple[int, Sequence[float]]],
) -> list[float]:
    """The actual load for each forecast step, from {day: (resolution, loads)} rows."""
    values: list[float] = []
    for i in range(span_days(steps, resolution_minutes)):
        day = forecast_date + timedelta(days=i)
        if day not in days:
            raise Unscorable(f"no actuals for {day}")
        res, loads = days[day]
        if resolution_minutes % res:
            raise Unscorable(
                f"actuals for {day} are at {res} minutes; they cannot score "
                f"{resolution_minutes}-minute steps"
            )
        if len(loads) * res != MINUTES_PER_DAY:
            raise Unscorable(f"actuals for {day} hold {len(loads)} values at {res} minutes")
        factor = resolution_minutes // res
        arr = np.asarray(loads, dtype=np.float64)
        if not np.isfinite(arr).all():
            raise Unscorable(f"actuals for {day} are not all finite")
        values.extend(arr.reshape(-1, factor).mean(axis=1).tolist())
    return values[:steps]


# --- scoring stored runs -----------------------------------------------------------------------

# One batch of runs to (re)score: completed forecasts whose every day has actuals and whose
# score is missing or was computed from other versions of those rows. Locked rows are skipped,
# so concurrent scorers split the work instead of computing the same scores twice;
# NO KEY UPDATE does not block the FOR KEY SHARE locks of inserts into child tables.
_CANDIDATES = """
SELECT r.id, r.region, r.forecast_date, coalesce(r.qnn_model_id, $6) AS model_id,
       r.result_payload, f.resolution, f.steps, a.actuals_updated_at
FROM optimization_runs r
CROSS JOIN LATERAL (
    SELECT coalesce((r.result_payload ->> 'resolution_minutes')::int,
                    (r.input_payload -> 'payload' ->> 'resolution_minutes')::int, 60) AS resolution,
           CASE WHEN jsonb_typeof(r.result_payload -> 'forecast') = 'array'
                THEN jsonb_array_length(r.result_payload -> 'forecast') END AS steps
) AS f
CROSS JOIN LATERAL (
    SELECT greatest(1, ceil(f.steps * f.resolution / 1440.0))::int AS days
) AS span
CROSS JOIN LATERAL (
    SELECT count(*) AS days, max(d.updated_at) AS actuals_updated_at
    FROM energy_datasets d
    WHERE d.region = r.region AND d.historical_loads IS NOT NULL
      AND d.data_date >= r.forecast_date AND d.data_date < r.forecast_date + span.days
) AS a
LEFT JOIN forecast_scores s ON s.run_id = r.id
WHERE r.request_type = 'forecast' AND r.status = 'completed'
  AND f.steps > 0
  AND ($1::text IS NULL OR r.region = $1)
  AND ($2::date[] IS NULL OR (
        r.forecast_date BETWEEN $3::date AND $4::date
        AND EXISTS (SELECT 1 FROM unnest($2::date[]) AS x(day)
                    WHERE x.day >= r.forecast_date AND x.day < r.forecast_date + span.days)))
  AND a.days = span.days
  AND (s.run_id IS NULL OR s.actuals_updated_at IS DISTINCT FROM a.actuals_updated_at)
LIMIT $5
FOR NO KEY UPDATE OF r SKIP LOCKED
"""

_ACTUALS = """
SELECT d.region, d.data_date, d.resolution_minutes, d.historical_loads
FROM energy_datasets d
JOIN unnest($1::text[], $2::date[]) AS k(region, data_date) USING (region, data_date)
"""

_UPSERT_SCORES = """
INSERT INTO forecast_scores AS s (
    run_id, region, model_id, forecast_date, resolution_minutes, n, mape, rmse, mae, r2,
    coverage, interval_level, actuals_updated_at, note, scored_at)
SELECT t.*, now()
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::date[], $5::int[], $6::int[],
            $7::float8[], $8::float8[], $9::float8[], $10::float8[], $11::float8[],
            $12::float8[], $13::timestamptz[], $14::text[])
     AS t(run_id, region, model_id, forecast_date, resolution_minutes, n, mape, rmse, mae, r2,
          coverage, interval_level, actuals_updated_at, note)
ON CONFLICT (run_id) DO UPDATE SET
    region = EXCLUDED.region, model_id = EXCLUDED.model_id,
    forecast_date = EXCLUDED.forecast_date, resolution_minutes = EXCLUDED.resolution_minutes,
    n = EXCLUDED.n, mape = EXCLUDED.mape, rmse = EXCLUDED.rmse, mae = EXCLUDED.mae,
    r2 = EXCLUDED.r2, coverage = EXCLUDED.coverage, interval_level = EXCLUDED.interval_level,
    actuals_updated_at = EXCLUDED.actuals_updated_at, note = EXCLUDED.note, scored_at = now()
-- A scorer whose snapshot predates another's commit of the same score (it locked the run right
-- after that commit released it) must not count or rewrite it.
WHERE s.actuals_updated_at IS DISTINCT FROM EXCLUDED.actuals_updated_at
RETURNING run_id
"""

# Recomputed from forecast_scores rather than updated incrementally, so a re-score or a deleted
# run can never leave the rollup drifting. Keys are written in a fixed order under a lock.
_REFRESH_ROLLUP = """
WITH keys AS (
    SELECT DISTINCT model_id, region FROM unnest($1::text[], $2::text[]) AS k(model_id, region)
), latest AS (
    SELECT s.model_id, s.region, max(s.forecast_date) AS last_date
    FROM forecast_scores s JOIN keys USING (model_id, region)
    WHERE s.n > 0
    GROUP BY s.model_id, s.region
), fresh AS (
    INSERT INTO model_metrics AS m (
        model_id, region, runs, mape, rmse, mae, r2, coverage, interval_level, window_days,
        window_start, window_end, updated_at)
    SELECT s.model_id, s.region, count(*), avg(s.mape), avg(s.rmse), avg(s.mae), avg(s.r2),
           avg(s.coverage), avg(s.interval_level), $3::int, min(s.forecast_date),
           max(s.forecast_date), now()
    FROM forecast_scores s JOIN latest l USING (model_id, region)
    WHERE s.n > 0 AND s.forecast_date > l.last_date - $3::int
    GROUP BY s.model_id, s.region
    ORDER BY s.model_id, s.region
    ON CONFLICT (model_id, region) DO UPDATE SET
        runs = EXCLUDED.runs, mape = EXCLUDED.mape, rmse = EXCLUDED.rmse, mae = EXCLUDED.mae,
        r2 = EXCLUDED.r2, coverage = EXCLUDED.coverage,
        interval_level = EXCLUDED.interval_level, window_days = EXCLUDED.window_days,
        window_start = EXCLUDED.window_start, window_end = EXCLUDED.window_end,
        updated_at = now()
    RETURNING m.model_id, m.region
)
DELETE FROM model_metrics m
USING keys k
WHERE m.model_id = k.model_id AND m.region = k.region
  AND NOT EXISTS (SELECT 1 FROM latest l WHERE l.model_id = m.model_id AND l.region = m.region)
"""

_ALL_KEYS = """
SELECT DISTINCT model_id, region FROM forecast_scores
UNION SELECT model_id, region FROM model_metrics
"""


@contextlib.asynccontextmanager
async def _connection(
    pool: asyncpg.Pool | asyncpg.Connection,
) -> AsyncIterator[asyncpg.Connection]:
    if isinstance(pool, asyncpg.Connection):
        yield pool
    else:
        async with pool.acquire() as conn:
            yield conn


def _floats(value: Any) -> list[float] | None:
    return [float(v) for v in value] if isinstance(value, list) else None


def _score_row(
    cand: asyncpg.Record, actuals: Mapping[tuple[str, date], tuple[int, Sequence[float]]]
) -> list[Any]:
    result = cand["result_payload"]
    if isinstance(result, str):
        result = orjson.loads(result)
    forecast = _floats(result.get("forecast")) or []
    lower, upper = _floats(result.get("lower")), _floats(result.get("upper"))
    if lower is not None and upper is not None and not len(lower) == len(upper) == len(forecast):
        lower = upper = None
    region, first = cand["region"], cand["forecast_date"]
    days = {
        d: actuals[(region, d)]
        for i in range(span_days(len(forecast), cand["resolution"]))
        if (region, d := first + timedelta(days=i)) in actuals
    }
    note: str | None = None
    score = ForecastScore(0, None, None, None, None, None)
    try:
        actual = align_actuals(first, len(forecast), cand["resolution"], days)
        score = score_forecast(actual, forecast, lower, upper)
    except Unscorable as exc:
        note = str(exc)
    level = result.get("interval_level") if lower is not None else None
    return [
        cand["id"],
        region,
        cand["model_id"],
        first,
        cand["resolution"],
        score.n,
        score.mape,
        score.rmse,
        score.mae,
        score.r2,
        score.coverage,
        float(level) if isinstance(level, int | float) else None,
        cand["actuals_updated_at"],
        note,
    ]


async def score_pending(
    pool: asyncpg.Pool | asyncpg.Connection,
    *,
    region: str | None = None,
    dates: Iterable[date] | None = None,
    batch: int = SCORE_BATCH,
) -> int:
    """Score every completed forecast whose actuals are all stored and whose score is missing
    or stale; then refresh the affected `model_metrics`. Returns the runs (re)scored.

    `region` / `dates` narrow the search to forecasts covering those days (what an import or a
    commit of new forecasts touched); without them every completed forecast is checked. Safe to
    run from several processes at once: each batch locks its runs and others skip them.
    """
    day_list = sorted(set(dates)) if dates is not None else None
    if day_list == []:
        return 0
    low = day_list[0] - timedelta(days=MAX_SPAN_DAYS) if day_list else None
    high = day_list[-1] if day_list else None
    scored = 0
    keys: set[tuple[str, str]] = set()
    async with _connection(pool) as conn:
        while True:
            async with conn.transaction():
                cands = await conn.fetch(
                    _CANDIDATES, region, day_list, low, high, batch, UNKNOWN_MODEL
                )
                if not cands:
                    break
                needed = {
                    (c["region"], c["forecast_date"] + timedelta(days=i))
                    for c in cands
                    for i in range(span_days(c["steps"], c["resolution"]))
                }
                rows = await conn.fetch(_ACTUALS, [k[0] for k in needed], [k[1] for k in needed])
                actuals = {
                    (r["region"], r["data_date"]): (
                        r["resolution_minutes"],
                        list(r["historical_loads"]),
                    )
                    for r in rows
                }
                score_rows = [_score_row(c, actuals) for c in cands]
                written = await conn.fetch(
                    _UPSERT_SCORES, *map(list, zip(*score_rows, strict=True))
                )
            scored += len(written)
            keys.update((c["model_id"], c["region"]) for c in cands)
        if keys:
            await refresh_model_metrics(conn, keys)
    return scored


async def refresh_model_metrics(
    pool: asyncpg.Pool | asyncpg.Connection, keys: Collection[tuple[str, str]] | None = None
) -> None:
    """Recompute the rollups of (model_id, region) keys (all keys if None); drop emptied ones."""
    async with _connection(pool) as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", ROLLUP_LOCK_KEY)
        if keys is None:
            keys = [(r["model_id"], r["region"]) for r in await conn.fetch(_ALL_KEYS)]
        ordered = sorted(keys)
        await conn.execute(
            _REFRESH_ROLLUP,
            [k[0] for k in ordered],
            [k[1] for k in ordered],
            ROLLUP_WINDOW_DAYS,
        )


# --- reading -----------------------------------------------------------------------------------

_REPORT = """
SELECT s.model_id, s.region, count(*)::int AS runs, sum(s.n)::int AS steps,
       min(s.forecast_date) AS first_date, max(s.forecast_date) AS last_date,
       avg(s.mape) AS mape,
       percentile_cont(0.9) WITHIN GROUP (ORDER BY s.mape) AS p90_mape,
       avg(s.rmse) AS rmse, avg(s.mae) AS mae, avg(s.r2) AS r2,
       avg(s.coverage) AS coverage, avg(s.interval_level) AS interval_level,
       m.mape AS window_mape, m.window_days,
       (SELECT count(*) FROM forecast_scores u
        WHERE u.model_id = s.model_id AND u.region = s.region AND u.n = 0)::int AS unscorable
FROM forecast_scores s
LEFT JOIN model_metrics m ON m.model_id = s.model_id AND m.region = s.region
WHERE s.n > 0 AND ($1::text IS NULL OR s.region = $1) AND ($2::text IS NULL OR s.model_id = $2)
GROUP BY s.model_id, s.region, m.mape, m.window_days
ORDER BY s.region, avg(s.mape) NULLS LAST, s.model_id
"""


async def accuracy_report(
    pool: asyncpg.Pool | asyncpg.Connection, region: str | None = None, model: str | None = None
) -> list[asyncpg.Record]:
    """Per (model, region), over every scored run: means of the per-run metrics, p90 MAPE, and
    the rolling-window MAPE from model_metrics."""
    return list(await pool.fetch(_REPORT, region, model))


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_accuracy(rows: Sequence[asyncpg.Record] | Sequence[Mapping[str, Any]]) -> str:
    """The report as a fixed-width table (MAPE in percent, RMSE/MAE in MW)."""
    header = (
        f"{'model':<28} {'region':<16} {'runs':>5} {'from':<10} {'to':<10} {'MAPE %':>7} "
        f"{'p90 %':>7} {'RMSE MW':>9} {'MAE MW':>9} {'R²':>6} {'cover':>6} {'nominal':>7} "
        f"{'window MAPE %':>14}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        window = (
            f"{r['window_mape']:.2f} ({r['window_days']}d)" if r["window_mape"] is not None else "-"
        )
        lines.append(
            f"{r['model_id'][:28]:<28} {r['region'][:16]:<16} {r['runs']:>5} "
            f"{r['first_date']!s:<10} {r['last_date']!s:<10} {_fmt(r['mape'], '.2f'):>7} "
            f"{_fmt(r['p90_mape'], '.2f'):>7} {_fmt(r['rmse'], ',.1f'):>9} "
            f"{_fmt(r['mae'], ',.1f'):>9} {_fmt(r['r2'], '.3f'):>6} "
            f"{_fmt(r['coverage'], '.3f'):>6} {_fmt(r['interval_level'], '.2f'):>7} "
            f"{window:>14}"
        )
    if not rows:
        lines.append("(no scored forecasts yet: import actuals with `eglo datasets import`)")
    return "\n".join(lines)


_ROLLING = """
SELECT model_id, region, mape FROM model_metrics
WHERE mape IS NOT NULL
ORDER BY runs DESC, model_id, region
LIMIT $1
"""


async def rolling_mape(
    pool: asyncpg.Pool | asyncpg.Connection, limit: int = 50
) -> list[tuple[str, str, float]]:
    """(model_id, region, window MAPE %) for the `limit` busiest keys: a bounded label set for a
    Prometheus gauge such as `eglo_forecast_mape_percent{model_id, region}`."""
    return [
        (r["model_id"], r["region"], float(r["mape"])) for r in await pool.fetch(_ROLLING, limit)
    ]


class BackgroundScorer:
    """Scores forecasts as the worker completes them, off the ack path.

    Completed forecasts only note their (region, days); a loop scores what has gathered every
    `interval_s` (one query per region instead of one per run) and refreshes the MAPE gauge.
    Scoring again when actuals arrive later is `eglo datasets import`'s job.
    """

    def __init__(
        self, pool: asyncpg.Pool, gauge: Any, *, limit: int, interval_s: float = 2.0
    ) -> None:
        self._pool = pool
        self._gauge = gauge
        self._limit = limit
        self._interval_s = interval_s
        self._pending: dict[str, set[date]] = {}

    def note(self, request: ForecastRequest) -> None:
        """A forecast completed: score it once actuals for its days are stored."""
        payload = request.payload
        days = self._pending.setdefault(request.region, set())
        days.update(
            request.forecast_date + timedelta(days=i)
            for i in range(span_days(payload.horizon_steps, payload.resolution_minutes))
        )

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.score_now()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - scoring is best effort, retried next round
                log.warning("scoring.failed", error=repr(exc)[:200])

    async def score_now(self) -> int:
        pending, self._pending = self._pending, {}
        scored = 0
        for region, days in pending.items():
            scored += await score_pending(self._pool, region=region, dates=days)
        for model_id, region, value in await rolling_mape(self._pool, self._limit):
            self._gauge.labels(model_id=model_id, region=region).set(value)
        return scored
