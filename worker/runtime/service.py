"""What every eglo service process (the worker, the embedder) shares around its own work.

Its resources, opened once and closed in reverse order; consumption that follows the database
gate (and whatever else the service waits for), one change at a time; readiness; burst mode; and
the signal entrypoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import aiormq
import asyncpg
import structlog
from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from producers import topology
from producers.broker import connect_broker
from worker.observability.metrics import Metrics
from worker.runtime import connections
from worker.runtime.gates import BrokerWatch, DatabaseGate
from worker.settings import Settings

log = structlog.get_logger(__name__)

# aiormq lets a connection queue only 10 frames (FRAME_BUFFER_SIZE; there is no parameter for it).
# Past that, every publish and ack waits for the writer task, one event-loop pass per frame, and a
# busy worker's outbox relay fell far behind its commits (docs/performance.md). 1,024 frames of
# eglo's size stay within a few MB.
AMQP_FRAME_BUFFER = 1024


# The young generation's threshold (Python's default: 700 container allocations). A service's
# young generation is mostly in-flight requests' data, traversed again at every collection while
# it lives; collecting a tenth as often costs a tenth of that (docs/performance.md).
GC_YOUNG_THRESHOLD = 7000


def settle_heap() -> None:
    """For a long-running service process, once its code is imported: what start-up created lives
    as long as the process, so it is frozen out of the collector's sight (no full collection
    traverses it again), and the young generation is collected less often. Cyclic garbage then
    waits for at most GC_YOUNG_THRESHOLD allocations; other garbage is freed as before."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


@dataclass
class Resources:
    pool: asyncpg.Pool
    connection: AbstractRobustConnection


@contextlib.asynccontextmanager
async def open_resources(
    settings: Settings, *, name: str, pool_size: int
) -> AsyncIterator[Resources]:
    """The database pool and the broker connection, closed in reverse order of opening."""
    aiormq.Connection.FRAME_BUFFER_SIZE = AMQP_FRAME_BUFFER
    pool = await connections.open_pool(connections.database_url(settings), size=pool_size)
    try:
        connection = await connect_broker(
            connections.amqp_url(settings),
            name=name,
            reconnect_interval=settings.amqp_reconnect_interval_s,
            backoff_max_s=settings.amqp_reconnect_max_s,
        )
        try:
            yield Resources(pool, connection)
        finally:
            await connection.close()
    finally:
        await pool.close()


class Switch:
    """Consumes while `wanted()` holds and pauses otherwise, one change at a time; a failed change
    is retried on the next one (the gate, the breaker or the broker changes again)."""

    def __init__(
        self,
        wanted: Callable[[], bool],
        start: Callable[[], Awaitable[None]],
        pause: Callable[[], Awaitable[None]],
        stopping: asyncio.Event,
    ) -> None:
        self._wanted, self._start, self._pause, self._stopping = wanted, start, pause, stopping
        self.lock = asyncio.Lock()

    async def follow(self) -> None:
        async with self.lock:
            if self._stopping.is_set():
                return
            try:
                await (self._start() if self._wanted() else self._pause())
            except Exception as exc:  # noqa: BLE001 - retried on the next change
                log.warning("consumer.switch_failed", error=repr(exc)[:200])

    def watch(
        self, gate: DatabaseGate, broker: BrokerWatch, pool: asyncpg.Pool, metrics: Metrics
    ) -> None:
        """Follow the database gate and the broker connection."""

        async def gate_changed() -> None:
            metrics.db_gate_open.set(1 if gate.is_open else 0)
            if gate.is_open:
                # Connections opened before a migration lack its types' codecs.
                await pool.expire_connections()
            await self.follow()

        gate.subscribe(gate_changed)
        broker.subscribe(self.follow)


def readiness(
    broker: BrokerWatch,
    channel: AbstractChannel,
    gate: DatabaseGate,
    *checks: Callable[[], str | None],
) -> Callable[[], tuple[bool, str]]:
    """`/readyz`: the broker, the consume channel, the database gate, then the service's checks,
    each a problem or None."""

    def ready() -> tuple[bool, str]:
        if (problem := broker.problem()) is not None:
            return False, problem
        if channel.is_closed:
            return False, "consume channel closed"
        if gate.problem is not None:
            return False, gate.problem
        for check in checks:
            if (problem := check()) is not None:
                return False, problem
        return True, "consuming"

    return ready


async def until_no_work(
    connection: AbstractRobustConnection,
    queues: list[str],
    in_flight: Callable[[], int],
    stop: asyncio.Event,
) -> None:
    """Burst mode: return once these queues are empty and nothing is in flight (or on stop)."""
    quiet_checks = 0
    while not stop.is_set():
        idle = in_flight() == 0 and await topology.ready_messages(connection, queues) == 0
        quiet_checks = quiet_checks + 1 if idle else 0
        # Twice in a row: a delivery can be in the channel's buffer between two looks.
        if quiet_checks >= 2:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=0.25)


class Service(Protocol):
    def stop(self) -> None: ...

    async def run(self, *, burst: bool = False) -> int: ...


async def run_until_signalled(service: Service, *, burst: bool = False) -> int:
    """A service's entrypoint: it stops on SIGTERM or SIGINT; returns its exit code."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.stop)
    return await service.run(burst=burst)
