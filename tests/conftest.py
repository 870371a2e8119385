"""Fixtures: a real RabbitMQ vhost per test, a real Postgres database per session, the emulator."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator

import aio_pika
import asyncpg
import pytest

from db.migrate import migrate
from db.pool import connect, create_pool
from tests.support import infra
from worker.observability import logs

logs.configure("WARNING", json=False)

# A test's folder is its kind; `-m unit`, `-m integration`, `-m e2e` select by it.
_KINDS = ("unit", "integration", "e2e", "chaos", "hostile")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = item.path.parts
        for kind in _KINDS:
            if kind in parts:
                item.add_marker(getattr(pytest.mark, kind))

TABLES = (
    "forecast_scores",
    "model_metrics",
    "outbox",
    "anomalies",
    "optimization_embeddings",
    "qnn_execution_metrics",
    "optimization_runs",
    "energy_datasets",
)


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A migrated database of its own on a pgvector-enabled server."""
    with infra.postgres_server() as server_url:
        name = f"eglo_test_{uuid.uuid4().hex[:8]}"

        async def create() -> None:
            conn = await asyncpg.connect(server_url)
            try:
                await conn.execute(f'CREATE DATABASE "{name}"')
            finally:
                await conn.close()
            conn = await connect(infra.with_database(server_url, name))
            try:
                await migrate(conn)
            finally:
                await conn.close()

        asyncio.run(create())
        yield infra.with_database(server_url, name)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on a database emptied before the test."""
    pool = await create_pool(database_url, size=4)
    await pool.execute(f"TRUNCATE {', '.join(TABLES)} CASCADE")
    yield pool
    await pool.close()


@pytest.fixture(scope="session")
def broker() -> Iterator[infra.Broker | None]:
    """EGLO_AMQP_URL's broker (None), a RabbitMQ testcontainer, or the local one (started)."""
    if os.environ.get("EGLO_AMQP_URL"):
        yield None
        return
    with infra.rabbitmq_broker() as broker:
        yield broker


@pytest.fixture
def amqp_url(broker: infra.Broker | None) -> Iterator[str]:
    """A vhost of the test's own (with EGLO_AMQP_URL set: that broker, shared)."""
    if broker is None:
        yield os.environ["EGLO_AMQP_URL"]
        return
    with infra.fresh_vhost(broker) as url:
        yield url


@pytest.fixture
async def amqp(amqp_url: str) -> AsyncIterator[aio_pika.abc.AbstractRobustConnection]:
    connection = await aio_pika.connect_robust(amqp_url)
    yield connection
    await connection.close()


@pytest.fixture
async def emulator() -> AsyncIterator[str]:
    """A fault-free QNN emulator on a free port."""
    from qnn_emulator.server import running_emulator
    from qnn_emulator.settings import EmulatorSettings

    async with running_emulator(EmulatorSettings()) as url:
        yield url


