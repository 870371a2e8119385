"""Relays committed outbox events to the broker with publisher confirms.

Two paths. The fast path: right after a commit, the store hands this process's new events over
in memory; they are published at once and marked published by event_id. The fallback: a poller
claims rows still unpublished after `fallback_after_s` (a worker that crashed between commit and
publish, a broker that refused) with FOR UPDATE SKIP LOCKED, so it is safe with many workers and
never races a healthy worker's fast path. Only events the broker confirmed are marked; anything
else is sent again later with the same event_id, which consumers use to drop duplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Sequence
from typing import Any

import aio_pika
import asyncpg
import structlog
from aio_pika.abc import AbstractChannel, AbstractExchange

from worker import tracing
from worker.metrics import Metrics
from worker.records import OutboxEvent

log = structlog.get_logger(__name__)

_CLAIM = """
SELECT id, event_id, exchange, routing_key, body, correlation_id, headers
FROM outbox
WHERE published_at IS NULL AND created_at < now() - make_interval(secs => $2)
ORDER BY id LIMIT $1
FOR UPDATE SKIP LOCKED
"""
_MARK_IDS = "UPDATE outbox SET published_at = now() WHERE id = ANY($1::bigint[])"
_MARK_EVENTS = (
    "UPDATE outbox SET published_at = now() "
    "WHERE event_id = ANY($1::uuid[]) AND published_at IS NULL"
)
_BACKLOG = "SELECT count(*) FROM outbox WHERE published_at IS NULL"
_PRUNE = "DELETE FROM outbox WHERE published_at < now() - make_interval(hours => $1)"


class OutboxRelay:
    def __init__(
        self,
        pool: asyncpg.Pool,
        channel: AbstractChannel,
        metrics: Metrics,
        *,
        batch: int,
        poll_s: float,
        fallback_after_s: float = 5.0,
        retention_h: float = 24.0,
    ) -> None:
        self._pool = pool
        self._channel = channel
        self._metrics = metrics
        self._batch = batch
        self._poll_s = poll_s
        self._fallback_after_s = fallback_after_s
        self._retention_h = retention_h
        self._fresh: asyncio.Queue[OutboxEvent] = asyncio.Queue()
        self._stopping = asyncio.Event()
        self._exchanges: dict[str, AbstractExchange] = {}

    def committed(self, events: Sequence[OutboxEvent]) -> None:
        """Events of a transaction that just committed: publish them now, not at a poll."""
        for event in events:
            self._fresh.put_nowait(event)

    def stop(self) -> None:
        """Finish what is in hand, flush what is left, and return from `run`.

        Cancelling mid-batch would leave published events unmarked, to be sent twice.
        """
        self._stopping.set()

    async def run(self) -> None:
        """Both paths, until stopped; then everything this process committed is flushed."""
        fast = asyncio.create_task(self._fast_path(), name="outbox-fast")
        try:
            await self._poll_fallback()
        finally:
            await self._fresh.put(_STOP)
            await fast
        await self.flush()

    async def flush(self, *, fallback_after_s: float = 0.0) -> int:
        """Relay every unpublished event older than fallback_after_s; returns how many."""
        total = 0
        while True:
            claimed, confirmed = await self._relay_claimed(fallback_after_s)
            total += confirmed
            if claimed < self._batch or confirmed < claimed:
                return total

    async def _fast_path(self) -> None:
        while True:
            events = [await self._fresh.get()]
            while not self._fresh.empty() and len(events) < self._batch:
                events.append(self._fresh.get_nowait())
            stop = _STOP in events
            events = [e for e in events if e is not _STOP]
            if events:
                try:
                    await self._publish_and_mark(events)
                except Exception as exc:  # noqa: BLE001 - the fallback poller re-sends them
                    log.warning("outbox.fast_path.failed", count=len(events), error=repr(exc)[:300])
            if stop:
                return

    async def _poll_fallback(self) -> None:
        polls = 0
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=self._poll_s)
            if self._stopping.is_set():
                return
            try:
                await self.flush(fallback_after_s=self._fallback_after_s)
                polls += 1
                if polls % 10 == 1:
                    await self._refresh_backlog()
                if polls % 1000 == 0:
                    await self._pool.execute(_PRUNE, self._retention_h)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the relay outlives broker and DB blips
                self._metrics.db_errors.labels(operation="outbox_relay").inc()
                log.warning("outbox.relay.failed", error=repr(exc)[:300])

    async def _publish_and_mark(self, events: list[OutboxEvent]) -> None:
        outcomes = await asyncio.gather(
            *(
                self._publish(
                    e.event_id, e.exchange, e.routing_key, e.body, e.correlation_id, e.headers
                )
                for e in events
            ),
            return_exceptions=True,
        )
        confirmed = [
            e for e, o in zip(events, outcomes, strict=True) if not isinstance(o, BaseException)
        ]
        self._log_failures(outcomes)
        await self._pool.execute(_MARK_EVENTS, [e.event_id for e in confirmed])
        for event in confirmed:
            self._metrics.events_published.labels(
                event_type=_event_type(event.exchange, event.routing_key)
            ).inc()

    async def _relay_claimed(self, older_than_s: float) -> tuple[int, int]:
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(_CLAIM, self._batch, older_than_s)
            if not rows:
                return 0, 0
            outcomes = await asyncio.gather(
                *(
                    self._publish(
                        r["event_id"],
                        r["exchange"],
                        r["routing_key"],
                        r["body"],
                        r["correlation_id"],
                        r["headers"],
                    )
                    for r in rows
                ),
                return_exceptions=True,
            )
            confirmed = [
                r for r, o in zip(rows, outcomes, strict=True) if not isinstance(o, BaseException)
            ]
            self._log_failures(outcomes)
            await conn.execute(_MARK_IDS, [r["id"] for r in confirmed])
        for row in confirmed:
            self._metrics.events_published.labels(
                event_type=_event_type(row["exchange"], row["routing_key"])
            ).inc()
        return len(rows), len(confirmed)

    def _log_failures(self, outcomes: Sequence[object]) -> None:
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        if failures:
            log.warning(
                "outbox.publish.unconfirmed", count=len(failures), error=repr(failures[0])[:300]
            )

    async def _refresh_backlog(self) -> None:
        self._metrics.outbox_backlog.set(await self._pool.fetchval(_BACKLOG))

    async def _exchange(self, name: str) -> AbstractExchange:
        if name == "":
            return self._channel.default_exchange
        if name not in self._exchanges:
            self._exchanges[name] = await self._channel.get_exchange(name, ensure=False)
        return self._exchanges[name]

    async def _publish(
        self,
        event_id: uuid.UUID,
        exchange_name: str,
        routing_key: str,
        body: bytes,
        correlation_id: str | None,
        headers: Any,
    ) -> None:
        exchange = await self._exchange(exchange_name)
        with tracing.tracer.start_as_current_span(
            f"{exchange_name or 'reply'} publish",
            context=tracing.extract(headers),
            kind=tracing.SpanKind.PRODUCER,
            attributes={
                "messaging.system": "rabbitmq",
                "messaging.destination.name": exchange_name,
                "messaging.rabbitmq.destination.routing_key": routing_key,
                "messaging.message.id": str(event_id),
            },
        ):
            message = aio_pika.Message(
                body,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=str(event_id),
                correlation_id=correlation_id,
                type=_event_type(exchange_name, routing_key),
                headers=tracing.inject(),
            )
            await exchange.publish(message, routing_key=routing_key)


# Marks the end of the fast path's queue at shutdown.
_STOP: Any = object()


def _event_type(exchange: str, routing_key: str) -> str:
    # Replies go to the default exchange under the reply queue's name; the type is in the body.
    return routing_key if exchange else "reply"
