"""The whole pipeline on the real broker, the real database and the QNN emulator."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

import aio_pika
import asyncpg
import orjson
from aio_pika.abc import AbstractRobustConnection

from contracts.topology import REASON_HEADER
from producers import topology
from producers.publisher import Publisher
from producers.reader import parse_request
from producers.sample import generate_requests
from tests.support.harness import (
    bind_event_queue,
    drain_queue,
    event_bodies,
    events_sent,
    make_settings,
    metric,
    queue_depth,
    running_worker,
    scrape,
    wait_for,
)


def _routing_key(body: bytes) -> str:
    """request.<the body's type>, as a producer sets it (request.forecast for unreadable ones)."""
    try:
        kind = orjson.loads(body).get("request_type")
    except orjson.JSONDecodeError:
        kind = None
    return topology.request_routing_key(kind if isinstance(kind, str) else "forecast")


def _invalid_bodies(valid: list[dict[str, Any]]) -> list[tuple[bytes, str | None, str]]:
    """25 bad messages of seven kinds: (body, content_type, expected reason)."""
    bad: list[tuple[bytes, str | None, str]] = []
    for i in range(5):
        bad.append((b'{"request_id": "broken-%d", ' % i, "application/json", "invalid_json"))
    for i in range(3):
        bad.append((orjson.dumps(valid[i]), "text/csv", "unsupported_content_type"))
    for i in range(3):
        bad.append(
            (
                orjson.dumps(valid[i]).replace(b'"payload":{', b'"x":NaN,"payload":{', 1),
                "application/json",
                "invalid_json",
            )
        )
    for i in range(3):
        bad.append(
            (
                orjson.dumps({**valid[i], "schema_version": 2}),
                "application/json",
                "unsupported_schema_version",
            )
        )
    for i in range(3):
        bad.append(
            (
                orjson.dumps({**valid[i], "request_type": "teleport"}),
                "application/json",
                "unknown_request_type",
            )
        )
    storage = [r for r in valid if r["request_type"] == "storage"]
    for i in range(4):
        doc = orjson.loads(orjson.dumps(storage[i]))
        doc["request_id"] = f"negative-{i}"
        doc["payload"]["max_charge_kw"] = -10
        bad.append((orjson.dumps(doc), "application/json", "invalid_request"))
    forecast = [r for r in valid if r["request_type"] == "forecast"]
    for i in range(4):
        doc = orjson.loads(orjson.dumps(forecast[i]))
        doc["request_id"] = f"too-long-{i}"
        doc["payload"]["historical_loads"] = [100.0] * 40_000
        bad.append((orjson.dumps(doc), "application/json", "invalid_request"))
    assert len(bad) == 25
    return bad


async def test_acceptance_500_valid_25_invalid_50_duplicates(
    amqp: AbstractRobustConnection,
    amqp_url: str,
    database_url: str,
    pool: asyncpg.Pool,
    emulator: str,
) -> None:
    """500 runs with metrics, 25 reasoned dead letters, an event per run, nothing unacked."""
    events_q = await bind_event_queue(amqp, "run.#")
    embedding_q = await bind_event_queue(amqp, "embedding.requested")
    valid = generate_requests(500, seed=2024, id_prefix="acc")
    duplicates = random.Random(1).sample(valid, 50)
    bad = _invalid_bodies(valid)
    settings = make_settings(amqp_url, database_url, emulator)
    async with running_worker(settings) as worker, Publisher.connect(amqp_url) as publisher:
        sends: list[Any] = [publisher.publish(parse_request(r)) for r in valid]
        sends += [publisher.publish_raw(b, _routing_key(b), content_type=ct) for b, ct, _ in bad]
        random.Random(2).shuffle(sends)
        await asyncio.gather(*sends)
        # Duplicates after the originals, some while the originals are still in flight.
        await asyncio.gather(*(publisher.publish(parse_request(r)) for r in duplicates))

        await wait_for(lambda: pool.fetchval("SELECT count(*) = 500 FROM optimization_runs"))
        await wait_for(lambda: _depth_is(amqp, topology.DEAD_LETTER_QUEUE, 25))
        await wait_for(lambda: _depth_is(amqp, topology.REQUESTS_QUEUE, 0))
        await wait_for(lambda: worker.metrics.in_flight._value.get() == 0)
        await wait_for(lambda: events_sent(pool))
        samples = await scrape(worker.metrics_port or 0)

    statuses = await pool.fetch("SELECT status, count(*) FROM optimization_runs GROUP BY 1")
    assert {r["status"]: r["count"] for r in statuses} == {"completed": 500}
    assert (
        await pool.fetchval("SELECT count(DISTINCT optimization_run_id) FROM qnn_execution_metrics")
        == 500
    )
    assert await pool.fetchval("SELECT count(*) FROM qnn_execution_metrics") == 500

    dead = await drain_queue(await _queue(amqp, topology.DEAD_LETTER_QUEUE))
    assert len(dead) == 25
    assert Counter(str(m.headers[REASON_HEADER]) for m in dead) == Counter(r for *_, r in bad)

    outcomes = event_bodies(await drain_queue(events_q))
    run_ids = {str(r["id"]) for r in await pool.fetch("SELECT id FROM optimization_runs")}
    assert len(outcomes) == 500
    assert {e["run_id"] for e in outcomes} == run_ids
    assert all(e["event_type"] == f"run.completed.{e['request_type']}" for e in outcomes)
    assert len({e["event_id"] for e in outcomes}) == 500
    assert len(await drain_queue(embedding_q)) == 500

    # After a graceful stop nothing was left unacked: it would be back in the queue.
    assert await queue_depth(amqp, topology.REQUESTS_QUEUE) == 0

    assert metric(samples, "eglo_messages_total", outcome="completed") == 500
    assert metric(samples, "eglo_messages_total", outcome="duplicate") == 50
    assert metric(samples, "eglo_dead_letters_total") == 25
    assert metric(samples, "eglo_messages_total", outcome="dead_lettered") == 25
    assert metric(samples, "eglo_messages_total", request_type="unknown") == 25
    assert metric(samples, "eglo_processing_duration_seconds_count") == 575
    anomalies = await pool.fetchval("SELECT count(*) FROM anomalies")
    assert metric(samples, "eglo_events_published_total") == 1000 + anomalies


async def _queue(amqp: AbstractRobustConnection, name: str) -> aio_pika.abc.AbstractQueue:
    channel = await amqp.channel()
    return await channel.get_queue(name, ensure=False)


async def _depth_is(amqp: AbstractRobustConnection, name: str, depth: int) -> bool:
    return await queue_depth(amqp, name) == depth


async def test_flaky_qnn_every_request_still_completes(
    amqp_url: str, database_url: str, pool: asyncpg.Pool
) -> None:
    """At 20% 5xx and 10% 429 every request completes, and the retry counter shows why."""
    from qnn_emulator.server import running_emulator
    from qnn_emulator.settings import EmulatorSettings

    flaky = EmulatorSettings(error_rate=0.2, throttle_rate=0.1, retry_after_s=1, seed=42)
    requests = generate_requests(200, seed=77, id_prefix="flaky")
    async with running_emulator(flaky) as qnn_url:
        settings = make_settings(amqp_url, database_url, qnn_url)
        async with running_worker(settings) as worker, Publisher.connect(amqp_url) as publisher:
            await publisher.publish_many(parse_request(r) for r in requests)
            await wait_for(lambda: pool.fetchval("SELECT count(*) = 200 FROM optimization_runs"))
            samples = await scrape(worker.metrics_port or 0)
    assert (
        await pool.fetchval("SELECT count(*) FROM optimization_runs WHERE status = 'completed'")
        == 200
    )
    retries = {
        labels: v for (name, labels), v in samples.items() if name == "eglo_qnn_retries_total" and v
    }
    assert metric(samples, "eglo_qnn_retries_total", reason="http_429") > 0
    assert metric(samples, "eglo_qnn_retries_total") > 200 * 0.3 * 0.5, retries
    assert any(dict(labels)["reason"].startswith("http_5") for labels in retries)
    # Every retried call shows up as a QNN call with its HTTP status.
    assert metric(samples, "eglo_qnn_request_duration_seconds_count", status="429") > 0
    # Stored call counts cover the final delivery only; a rare delay-tier trip adds retries.
    total_calls = await pool.fetchval("SELECT sum(call_attempts) FROM qnn_execution_metrics")
    assert 200 < total_calls <= 200 + metric(samples, "eglo_qnn_retries_total")


async def test_every_request_stage_is_timed(
    amqp: AbstractRobustConnection,
    amqp_url: str,
    database_url: str,
    pool: asyncpg.Pool,
    emulator: str,
) -> None:
    """Each completed request is observed once in each stage from queue wait to the outcome
    event's confirm (the relay's wait: at most once, it is timed from the wake-up it answers)."""
    from worker.observability.metrics import STAGES

    await bind_event_queue(amqp, "run.#")
    requests = generate_requests(40, seed=515, id_prefix="stages")
    settings = make_settings(amqp_url, database_url, emulator)
    async with running_worker(settings) as worker, Publisher.connect(amqp_url) as publisher:
        await publisher.publish_many(parse_request(r) for r in requests)
        await wait_for(lambda: pool.fetchval("SELECT count(*) = 40 FROM optimization_runs"))
        await wait_for(lambda: events_sent(pool))
        await wait_for(
            lambda: worker.metrics.stages["publish_confirm"]._sum.get() > 0
            and sum(b.get() for b in worker.metrics.stages["publish_confirm"]._buckets) == 40
        )
        samples = await scrape(worker.metrics_port or 0)
    name = "eglo_request_stage_duration_seconds"
    counts = {s: metric(samples, f"{name}_count", stage=s) for s in STAGES}
    assert set(counts) == {
        "queue_wait", "announce_wait", "intake", "qnn", "commit_wait", "commit", "relay_wait",
        "publish_confirm",
    }
    for stage in STAGES:
        if stage == "relay_wait":
            assert 1 <= counts[stage] <= 40, counts
        else:
            assert counts[stage] == 40, counts
        total = metric(samples, f"{name}_sum", stage=stage)
        assert 0 <= total < 40 * 30, (stage, total)
    # The QNN call (the emulator answers in ~20 ms here) is timed as such.
    assert metric(samples, f"{name}_sum", stage="qnn") >= 40 * 0.001
