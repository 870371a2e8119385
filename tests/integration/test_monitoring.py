"""The QNN monitoring API: anomalies synced without duplicates, resolved on both sides, logs."""

from __future__ import annotations

import asyncpg
import httpx

from contracts.qnn import build_predict_body
from producers.reader import parse_request
from producers.sample import generate_requests
from worker.ops.monitoring import list_anomalies, model_logs, resolve_anomaly, sync_anomalies

MODEL = "PRETRAINED_QNN_GRID_MODEL"


async def _spiky_prediction(qnn: httpx.AsyncClient, request_id: str) -> None:
    doc = next(r for r in generate_requests(8, seed=17) if r["request_type"] == "forecast")
    loads = list(doc["payload"]["historical_loads"])
    loads[50] *= 3
    doc["payload"]["historical_loads"] = loads
    doc["request_id"] = request_id
    body = build_predict_body(
        parse_request(doc), model_id=MODEL, mode="quantum", optimization_level=1
    )
    assert (await qnn.post("/api/v1/predictions/predict", json=body)).status_code == 200


async def test_sync_is_idempotent_and_resolve_reaches_the_qnn(
    pool: asyncpg.Pool, emulator: str
) -> None:
    """Two syncs store one row; resolving marks it here and on the QNN; logs come back."""
    async with httpx.AsyncClient(base_url=emulator) as qnn:
        await _spiky_prediction(qnn, "mon-1")
        assert await sync_anomalies(pool, qnn) == (1, 0)
        assert await sync_anomalies(pool, qnn) == (0, 1)
        [row] = await list_anomalies(pool, unresolved=True)
        assert (row["source"], row["resolved"]) == ("qnn", False)
        assert await resolve_anomaly(pool, qnn, str(row["id"])) == "qnn"
        remote = (await qnn.get("/api/v1/monitoring/anomalies/")).json()
        assert [a["resolved"] for a in remote] == [True]
        assert await list_anomalies(pool, unresolved=True) == []
        resolved_at = await pool.fetchval("SELECT resolved_at FROM anomalies")
        assert resolved_at is not None
        await sync_anomalies(pool, qnn)  # a later sync does not un-resolve it
        assert await pool.fetchval("SELECT resolved_at FROM anomalies") == resolved_at
        logs = await model_logs(qnn, MODEL)
        assert [entry["request_id"] for entry in logs] == ["mon-1"]
