"""Forecast scoring: metrics on hand-computed cases, alignment, score_pending and the rollup."""

from __future__ import annotations

import asyncio
import math
import uuid
from datetime import timedelta

import asyncpg
import pytest

from tests.support.runs import (
    DAY,
    REGION,
    clean,
    forecast_result,
    hourly,
    import_days,
    insert_run,
)
from worker.analytics.accuracy import (
    ROLLUP_WINDOW_DAYS,
    Unscorable,
    accuracy_report,
    align_actuals,
    coverage,
    format_accuracy,
    mae,
    mape,
    r2,
    refresh_model_metrics,
    rmse,
    rolling_mape,
    score_forecast,
    score_pending,
)


async def score_of(pool: asyncpg.Pool, run_id: uuid.UUID) -> asyncpg.Record | None:
    return await pool.fetchrow("SELECT * FROM forecast_scores WHERE run_id = $1", run_id)


# --- pure metrics --------------------------------------------------------------------------

ACTUAL = [100.0, 200.0, 0.0, 400.0]
PREDICTED = [110.0, 180.0, 5.0, 400.0]


def test_metrics_on_a_hand_computed_case() -> None:
    """Errors -10, +20, -5, 0 against actuals 100, 200, 0, 400."""
    # MAPE skips the zero actual: (10/100 + 20/200 + 0/400) / 3.
    assert mape(ACTUAL, PREDICTED) == pytest.approx(20 / 3)
    assert rmse(ACTUAL, PREDICTED) == pytest.approx(math.sqrt((100 + 400 + 25 + 0) / 4))
    assert mae(ACTUAL, PREDICTED) == pytest.approx(35 / 4)
    # mean 175: SST = 75² + 25² + 175² + 225² = 87500; SSE = 525.
    assert r2(ACTUAL, PREDICTED) == pytest.approx(1 - 525 / 87500)
    assert coverage(ACTUAL, [100, 190, 1, 390], [105, 199, 2, 400]) == 0.5  # bounds count
    score = score_forecast(ACTUAL, PREDICTED, [0] * 4, [1000] * 4)
    assert score.n == 4 and score.coverage == 1.0
    assert score_forecast(ACTUAL, PREDICTED).coverage is None


def test_metric_edge_cases() -> None:
    """All-zero actuals have no MAPE, flat actuals no R², and lengths must match."""
    assert mape([0.0, 0.0], [1.0, 2.0]) is None
    assert r2([5.0, 5.0, 5.0], [4.0, 5.0, 6.0]) is None
    assert r2([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == 1.0
    assert r2([1.0, 2.0, 3.0], [2.0, 2.0, 2.0]) == 0.0  # the mean scores zero
    with pytest.raises(ValueError, match="differ in length"):
        rmse([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="nothing to score"):
        mae([], [])


def test_align_actuals_spans_days_and_averages_finer_data() -> None:
    """A 30-hour hourly forecast takes day one and the first 6 hours of day two."""
    days = {
        DAY: (15, [float(i // 4) for i in range(96)]),  # hourly means 0..23 (+ fractional zero)
        DAY + timedelta(days=1): (60, [100.0 + h for h in range(24)]),
    }
    values = align_actuals(DAY, 30, 60, days)
    assert values == [float(h) for h in range(24)] + [100.0 + h for h in range(6)]
    with pytest.raises(Unscorable, match="no actuals for 2025-06-03"):
        align_actuals(DAY, 49, 60, days)
    with pytest.raises(Unscorable, match="cannot score 30-minute steps"):
        align_actuals(DAY + timedelta(days=1), 48, 30, days)


# --- stored runs -----------------------------------------------------------------------------




async def test_score_pending_actuals_first(pool: asyncpg.Pool) -> None:
    """Actuals already stored: the next score_pending scores the new forecast exactly."""
    await clean(pool)
    actual = hourly(0)
    await import_days(pool, {DAY: actual})
    forecast = [v * 1.02 for v in actual]
    lower = [v - 30 for v in forecast]
    upper = [v + 30 for v in forecast]
    result = forecast_result(forecast, lower, upper)
    run_id = await insert_run(pool, forecast_date=DAY, result=result)
    assert await score_pending(pool, region=REGION, dates=[DAY]) == 1
    row = await score_of(pool, run_id)
    assert row is not None
    assert row["n"] == 24 and row["model_id"] == "qnn-a" and row["note"] is None
    assert row["mape"] == pytest.approx(2.0)
    assert row["mae"] == pytest.approx(mae(actual, forecast))
    assert row["rmse"] == pytest.approx(rmse(actual, forecast))
    assert row["r2"] == pytest.approx(r2(actual, forecast))
    assert row["coverage"] == pytest.approx(coverage(actual, lower, upper))
    assert row["interval_level"] == 0.9
    assert await score_pending(pool) == 0  # nothing left


async def test_score_pending_forecast_first(pool: asyncpg.Pool) -> None:
    """A forecast stored before its actuals is scored once they arrive, not before."""
    await clean(pool)
    actual = hourly(1)
    run_id = await insert_run(pool, forecast_date=DAY, result=forecast_result(actual))
    assert await score_pending(pool) == 0
    assert await score_of(pool, run_id) is None
    await import_days(pool, {DAY: actual})
    assert await score_pending(pool, dates=[DAY]) == 1
    row = await score_of(pool, run_id)
    assert row is not None and row["mape"] == 0.0 and row["r2"] == 1.0 and row["coverage"] is None


async def test_multi_day_forecast_waits_for_every_day(pool: asyncpg.Pool) -> None:
    """A 36-hour forecast is scored only when both days are stored; the import of day two finds
    it through the dates filter."""
    await clean(pool)
    day2 = DAY + timedelta(days=1)
    actual = hourly(0) + hourly(1)[:12]
    run_id = await insert_run(pool, forecast_date=DAY, result=forecast_result(actual))
    await import_days(pool, {DAY: hourly(0)})
    assert await score_pending(pool, dates=[DAY]) == 0
    await import_days(pool, {day2: hourly(1)})
    assert await score_pending(pool, region="Elsewhere", dates=[day2]) == 0
    assert await score_pending(pool, region=REGION, dates=[day2]) == 1
    row = await score_of(pool, run_id)
    assert row is not None and row["n"] == 36 and row["mape"] == 0.0


async def test_updated_actuals_trigger_a_rescore(pool: asyncpg.Pool) -> None:
    """Changing the stored actuals re-scores the forecast; re-importing identical ones doesn't."""
    await clean(pool)
    actual = hourly(2)
    run_id = await insert_run(pool, forecast_date=DAY, result=forecast_result(actual))
    await import_days(pool, {DAY: actual})
    assert await score_pending(pool) == 1
    await import_days(pool, {DAY: actual})
    assert await score_pending(pool) == 0
    corrected = [v * 1.1 for v in actual]
    await import_days(pool, {DAY: corrected})
    assert await score_pending(pool, dates=[DAY]) == 1
    row = await score_of(pool, run_id)
    assert row is not None
    assert row["mape"] == pytest.approx(mape(corrected, actual))
    assert await pool.fetchval("SELECT count(*) FROM forecast_scores") == 1


async def test_unscorable_runs_get_a_note_once(pool: asyncpg.Pool) -> None:
    """Hourly actuals cannot score a 30-minute forecast: one n=0 row with a note, not a loop."""
    await clean(pool)
    run_id = await insert_run(
        pool, forecast_date=DAY, result=forecast_result([1000.0] * 48, resolution=30)
    )
    await import_days(pool, {DAY: hourly(0)})
    assert await score_pending(pool) == 1
    assert await score_pending(pool) == 0
    row = await score_of(pool, run_id)
    assert row is not None and row["n"] == 0 and "cannot score 30-minute" in row["note"]
    assert await pool.fetchval("SELECT count(*) FROM model_metrics") == 0


async def test_only_completed_forecasts_are_scored(pool: asyncpg.Pool) -> None:
    """Failed forecasts and other request types are left alone."""
    await clean(pool)
    await import_days(pool, {DAY: hourly(0)})
    await insert_run(pool, forecast_date=DAY, result={}, status="failed")
    await insert_run(
        pool,
        forecast_date=DAY,
        request_type="grid_switch",
        result={"dispatch_kw": {"grid": [1.0] * 24}},
        payload={
            "load_forecast": [1.0] * 24,
            "sources": [{"name": "grid", "kind": "grid", "capacity_kw": 10, "cost_per_kwh": 1}],
        },
    )
    assert await score_pending(pool) == 0


async def test_model_metrics_rollup(pool: asyncpg.Pool) -> None:
    """The rollup holds the mean of per-run metrics over the trailing window, per model/region."""
    await clean(pool)
    days = {DAY + timedelta(days=i): hourly(i) for i in range(40)}
    await import_days(pool, days)
    errors = {"qnn-a": 0.02, "qnn-b": 0.05}
    for i, (day, actual) in enumerate(days.items()):
        for model, err in errors.items():
            # Alternate over- and under-forecasting; runs get older as i shrinks.
            sign = 1 if i % 2 else -1
            forecast = [v * (1 + sign * err * (1 + i / 100)) for v in actual]
            await insert_run(
                pool, forecast_date=day, model_id=model, result=forecast_result(forecast)
            )
    await insert_run(pool, forecast_date=DAY, model_id=None, result=forecast_result(hourly(0)))
    assert await score_pending(pool) == 81
    metrics = {
        r["model_id"]: r for r in await pool.fetch("SELECT * FROM model_metrics ORDER BY 1")
    }
    assert set(metrics) == {"qnn-a", "qnn-b", "unknown"}
    last = DAY + timedelta(days=39)
    for model, err in errors.items():
        m = metrics[model]
        in_window = [i for i in range(40) if i > 39 - ROLLUP_WINDOW_DAYS]
        assert m["runs"] == len(in_window) == ROLLUP_WINDOW_DAYS
        assert m["window_end"] == last
        assert m["window_start"] == last - timedelta(days=ROLLUP_WINDOW_DAYS - 1)
        expected = sum(100 * err * (1 + i / 100) for i in in_window) / len(in_window)
        assert m["mape"] == pytest.approx(expected)
    report = await accuracy_report(pool, region=REGION)
    by_model = {r["model_id"]: r for r in report}
    assert by_model["qnn-a"]["runs"] == 40
    assert by_model["qnn-a"]["mape"] < by_model["qnn-b"]["mape"]
    assert [r["model_id"] for r in report][:2] == ["unknown", "qnn-a"]  # best MAPE first
    table = format_accuracy(report)
    assert "qnn-b" in table and "MAPE %" in table
    assert [r["model_id"] for r in await accuracy_report(pool, model="qnn-b")] == ["qnn-b"]
    gauge = await rolling_mape(pool, limit=2)
    assert len(gauge) == 2 and {g[0] for g in gauge} == {"qnn-a", "qnn-b"}


async def test_rollup_drops_keys_whose_scores_are_gone(pool: asyncpg.Pool) -> None:
    """After the scored runs are deleted (retention), refreshing removes the rollup row."""
    await clean(pool)
    await import_days(pool, {DAY: hourly(0)})
    await insert_run(pool, forecast_date=DAY, result=forecast_result(hourly(0)))
    await score_pending(pool)
    assert await pool.fetchval("SELECT count(*) FROM model_metrics") == 1
    await pool.execute("DELETE FROM optimization_runs")
    await refresh_model_metrics(pool)
    assert await pool.fetchval("SELECT count(*) FROM model_metrics") == 0
    assert format_accuracy(await accuracy_report(pool)).endswith("`eglo datasets import`)")


async def test_concurrent_scorers_split_the_work(pool: asyncpg.Pool) -> None:
    """Several score_pending calls at once score every run exactly once between them."""
    await clean(pool)
    days = {DAY + timedelta(days=i): hourly(i) for i in range(10)}
    await import_days(pool, days)
    for day, actual in days.items():
        for k in range(6):
            await insert_run(
                pool, forecast_date=day, model_id=f"m{k % 2}", result=forecast_result(actual)
            )
    counts = await asyncio.gather(*(score_pending(pool, batch=7) for _ in range(4)))
    assert sum(counts) == 60
    assert await pool.fetchval("SELECT count(*) FROM forecast_scores") == 60
    assert await pool.fetchval("SELECT sum(runs) FROM model_metrics") == 60
