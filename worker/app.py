"""The worker process: opens every long-lived resource once, runs until told to stop, then drains.

Shutdown (SIGTERM/SIGINT, or an empty queue in burst mode): stop consuming, let in-flight requests
finish within `shutdown_grace_s`, flush the outbox, close everything in reverse order. Deliveries
that did not finish stay unacked and the broker redelivers them to another worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aio_pika
import asyncpg
import structlog
from aio_pika.abc import AbstractRobustConnection

from db.pool import create_pool, database_url
from worker import http, topology
from worker.consumer import Consumer
from worker.metrics import Metrics
from worker.outbox import OutboxRelay
from worker.pipeline import Pipeline
from worker.qnn import QnnClient, make_http_client
from worker.settings import Settings
from worker.store import RunStore

log = structlog.get_logger(__name__)


@dataclass
class Resources:
    pool: asyncpg.Pool
    connection: AbstractRobustConnection


@contextlib.asynccontextmanager
async def open_resources(settings: Settings) -> AsyncIterator[Resources]:
    """The database pool and broker connection, closed in reverse order of opening."""
    pool = await create_pool(database_url(settings), size=settings.db_pool_size)
    try:
        connection = await aio_pika.connect_robust(
            settings.amqp_url.get_secret_value(),
            client_properties={"connection_name": "eglo-worker"},
        )
        try:
            yield Resources(pool, connection)
        finally:
            await connection.close()
    finally:
        await pool.close()


async def _queue_depth(connection: AbstractRobustConnection, names: list[str]) -> int:
    async with connection.channel() as channel:
        total = 0
        for name in names:
            queue = await channel.declare_queue(name, passive=True)
            total += queue.declaration_result.message_count or 0
        return total


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
                qnn = QnnClient(http_client, settings, metrics)
                consumer = Consumer(
                    Pipeline(settings, qnn, store, metrics),
                    consume_channel,
                    publish_channel,
                    metrics,
                )

                def ready() -> tuple[bool, str]:
                    if res.connection.is_closed:
                        return False, "broker connection closed"
                    if not consumer.consuming:
                        return False, "not consuming"
                    return True, "consuming"

                runner, self.metrics_port = await http.start(
                    http.build_app(metrics, ready), settings.metrics_host, settings.metrics_port
                )
                store.start()
                relay_task = asyncio.create_task(relay.run(), name="outbox-relay")
                try:
                    await consumer.start()
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
                    await store.close()
                    relay_task.cancel()
                    await asyncio.gather(relay_task, return_exceptions=True)
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(relay.flush(), timeout=5.0)
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


async def _until_no_work(
    connection: AbstractRobustConnection,
    consumer: Consumer,
    settings: Settings,
    stop: asyncio.Event,
) -> None:
    """Burst mode: return once the queue and delay queues are empty and nothing is in flight."""
    names = [topology.REQUESTS_QUEUE] + [
        topology.delay_queue_name(d) for d in settings.retry_delays_s
    ]
    quiet_checks = 0
    while not stop.is_set():
        idle = consumer.in_flight == 0 and await _queue_depth(connection, names) == 0
        quiet_checks = quiet_checks + 1 if idle else 0
        # Twice in a row: a delivery can be in the channel's buffer between two looks.
        if quiet_checks >= 2:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=0.25)
