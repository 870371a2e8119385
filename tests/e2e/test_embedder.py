"""The embedder process on the real broker and database: events in, one vector per run and model."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from datetime import UTC, date, datetime
from typing import Any

import aio_pika
import asyncpg
import numpy as np
import orjson
import pytest
from aio_pika.abc import AbstractRobustConnection

from contracts.events import EMBEDDING_REQUESTED, EmbeddingRequested
from contracts.topology import DETAIL_HEADER, REASON_HEADER
from producers import topology
from producers.sample import generate_requests
from tests.support.embeddings import fake_vector, running_fake_api
from tests.support.harness import drain_queue, make_settings, metric, queue_depth, scrape, wait_for
from tests.support.runs import insert_runs
from worker.embedder import service as embedder_module
from worker.embedder.backends import (
    EmbedderNotInstalled,
    FeaturesEmbedder,
    OpenAIEmbedder,
    scenario_text,
)
from worker.embedder.service import (
    EMBEDDINGS_DLQ,
    EMBEDDINGS_QUEUE,
    EmbedderConfig,
    EmbedderService,
)
from worker.observability.metrics import Metrics

CONFIG = EmbedderConfig(
    metrics_port=0, retry_delay_s=0.05, batch_window_ms=5, prefetch=64, max_attempts=3
)




def requested(run_id: uuid.UUID, request: dict[str, Any]) -> bytes:
    return (
        EmbeddingRequested(
            event_id=uuid.uuid5(run_id, EMBEDDING_REQUESTED),
            event_type=EMBEDDING_REQUESTED,
            occurred_at=datetime.now(UTC),
            run_id=run_id,
            request_id=request["request_id"],
            request_type=request["request_type"],
        )
        .model_dump_json()
        .encode()
    )


async def publish(connection: AbstractRobustConnection, bodies: list[bytes]) -> None:
    """Publish to eglo.events as the outbox relay does, once the embedder's queue is bound."""
    async with connection.channel(publisher_confirms=True) as channel:
        await topology.declare(channel)
        await embedder_module.declare(channel)
        exchange = await channel.get_exchange(topology.EVENTS_EXCHANGE)
        for body in bodies:
            await exchange.publish(
                aio_pika.Message(
                    body,
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key=EMBEDDING_REQUESTED,
            )


async def run_burst(service: EmbedderService) -> None:
    assert await asyncio.wait_for(service.run(burst=True), timeout=120) == 0


async def dead_letters(
    connection: AbstractRobustConnection,
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    channel = await connection.channel()
    queue = await channel.get_queue(EMBEDDINGS_DLQ)
    return await drain_queue(queue, idle_s=0.5)


def sample(registry_metrics: Metrics, name: str, **labels: str) -> float:
    return registry_metrics.registry.get_sample_value(name, labels) or 0.0


async def test_each_run_is_embedded_once(
    amqp_url: str, amqp: AbstractRobustConnection, pool: asyncpg.Pool, database_url: str
) -> None:
    """60 events become 60 features-v1 rows equal to the embedder's own output, then the queue
    is empty."""
    requests = generate_requests(60, seed=21)
    run_ids = await insert_runs(pool, requests)
    await publish(amqp, [requested(i, r) for i, r in zip(run_ids, requests, strict=True)])

    service = EmbedderService(
        make_settings(amqp_url, database_url, "http://127.0.0.1:1"), config=CONFIG
    )
    await run_burst(service)

    rows = await pool.fetch(
        "SELECT optimization_run_id, model, dimensions, embedding FROM optimization_embeddings"
    )
    assert Counter(r["optimization_run_id"] for r in rows) == Counter(run_ids)
    assert {(r["model"], r["dimensions"]) for r in rows} == {("features-v1", 64)}
    stored = {r["optimization_run_id"]: r["embedding"].to_numpy() for r in rows}
    expected = FeaturesEmbedder().embed_array(requests)
    for run_id, vector in zip(run_ids, expected, strict=True):
        # pgvector stores float32.
        np.testing.assert_allclose(stored[run_id], vector, atol=1e-6)
    assert sample(service.metrics, "eglo_embeddings_stored_total", model="features-v1") == 60
    assert await queue_depth(amqp, EMBEDDINGS_QUEUE) == 0
    assert await dead_letters(amqp) == []


async def test_redelivery_does_not_duplicate(
    amqp_url: str, amqp: AbstractRobustConnection, pool: asyncpg.Pool, database_url: str
) -> None:
    """Every event sent twice, then all of them again later: still one row per run and model."""
    requests = generate_requests(20, seed=22)
    run_ids = await insert_runs(pool, requests)
    bodies = [requested(i, r) for i, r in zip(run_ids, requests, strict=True)]
    settings = make_settings(amqp_url, database_url, "http://127.0.0.1:1")

    await publish(amqp, bodies + bodies)
    first = EmbedderService(settings, config=CONFIG)
    await run_burst(first)
    await publish(amqp, bodies)
    second = EmbedderService(settings, config=CONFIG)
    await run_burst(second)

    counts = await pool.fetch(
        "SELECT optimization_run_id, count(*) AS n FROM optimization_embeddings"
        " GROUP BY optimization_run_id"
    )
    assert {r["optimization_run_id"]: r["n"] for r in counts} == dict.fromkeys(run_ids, 1)
    assert sample(first.metrics, "eglo_embeddings_stored_total", model="features-v1") == 20
    assert sample(first.metrics, "eglo_embedder_messages_total", outcome="stored") == 20
    assert sample(first.metrics, "eglo_embedder_messages_total", outcome="duplicate") == 20
    assert sample(second.metrics, "eglo_embeddings_stored_total", model="features-v1") == 0
    assert sample(second.metrics, "eglo_embedder_messages_total", outcome="duplicate") == 20


async def test_models_live_side_by_side(
    amqp_url: str, amqp: AbstractRobustConnection, pool: asyncpg.Pool, database_url: str
) -> None:
    """A features-v1 and a 1536-dimension API embedder each store their own row per run."""
    requests = generate_requests(10, seed=23)
    run_ids = await insert_runs(pool, requests)
    bodies = [requested(i, r) for i, r in zip(run_ids, requests, strict=True)]
    settings = make_settings(amqp_url, database_url, "http://127.0.0.1:1")

    await publish(amqp, bodies)
    await run_burst(EmbedderService(settings, config=CONFIG))
    async with running_fake_api() as api:
        api_embedder = OpenAIEmbedder(base_url=api.url, api_key=api.api_key, batch_size=4)
        try:
            await publish(amqp, bodies)
            await run_burst(EmbedderService(settings, config=CONFIG, embedder=api_embedder))
        finally:
            await api_embedder.aclose()

    rows = await pool.fetch(
        "SELECT optimization_run_id, model, dimensions, embedding FROM optimization_embeddings"
    )
    assert Counter((r["model"], r["dimensions"]) for r in rows) == {
        ("features-v1", 64): 10,
        ("text-embedding-3-small", 1536): 10,
    }
    api_vectors = {
        r["optimization_run_id"]: r["embedding"].to_numpy() for r in rows if r["dimensions"] == 1536
    }
    for run_id, request in zip(run_ids, requests, strict=True):
        np.testing.assert_allclose(
            api_vectors[run_id], fake_vector(scenario_text(request), 1536), atol=1e-6
        )


async def test_bad_events_are_dead_lettered_with_reasons(
    amqp_url: str, amqp: AbstractRobustConnection, pool: asyncpg.Pool, database_url: str
) -> None:
    """A body that is not JSON and one that is not an EmbeddingRequested go to the DLQ."""
    await publish(amqp, [b'{"run_id": ', orjson.dumps({"run_id": "not-a-uuid"})])
    settings = make_settings(amqp_url, database_url, "http://127.0.0.1:1")
    service = EmbedderService(settings, config=CONFIG)
    await run_burst(service)

    reasons = sorted(str((m.headers or {})[REASON_HEADER]) for m in await dead_letters(amqp))
    assert reasons == ["invalid_event", "invalid_json"]
    assert sample(service.metrics, "eglo_dead_letters_total", reason="invalid_json") == 1


async def test_missing_run_is_retried_then_dead_lettered(
    amqp_url: str, amqp: AbstractRobustConnection, pool: asyncpg.Pool, database_url: str
) -> None:
    """An event for a run that never appears is delivered max_attempts times, then dead-lettered."""
    ghost = uuid.uuid4()
    await publish(amqp, [requested(ghost, generate_requests(1, seed=24)[0])])
    settings = make_settings(amqp_url, database_url, "http://127.0.0.1:1")
    service = EmbedderService(settings, config=CONFIG)
    await run_burst(service)

    [message] = await dead_letters(amqp)
    headers = message.headers or {}
    assert headers[REASON_HEADER] == "run_not_found"
    assert f"run {ghost} not found after 3 deliveries" == headers[DETAIL_HEADER]
    assert (
        sample(service.metrics, "eglo_embedder_messages_total", outcome="run_not_found_retry") == 2
    )
    assert await pool.fetchval("SELECT count(*) FROM optimization_embeddings") == 0


async def test_run_committed_after_its_event_is_embedded(
    amqp_url: str, amqp: AbstractRobustConnection, pool: asyncpg.Pool, database_url: str
) -> None:
    """An event that overtakes its run is retried until the run exists; metrics show the store."""
    request = generate_requests(1, seed=25)[0]
    run_id = uuid.uuid4()
    config = EmbedderConfig(metrics_port=0, retry_delay_s=0.2, batch_window_ms=5, max_attempts=20)
    service = EmbedderService(
        make_settings(amqp_url, database_url, "http://127.0.0.1:1"), config=config
    )
    task = asyncio.create_task(service.run())
    await asyncio.wait_for(service.started.wait(), timeout=30)
    try:
        await publish(amqp, [requested(run_id, request)])
        await wait_for(
            lambda: (
                sample(
                    service.metrics, "eglo_embedder_messages_total", outcome="run_not_found_retry"
                )
                >= 1
            ),
            within_s=30,
        )
        await pool.execute(
            """INSERT INTO optimization_runs (id, request_id, request_type, region, forecast_date,
                   input_payload, request_fingerprint, result_payload)
               VALUES ($1, $2, $3, $4, $5, $6, 'fp', '{}')""",
            run_id,
            request["request_id"],
            request["request_type"],
            request["region"],
            date.fromisoformat(request["forecast_date"]),
            request,
        )
        await wait_for(
            lambda: pool.fetchval(
                "SELECT count(*) FROM optimization_embeddings WHERE optimization_run_id = $1",
                run_id,
            ),
            within_s=30,
        )
        assert service.metrics_port is not None
        samples = await scrape(service.metrics_port)
        assert metric(samples, "eglo_embeddings_stored_total", model="features-v1") == 1
    finally:
        service.stop()
        assert await asyncio.wait_for(task, timeout=30) == 0
    assert await dead_letters(amqp) == []


async def test_unembeddable_run_is_dead_lettered_alone(
    amqp_url: str, amqp: AbstractRobustConnection, pool: asyncpg.Pool, database_url: str
) -> None:
    """A stored payload the embedder cannot read is dead-lettered; its batch-mates are stored."""
    requests = generate_requests(5, seed=26)
    broken = {**requests[0], "request_id": "broken-payload", "payload": {"nothing": 1}}
    run_ids = await insert_runs(pool, [*requests, broken])
    await publish(
        amqp, [requested(i, r) for i, r in zip(run_ids, [*requests, broken], strict=True)]
    )
    await run_burst(
        EmbedderService(make_settings(amqp_url, database_url, "http://127.0.0.1:1"), config=CONFIG)
    )

    stored = {
        r["optimization_run_id"]
        for r in await pool.fetch("SELECT optimization_run_id FROM optimization_embeddings")
    }
    assert stored == set(run_ids[:5])
    [message] = await dead_letters(amqp)
    assert (message.headers or {})[REASON_HEADER] == "unembeddable"
    assert "broken-payload" in str((message.headers or {})[DETAIL_HEADER])


class _NotInstalled:
    """An embedder whose model extra is missing."""

    name = "missing-model"
    dimensions = 8

    async def warm_up(self) -> None:
        raise EmbedderNotInstalled("extra not installed")

    async def embed(self, scenarios: Any) -> list[list[float]]:
        raise AssertionError("never reached")


async def test_missing_model_extra_stops_before_consuming(
    amqp_url: str, amqp: AbstractRobustConnection, pool: asyncpg.Pool, database_url: str
) -> None:
    """An embedder that cannot load fails the process at start and leaves the events queued."""
    requests = generate_requests(3, seed=27)
    run_ids = await insert_runs(pool, requests)
    await publish(amqp, [requested(i, r) for i, r in zip(run_ids, requests, strict=True)])
    service = EmbedderService(
        make_settings(amqp_url, database_url, "http://127.0.0.1:1"),
        config=CONFIG,
        embedder=_NotInstalled(),
    )
    with pytest.raises(EmbedderNotInstalled):
        await service.run(burst=True)
    assert await queue_depth(amqp, EMBEDDINGS_QUEUE) == 3
