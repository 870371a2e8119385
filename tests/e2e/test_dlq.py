"""`eglo dlq list` and `eglo dlq replay` against the real broker, database and QNN stand-ins."""

from __future__ import annotations

from datetime import UTC, datetime

import aio_pika
import asyncpg
import orjson
from aio_pika.abc import AbstractRobustConnection

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
    queue_depth,
    running_worker,
    wait_for,
)
from worker.ops.dlq import list_dead_letters, replay_dead_letters


async def test_list_shows_reasons_and_leaves_letters_in_place(
    amqp: AbstractRobustConnection,
    amqp_url: str,
    database_url: str,
    pool: asyncpg.Pool,
    emulator: str,
) -> None:
    """Listing shows each dead letter's reason, id and when it was dead-lettered (UTC), and
    takes nothing away."""
    doc = generate_requests(1, seed=4, id_prefix="dlq")[0]
    before = datetime.now(UTC)
    async with Publisher.connect(amqp_url) as publisher:
        await publisher.publish_raw(
            orjson.dumps(doc),
            "request.forecast",
            content_type="text/plain",
            message_id=doc["request_id"],
        )
        await publisher.publish_raw(b"{oops", "request.forecast", message_id="garbage")
    async with running_worker(make_settings(amqp_url, database_url, emulator)):
        await wait_for(lambda: _depth(amqp, topology.DEAD_LETTER_QUEUE, 2))
    letters = await list_dead_letters(amqp_url)
    assert {(d.message_id, d.reason) for d in letters} == {
        (doc["request_id"], "unsupported_content_type"),
        ("garbage", "invalid_json"),
    }
    for d in letters:
        assert d.dead_lettered_at is not None and d.dead_lettered_at.tzinfo is not None
        assert before <= d.dead_lettered_at <= datetime.now(UTC), d
    # The listing's channel closing puts them back; the broker does that asynchronously.
    await wait_for(lambda: _depth(amqp, topology.DEAD_LETTER_QUEUE, 2), within_s=10)


async def test_replay_after_qnn_outage_completes_the_failed_runs(
    amqp: AbstractRobustConnection,
    amqp_url: str,
    database_url: str,
    pool: asyncpg.Pool,
    emulator: str,
) -> None:
    """Requests that exhausted their retries are re-run in place by a replay, once QNN is back."""
    docs = generate_requests(4, seed=12, id_prefix="outage")
    events = await bind_event_queue(amqp, "run.#")
    async with stubs.stub_qnn(stubs.always_unavailable) as down:
        settings = make_settings(amqp_url, database_url, down.url, qnn_attempts=1)
        async with running_worker(settings), Publisher.connect(amqp_url) as publisher:
            await publisher.publish_many(parse_request(d) for d in docs)
            await wait_for(lambda: _depth(amqp, topology.DEAD_LETTER_QUEUE, 4))
    assert (
        await pool.fetchval("SELECT count(*) FROM optimization_runs WHERE status = 'failed'") == 4
    )
    run_ids = {r["id"] for r in await pool.fetch("SELECT id FROM optimization_runs")}

    replayed, kept = await replay_dead_letters(amqp_url, reason="retries_exhausted")
    assert (replayed, kept) == (4, 0)
    async with running_worker(make_settings(amqp_url, database_url, emulator)):
        await wait_for(
            lambda: pool.fetchval(
                "SELECT count(*) = 4 FROM optimization_runs WHERE status = 'completed'"
            )
        )
    rows = await pool.fetch("SELECT id, attempts FROM optimization_runs")
    assert {r["id"] for r in rows} == run_ids  # the same runs, updated, not new ones
    assert all(r["attempts"] == 3 + 1 for r in rows)  # three failed deliveries, one replay
    bodies = event_bodies(await drain_queue(events, idle_s=0.5))
    assert sorted(b["status"] for b in bodies) == ["completed"] * 4 + ["failed"] * 4
    assert len({b["event_id"] for b in bodies}) == 8
    assert await _depth(amqp, topology.DEAD_LETTER_QUEUE, 0)


async def test_replay_by_reason_keeps_the_others(
    amqp: AbstractRobustConnection, amqp_url: str
) -> None:
    """A replay filtered by reason re-publishes those and leaves the rest in the DLQ."""
    channel = await amqp.channel(publisher_confirms=True)
    await topology.declare(channel)
    dlx = await channel.get_exchange(topology.DEAD_LETTER_EXCHANGE)
    for reason in ("invalid_json", "invalid_json", "body_too_large"):
        await dlx.publish(
            aio_pika.Message(
                b"{}",
                headers={
                    "x-eglo-dead-letter-reason": reason,
                    "x-eglo-original-routing-key": "request.forecast",
                },
            ),
            routing_key="",
        )
    assert await wait_for(lambda: _depth(amqp, topology.DEAD_LETTER_QUEUE, 3))
    assert await replay_dead_letters(amqp_url, reason="body_too_large") == (1, 2)
    assert await _depth(amqp, topology.REQUESTS_QUEUE, 1)
    assert await _depth(amqp, topology.DEAD_LETTER_QUEUE, 2)


async def _depth(amqp: AbstractRobustConnection, name: str, n: int) -> bool:
    return await queue_depth(amqp, name) == n


async def test_replay_with_a_worker_running_replays_each_letter_of_the_snapshot_once(
    amqp: AbstractRobustConnection,
    amqp_url: str,
    database_url: str,
    pool: asyncpg.Pool,
    emulator: str,
) -> None:
    """A worker is consuming while the replay runs, and every replayed letter is dead-lettered
    again at once (its body is still not JSON), so it lands back in the DLQ while the replay is
    still draining it. The replay takes only the letters that were there when it started, each
    once: it replays exactly that many, and afterwards the DLQ holds each of them once more."""
    ids = [f"again-{i:02d}" for i in range(20)]
    async with running_worker(make_settings(amqp_url, database_url, emulator)):
        async with Publisher.connect(amqp_url) as publisher:
            for message_id in ids:
                await publisher.publish_raw(b"{oops", "request.forecast", message_id=message_id)
        await wait_for(lambda: _depth(amqp, topology.DEAD_LETTER_QUEUE, len(ids)))

        replayed, kept = await replay_dead_letters(amqp_url)
        assert (replayed, kept) == (len(ids), 0)
        # Each one fails again and comes back, once.
        await wait_for(lambda: _depth(amqp, topology.DEAD_LETTER_QUEUE, len(ids)))
        await wait_for(lambda: _depth(amqp, topology.REQUESTS_QUEUE, 0))
    letters = await list_dead_letters(amqp_url)
    assert sorted(d.message_id or "" for d in letters) == ids
    assert {d.reason for d in letters} == {"invalid_json"}
