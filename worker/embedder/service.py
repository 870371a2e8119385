"""The embedder process: `embedding.requested` events in, one scenario embedding per run stored.

It consumes its own quorum queue `eglo.embeddings` (bound to `eglo.events`), so it scales apart
from the workers. Deliveries are micro-batched: whatever arrives within a few milliseconds is
loaded in one query, embedded in one call and written in one transaction, then acked after the
commit. Writes are idempotent per (run, model), so a redelivery stores nothing twice.

Settling rules: an event that is not JSON or not an `EmbeddingRequested` is dead-lettered to
`eglo.embeddings.dlq` with a reason header; an event naming a run that does not exist (yet) is
requeued after `retry_delay_s` and dead-lettered on its `max_attempts`th delivery; a scenario
the embedder rejects is dead-lettered; a failure that is not the event's (the database
unreachable, its schema missing or older than the code, a table gone, a privilege revoked) pauses
consumption through the database gate (runtime/gates.py) and the batch waits, unacked, until the
database can take it, spending no delivery; any other failure (the embeddings API, say) requeues
the batch after a pause, and the queue's delivery limit stops an endless loop.
As in the worker, what becomes of a delivery is decided first (`_process` returns Decisions) and
settled in one place (`_settle`); a dead-letter copy that cannot be published falls back to the
queue's own dead-lettering.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import asyncpg
import orjson
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
)
from prometheus_client import Counter, Histogram
from pydantic import TypeAdapter, ValidationError

from contracts import wire
from contracts.events import EMBEDDING_REQUESTED, EmbeddingRequested
from contracts.topology import DETAIL_HEADER, REASON_HEADER
from contracts.vocabulary import EmbedderDeadLetterReason
from db.migrate import EMBEDDER_PRIVILEGES
from producers.topology import (
    DELIVERY_LIMIT,
    EVENTS_EXCHANGE,
    republished_copy,
)
from worker.embedder.backends import (
    Embedder,
    EmbeddingRejected,
    close_embedder,
    make_embedder,
    warm_up_embedder,
)
from worker.observability.metrics import DB_BUCKETS, LATENCY_BUCKETS, Metrics
from worker.runtime import health as http
from worker.runtime.connections import connect_database, database_url
from worker.runtime.gates import BrokerWatch, DatabaseGate, is_systemic
from worker.runtime.service import (
    Switch,
    open_resources,
    readiness,
    run_until_signalled,
    until_no_work,
)
from worker.settings import Settings

log = structlog.get_logger(__name__)
_EVENT = TypeAdapter(EmbeddingRequested)

EMBEDDINGS_QUEUE = "eglo.embeddings"
EMBEDDINGS_DLQ = "eglo.embeddings.dlq"
# Quorum queues count redeliveries in this header (absent on the first delivery).
DELIVERY_COUNT_HEADER = "x-delivery-count"


async def declare(channel: AbstractChannel) -> AbstractQueue:
    """Declare the embedder's queue, its dead-letter queue and binding; safe to call repeatedly."""
    events = await channel.declare_exchange(
        EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
    )
    await channel.declare_queue(EMBEDDINGS_DLQ, durable=True, arguments={"x-queue-type": "quorum"})
    queue = await channel.declare_queue(
        EMBEDDINGS_QUEUE,
        durable=True,
        arguments={
            "x-queue-type": "quorum",
            # Through the default exchange straight to our own DLQ, apart from failed requests.
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": EMBEDDINGS_DLQ,
            "x-delivery-limit": DELIVERY_LIMIT,
        },
    )
    await queue.bind(events, routing_key=EMBEDDING_REQUESTED)
    return queue


@dataclass(frozen=True, slots=True)
class EmbedderConfig:
    """The embedder's knobs; `from_settings` reads each from Settings as `embedder_<name>`."""

    kind: str = "features"
    model: str | None = None
    dimensions: int | None = None
    prefetch: int = 128
    batch_max: int = 64
    batch_window_ms: float = 10.0
    concurrency: int = 2
    max_attempts: int = 5
    retry_delay_s: float = 2.0
    metrics_port: int = 9109
    api_url: str = "https://api.openai.com/v1"
    api_key: str | None = field(default=None, repr=False)
    api_timeout_s: float = 30.0
    api_batch: int = 256
    api_attempts: int = 5
    api_max_response_bytes: int = 64 << 20
    api_deadline_s: float = 120.0

    @classmethod
    def from_settings(cls, settings: Settings) -> EmbedderConfig:
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            value = getattr(settings, f"embedder_{f.name}", None)
            if value is None:
                continue
            values[f.name] = (
                value.get_secret_value() if hasattr(value, "get_secret_value") else value
            )
        config = cls(**values)
        # Past the queue's own limit the broker would dead-letter first, without our reason.
        return dataclasses.replace(
            config, max_attempts=max(1, min(config.max_attempts, DELIVERY_LIMIT))
        )

    def build_embedder(self, metrics: Metrics | None = None) -> Embedder:
        if self.kind == "openai":
            options: dict[str, Any] = {
                "base_url": self.api_url,
                "api_key": self.api_key,
                "timeout_s": self.api_timeout_s,
                "batch_size": self.api_batch,
                "attempts": self.api_attempts,
                "max_response_bytes": self.api_max_response_bytes,
                "deadline_s": self.api_deadline_s,
            }
            if metrics is not None:
                failures = metrics.http_peer_failures
                options["on_failure"] = lambda reason: failures.labels(
                    peer="embeddings", reason=reason
                ).inc()
            if self.model:
                options["model"] = self.model
            if self.dimensions:
                options["dimensions"] = self.dimensions
            return make_embedder("openai", **options)
        return make_embedder(self.kind)


class EmbedderMetrics:
    """The embedder's own metrics, on the process registry beside the shared ones."""

    def __init__(self, metrics: Metrics) -> None:
        r = metrics.registry
        self.stored = metrics.embeddings
        self.messages = Counter(
            "eglo_embedder_messages",
            "embedding.requested deliveries settled, by outcome.",
            ["outcome"],
            registry=r,
        )
        self.embed_duration = Histogram(
            "eglo_embed_duration_seconds",
            "One embedder call for a batch of scenarios, by model.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "eglo_embed_batch_size_runs",
            "Runs embedded per batch.",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500),
            registry=r,
        )
        self.write = Histogram(
            "eglo_embeddings_write_duration_seconds",
            "One transaction of embedding inserts.",
            buckets=DB_BUCKETS,
            registry=r,
        )


_LOAD = """
SELECT r.id, r.input_payload,
       EXISTS (SELECT 1 FROM optimization_embeddings e
               WHERE e.optimization_run_id = r.id AND e.model = $2) AS embedded
FROM optimization_runs r WHERE r.id = ANY($1::uuid[])
"""

# Vectors go as text: asyncpg cannot bind an array of the pgvector type.
_INSERT = """
INSERT INTO optimization_embeddings (optimization_run_id, model, dimensions, embedding)
SELECT run_id, $2, $3, embedding::vector
FROM unnest($1::uuid[], $4::text[]) AS t(run_id, embedding)
ON CONFLICT (optimization_run_id, model) DO NOTHING
RETURNING optimization_run_id
"""


def _vector_text(vector: list[float]) -> str:
    return "[" + ",".join(repr(float(x)) for x in vector) + "]"


class _Unsettled(Exception):
    """A batch step failed in a way that a later delivery may not: requeue what is left."""


# What becomes of one delivery, decided by `_process` and settled by `_settle` alone, as the
# worker's pipeline decides and its consumer settles.
@dataclass(frozen=True, slots=True)
class Embedded:
    outcome: str  # stored | duplicate: ack


@dataclass(frozen=True, slots=True)
class Rejected:
    reason: EmbedderDeadLetterReason
    detail: str  # dead-lettered with the reason, then acked


@dataclass(frozen=True, slots=True)
class Later:
    outcome: str  # requeued after the retry delay


Decision = Embedded | Rejected | Later


async def _quietly(operation: Awaitable[None], how: str) -> None:
    """A settle that fails on a closed channel needs no retry (the broker redelivers), but it is
    said, with the error, rather than swallowed."""
    try:
        await operation
    except Exception as exc:  # noqa: BLE001 - the broker redelivers what was not settled
        log.warning("embedder.settle_failed", how=how, error=repr(exc)[:200])


class EmbedderService:
    """One embedder process's lifecycle; `run` returns the exit code."""

    def __init__(
        self,
        settings: Settings,
        *,
        config: EmbedderConfig | None = None,
        embedder: Embedder | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.config = config or EmbedderConfig.from_settings(settings)
        self.metrics = metrics or Metrics()
        self._embedder = embedder
        self.stop_requested = asyncio.Event()
        self.started = asyncio.Event()
        self.metrics_port: int | None = None
        self._inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self._open_messages: dict[int, AbstractIncomingMessage] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = asyncio.Event()
        self._delayed: set[asyncio.Task[None]] = set()
        self._consumer_tag: str | None = None
        self._gate: DatabaseGate | None = None

    def stop(self) -> None:
        self.stop_requested.set()

    @property
    def in_flight(self) -> int:
        return len(self._open_messages)

    async def run(self, *, burst: bool = False) -> int:
        settings, config = self.settings, self.config
        owns_embedder = self._embedder is None
        embedder = self._embedder or config.build_embedder(self.metrics)
        em = EmbedderMetrics(self.metrics)
        self.metrics.prefetch.set(config.prefetch)
        try:
            # Before taking deliveries: a missing model extra must stop the process, not
            # requeue every event until the delivery limit dead-letters it.
            await warm_up_embedder(embedder)
            async with open_resources(
                settings, name="eglo-embedder", pool_size=settings.db_pool_size
            ) as res:
                pool, connection = res.pool, res.connection
                consume_channel = await connection.channel()
                await consume_channel.set_qos(prefetch_count=config.prefetch)
                publish_channel = await connection.channel(publisher_confirms=True)
                await declare(publish_channel)
                # declare_queue, not get_queue: only a queue declared on a robust channel gets
                # its consumer back after a reconnect.
                queue = await consume_channel.declare_queue(EMBEDDINGS_QUEUE, passive=True)
                gate = DatabaseGate(
                    lambda: connect_database(database_url(settings)),
                    EMBEDDER_PRIVILEGES,
                    interval_s=settings.db_check_interval_s,
                )
                self._gate = gate

                async def consume() -> None:
                    if self._consumer_tag is None:
                        self._consumer_tag = await queue.consume(self._on_message)
                        log.info("embedder.consuming")

                async def pause() -> None:
                    if self._consumer_tag is not None:
                        tag, self._consumer_tag = self._consumer_tag, None
                        await queue.cancel(tag)
                        log.info("embedder.paused", reason=gate.problem)

                switch = Switch(lambda: gate.is_open, consume, pause, self.stop_requested)
                broker = BrokerWatch(connection, self.metrics)
                switch.watch(gate, broker, pool, self.metrics)
                ready = readiness(
                    broker,
                    consume_channel,
                    gate,
                    lambda: "not consuming" if self._consumer_tag is None else None,
                )
                runner, self.metrics_port = await http.start(
                    http.build_app(self.metrics, ready), settings.metrics_host, config.metrics_port
                )
                batchers = [
                    asyncio.create_task(
                        self._batch_loop(pool, publish_channel, embedder, em),
                        name=f"embedder-batch-{i}",
                    )
                    for i in range(max(1, config.concurrency))
                ]
                gate_task = asyncio.create_task(gate.run(), name="db-gate")
                try:
                    if await gate.check() is not None:
                        log.warning("embedder.waiting_for_database", reason=gate.problem)
                    await switch.follow()
                    log.info(
                        "embedder.started",
                        model=embedder.name,
                        dimensions=embedder.dimensions,
                        metrics_port=self.metrics_port,
                        prefetch=config.prefetch,
                        burst=burst,
                    )
                    self.started.set()
                    if burst:
                        await until_no_work(
                            connection,
                            [EMBEDDINGS_QUEUE],
                            lambda: self.in_flight,
                            self.stop_requested,
                        )
                    else:
                        await self.stop_requested.wait()
                    log.info("embedder.stopping", in_flight=self.in_flight)
                    async with switch.lock:
                        await pause()
                    self._stopping.set()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._idle.wait(), settings.shutdown_grace_s)
                    if self.in_flight:
                        # Unacked deliveries go back to the queue when the channel closes.
                        log.warning("embedder.drain.timeout", abandoned=self.in_flight)
                finally:
                    for task in (*batchers, *self._delayed, gate_task):
                        task.cancel()
                    await asyncio.gather(
                        *batchers, *self._delayed, gate_task, return_exceptions=True
                    )
                    await runner.cleanup()
        finally:
            if owns_embedder:
                await close_embedder(embedder)
        log.info("embedder.stopped")
        return 0

    # ----------------------------------------------------------------------- deliveries

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self._open_messages[id(message)] = message
        self._idle.clear()
        self.metrics.in_flight.set(self.in_flight)
        self._inbox.put_nowait(message)

    def _take(self, message: AbstractIncomingMessage) -> bool:
        """Mark a delivery settled; False if it already was (each is settled exactly once)."""
        if self._open_messages.pop(id(message), None) is None:
            return False
        self.metrics.in_flight.set(self.in_flight)
        if not self._open_messages:
            self._idle.set()
        return True

    async def _ack(
        self, message: AbstractIncomingMessage, em: EmbedderMetrics, outcome: str
    ) -> None:
        if self._take(message):
            em.messages.labels(outcome=outcome).inc()
            # A closed channel means the broker redelivers it; the write is idempotent.
            await _quietly(message.ack(), "ack")

    async def _requeue(
        self, message: AbstractIncomingMessage, em: EmbedderMetrics, outcome: str
    ) -> None:
        if self._take(message):
            em.messages.labels(outcome=outcome).inc()
            await _quietly(message.nack(requeue=True), "requeue")

    def _requeue_later(
        self, message: AbstractIncomingMessage, em: EmbedderMetrics, outcome: str
    ) -> None:
        """Requeue after the retry delay (at once when stopping) without holding up the batch."""

        async def later() -> None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.config.retry_delay_s)
            await self._requeue(message, em, outcome)

        task = asyncio.create_task(later())
        self._delayed.add(task)
        task.add_done_callback(self._delayed.discard)

    async def _dead_letter(
        self,
        message: AbstractIncomingMessage,
        channel: AbstractChannel,
        em: EmbedderMetrics,
        reason: str,
        detail: str,
    ) -> None:
        """Publish a copy with the reason to the DLQ, confirmed, then ack the original."""
        headers: dict[str, Any] = dict(message.headers or {})
        headers[REASON_HEADER] = reason
        headers[DETAIL_HEADER] = detail[:1000]
        copy = republished_copy(message, headers)
        await channel.default_exchange.publish(copy, routing_key=EMBEDDINGS_DLQ)
        self.metrics.dead_letters.labels(reason=reason).inc()
        log.warning("embedding.dead_lettered", reason=reason, detail=detail[:300])
        await self._ack(message, em, "dead_lettered")

    # ----------------------------------------------------------------------- batches

    async def _batch_loop(
        self,
        pool: asyncpg.Pool,
        channel: AbstractChannel,
        embedder: Embedder,
        em: EmbedderMetrics,
    ) -> None:
        config = self.config
        while True:
            batch = [await self._inbox.get()]
            # Under load the inbox already holds a batch; at low load the window costs a few ms.
            if self._inbox.qsize() < config.batch_max - 1 and config.batch_window_ms > 0:
                await asyncio.sleep(config.batch_window_ms / 1000.0)
            while len(batch) < config.batch_max and not self._inbox.empty():
                batch.append(self._inbox.get_nowait())
            await self._process_waiting_out_the_database(batch, pool, channel, embedder, em)

    async def _process_waiting_out_the_database(
        self,
        batch: list[AbstractIncomingMessage],
        pool: asyncpg.Pool,
        channel: AbstractChannel,
        embedder: Embedder,
        em: EmbedderMetrics,
    ) -> None:
        """A systemic database failure (unreachable, table missing, privilege revoked) pauses
        consumption through the gate; the batch stays unacked, spends no delivery, and is retried
        once the gate reopens. Any other failure requeues it after a pause."""
        while True:
            try:
                decisions = await self._process(batch, pool, embedder, em)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.metrics.db_errors.labels(operation="embed_batch").inc()
                gate = self._gate
                if gate is not None and is_systemic(exc):
                    log.warning("embedder.batch.waiting", size=len(batch), error=repr(exc)[:300])
                    gate.report(exc)
                    if not await self._wait_open(gate):
                        # Stopping: the channel's close gives them back to the broker.
                        for message in batch:
                            self._take(message)
                        return
                    batch = [m for m in batch if id(m) in self._open_messages]
                    if not batch:
                        return
                    continue
                # requeued; the queue's delivery limit bounds the loop
                log.warning(
                    "embedder.batch.failed",
                    size=len(batch),
                    error=repr(exc)[:300],
                    exc_info=not isinstance(exc, _Unsettled),
                )
                decisions = [(message, Later("requeued")) for message in batch]
            for message, decision in decisions:
                await self._settle(message, decision, channel, em)
            return

    async def _settle(
        self,
        message: AbstractIncomingMessage,
        decision: Decision,
        channel: AbstractChannel,
        em: EmbedderMetrics,
    ) -> None:
        """The one place a delivery is acked, dead-lettered or requeued (each exactly once)."""
        if id(message) not in self._open_messages:
            return
        if isinstance(decision, Embedded):
            await self._ack(message, em, decision.outcome)
        elif isinstance(decision, Later):
            self._requeue_later(message, em, decision.outcome)
        else:
            try:
                await self._dead_letter(message, channel, em, decision.reason, decision.detail)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the queue's own DLX takes the original
                log.error("embedding.copy_failed", reason=decision.reason, error=repr(exc)[:300])
                if self._take(message):
                    em.messages.labels(outcome="dead_lettered").inc()
                    await _quietly(message.reject(requeue=False), "reject")

    async def _wait_open(self, gate: DatabaseGate) -> bool:
        """Until the gate opens (True) or the service stops (False)."""
        opened = asyncio.ensure_future(gate.wait_open())
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({opened, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            opened.cancel()
            stopping.cancel()
        return gate.is_open and not self._stopping.is_set()

    async def _process(
        self,
        batch: list[AbstractIncomingMessage],
        pool: asyncpg.Pool,
        embedder: Embedder,
        em: EmbedderMetrics,
    ) -> list[tuple[AbstractIncomingMessage, Decision]]:
        """What becomes of each delivery of the batch, once its vectors are committed."""
        decided: list[tuple[AbstractIncomingMessage, Decision]] = []
        by_run: dict[uuid.UUID, list[AbstractIncomingMessage]] = {}
        for message in batch:
            try:
                event = wire.validate(_EVENT, wire.loads(message.body))
            except orjson.JSONDecodeError as exc:
                decided.append((message, Rejected("invalid_json", str(exc))))
                continue
            except ValidationError as exc:
                decided.append((message, Rejected("invalid_event", str(exc))))
                continue
            by_run.setdefault(event.run_id, []).append(message)
        if not by_run:
            return decided

        rows = {row["id"]: row for row in await pool.fetch(_LOAD, list(by_run), embedder.name)}
        todo: list[uuid.UUID] = []
        for run_id, messages in by_run.items():
            row = rows.get(run_id)
            if row is None:
                decided += [(m, self._run_not_found(m, run_id)) for m in messages]
            elif row["embedded"]:
                decided += [(m, Embedded("duplicate")) for m in messages]
            else:
                todo.append(run_id)
        if not todo:
            return decided

        vectors, rejected = await self._embed(
            embedder, todo, [rows[r]["input_payload"] for r in todo], em
        )
        for run_id, detail in rejected.items():
            decided += [(m, Rejected("unembeddable", detail)) for m in by_run[run_id]]
        if not vectors:
            return decided

        started = time.perf_counter()
        async with pool.acquire() as conn, conn.transaction():
            inserted = {
                row["optimization_run_id"]
                for row in await conn.fetch(
                    _INSERT,
                    list(vectors),
                    embedder.name,
                    embedder.dimensions,
                    [_vector_text(v) for v in vectors.values()],
                )
            }
        em.write.observe(time.perf_counter() - started)
        em.stored.labels(model=embedder.name).inc(len(inserted))
        for run_id in vectors:
            outcome = "stored" if run_id in inserted else "duplicate"
            for message in by_run[run_id]:
                decided.append((message, Embedded(outcome)))
                outcome = "duplicate"
        return decided

    async def _embed(
        self,
        embedder: Embedder,
        run_ids: list[uuid.UUID],
        scenarios: list[dict[str, Any]],
        em: EmbedderMetrics,
    ) -> tuple[dict[uuid.UUID, list[float]], dict[uuid.UUID, str]]:
        """Vectors by run, and the runs the embedder rejected (found one by one) with why."""
        started = time.perf_counter()
        try:
            vectors = await embedder.embed(scenarios)
        except EmbeddingRejected as exc:
            if len(scenarios) == 1:
                return {}, {run_ids[0]: str(exc)}
            good: dict[uuid.UUID, list[float]] = {}
            bad: dict[uuid.UUID, str] = {}
            for run_id, scenario in zip(run_ids, scenarios, strict=True):
                try:
                    good[run_id] = (await embedder.embed([scenario]))[0]
                except EmbeddingRejected as one:
                    bad[run_id] = str(one)
            return good, bad
        finally:
            em.embed_duration.labels(model=embedder.name).observe(time.perf_counter() - started)
        em.batch_size.observe(len(scenarios))
        if len(vectors) != len(run_ids) or any(len(v) != embedder.dimensions for v in vectors):
            raise _Unsettled(f"{embedder.name} returned vectors of the wrong count or size")
        return dict(zip(run_ids, vectors, strict=True)), {}

    def _run_not_found(self, message: AbstractIncomingMessage, run_id: uuid.UUID) -> Decision:
        # The event may overtake the run's commit on a replica or a restored database: wait a bit.
        previous = (message.headers or {}).get(DELIVERY_COUNT_HEADER)
        deliveries = (previous if isinstance(previous, int) else 0) + 1
        if deliveries >= self.config.max_attempts:
            detail = f"run {run_id} not found after {deliveries} deliveries"
            return Rejected("run_not_found", detail)
        return Later("run_not_found_retry")


async def run_embedder(settings: Settings, *, burst: bool = False) -> int:
    """The `eglo embedder` entrypoint: an EmbedderService that stops on SIGTERM or SIGINT."""
    return await run_until_signalled(EmbedderService(settings), burst=burst)
