"""Helpers for driving the real worker and reading the real broker in tests."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import httpx
import orjson
from aio_pika.abc import AbstractRobustConnection

from db.migrate import migration_files
from producers import topology
from tests.support import infra
from worker.runtime.app import Worker
from worker.settings import Settings


@contextlib.asynccontextmanager
async def running_worker(settings: Settings) -> AsyncIterator[Worker]:
    """A real worker in this event loop; stopped (gracefully) on exit."""
    worker = Worker(settings)
    task = asyncio.create_task(worker.run())
    started = asyncio.create_task(worker.started.wait())
    await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        started.cancel()
        task.result()  # raises what stopped it
    try:
        yield worker
    finally:
        worker.stop()
        assert await asyncio.wait_for(task, timeout=30) == 0


async def wait_for(
    predicate: Callable[[], Any], *, within_s: float = 60.0, interval: float = 0.1
) -> Any:
    """Poll an async or sync predicate until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"condition not met within {within_s}s (last value {value!r})")
        await asyncio.sleep(interval)


async def events_sent(pool: asyncpg.Pool) -> bool:
    """A run is stored and the outbox holds nothing unsent: its events are out."""
    return bool(
        await pool.fetchval(
            "SELECT count(*) = 0 FROM outbox WHERE published_at IS NULL "
            "AND EXISTS (SELECT 1 FROM optimization_runs)"
        )
    )


async def bind_event_queue(
    connection: AbstractRobustConnection, pattern: str = "#"
) -> aio_pika.abc.AbstractQueue:
    """A queue of the test's own bound to eglo.events, declared before anything is published."""
    channel = await connection.channel()
    await topology.declare(channel)
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(topology.EVENTS_EXCHANGE, routing_key=pattern)
    return queue


async def drain_queue(
    queue: aio_pika.abc.AbstractQueue, *, idle_s: float = 1.0
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Take (and ack) everything in a queue until it stays empty for idle_s."""
    messages = []
    loop = asyncio.get_running_loop()
    last = loop.time()
    while loop.time() - last < idle_s:
        message = await queue.get(fail=False, no_ack=False)
        if message is None:
            await asyncio.sleep(0.05)
            continue
        await message.ack()
        messages.append(message)
        last = loop.time()
    return messages


async def queue_depth(connection: AbstractRobustConnection, name: str) -> int:
    async with connection.channel() as channel:
        queue = await channel.declare_queue(name, passive=True)
        return int(queue.declaration_result.message_count or 0)


def event_bodies(messages: list[aio_pika.abc.AbstractIncomingMessage]) -> list[dict[str, Any]]:
    return [orjson.loads(m.body) for m in messages]


async def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Read a live /metrics into {(sample name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def metric(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    """Sum of every sample of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def save_figures(name: str, figures: Any) -> None:
    """A conformance run's figures, kept in .eglo/conformance/<name>.json for the record."""
    out = Path(__file__).resolve().parents[2] / ".eglo" / "conformance"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(orjson.dumps(figures, option=orjson.OPT_INDENT_2).decode())


@contextlib.asynccontextmanager
async def database_at(database_url: str, versions: int | None) -> AsyncIterator[str]:
    """A database of the test's own with the first `versions` migrations (None: none at all,
    not even schema_migrations)."""
    name = f"eglo_scratch_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = infra.with_database(database_url, name)
    if versions is not None:
        conn = await asyncpg.connect(url)
        try:
            await apply_first(conn, versions)
        finally:
            await conn.close()
    try:
        yield url
    finally:
        admin = await asyncpg.connect(database_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def apply_first(conn: asyncpg.Connection, versions: int) -> None:
    """What `eglo migrate` did for an older release: its migrations, recorded."""
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version TEXT PRIMARY KEY, "
        "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
    )
    for version, sql in migration_files()[:versions]:
        await conn.execute(sql)
        await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)


def make_settings(amqp_url: str, database_url: str, qnn_url: str, **overrides: Any) -> Settings:
    """Test settings: fast retries and delay tiers, a free metrics port, small grace."""
    values: dict[str, Any] = dict(
        amqp_url=amqp_url,
        database_url=database_url,
        qnn_url=qnn_url,
        metrics_port=0,
        metrics_host="127.0.0.1",
        qnn_backoff_initial_s=0.01,
        qnn_backoff_max_s=0.1,
        qnn_timeout_s=2.0,
        retry_delays_s=[0.2, 0.5],
        shutdown_grace_s=5.0,
        prefetch=64,
        outbox_poll_s=0.1,
    )
    values.update(overrides)
    return Settings(**values)
