"""The worker process: opens every long-lived resource once, runs until told to stop, then drains.

Shutdown (SIGTERM/SIGINT, or an empty queue in burst mode): stop consuming, let in-flight requests
finish within `shutdown_grace_s`, flush the outbox, close everything in reverse order. Deliveries
that did not finish stay unacked and the broker redelivers them to another worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import aiormq
import asyncpg
import structlog
from aio_pika.abc import AbstractRobustConnection

from db.migrate import WORKER_PRIVILEGES
from db.pool import connect, create_pool, database_url
from worker import http, tls, topology
from worker.breaker import CircuitBreaker, State
from worker.consumer import Consumer
from worker.datasets import resolve_request
from worker.gates import BrokerWatch, DatabaseGate
from worker.metrics import Metrics
from worker.outbox import OutboxRelay
from worker.pipeline import Pipeline
from worker.qnn import QnnClient, make_http_client
from worker.scoring import BackgroundScorer
from worker.settings import Settings
from worker.store import RunStore

log = structlog.get_logger(__name__)


@dataclass
class Resources:
    pool: asyncpg.Pool
    connection: AbstractRobustConnection


# aiormq lets a connection queue only 10 frames (FRAME_BUFFER_SIZE; there is no parameter for it).
# Past that, every publish and ack waits for the writer task, one event-loop pass per frame: on a
# busy worker the outbox relay took 2-8 s per 500 events and fell thousands of events behind the
# commits (measured with the bench harness). 1,024 frames of eglo's size stay within a few MB.
AMQP_FRAME_BUFFER = 1024


@contextlib.asynccontextmanager
async def open_resources(settings: Settings) -> AsyncIterator[Resources]:
    """The database pool and broker connection, closed in reverse order of opening."""
    aiormq.Connection.FRAME_BUFFER_SIZE = AMQP_FRAME_BUFFER
    pool = await create_pool(database_url(settings), size=settings.db_pool_size)
    try:
        connection = await tls.connect_broker(
            tls.amqp_url(settings),
            name="eglo-worker",
            reconnect_interval=settings.amqp_reconnect_interval_s,
        )
        try:
            yield Resources(pool, connection)
        finally:
            await connection.close()
    finally:
        await pool.close()


class Worker:
    """One worker process's lifecycle; `run` returns the exit code."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.stop_requested = asyncio.Event()
        self.started = asyncio.Event()
        self.metrics_port: int | None = None

    def stop(self) -> None:
        self.stop_requested.set()

    async def run(self, *, burst: bool = False) -> int:
        settings, metrics = self.settings, self.metrics
        metrics.prefetch.set(settings.prefetch)
        async with open_resources(settings) as res:
            consume_channel = await res.connection.channel()
            await consume_channel.set_qos(prefetch_count=settings.prefetch)
            publish_channel = await res.connection.channel(publisher_confirms=True)
            await topology.declare(publish_channel, settings.retry_delays_s)

            relay = OutboxRelay(
                res.pool,
                publish_channel,
                metrics,
                batch=settings.outbox_batch,
                poll_s=settings.outbox_poll_s,
            )
            store = RunStore(
                res.pool,
                metrics,
                batch_max=settings.db_batch_max,
                writers=settings.db_writers,
                on_commit=relay.wake,
            )
            async with make_http_client(settings) as http_client:
                breaker = CircuitBreaker(
                    failure_threshold=settings.breaker_failure_threshold,
                    probe_interval_s=settings.breaker_probe_interval_s,
                    probe=lambda: qnn.healthy(),
                )
                qnn = QnnClient(http_client, settings, metrics, breaker)
                scorer = (
                    BackgroundScorer(
                        res.pool, metrics.forecast_mape, limit=settings.accuracy_gauge_limit
                    )
                    if settings.score_forecasts
                    else None
                )
                gate = DatabaseGate(
                    lambda: connect(database_url(settings)),
                    WORKER_PRIVILEGES,
                    interval_s=settings.db_check_interval_s,
                )
                consumer = Consumer(
                    Pipeline(
                        settings,
                        qnn,
                        store,
                        metrics,
                        datasets=functools.partial(resolve_request, res.pool),
                        on_forecast=scorer.note if scorer is not None else None,
                        db_gate=gate,
                    ),
                    consume_channel,
                    publish_channel,
                    metrics,
                )
                broker = BrokerWatch(res.connection, metrics)
                switching = asyncio.Lock()

                async def follow() -> None:
                    """Consume while the database and the QNN can take work, else pause."""
                    async with switching:
                        if self.stop_requested.is_set():
                            return
                        try:
                            if gate.is_open and breaker.state is not State.OPEN:
                                await consumer.start()
                            else:
                                await consumer.pause()
                        except Exception as exc:  # noqa: BLE001 - retried on the next change
                            log.warning("consumer.switch_failed", error=repr(exc)[:200])

                async def follow_breaker(state: State) -> None:
                    metrics.breaker_state.set(state.value)
                    await follow()

                async def follow_gate() -> None:
                    metrics.db_gate_open.set(1 if gate.is_open else 0)
                    if gate.is_open:
                        # Connections opened before a migration lack its types' codecs.
                        await res.pool.expire_connections()
                    await follow()

                breaker.subscribe(follow_breaker)
                gate.subscribe(follow_gate)
                broker.subscribe(follow)

                def ready() -> tuple[bool, str]:
                    if (problem := broker.problem()) is not None:
                        return False, problem
                    if consume_channel.is_closed:
                        return False, "consume channel closed"
                    if gate.problem is not None:
                        return False, gate.problem
                    if breaker.state is State.OPEN:
                        return False, "QNN circuit open"
                    if not consumer.consuming:
                        return False, "not consuming"
                    if consumer.unsettled:
                        return False, f"{consumer.unsettled} deliveries could not be settled"
                    return True, "consuming"

                runner, self.metrics_port = await http.start(
                    http.build_app(metrics, ready), settings.metrics_host, settings.metrics_port
                )
                store.start()
                relay_started = asyncio.Event()

                async def after_gate(name: str, work: Callable[[], Awaitable[None]]) -> None:
                    # Nothing to poll before the schema exists: wait, quietly.
                    await gate.wait_open()
                    if name == "outbox-relay":
                        relay_started.set()
                    await work()

                relay_task = asyncio.create_task(
                    after_gate("outbox-relay", relay.run), name="outbox-relay"
                )
                background = [
                    asyncio.create_task(
                        _watch_queues(res.connection, metrics, _queue_names(settings)),
                        name="queue-watch",
                    ),
                    asyncio.create_task(gate.run(), name="db-gate"),
                ]
                if scorer is not None:
                    background.append(
                        asyncio.create_task(after_gate("scorer", scorer.run), name="scorer")
                    )
                try:
                    if await gate.check() is not None:
                        log.warning("worker.waiting_for_database", reason=gate.problem)
                    await follow()
                    log.info(
                        "worker.started",
                        metrics_port=self.metrics_port,
                        prefetch=settings.prefetch,
                        burst=burst,
                    )
                    self.started.set()
                    if burst:
                        await _until_no_work(
                            res.connection, consumer, settings, self.stop_requested
                        )
                    else:
                        await self.stop_requested.wait()
                    log.info("worker.stopping", in_flight=consumer.in_flight)
                    await consumer.pause()
                    if not await consumer.drain(settings.shutdown_grace_s):
                        log.warning("worker.drain.timeout", abandoned=consumer.in_flight)
                        await consumer.abandon()
                finally:
                    await breaker.close()
                    await store.close()
                    for task in background:
                        task.cancel()
                    relay.stop()
                    if not relay_started.is_set():
                        relay_task.cancel()
                    try:
                        await asyncio.wait_for(relay_task, settings.outbox_flush_timeout_s)
                    except asyncio.CancelledError:
                        if not relay_task.cancelled():
                            raise
                    except Exception as exc:  # noqa: BLE001 - unsent events stay in the outbox
                        log.warning("outbox.flush.incomplete", error=repr(exc)[:200])
                    await asyncio.gather(*background, return_exceptions=True)
                    await runner.cleanup()
        log.info("worker.stopped")
        return 0


async def run_worker(settings: Settings, *, burst: bool = False) -> int:
    """The `eglo worker` entrypoint: a Worker that stops on SIGTERM or SIGINT."""
    worker = Worker(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    return await worker.run(burst=burst)


def _queue_names(settings: Settings) -> list[str]:
    delay_queues = [topology.delay_queue_name(d) for d in settings.retry_delays_s]
    return [topology.REQUESTS_QUEUE, topology.DEAD_LETTER_QUEUE, *delay_queues]


async def _watch_queues(
    connection: AbstractRobustConnection, metrics: Metrics, names: list[str]
) -> None:
    """Export queue depths, so alerts need no broker plugin to see a stuck backlog."""
    while True:
        try:
            async with connection.channel() as channel:
                for name in names:
                    queue = await channel.declare_queue(name, passive=True)
                    depth = queue.declaration_result.message_count or 0
                    metrics.queue_messages.labels(queue=name).set(depth)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a broker blip must not end the watch
            log.debug("queue.watch.failed", error=repr(exc)[:200])
        await asyncio.sleep(5.0)


async def _until_no_work(
    connection: AbstractRobustConnection,
    consumer: Consumer,
    settings: Settings,
    stop: asyncio.Event,
) -> None:
    """Burst mode: return once the queue and delay queues are empty and nothing is in flight."""
    names = [n for n in _queue_names(settings) if n != topology.DEAD_LETTER_QUEUE]
    quiet_checks = 0
    while not stop.is_set():
        idle = consumer.in_flight == 0 and await topology.ready_messages(connection, names) == 0
        quiet_checks = quiet_checks + 1 if idle else 0
        # Twice in a row: a delivery can be in the channel's buffer between two looks.
        if quiet_checks >= 2:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=0.25)
