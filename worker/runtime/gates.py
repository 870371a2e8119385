"""What a worker or embedder needs before it may consume, each with the reason /readyz gives.

DatabaseGate: whether the database can take the work (schema current, tables there, privileges
held). BrokerWatch: whether the broker connection is up.

A failure that is not about the message (the server unreachable, a table missing, a privilege
revoked, no connection to be had) closes the gate; the process stops consuming while it is closed
and requests in flight wait for it instead of spending their deliveries. A check on a connection
of the gate's own (never the busy pool) runs every `interval_s` and reopens it once the database
answers and the schema is current again. /readyz reports the gate's reason while it is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import asyncpg
import structlog
from aio_pika.abc import AbstractRobustConnection

from db.migrate import schema_problem
from worker.observability.metrics import Metrics

log = structlog.get_logger(__name__)

# Errors that say nothing about the message being handled.
_TRANSIENT = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.TooManyConnectionsError,
    TimeoutError,
)
# SQLSTATE classes: 08 connection, 28 authorization, 3D database gone, 3F schema gone,
# 53 insufficient resources (disk full, too many connections), 57 operator intervention.
_SYSTEMIC_CLASSES = ("08", "28", "3D", "3F", "53", "57")
_SYSTEMIC_STATES = {
    "42P01",  # undefined_table: not migrated yet, or dropped
    "42703",  # undefined_column: the code is newer than the schema
    "42883",  # undefined_function
    "42704",  # undefined_object (e.g. the vector type)
    "42501",  # insufficient_privilege
    "25006",  # read_only_sql_transaction: connected to a standby after a failover
}
_NOT_SYSTEMIC = {"57014"}  # query_canceled (statement timeout): may well be the message's own


def is_systemic(exc: BaseException) -> bool:
    """True for a database failure that would fail any message alike."""
    if isinstance(exc, _TRANSIENT):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        state = str(getattr(exc, "sqlstate", "") or "")
        if state in _NOT_SYSTEMIC:
            return False
        return state in _SYSTEMIC_STATES or state[:2] in _SYSTEMIC_CLASSES
    return False


def describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0][:160] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


Listener = Callable[[], Coroutine[Any, Any, None]]


class DatabaseGate:
    """Open while the database can do the work; `problem` says why not."""

    def __init__(
        self,
        connect: Callable[[], Awaitable[asyncpg.Connection]],
        privileges: dict[str, tuple[str, ...]],
        *,
        interval_s: float = 1.0,
        timeout_s: float = 3.0,
        max_hold_s: float = 30.0,
    ) -> None:
        self._connect = connect
        self._privileges = privileges
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._max_hold_s = max_hold_s
        self._conn: asyncpg.Connection | None = None
        self._checking = asyncio.Lock()  # one query at a time on the gate's connection
        self._open = asyncio.Event()
        self._wake = asyncio.Event()
        self._listeners: list[Listener] = []
        self.problem: str | None = "database not checked yet"
        # After a failure reported by the work itself, stay closed at least this long, doubling
        # while the failures come back right after reopening (a fault the check cannot see).
        self._hold_s = interval_s
        self._closed_until = 0.0
        self._opened_at = 0.0

    @property
    def is_open(self) -> bool:
        return self.problem is None

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    async def wait_open(self) -> None:
        await self._open.wait()

    async def check(self) -> str | None:
        """Check now and update the gate; returns the problem (None: open)."""
        async with self._checking:
            problem = await self._problem()
        if problem is None and time.monotonic() < self._closed_until:
            problem = self.problem or "database failing"
        self._set(problem)
        return problem

    def report(self, exc: BaseException) -> None:
        """The work hit a systemic failure: close now; the next check decides when to reopen."""
        now = time.monotonic()
        if self.problem is None:
            recent = now - self._opened_at < self._max_hold_s
            self._hold_s = min(self._hold_s * 2, self._max_hold_s) if recent else self._interval_s
            self._closed_until = now + self._hold_s
            self._set(f"database error: {describe(exc)}")
        self._wake.set()

    async def run(self) -> None:
        """Check every interval_s (at once after a report) until cancelled."""
        try:
            while True:
                await self.check()
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._interval_s)
        finally:
            await self._drop_connection()

    async def _problem(self) -> str | None:
        try:
            async with asyncio.timeout(self._timeout_s):
                if self._conn is None or self._conn.is_closed():
                    self._conn = await self._connect()
                return await schema_problem(self._conn, self._privileges)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure to check is a reason to stay shut
            await self._drop_connection()
            if isinstance(exc, TimeoutError):
                return f"database unreachable: no answer within {self._timeout_s:g} s"
            if is_systemic(exc) and not isinstance(exc, asyncpg.PostgresError):
                return f"database unreachable: {describe(exc)}"
            return f"database error: {describe(exc)}"

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()

    def _set(self, problem: str | None) -> None:
        if problem == self.problem:
            return
        previous, self.problem = self.problem, problem
        if problem is None:
            self._opened_at = time.monotonic()
            self._open.set()
            log.info("db.gate.open", previous=previous)
        else:
            self._open.clear()
            log.warning("db.gate.closed", reason=problem)
        if (previous is None) != (problem is None):
            for listener in self._listeners:
                asyncio.create_task(listener())  # noqa: RUF006 - listeners are short, own errors


class BrokerWatch:
    """Whether the broker connection is really up.

    aio-pika's robust connection keeps `is_closed` False while it reconnects, so that alone made
    /readyz answer 200 for as long as the broker refused the worker. This follows the
    connection's close and reconnect callbacks instead (a reconnect is reported once every
    channel, and so the consumer, has been restored).
    """

    def __init__(self, connection: AbstractRobustConnection, metrics: Metrics) -> None:
        self._connection = connection
        self._metrics = metrics
        self._up = True
        self._listeners: list[Callable[[], Coroutine[Any, Any, None]]] = []
        connection.close_callbacks.add(self._on_close)
        connection.reconnect_callbacks.add(self._on_reconnect)
        metrics.broker_connected.set(1)

    def subscribe(self, listener: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Called after each reconnect."""
        self._listeners.append(listener)

    def problem(self) -> str | None:
        if self._connection.is_closed:
            return "broker connection closed"
        if not self._up or not self._connection.connected.is_set():
            return "broker connection down, reconnecting"
        return None

    def _on_close(self, _: object, exc: BaseException | None = None) -> None:
        # aio-pika marks a close of our own before it runs the callbacks: no warning for that.
        if self._up and not getattr(self._connection, "_close_called", False):
            log.warning("broker.connection.lost", error=repr(exc)[:200])
        self._up = False
        self._metrics.broker_connected.set(0)

    def _on_reconnect(self, *_: object) -> None:
        self._up = True
        self._metrics.broker_connected.set(1)
        log.info("broker.connection.restored")
        for listener in self._listeners:
            asyncio.create_task(listener())  # noqa: RUF006 - listeners are short, own errors
