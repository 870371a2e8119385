"""Failed, expired, conflicting and replied-to requests, each against the real broker and DB."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import asyncpg
import orjson
from aio_pika.abc import AbstractRobustConnection

from contracts.topology import ATTEMPT_HEADER, REASON_HEADER
from producers import topology
from producers.publisher import Publisher
from producers.reader import parse_request
from producers.sample import generate_requests
from tests.support import stub_qnn as stubs
from tests.support.harness import (
    bind_event_queue,
    drain_queue,
    event_bodies,
    make_settings,
    running_worker,
    wait_for,
)


def _one(kind: str, request_id: str, **changes: Any) -> dict[str, Any]:
    doc = next(r for r in generate_requests(8, seed=5) if r["request_type"] == kind)
    return {**doc, "request_id": request_id, **changes}


async def _run_one(
    amqp_url: str,
    database_url: str,
    qnn_url: str,
    pool: asyncpg.Pool,
    doc: dict[str, Any],
    **settings: Any,
) -> asyncpg.Record:
    async with (
        running_worker(make_settings(amqp_url, database_url, qnn_url, **settings)),
        Publisher.connect(amqp_url) as publisher,
    ):
        await publisher.publish(parse_request(doc))
        return await wait_for(
            lambda: pool.fetchrow(
                "SELECT * FROM optimization_runs WHERE request_id = $1", doc["request_id"]
            )
        )


async def _dead_letters(
    amqp: AbstractRobustConnection,
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    channel = await amqp.channel()
    return await drain_queue(
        await channel.get_queue(topology.DEAD_LETTER_QUEUE, ensure=False), idle_s=0.5
    )


async def test_invalid_qnn_result_is_a_failed_run(
    amqp: AbstractRobustConnection, amqp_url: str, database_url: str, pool: asyncpg.Pool
) -> None:
    """A forecast of the wrong length is stored as failed with the reason, and announced."""
    events = await bind_event_queue(amqp, "run.#")
    async with stubs.stub_qnn(stubs.wrong_length_forecast) as qnn:
        run = await _run_one(amqp_url, database_url, qnn.url, pool, _one("forecast", "bad-result"))
    assert run["status"] == "failed"
    assert run["error_code"] == "qnn_invalid_result"
    assert "steps" in run["error_message"]
    assert run["result_payload"] is None
    [event] = event_bodies(await drain_queue(events, idle_s=0.5))
    assert event["event_type"] == "run.failed.forecast"
    assert event["error_code"] == "qnn_invalid_result"


async def test_qnn_validation_error_fails_without_retries(
    amqp_url: str, database_url: str, pool: asyncpg.Pool
) -> None:
    """A 4xx from the QNN is permanent: one call, a failed run, no delay tiers."""
    async with stubs.stub_qnn(stubs.validation_error) as qnn:
        run = await _run_one(amqp_url, database_url, qnn.url, pool, _one("storage", "rejected"))
        assert len(qnn.calls) == 1
    assert (run["status"], run["error_code"], run["attempts"]) == ("failed", "qnn_rejected", 1)


async def test_unavailable_qnn_goes_through_tiers_then_dlq(
    amqp: AbstractRobustConnection, amqp_url: str, database_url: str, pool: asyncpg.Pool
) -> None:
    """In-process retries, then each delay tier, then a failed run, an event and a dead letter."""
    events = await bind_event_queue(amqp, "run.failed.#")
    async with stubs.stub_qnn(stubs.always_unavailable) as qnn:
        run = await _run_one(
            amqp_url, database_url, qnn.url, pool, _one("grid_switch", "down"), qnn_attempts=2
        )
        assert len(qnn.calls) == 2 * 3  # two tries on each of three deliveries
    assert (run["status"], run["error_code"], run["attempts"]) == ("failed", "qnn_unavailable", 3)
    [event] = event_bodies(await drain_queue(events, idle_s=0.5))
    assert event["request_id"] == "down"
    [dead] = await _dead_letters(amqp)
    assert dead.headers[REASON_HEADER] == "retries_exhausted"
    assert dead.headers[ATTEMPT_HEADER] == 2


async def test_expired_request_is_stored_without_calling_the_qnn(
    amqp: AbstractRobustConnection, amqp_url: str, database_url: str, pool: asyncpg.Pool
) -> None:
    """A passed deadline means an expired run and event, and no QNN call."""
    events = await bind_event_queue(amqp, "run.expired.#")
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    async with stubs.stub_qnn(stubs.always_unavailable) as qnn:
        run = await _run_one(
            amqp_url, database_url, qnn.url, pool, _one("forecast", "late", deadline=past)
        )
        assert qnn.calls == []
    assert (run["status"], run["error_code"]) == ("expired", "deadline_passed")
    assert len(await drain_queue(events, idle_s=0.5)) == 1


async def test_reused_request_id_with_other_payload_is_dead_lettered(
    amqp: AbstractRobustConnection,
    amqp_url: str,
    database_url: str,
    pool: asyncpg.Pool,
    emulator: str,
) -> None:
    """Same request_id, different payload: the first run stands, the second is a dead letter."""
    original = _one("forecast", "reused")
    other = _one("forecast", "reused", region="Elsewhere")
    await _run_one(amqp_url, database_url, emulator, pool, original)
    async with (
        running_worker(make_settings(amqp_url, database_url, emulator)),
        Publisher.connect(amqp_url) as publisher,
    ):
        await publisher.publish(parse_request(other))
        dead = await wait_for(lambda: _dead_letters(amqp))
    assert [d.headers[REASON_HEADER] for d in dead] == ["request_id_conflict"]
    assert await pool.fetchval("SELECT region FROM optimization_runs") == original["region"]


async def test_reply_to_gets_the_outcome_with_correlation_id(
    amqp: AbstractRobustConnection,
    amqp_url: str,
    database_url: str,
    pool: asyncpg.Pool,
    emulator: str,
) -> None:
    """A request with reply_to gets its outcome event there, correlated."""
    channel = await amqp.channel()
    replies = await channel.declare_queue(exclusive=True)
    async with (
        running_worker(make_settings(amqp_url, database_url, emulator)),
        Publisher.connect(amqp_url) as publisher,
    ):
        await publisher.publish(
            parse_request(_one("storage", "ask")), reply_to=replies.name, correlation_id="corr-42"
        )
        message = await wait_for(lambda: replies.get(fail=False))
    assert message.correlation_id == "corr-42"
    body = orjson.loads(message.body)
    assert (body["request_id"], body["status"]) == ("ask", "completed")


async def test_burst_mode_exits_when_the_queue_is_empty(
    amqp_url: str, database_url: str, pool: asyncpg.Pool, emulator: str
) -> None:
    """`--burst` processes what is queued, commits it, and exits 0."""
    from worker.runtime.app import Worker

    async with Publisher.connect(amqp_url) as publisher:
        await publisher.publish_many(
            [parse_request(r) for r in generate_requests(40, seed=9, id_prefix="burst")]
        )
    worker = Worker(make_settings(amqp_url, database_url, emulator))
    assert await asyncio.wait_for(worker.run(burst=True), timeout=60) == 0
    assert await pool.fetchval("SELECT count(*) FROM optimization_runs") == 40
    assert await pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 0
