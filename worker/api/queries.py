"""The API's reads and writes of the database (runs, submissions, the audit log)."""

from __future__ import annotations

import base64
import uuid
from datetime import date, datetime
from typing import Any

import asyncpg
import orjson

from contracts.events import EMBEDDING_REQUESTED
from worker.api.auth import Principal
from worker.api.models import AnomalyView, EventView, Execution, PendingRun, RunSummary

# The outbox keys its events by ids derived from the run (worker/core/records.py): recompute them.
from worker.core.records import _event_id, outcome_event_id

RUN_COLUMNS = """r.id AS run_id, r.request_id, r.request_type, r.region, r.forecast_date,
    r.status, r.error_code, r.attempts, r.created_at, r.updated_at"""

_RUN = f"""
SELECT {RUN_COLUMNS}, r.input_payload, r.result_payload, r.error_message, r.qnn_model_id,
       r.qnn_execution_time, r.published_at, r.request_fingerprint
FROM optimization_runs r WHERE r.request_id = $1
"""

_EXECUTION = """
SELECT model_id, device_used, circuit_depth, n_qubits, execution_time_ms, quantum_cost_usd,
       call_attempts, round_trip_ms, created_at
FROM qnn_execution_metrics WHERE optimization_run_id = $1 ORDER BY created_at
"""

ANOMALY_COLUMNS = """a.id, a.source, a.anomaly_type, a.severity, a.description, a.details,
    a.suggested_actions, a.resolved, a.detected_at, a.resolved_at, r.request_id"""

_RUN_ANOMALIES = f"""
SELECT {ANOMALY_COLUMNS}
FROM anomalies a JOIN optimization_runs r ON r.id = a.optimization_run_id
WHERE a.optimization_run_id = $1 ORDER BY a.detected_at, a.id
"""

_EVENTS = """
SELECT event_id, routing_key, created_at, published_at FROM outbox
WHERE event_id = ANY($1::uuid[]) ORDER BY id
"""

_LIST = f"""
SELECT {RUN_COLUMNS} FROM optimization_runs r
WHERE ($1::text IS NULL OR r.request_type = $1)
  AND ($2::text IS NULL OR r.region = $2)
  AND ($3::text IS NULL OR r.status = $3)
  AND ($4::date IS NULL OR r.forecast_date >= $4)
  AND ($5::date IS NULL OR r.forecast_date <= $5)
  AND ($6::timestamptz IS NULL OR r.created_at >= $6)
  AND ($7::timestamptz IS NULL OR r.created_at < $7)
  AND ($8::timestamptz IS NULL OR (r.created_at, r.id) < ($8, $9::uuid))
ORDER BY r.created_at DESC, r.id DESC
LIMIT $10
"""

_ANOMALIES = f"""
SELECT {ANOMALY_COLUMNS}
FROM anomalies a LEFT JOIN optimization_runs r ON r.id = a.optimization_run_id
WHERE ($1::bool IS NULL OR a.resolved = $1)
  AND ($2::text IS NULL OR a.severity = $2)
  AND ($3::text IS NULL OR a.source = $3)
ORDER BY a.detected_at DESC, a.id
LIMIT $4
"""


class InvalidCursor(ValueError):
    pass


def encode_cursor(created_at: datetime, run_id: uuid.UUID) -> str:
    raw = orjson.dumps([created_at.isoformat(), str(run_id)])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, run_id = orjson.loads(raw)
        moment = datetime.fromisoformat(created_at)
        if moment.tzinfo is None:
            raise ValueError("naive")
        return moment, uuid.UUID(run_id)
    except (ValueError, TypeError, orjson.JSONDecodeError):
        raise InvalidCursor("cursor is not one this API returned") from None


def summary(row: asyncpg.Record) -> RunSummary:
    return RunSummary.model_validate({k: row[k] for k in RunSummary.model_fields})


async def run_row(pool: asyncpg.Pool, request_id: str) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await pool.fetchrow(_RUN, request_id)
    return row


def _event_ids(run_id: uuid.UUID, status: str, anomaly_ids: list[uuid.UUID]) -> list[uuid.UUID]:
    ids = [outcome_event_id(run_id, status), _event_id(run_id, EMBEDDING_REQUESTED)]
    ids += [_event_id(run_id, f"anomaly-event:{a}") for a in anomaly_ids]
    return ids


async def run_details(
    pool: asyncpg.Pool, row: asyncpg.Record, links: dict[str, str]
) -> dict[str, Any]:
    """A stored run with its execution metrics, anomalies and (still kept) events."""
    run_id: uuid.UUID = row["run_id"]
    async with pool.acquire() as conn:
        execution = [
            Execution.model_validate(dict(r)) for r in await conn.fetch(_EXECUTION, run_id)
        ]
        anomalies = [
            AnomalyView.model_validate(dict(r)) for r in await conn.fetch(_RUN_ANOMALIES, run_id)
        ]
        events = [
            EventView.model_validate(dict(r))
            for r in await conn.fetch(
                _EVENTS, _event_ids(run_id, row["status"], [a.id for a in anomalies])
            )
        ]
    return {
        **summary(row).model_dump(),
        "request": row["input_payload"],
        "result": row["result_payload"],
        "error_message": row["error_message"],
        "qnn_model_id": row["qnn_model_id"],
        "qnn_execution_time": row["qnn_execution_time"],
        "published_at": row["published_at"],
        "execution": execution,
        "anomalies": anomalies,
        "events": events,
        "links": links,
    }


async def pending(pool: asyncpg.Pool, request_id: str) -> PendingRun | None:
    row = await pool.fetchrow(
        "SELECT request_id, request_type, submitted_by, submitted_at FROM api_submissions "
        "WHERE request_id = $1",
        request_id,
    )
    return None if row is None else PendingRun.model_validate(dict(row))


async def record_submission(
    pool: asyncpg.Pool, request_id: str, request_type: str, principal: Principal
) -> None:
    await pool.execute(
        "INSERT INTO api_submissions (request_id, request_type, submitted_by) VALUES ($1, $2, $3) "
        "ON CONFLICT (request_id) DO NOTHING",
        request_id,
        request_type,
        principal.name,
    )


async def list_runs(
    pool: asyncpg.Pool,
    *,
    request_type: str | None,
    region: str | None,
    status: str | None,
    forecast_from: date | None,
    forecast_to: date | None,
    created_from: datetime | None,
    created_to: datetime | None,
    cursor: str | None,
    limit: int,
) -> tuple[list[RunSummary], str | None]:
    after: tuple[datetime | None, uuid.UUID | None] = (None, None)
    if cursor:
        after = decode_cursor(cursor)
    rows = await pool.fetch(
        _LIST,
        request_type,
        region,
        status,
        forecast_from,
        forecast_to,
        created_from,
        created_to,
        after[0],
        after[1],
        limit + 1,
    )
    items = [summary(r) for r in rows[:limit]]
    next_cursor = (
        encode_cursor(items[-1].created_at, items[-1].run_id) if len(rows) > limit else None
    )
    return items, next_cursor


async def list_anomalies(
    pool: asyncpg.Pool,
    *,
    resolved: bool | None,
    severity: str | None,
    source: str | None,
    limit: int,
) -> list[AnomalyView]:
    rows = await pool.fetch(_ANOMALIES, resolved, severity, source, limit)
    return [AnomalyView.model_validate(dict(r)) for r in rows]


async def audit(
    pool: asyncpg.Pool,
    principal: Principal,
    action: str,
    *,
    target: str | None,
    details: dict[str, Any],
    outcome: str,
) -> None:
    await pool.execute(
        "INSERT INTO audit_log (actor, role, action, target, details, outcome) "
        "VALUES ($1, $2, $3, $4, $5::jsonb, $6)",
        principal.name,
        principal.role,
        action,
        target,
        details,
        outcome,
    )
