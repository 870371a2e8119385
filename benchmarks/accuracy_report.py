"""Forecast accuracy on real electricity demand, through eglo's own import and scoring (not a test).

    python -m benchmarks.accuracy_report [--mode worker|direct] [--history-days 28] [--plot PNG]

Data: `pmdarima.datasets.load_taylor()`, 4032 half-hourly readings of England & Wales electricity
demand in MW from Monday 2000-06-05 (84 days), shipped inside the pmdarima package. It is imported
with `worker.ops.datasets.import_datasets` as 84 `energy_datasets` rows (region "England-Wales",
30-minute resolution) into a scratch database on the configured (or embedded) Postgres.

Forecasts, one per day from day 15 (2000-06-19) to day 84 (2000-08-27), 70 days, each 48 steps
(the whole next day) from the preceding `--history-days` days:

* the QNN emulator, started in-process, asked for a forecast request that carries only a
  `dataset_ref` to the stored days:
  - `--mode worker` (default): the requests are published to RabbitMQ (the local broker, in a
    vhost of their own, or EGLO_AMQP_URL) and a real eglo worker, running in this process,
    resolves the reference from `energy_datasets`, calls the emulator (mode "quantum",
    optimization_level 1) and stores the runs as in production;
  - `--mode direct` (no broker needed): the same request is resolved by
    `worker.runtime.history.resolve_request`, sent to `POST /api/v1/predictions/predict` as
    `contracts.qnn.build_predict_body` builds it, parsed with `parse_predict_response`, checked
    with `worker.core.result_checks.check_result`, and the completed run is inserted directly;
* two baselines stored the same way, to judge the numbers against: yesterday's load at the same
  half-hour (persistence) and last week's (seasonal naive).

Then `worker.analytics.accuracy.score_pending`
scores every run against the imported actuals, the report is
printed with `format_accuracy`, and the forecast whose MAPE is the median is drawn with
`worker.analytics.plots.plot_run`. The scratch database is dropped unless --keep.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import io
import os
import time
import uuid
from datetime import date, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import numpy as np
import orjson

from contracts.qnn import PREDICT_PATH, build_predict_body, parse_predict_response
from contracts.requests import DatasetRef, ForecastRequest, request_fingerprint
from db.migrate import migrate
from db.pool import connect, create_pool
from worker.analytics.accuracy import accuracy_report, format_accuracy, score_pending
from worker.analytics.plots import plot_run
from worker.core.result_checks import check_result
from worker.ops.datasets import import_datasets
from worker.runtime.connections import database_url
from worker.runtime.history import resolve_request
from worker.settings import Settings

REGION = "England-Wales"
FIRST_DAY = date(2000, 6, 5)  # a Monday
STEPS_PER_DAY = 48
RESOLUTION = 30
FIRST_FORECAST_DAY = 14  # two weeks of history: the emulator's weekly terms need them
QNN_MODEL = "PRETRAINED_QNN_GRID_MODEL"
BASELINES = {"baseline-persistence-1d": 1, "baseline-seasonal-naive-7d": 7}

_INSERT_RUN = """
INSERT INTO optimization_runs (id, request_id, request_type, region, forecast_date,
    input_payload, request_fingerprint, result_payload, status, qnn_model_id, qnn_execution_time)
VALUES ($1, $2, 'forecast', $3, $4, $5, $6, $7, 'completed', $8, $9)
ON CONFLICT (request_id) DO NOTHING
"""


def taylor_days() -> list[list[float]]:
    from pmdarima.datasets import load_taylor

    series = np.asarray(load_taylor(), dtype=np.float64)
    assert series.size == 84 * STEPS_PER_DAY, series.size
    return [series[i : i + STEPS_PER_DAY].tolist() for i in range(0, series.size, STEPS_PER_DAY)]


def datasets_ndjson(days: list[list[float]]) -> str:
    return "\n".join(
        orjson.dumps(
            {
                "region": REGION,
                "date": (FIRST_DAY + timedelta(days=i)).isoformat(),
                "resolution_minutes": RESOLUTION,
                "loads": loads,
            }
        ).decode()
        for i, loads in enumerate(days)
    )


def forecast_request(day_index: int, history_days: int, model: str) -> ForecastRequest:
    day = FIRST_DAY + timedelta(days=day_index)
    start = FIRST_DAY + timedelta(days=max(0, day_index - history_days))
    return ForecastRequest.model_validate(
        {
            "request_id": f"taylor-{model}-{day.isoformat()}",
            "request_type": "forecast",
            "region": REGION,
            "forecast_date": day,
            "payload": {
                "dataset_ref": DatasetRef(
                    region=REGION, start_date=start, end_date=day - timedelta(days=1)
                ),
                "resolution_minutes": RESOLUTION,
                "horizon_steps": STEPS_PER_DAY,
            },
        }
    )


async def store_run(
    pool: asyncpg.Pool,
    original: ForecastRequest,
    resolved: ForecastRequest,
    result: dict[str, Any],
    model_id: str,
    execution_s: float | None,
) -> None:
    await pool.execute(
        _INSERT_RUN,
        uuid.uuid4(),
        original.request_id,
        original.region,
        original.forecast_date,
        resolved.model_dump(mode="json"),
        request_fingerprint(original),
        result,
        model_id,
        execution_s,
    )


async def qnn_forecasts(pool: asyncpg.Pool, days: int, history_days: int) -> float:
    """Run every day's forecast through the emulator's HTTP API; returns the mean call time."""
    from qnn_emulator.server import running_emulator
    from qnn_emulator.settings import EmulatorSettings

    seconds = []
    async with running_emulator(EmulatorSettings()) as url, httpx.AsyncClient(
        base_url=url, timeout=60
    ) as client:
        for day_index in range(FIRST_FORECAST_DAY, days):
            original = forecast_request(day_index, history_days, "qnn")
            resolved = await resolve_request(pool, original)
            assert isinstance(resolved, ForecastRequest)
            body = build_predict_body(
                resolved, model_id=QNN_MODEL, mode="quantum", optimization_level=1
            )
            started = time.perf_counter()
            response = await client.post(PREDICT_PATH, json=body)
            seconds.append(time.perf_counter() - started)
            response.raise_for_status()
            raw, raw_meta = parse_predict_response("forecast", response.content)
            result, meta = check_result(resolved, raw, raw_meta)
            execution = meta.execution_time_ms / 1000 if meta.execution_time_ms else None
            await store_run(pool, original, resolved, result, meta.model_id or QNN_MODEL, execution)
    return float(np.mean(seconds))


async def baseline_forecasts(pool: asyncpg.Pool, series: list[list[float]], history: int) -> None:
    for model, lag_days in BASELINES.items():
        for day_index in range(FIRST_FORECAST_DAY, len(series)):
            original = forecast_request(day_index, history, model)
            resolved = await resolve_request(pool, original)
            assert isinstance(resolved, ForecastRequest)
            result = {"forecast": series[day_index - lag_days], "resolution_minutes": RESOLUTION}
            await store_run(pool, original, resolved, result, model, None)


async def worker_forecasts(
    pool: asyncpg.Pool, url: str, days: int, history_days: int
) -> float:
    """Publish every day's request to the broker and let a real worker process it; returns the
    wall time per forecast."""
    import contextlib

    from producers.publisher import Publisher
    from qnn_emulator.server import running_emulator
    from qnn_emulator.settings import EmulatorSettings
    from worker.observability import logs
    from worker.runtime.app import Worker

    # The tests' broker helpers (local RabbitMQ, throwaway vhost), imported dynamically because
    # tests/support/infra.py is not typed for mypy --strict (docker has no stubs).
    infra = importlib.import_module("tests.support.infra")
    logs.configure("WARNING", json=False)
    with contextlib.ExitStack() as stack:
        amqp_url = Settings().amqp_url.get_secret_value()
        if "EGLO_AMQP_URL" not in os.environ:
            infra.ensure_local_rabbitmq()
            amqp_url = stack.enter_context(infra.fresh_vhost())
        async with running_emulator(EmulatorSettings()) as qnn_url:
            settings = Settings(
                amqp_url=amqp_url,
                database_url=url,
                qnn_url=qnn_url,
                metrics_port=0,
                metrics_host="127.0.0.1",
            )
            worker = Worker(settings)
            task = asyncio.create_task(worker.run())
            await worker.started.wait()
            started = time.perf_counter()
            try:
                async with Publisher.connect(amqp_url) as publisher:
                    await publisher.publish_many(
                        forecast_request(d, history_days, "qnn")
                        for d in range(FIRST_FORECAST_DAY, days)
                    )
                expected = days - FIRST_FORECAST_DAY
                while await pool.fetchval(
                    "SELECT count(*) FROM optimization_runs WHERE request_id LIKE 'taylor-qnn-%'"
                ) < expected:
                    if task.done():
                        task.result()
                    await asyncio.sleep(0.2)
                elapsed = time.perf_counter() - started
            finally:
                worker.stop()
                await asyncio.wait_for(task, timeout=60)
    statuses = await pool.fetch(
        "SELECT status, error_code, count(*) FROM optimization_runs GROUP BY 1, 2"
    )
    if any(r["status"] != "completed" for r in statuses):
        raise RuntimeError(f"not every forecast completed: {[tuple(r) for r in statuses]}")
    return elapsed / expected


async def run(args: argparse.Namespace) -> None:
    server = database_url(Settings())
    name = f"eglo_accuracy_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(server)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = urlunsplit(urlsplit(server)._replace(path=f"/{name}"))
    try:
        conn = await connect(url)
        try:
            await migrate(conn)
        finally:
            await conn.close()
        pool = await create_pool(url, size=4)
        try:
            series = taylor_days()
            report = await import_datasets(pool, io.StringIO(datasets_ndjson(series)))
            print(f"imported England-Wales (load_taylor): {report}")
            started = time.perf_counter()
            if args.mode == "worker":
                per_forecast = await worker_forecasts(pool, url, len(series), args.history_days)
                how = f"through the broker and a worker, {per_forecast * 1000:.0f} ms each"
            else:
                per_call = await qnn_forecasts(pool, len(series), args.history_days)
                how = f"direct emulator calls, {per_call * 1000:.0f} ms each"
            await baseline_forecasts(pool, series, args.history_days)
            scored = await score_pending(pool)
            print(
                f"{scored} forecasts scored ({len(series) - FIRST_FORECAST_DAY} days x "
                f"{1 + len(BASELINES)} models) in {time.perf_counter() - started:.1f} s; "
                f"QNN forecasts {how}"
            )
            print()
            print(format_accuracy(await accuracy_report(pool)))
            median_run = await pool.fetchval(
                """SELECT run_id FROM forecast_scores WHERE model_id = $1 AND n > 0
                   ORDER BY mape OFFSET (SELECT count(*) / 2 FROM forecast_scores
                                         WHERE model_id = $1 AND n > 0) LIMIT 1""",
                QNN_MODEL,
            )
            if median_run is not None and args.plot:
                path = await plot_run(pool, str(median_run), Path(args.plot))
                print(f"\nmedian-MAPE QNN forecast drawn to {path}")
            if args.keep:
                print(f"kept database {name}: {url}")
        finally:
            await pool.close()
    finally:
        if not args.keep:
            admin = await asyncpg.connect(server)
            try:
                await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            finally:
                await admin.close()


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("worker", "direct"), default="worker")
    parser.add_argument("--history-days", type=int, default=28, help="days of history (<= 56)")
    parser.add_argument("--plot", default=".eglo/plots/accuracy-forecast.png")
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    cli()
