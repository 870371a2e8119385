"""Anomalies found in a completed run are stored with it and announced, in one transaction."""

from __future__ import annotations

from typing import Any

import asyncpg
from aio_pika.abc import AbstractRobustConnection

from producers.publisher import Publisher
from producers.reader import parse_request
from producers.sample import generate_requests
from tests.support.harness import (
    bind_event_queue,
    drain_queue,
    event_bodies,
    events_sent,
    make_settings,
    running_worker,
    wait_for,
)


def _forecast_with_spike() -> dict[str, Any]:
    doc = next(r for r in generate_requests(8, seed=17, id_prefix="spiky")
               if r["request_type"] == "forecast" and len(r["payload"]["historical_loads"]) >= 168)
    loads = list(doc["payload"]["historical_loads"])
    loads[len(loads) // 2] *= 3  # a meter spike no grid produces
    doc["payload"]["historical_loads"] = loads
    doc["payload"].pop("temperature_c", None)
    return doc


async def test_spike_in_history_is_stored_and_emitted(
    amqp: AbstractRobustConnection, amqp_url: str, database_url: str, pool: asyncpg.Pool,
    emulator: str,
) -> None:
    """A tripled reading becomes an input_spike row linked to the run and an event."""
    events = await bind_event_queue(amqp, "anomaly.detected.#")
    doc = _forecast_with_spike()
    async with running_worker(make_settings(amqp_url, database_url, emulator)), \
            Publisher.connect(amqp_url) as publisher:
        await publisher.publish(parse_request(doc))
        await wait_for(lambda: events_sent(pool))
    rows = await pool.fetch(
        "SELECT a.*, r.request_id FROM anomalies a JOIN optimization_runs r "
        "ON r.id = a.optimization_run_id WHERE a.anomaly_type = 'input_spike'")
    assert len(rows) == 1
    row = rows[0]
    assert row["request_id"] == doc["request_id"] and row["source"] == "eglo"
    assert row["severity"] in ("medium", "high", "critical") and row["suggested_actions"]
    bodies = event_bodies(await drain_queue(events, idle_s=0.5))
    spike = [b for b in bodies if b["anomaly_type"] == "input_spike"]
    assert len(spike) == 1
    assert spike[0]["anomaly_id"] == str(row["id"])
    assert spike[0]["event_type"] == f"anomaly.detected.{row['severity']}"
