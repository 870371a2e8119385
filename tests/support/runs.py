"""Runs and actuals written straight into the database, as the worker and `eglo datasets` would."""

from __future__ import annotations

import io
import math
import uuid
from collections.abc import Mapping, Sequence
from datetime import date
from typing import Any

import asyncpg
import orjson
from pydantic import TypeAdapter

from contracts.requests import AnyRequest, OptimizationRequest, request_fingerprint
from worker.ops.datasets import import_datasets

DAY = date(2025, 6, 1)


REGION = "North"


ADAPTER: TypeAdapter[AnyRequest] = TypeAdapter(OptimizationRequest)


async def clean(pool: asyncpg.Pool) -> None:
    """model_metrics is not in conftest's TABLES; forecast_scores goes with the runs (CASCADE)."""
    await pool.execute("TRUNCATE model_metrics")


async def insert_run(
    pool: asyncpg.Pool | asyncpg.Connection,
    *,
    forecast_date: date,
    result: dict[str, Any],
    request_type: str = "forecast",
    region: str = REGION,
    model_id: str | None = "qnn-a",
    payload: dict[str, Any] | None = None,
    status: str = "completed",
    created_at: Any = None,
    request_id: str | None = None,
) -> uuid.UUID:
    """A stored run as the worker would write it (input_payload is a validated request).

    The pool's codec encodes jsonb parameters, so documents go in as Python objects.
    """
    if payload is None:
        steps = len(result.get("forecast", [])) or 24
        payload = {
            "historical_loads": [100.0 + i % 24 for i in range(72)],
            "resolution_minutes": result.get("resolution_minutes", 60),
            "horizon_steps": steps,
        }
    doc = {
        "request_id": request_id or f"t-{uuid.uuid4().hex[:12]}",
        "request_type": request_type,
        "region": region,
        "forecast_date": forecast_date.isoformat(),
        "payload": payload,
    }
    request: AnyRequest = ADAPTER.validate_python(doc)
    run_id = uuid.uuid4()
    await pool.execute(
        """INSERT INTO optimization_runs (id, request_id, request_type, region, forecast_date,
               input_payload, request_fingerprint, result_payload, status, error_code,
               qnn_model_id, created_at)
           VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8::jsonb, $9, $10, $11,
                   coalesce($12, now()))""",
        run_id,
        request.request_id,
        request_type,
        region,
        forecast_date,
        request.model_dump(mode="json"),
        request_fingerprint(request),
        result if status == "completed" else None,
        status,
        "qnn_error" if status == "failed" else None,
        model_id,
        created_at,
    )
    return run_id


def forecast_result(
    forecast: Sequence[float],
    lower: Sequence[float] | None = None,
    upper: Sequence[float] | None = None,
    resolution: int = 60,
) -> dict[str, Any]:
    out: dict[str, Any] = {"forecast": list(forecast), "resolution_minutes": resolution}
    if lower is not None and upper is not None:
        out.update(lower=list(lower), upper=list(upper), interval_level=0.9)
    return out


async def import_days(
    pool: asyncpg.Pool, days: Mapping[date, Sequence[float]], region: str = REGION, res: int = 60
) -> None:
    lines = [
        orjson.dumps(
            {"region": region, "date": d.isoformat(), "resolution_minutes": res, "loads": list(v)}
        ).decode()
        for d, v in days.items()
    ]
    report = await import_datasets(pool, io.StringIO("\n".join(lines)))
    assert report.rejected == 0, report.errors


def hourly(day_index: int) -> list[float]:
    """A day of actuals with a daily shape, different every day."""
    return [1000.0 + 10 * day_index + 200 * math.sin(math.pi * h / 24) for h in range(24)]


async def insert_runs(pool: asyncpg.Pool, requests: list[dict[str, Any]]) -> list[uuid.UUID]:
    """Completed runs stored directly, as the worker would have stored them."""
    ids = [uuid.uuid4() for _ in requests]
    await pool.executemany(
        """INSERT INTO optimization_runs (id, request_id, request_type, region, forecast_date,
               input_payload, request_fingerprint, result_payload)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8)""",
        [
            (
                run_id,
                r["request_id"],
                r["request_type"],
                r["region"],
                date.fromisoformat(r["forecast_date"]),
                r,
                f"fp-{r['request_id']}",
                {"ok": True},
            )
            for run_id, r in zip(ids, requests, strict=True)
        ],
    )
    return ids
