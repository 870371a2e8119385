"""Forecasts that name a stored period (dataset_ref) instead of carrying their history."""

from __future__ import annotations

import math
from datetime import date, timedelta
from typing import Any

import asyncpg

from producers.publisher import Publisher
from producers.reader import parse_request
from tests.support.harness import make_settings, running_worker, wait_for

START = date(2025, 3, 3)


async def _store_days(pool: asyncpg.Pool, region: str, days: int) -> list[float]:
    history: list[float] = []
    for d in range(days):
        loads = [1000 + 300 * math.sin((h - 6) / 24 * 2 * math.pi) for h in range(24)]
        history += loads
        await pool.execute(
            "INSERT INTO energy_datasets (region, data_date, resolution_minutes, historical_loads)"
            " VALUES ($1, $2, 60, $3)", region, START + timedelta(days=d), loads)
    return history


def _request(request_id: str, region: str, days: int) -> dict[str, Any]:
    return {
        "request_id": request_id, "request_type": "forecast", "region": region,
        "forecast_date": (START + timedelta(days=days)).isoformat(),
        "payload": {
            "dataset_ref": {"region": region, "start_date": START.isoformat(),
                            "end_date": (START + timedelta(days=days - 1)).isoformat()},
            "resolution_minutes": 60, "horizon_steps": 24,
        },
    }


async def test_history_is_loaded_from_energy_datasets(
    amqp_url: str, database_url: str, pool: asyncpg.Pool, emulator: str
) -> None:
    """The worker fills historical_loads from the stored days; a missing period is a failed run."""
    history = await _store_days(pool, "Testland", 7)
    async with running_worker(make_settings(amqp_url, database_url, emulator)), \
            Publisher.connect(amqp_url) as publisher:
        await publisher.publish(parse_request(_request("by-ref", "Testland", 7)))
        await publisher.publish(parse_request(_request("no-data", "Nowhere", 3)))
        await wait_for(lambda: pool.fetchval("SELECT count(*) = 2 FROM optimization_runs"))
    runs = {r["request_id"]: r for r in await pool.fetch("SELECT * FROM optimization_runs")}
    assert runs["by-ref"]["status"] == "completed"
    stored = runs["by-ref"]["input_payload"]["payload"]
    assert stored["historical_loads"] == history
    assert stored["dataset_ref"]["region"] == "Testland"
    assert len(runs["by-ref"]["result_payload"]["forecast"]) == 24
    assert (runs["no-data"]["status"], runs["no-data"]["error_code"]) == (
        "failed", "dataset_not_found")


async def test_completed_forecast_is_scored_against_stored_actuals(
    amqp_url: str, database_url: str, pool: asyncpg.Pool, emulator: str
) -> None:
    """Actuals already stored: the worker scores the forecast soon after it completes."""
    from tests.support.harness import metric

    history = await _store_days(pool, "Scoreland", 8)  # 7 days of history + the actual day
    doc = _request("scored", "Scoreland", 7)
    doc["payload"] = {"historical_loads": history[: 7 * 24], "resolution_minutes": 60,
                      "horizon_steps": 24}
    settings = make_settings(amqp_url, database_url, emulator)
    async with running_worker(settings) as worker, Publisher.connect(amqp_url) as publisher:
        await publisher.publish(parse_request(doc))
        score = await wait_for(lambda: pool.fetchrow("SELECT * FROM forecast_scores"),
                               within_s=30)
        samples = await wait_for(lambda: _gauge_present(worker.metrics_port or 0), within_s=30)
    assert score["n"] == 24 and score["mape"] is not None
    assert score["mape"] < 10  # a clean sine day is easy to forecast
    assert metric(samples, "eglo_forecast_mape_percent", region="Scoreland") == score["mape"]


async def _gauge_present(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float] | None:
    from tests.support.harness import scrape

    samples = await scrape(port)
    has = any(name == "eglo_forecast_mape_percent" for name, _ in samples)
    return samples if has else None
