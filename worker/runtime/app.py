"""The worker process: opens every long-lived resource once, runs until told to stop, then drains.

Shutdown (SIGTERM/SIGINT, or an empty queue in burst mode): stop consuming, let in-flight requests
finish within `shutdown_grace_s`, flush the outbox, close everything in reverse order. Deliveries
that did not finish stay unacked and the broker redelivers them to another worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import structlog
from aio_pika.abc import AbstractRobustConnection
from aiohttp import web

from db.migrate import WORKER_PRIVILEGES
from producers import topology
from worker.analytics.accuracy import BackgroundScorer
from worker.observability.metrics import Metrics
from worker.runtime import health as http
from worker.runtime.breaker import CircuitBreaker, State
from worker.runtime.connections import connect_database, database_url
from worker.runtime.consumer import Consumer
from worker.runtime.gates import BrokerWatch, DatabaseGate
from worker.runtime.history import resolve_request
from worker.runtime.outbox import OutboxRelay
from worker.runtime.pipeline import Pipeline
from worker.runtime.qnn import QnnClient, make_http_client
from worker.runtime.service import (
    Resources,
    Switch,
    open_resources,
    readiness,
    run_until_signalled,
    until_no_work,
)
from worker.runtime.store import RunStore
from worker.settings import Settings

log = structlog.get_logger(__name__)


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
        settings = self.settings
        self.metrics.prefetch.set(settings.prefetch)
        async with contextlib.AsyncExitStack() as stack:
            res = await stack.enter_async_context(
                open_resources(settings, name="eglo-worker", pool_size=settings.db_pool_size)
            )
            http_client = await stack.enter_async_context(make_http_client(settings))
            parts = await self._build(res, http_client)
            stack.push_async_callback(self._stop, parts)
            await self._start(parts)
            log.info(
                "worker.started",
                metrics_port=self.metrics_port,
                prefetch=settings.prefetch,
                burst=burst,
            )
            self.started.set()
            if burst:
                names = [n for n in _queue_names(settings) if n != topology.DEAD_LETTER_QUEUE]
                await until_no_work(
                    res.connection, names, lambda: parts.consumer.in_flight, self.stop_requested
                )
            else:
                await self.stop_requested.wait()
            log.info("worker.stopping", in_flight=parts.consumer.in_flight)
            await parts.consumer.pause()
            if not await parts.consumer.drain(settings.shutdown_grace_s):
                log.warning("worker.drain.timeout", abandoned=parts.consumer.in_flight)
                await parts.consumer.abandon()
        log.info("worker.stopped")
        return 0

    async def _build(self, res: Resources, http_client: httpx.AsyncClient) -> _Parts:
        """Every component, wired; nothing runs yet."""
        settings, metrics = self.settings, self.metrics
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
            window=settings.outbox_window,
            confirm_timeout_s=settings.outbox_confirm_timeout_s,
            max_unannounced=settings.outbox_max_unannounced,
        )
        store = RunStore(
            res.pool,
            metrics,
            batch_max=settings.db_batch_max,
            writers=settings.db_writers,
            on_commit=relay.committed,
            lease_s=relay.lease_s,
        )
        breaker = CircuitBreaker(
            failure_threshold=settings.breaker_failure_threshold,
            probe_interval_s=settings.breaker_probe_interval_s,
            probe=lambda: qnn.healthy(),
        )
        qnn = QnnClient(http_client, settings, metrics, breaker)
        scorer = (
            BackgroundScorer(res.pool, metrics.forecast_mape, limit=settings.accuracy_gauge_limit)
            if settings.score_forecasts
            else None
        )
        gate = DatabaseGate(
            lambda: connect_database(database_url(settings)),
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
                room=relay.room,
            ),
            consume_channel,
            publish_channel,
            metrics,
        )
        switch = Switch(
            lambda: gate.is_open and breaker.state is not State.OPEN,
            consumer.start,
            consumer.pause,
            self.stop_requested,
        )

        async def breaker_changed(state: State) -> None:
            metrics.breaker_state.set(state.value)
            await switch.follow()

        broker = BrokerWatch(res.connection, metrics)
        breaker.subscribe(breaker_changed)
        switch.watch(gate, broker, res.pool, metrics)

        def problem() -> str | None:
            if breaker.state is State.OPEN:
                return "QNN circuit open"
            if not consumer.consuming:
                return "not consuming"
            if consumer.unsettled:
                return f"{consumer.unsettled} deliveries could not be settled"
            return None

        ready = readiness(broker, consume_channel, gate, problem)
        return _Parts(res, consumer, store, relay, breaker, gate, scorer, switch, ready)

    async def _start(self, parts: _Parts) -> None:
        """Health endpoint, writers, relay and watchers; then consume if the database allows."""
        settings = self.settings
        parts.runner, self.metrics_port = await http.start(
            http.build_app(self.metrics, parts.ready), settings.metrics_host, settings.metrics_port
        )
        parts.store.start()
        gate = parts.gate

        async def after_gate(
            work: Callable[[], Awaitable[None]], started: asyncio.Event | None = None
        ) -> None:
            # Nothing to poll before the schema exists: wait, quietly.
            await gate.wait_open()
            if started is not None:
                started.set()
            await work()

        parts.relay_task = asyncio.create_task(
            after_gate(parts.relay.run, parts.relay_started), name="outbox-relay"
        )
        parts.background = [
            asyncio.create_task(
                _watch_queues(parts.res.connection, self.metrics, _queue_names(settings)),
                name="queue-watch",
            ),
            asyncio.create_task(gate.run(), name="db-gate"),
        ]
        if parts.scorer is not None:
            parts.background.append(
                asyncio.create_task(after_gate(parts.scorer.run), name="scorer")
            )
        if await gate.check() is not None:
            log.warning("worker.waiting_for_database", reason=gate.problem)
        await parts.switch.follow()

    async def _stop(self, parts: _Parts) -> None:
        """Reverse order: no more QNN probes or commits, then the outbox flushed within its
        timeout (what is left stays in the outbox for the next relay), then the watchers."""
        await parts.breaker.close()
        await parts.store.close()
        for task in parts.background:
            task.cancel()
        parts.relay.stop()
        if parts.relay_task is not None:
            if not parts.relay_started.is_set():
                parts.relay_task.cancel()
            try:
                await asyncio.wait_for(parts.relay_task, self.settings.outbox_flush_timeout_s)
            except asyncio.CancelledError:
                if not parts.relay_task.cancelled():
                    raise
            except Exception as exc:  # noqa: BLE001 - unsent events stay in the outbox
                log.warning("outbox.flush.incomplete", error=repr(exc)[:200])
        await asyncio.gather(*parts.background, return_exceptions=True)
        if parts.runner is not None:
            await parts.runner.cleanup()


@dataclass
class _Parts:
    """The running worker's components, built once."""

    res: Resources
    consumer: Consumer
    store: RunStore
    relay: OutboxRelay
    breaker: CircuitBreaker
    gate: DatabaseGate
    scorer: BackgroundScorer | None
    switch: Switch
    ready: Callable[[], tuple[bool, str]]
    runner: web.AppRunner | None = None
    relay_task: asyncio.Task[None] | None = None
    relay_started: asyncio.Event = field(default_factory=asyncio.Event)
    background: list[asyncio.Task[None]] = field(default_factory=list)


async def run_worker(settings: Settings, *, burst: bool = False) -> int:
    """The `eglo worker` entrypoint: a Worker that stops on SIGTERM or SIGINT."""
    return await run_until_signalled(Worker(settings), burst=burst)


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
