"""The QNN's own monitoring API: its anomalies synced into `anomalies`, resolved both ways, and
its per-model logs. Calls go through runtime/http_client: bounded bodies, one deadline per call."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import asyncpg
import httpx
import orjson

from worker.runtime import http_client
from worker.runtime.http_client import CallLimits

ANOMALIES_PATH = "/api/v1/monitoring/anomalies/"
SEVERITIES = {"low", "medium", "high", "critical"}
DEFAULT_LIMITS = CallLimits()

_UPSERT = """
INSERT INTO anomalies (optimization_run_id, source, external_id, anomaly_type, severity,
                       description, details, suggested_actions, resolved, detected_at,
                       resolved_at)
SELECT (SELECT id FROM optimization_runs WHERE request_id = $1), 'qnn', $2, $3, $4, $5,
       $6::jsonb, $7::text[], $8, $9, $10
ON CONFLICT (source, external_id) DO UPDATE
SET resolved = anomalies.resolved OR EXCLUDED.resolved,
    resolved_at = coalesce(anomalies.resolved_at, EXCLUDED.resolved_at),
    optimization_run_id = coalesce(anomalies.optimization_run_id, EXCLUDED.optimization_run_id)
RETURNING (xmax = 0) AS inserted
"""


def _timestamp(value: Any) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


async def sync_anomalies(
    pool: asyncpg.Pool, qnn: httpx.AsyncClient, *, limits: CallLimits = DEFAULT_LIMITS
) -> tuple[int, int]:
    """Pull the QNN's anomalies; returns (new, already known). Re-running adds no duplicates."""
    response = await http_client.call(qnn, "GET", ANOMALIES_PATH, limits=limits)
    response.raise_for_status()
    doc = response.json()
    items = doc.get("data", doc) if isinstance(doc, dict) else doc
    if isinstance(items, dict):
        items = items.get("anomalies", items.get("items", []))
    new = known = 0
    async with pool.acquire() as conn, conn.transaction():
        for item in items:
            severity = str(item.get("severity", "medium")).lower()
            extra = {
                k: v
                for k, v in item.items()
                if k
                not in {
                    "id",
                    "anomaly_type",
                    "severity",
                    "description",
                    "suggested_actions",
                    "resolved",
                    "detected_at",
                    "resolved_at",
                    "request_id",
                }
            }
            inserted = await conn.fetchval(
                _UPSERT,
                item.get("request_id"),
                str(item["id"]),
                str(item.get("anomaly_type") or item.get("type") or "unknown"),
                severity if severity in SEVERITIES else "medium",
                item.get("description"),
                orjson.dumps(extra).decode(),
                [str(a) for a in item.get("suggested_actions") or []],
                bool(item.get("resolved")),
                _timestamp(item.get("detected_at")) or datetime.now(),
                _timestamp(item.get("resolved_at")),
            )
            new, known = (new + 1, known) if inserted else (new, known + 1)
    return new, known


async def list_anomalies(
    pool: asyncpg.Pool, *, unresolved: bool = False, limit: int = 50
) -> list[asyncpg.Record]:
    return list(
        await pool.fetch(
            """SELECT a.id, a.source, a.anomaly_type, a.severity, a.resolved, a.detected_at,
                  a.description, r.request_id
           FROM anomalies a LEFT JOIN optimization_runs r ON r.id = a.optimization_run_id
           WHERE NOT ($1 AND a.resolved)
           ORDER BY a.detected_at DESC LIMIT $2""",
            unresolved,
            limit,
        )
    )


def format_anomalies(rows: list[asyncpg.Record]) -> str:
    lines = [f"{'id':<36}  {'source':<6} {'severity':<8} {'type':<28} {'resolved':<8} request_id"]
    for r in rows:
        lines.append(
            f"{r['id']!s:<36}  {r['source']:<6} {r['severity']:<8} "
            f"{r['anomaly_type'][:28]:<28} {'yes' if r['resolved'] else 'no':<8} "
            f"{r['request_id'] or '-'}"
        )
    lines.append(f"{len(rows)} anomal{'y' if len(rows) == 1 else 'ies'}")
    return "\n".join(lines)


class AnomalyNotFound(LookupError):
    pass


async def resolve_anomaly(
    pool: asyncpg.Pool,
    qnn: httpx.AsyncClient,
    anomaly_id: str,
    *,
    limits: CallLimits = DEFAULT_LIMITS,
) -> str:
    """Mark resolved (telling the QNN first when the anomaly is the QNN's); returns its source."""
    try:
        key = uuid.UUID(anomaly_id)
    except ValueError:
        raise AnomalyNotFound(f"not an anomaly id: {anomaly_id!r}") from None
    row = await pool.fetchrow("SELECT source, external_id FROM anomalies WHERE id = $1", key)
    if row is None:
        raise AnomalyNotFound(f"no anomaly {anomaly_id}")
    if row["source"] == "qnn":
        response = await http_client.call(
            qnn, "POST", f"{ANOMALIES_PATH}{row['external_id']}/resolve", limits=limits
        )
        response.raise_for_status()
    await pool.execute(
        "UPDATE anomalies SET resolved = true, resolved_at = coalesce(resolved_at, now()) "
        "WHERE id = $1",
        key,
    )
    return str(row["source"])


async def model_logs(
    qnn: httpx.AsyncClient, model_id: str, *, limits: CallLimits = DEFAULT_LIMITS
) -> list[dict[str, Any]]:
    response = await http_client.call(
        qnn, "GET", f"/api/v1/monitoring/models/{model_id}/logs", limits=limits
    )
    response.raise_for_status()
    doc = response.json()
    logs = doc.get("data", doc) if isinstance(doc, dict) else doc
    return list(logs.get("logs", []) if isinstance(logs, dict) else logs)
