"""Start-up and upgrade order, systemic database failures, library logs (issue 17, items 1-3).

The hostile-world rows for the same behaviour (deploy order, a database and a broker refusing
mid-run) are in tests/hostile/test_startup.py.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg
import httpx
import orjson
import pytest

from db.migrate import SchemaStatus, migration_files, schema_problem, schema_status
from db.pool import connect
from tests.support.harness import apply_first, database_at, make_settings, running_worker, wait_for
from worker.runtime.gates import DatabaseGate, is_systemic

ROOT = Path(__file__).resolve().parents[2]


def shipped() -> int:
    return len(migration_files())


# ---- the schema's version ----------------------------------------------------------------------


def test_schema_status_describes_missing_older_and_current() -> None:
    versions = tuple(v for v, _ in migration_files())
    latest = versions[-1][:4]
    assert SchemaStatus((), versions).describe() == f"schema missing, code needs {latest}"
    older = SchemaStatus(versions[:-1], versions)
    assert older.describe() == f"schema at {versions[-2][:4]}, code needs {latest}"
    assert older.pending == versions[-1:] and not older.current
    assert SchemaStatus(versions, versions).current
    # A schema newer than the code (a rollback of the code only) is not pending anything.
    assert SchemaStatus((*versions, "9999_future"), versions).current


async def test_schema_problem_names_missing_tables_and_privileges(database_url: str) -> None:
    async with database_at(database_url, None) as url:
        conn = await asyncpg.connect(url)
        try:
            status = await schema_status(conn)
            assert status.applied == () and len(status.pending) == shipped()
            privileges = {"optimization_runs": ("SELECT",)}
            assert await schema_problem(conn, privileges) == status.describe()
            await apply_first(conn, shipped())
            assert await schema_problem(conn, privileges) is None
            assert await schema_problem(conn, {"no_such_table": ("SELECT",)}) == (
                "table no_such_table missing"
            )
            role = f"eglo_r_{uuid.uuid4().hex[:6]}"
            await conn.execute(
                f"CREATE ROLE {role}; "
                f"GRANT SELECT ON optimization_runs, schema_migrations TO {role}"
            )
            await conn.execute(f"SET ROLE {role}")
            assert await schema_problem(conn, {"optimization_runs": ("SELECT",)}) is None
            assert await schema_problem(conn, {"optimization_runs": ("SELECT", "INSERT")}) == (
                "no INSERT privilege on optimization_runs"
            )
            await conn.execute("RESET ROLE")
            await conn.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")
        finally:
            await conn.close()


def _eglo(*args: str, database_url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EGLO_DATABASE_URL": database_url, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


async def test_migrate_check_exit_codes(database_url: str) -> None:
    """`eglo migrate --check`: 1 while migrations are pending (saying which), 0 once current,
    2 when the database cannot be reached; --wait waits for a migration run meanwhile."""
    async with database_at(database_url, shipped() - 1) as url:
        pending = await asyncio.to_thread(_eglo, "migrate", "--check", database_url=url)
        assert pending.returncode == 1, pending.stderr
        latest = migration_files()[-1][0]
        assert f"code needs {latest[:4]}" in pending.stderr and latest in pending.stderr

        waiting = asyncio.create_task(
            asyncio.to_thread(_eglo, "migrate", "--check", "--wait", "30", database_url=url)
        )
        await asyncio.sleep(2.0)
        assert not waiting.done()
        done = await asyncio.to_thread(_eglo, "migrate", database_url=url)
        assert done.returncode == 0, done.stderr
        waited = await waiting
        assert waited.returncode == 0, waited.stderr
        assert "current" in waited.stdout

        current = await asyncio.to_thread(_eglo, "migrate", "--check", database_url=url)
        assert current.returncode == 0 and "current" in current.stdout
    unreachable = await asyncio.to_thread(
        _eglo, "migrate", "--check", database_url="postgresql://nobody@127.0.0.1:1/none"
    )
    assert unreachable.returncode == 2 and "database unreachable" in unreachable.stderr


# ---- a worker on an older schema ---------------------------------------------------------------


async def test_worker_on_an_older_schema_waits_and_starts_when_migrated(
    amqp_url: str, database_url: str, emulator: str
) -> None:
    """Schema one migration behind the code: /healthz 200, /readyz 503 "schema at 0003, code
    needs 0004", not consuming; migrated: consuming, without a restart."""
    from db.migrate import migrate

    async with database_at(database_url, shipped() - 1) as url:
        settings = make_settings(amqp_url, url, emulator, db_check_interval_s=0.3)
        async with running_worker(settings) as worker, httpx.AsyncClient() as client:
            base = f"http://127.0.0.1:{worker.metrics_port}"
            assert (await client.get(f"{base}/healthz")).status_code == 200
            ready = await client.get(f"{base}/readyz")
            versions = [v[:4] for v, _ in migration_files()]
            assert ready.status_code == 503
            assert ready.json()["detail"] == f"schema at {versions[-2]}, code needs {versions[-1]}"
            conn = await connect(url)
            try:
                await migrate(conn)
            finally:
                await conn.close()

            async def ready_now() -> bool:
                return (await client.get(f"{base}/readyz")).status_code == 200

            await wait_for(ready_now, within_s=5)


# ---- which failures are systemic ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "systemic"),
    [
        (ConnectionRefusedError(), True),
        (TimeoutError(), True),
        (asyncpg.UndefinedTableError("relation does not exist"), True),
        (asyncpg.UndefinedColumnError("column does not exist"), True),
        (asyncpg.InsufficientPrivilegeError("permission denied"), True),
        (asyncpg.TooManyConnectionsError("too many"), True),
        (asyncpg.InvalidCatalogNameError("database gone"), True),
        (asyncpg.ReadOnlySQLTransactionError("read only"), True),
        (asyncpg.AdminShutdownError("shutdown"), True),
        (asyncpg.QueryCanceledError("statement timeout"), False),
        (asyncpg.UniqueViolationError("duplicate"), False),
        (asyncpg.DataError("bad value"), False),
        (ValueError("bug"), False),
    ],
)
def test_is_systemic(exc: BaseException, systemic: bool) -> None:
    assert is_systemic(exc) is systemic


async def test_gate_closes_on_report_and_on_an_unreachable_database() -> None:
    changes: list[bool] = []
    gate: DatabaseGate
    connection = FakeConnection()

    async def connect_fake() -> asyncpg.Connection:
        if not connection.up:
            raise ConnectionRefusedError(111, "Connect call failed")
        return connection

    async def listener() -> None:
        changes.append(gate.is_open)

    gate = DatabaseGate(connect_fake, {}, interval_s=0.05)
    gate.subscribe(listener)
    assert not gate.is_open and gate.problem == "database not checked yet"
    assert await gate.check() is None
    await asyncio.wait_for(gate.wait_open(), 1)
    gate.report(asyncpg.UndefinedTableError("relation \"outbox\" does not exist"))
    assert gate.problem is not None and gate.problem.startswith("database error: UndefinedTable")
    await asyncio.sleep(0.1)  # held closed at least interval_s, then the check reopens it
    assert await gate.check() is None
    await asyncio.sleep(0)  # listeners run as tasks and read the gate as it is then
    connection.up = False
    await gate.check()
    assert gate.problem is not None and gate.problem.startswith(
        "database unreachable: ConnectionResetError"
    )
    await gate.check()  # the connection was dropped; a new one is refused
    assert gate.problem is not None and gate.problem.startswith(
        "database unreachable: ConnectionRefusedError"
    )
    await asyncio.sleep(0)
    assert changes == [True, False, True, False]


class FakeConnection:
    """Just enough of a connection for schema_problem on a current schema."""

    up = True

    def is_closed(self) -> bool:
        return False

    def terminate(self) -> None:
        pass

    async def fetchval(self, query: str, *args: object) -> object:
        if not self.up:
            raise ConnectionResetError(104, "Connection reset by peer")
        return False  # schema_migrations exists

    async def fetch(self, query: str, *args: object) -> list[dict[str, object]]:
        if "schema_migrations" in query:
            return [{"version": v} for v, _ in migration_files()]
        return []


# ---- library log lines -------------------------------------------------------------------------


def test_library_log_lines_are_eglo_json_lines() -> None:
    """aio-pika's reconnect warning (and any stdlib record) comes out as one JSON line with its
    level and logger, secrets scrubbed, beside eglo's own events."""
    code = (
        "import logging, structlog\n"
        "from worker.observability import logs\n"
        "logs.configure('INFO', json=True, secrets=('hunter2',))\n"
        "logging.getLogger('aio_pika.robust_connection').warning("
        "'Connection attempt to \"%s\" failed: %s. Reconnecting after %r seconds.', "
        "'amqp://eglo:hunter2@rabbit/', 'ACCESS_REFUSED', 5)\n"
        "logging.getLogger('asyncpg.pool').error('connection lost')\n"
        "logging.getLogger('aiohttp.access').info('GET /metrics')\n"
        "structlog.get_logger('worker').warning('own.event', n=1)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr
    lines = [orjson.loads(line) for line in done.stderr.splitlines()]
    assert [(x["level"], x.get("logger")) for x in lines] == [
        ("warning", "aio_pika.robust_connection"),
        ("error", "asyncpg.pool"),
        ("info", "aiohttp.access"),
        ("warning", None),
    ]
    assert "Reconnecting after 5 seconds" in lines[0]["event"]
    assert "hunter2" not in done.stderr
    assert all("timestamp" in x for x in lines)


# ---- a failure tied to one message: the dead letter carries a reason ---------------------------


class ExplodingPipeline:
    """A pipeline that fails every message with an unexpected error."""

    async def handle(self, delivery: object) -> object:
        raise ValueError("a bug this message always trips")


async def test_unexpected_error_on_the_last_delivery_is_dead_lettered_with_a_reason(
    amqp_url: str,
) -> None:
    """On the delivery the queue's limit would make its last, the consumer dead-letters the
    message itself as `unexpected_error` (the broker's own dead letter carries no reason)."""
    import aio_pika

    from contracts.topology import REASON_HEADER
    from producers import topology
    from worker.observability.metrics import Metrics
    from worker.runtime.consumer import Consumer

    connection = await aio_pika.connect_robust(amqp_url)
    try:
        channel = await connection.channel()
        publish_channel = await connection.channel(publisher_confirms=True)
        topo = await topology.declare(publish_channel)
        consumer = Consumer(ExplodingPipeline(), channel, publish_channel, Metrics())  # type: ignore[arg-type]
        # As the quorum queue would present its 20th delivery.
        await topo.requests_exchange.publish(
            aio_pika.Message(
                b"{}",
                headers={"x-delivery-count": topology.DELIVERY_LIMIT - 1},
                message_id="exploding-1",
            ),
            routing_key="request.forecast",
        )
        await consumer.start()
        dlq = await channel.declare_queue(topology.DEAD_LETTER_QUEUE, passive=True)
        dead = await wait_for(lambda: dlq.get(fail=False), within_s=10)
        await dead.ack()
        await consumer.pause()
        await consumer.drain(5)
    finally:
        await connection.close()
    assert dead.headers[REASON_HEADER] == "unexpected_error"
    assert "ValueError" in str(dead.headers["x-eglo-dead-letter-detail"])
    assert dead.message_id == "exploding-1"


async def test_embedder_without_a_schema_waits_and_starts_when_migrated(
    amqp_url: str, database_url: str
) -> None:
    """The embedder has the worker's start-up order: no schema -> its queue declared, /readyz
    503 with the reason, nothing consumed; migrated -> consuming, without a restart."""
    import aio_pika

    from db.migrate import migrate
    from worker.embedder.service import EMBEDDINGS_QUEUE, EmbedderConfig, EmbedderService

    async with database_at(database_url, None) as url:
        settings = make_settings(amqp_url, url, "http://127.0.0.1:1", db_check_interval_s=0.3)
        service = EmbedderService(settings, config=EmbedderConfig(metrics_port=0))
        task = asyncio.create_task(service.run())
        try:
            await asyncio.wait_for(service.started.wait(), 30)
            base = f"http://127.0.0.1:{service.metrics_port}"
            async with httpx.AsyncClient() as client:
                ready = await client.get(f"{base}/readyz")
                assert ready.status_code == 503
                assert ready.json()["detail"].startswith("schema missing, code needs ")
                connection = await aio_pika.connect_robust(amqp_url)
                try:
                    channel = await connection.channel()
                    queue = await channel.declare_queue(EMBEDDINGS_QUEUE, passive=True)
                    assert queue.declaration_result.consumer_count == 0
                finally:
                    await connection.close()
                conn = await connect(url)
                try:
                    await migrate(conn)
                finally:
                    await conn.close()

                async def ready_now() -> bool:
                    return (await client.get(f"{base}/readyz")).status_code == 200

                await wait_for(ready_now, within_s=5)
        finally:
            service.stop()
            assert await asyncio.wait_for(task, 30) == 0
