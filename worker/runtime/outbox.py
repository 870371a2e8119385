"""Relays committed outbox events to the broker with publisher confirms.

Safe with many workers: each batch is claimed with FOR UPDATE SKIP LOCKED, and only events the
broker confirmed are marked published; anything else is re-sent later with the same event_id.

After a broker node is lost, what was sent but not confirmed is sent again (consumers dedupe by
event_id). To keep that small, at most `window` events are unconfirmed at any moment (a sliding
window: the next event of the batch goes out when one is confirmed). The relay waits
for a usable channel before it claims rows, and gives up on a batch's confirms after
`confirm_timeout_s`, so a relay cut off from its broker never holds rows another worker could
send.

The relay also owns how far announcing may trail committing. A worker that commits faster than
its events can be confirmed (a saturated machine, a slow broker) would otherwise keep taking
requests while its outcome events pile up unsent: latency grows without bound, and the work hides
in the outbox where queue-depth autoscaling cannot see it. So `room()` holds new requests while
more than `max_unannounced` of this worker's committed runs await their outcome's confirm; they
wait in the broker's queue instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, datetime
from typing import Any, cast

import aio_pika
import aiormq
import asyncpg
import orjson
import structlog
from aio_pika.abc import AbstractChannel

from producers import broker
from worker.observability import tracing
from worker.observability.metrics import Metrics

log = structlog.get_logger(__name__)

_CLAIM = """
SELECT id, event_id, exchange, routing_key, body, correlation_id, headers
FROM outbox WHERE published_at IS NULL
ORDER BY id LIMIT $1
FOR UPDATE SKIP LOCKED
"""
_MARK = "UPDATE outbox SET published_at = now() WHERE id = ANY($1::bigint[])"
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
        retention_h: float = 24.0,
        window: int = 16,
        confirm_timeout_s: float = 5.0,
        max_unannounced: int = 256,
        lanes: int = 2,
    ) -> None:
        self._pool = pool
        self._channel = channel
        self._metrics = metrics
        self._batch = batch
        self._poll_s = poll_s
        self._retention_h = retention_h
        self._slots = asyncio.Semaphore(window)  # shared by the lanes
        self._lanes = lanes
        self._confirm_timeout_s = confirm_timeout_s
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._woken_at: float | None = None  # first wake not yet followed by a claim
        self._max_unannounced = max_unannounced
        # Runs this process committed whose outcome event its relay has not yet seen confirmed.
        # Approximate (another worker's relay, or this relay's other lane, may send them), so a
        # claim that finds nothing else unclaimed settles the count: never held for good.
        self._unannounced = 0
        self._room = asyncio.Event()
        self._room.set()

    def wake(self, runs: int = 0) -> None:
        """Called after a commit of `runs` new runs: their events leave now, not at the next
        poll."""
        if self._woken_at is None:
            self._woken_at = time.perf_counter()
        self._unannounced += runs
        self._update_room()
        self._wakeup.set()

    async def room(self) -> float:
        """Wait until announcing has caught up (see the module's docstring); the seconds held."""
        if self._room.is_set():
            return 0.0
        started = time.perf_counter()
        await self._room.wait()
        return time.perf_counter() - started

    def _update_room(self) -> None:
        if self._unannounced < self._max_unannounced or self._stopping:
            self._room.set()
        else:
            self._room.clear()

    def stop(self) -> None:
        """Finish the batch in hand, flush what is left, and return from `run`.

        Cancelling mid-batch would leave published events unmarked, to be sent twice.
        """
        self._stopping = True
        self._room.set()
        self._wakeup.set()

    async def run(self) -> None:
        """Relay until stopped; failures are logged and retried at the next poll.

        Two lanes: while one waits for its batch's confirms, the other claims what was committed
        meanwhile (SKIP LOCKED keeps their rows apart), so a commit never waits out a whole batch
        in flight. They share the window, so no more events are unconfirmed than with one.
        """
        await asyncio.gather(*(self._lane(first=i == 0) for i in range(self._lanes)))
        await self.flush()

    async def _lane(self, *, first: bool) -> None:
        polls = 0
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=self._poll_s)
            self._wakeup.clear()
            try:
                await self.flush()
                polls += 1
                if first and polls % 20 == 0:
                    await self._refresh_backlog()
                if first and polls % 1000 == 0:
                    await self._pool.execute(_PRUNE, self._retention_h)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the relay outlives broker and DB blips
                self._metrics.db_errors.labels(operation="outbox_relay").inc()
                log.warning("outbox.relay.failed", error=repr(exc)[:300])
                await asyncio.sleep(self._poll_s)

    async def flush(self) -> int:
        """Relay everything unpublished now; returns how many events were confirmed."""
        total = 0
        while True:
            claimed, confirmed = await self._relay_batch()
            total += confirmed
            if claimed < self._batch or confirmed < claimed:
                return total

    async def _refresh_backlog(self) -> None:
        self._metrics.outbox_backlog.set(await self._pool.fetchval(_BACKLOG))

    async def _relay_batch(self) -> tuple[int, int]:
        # The channel first, with no row claimed: a robust channel waits here while its broker
        # connection is down, and rows locked meanwhile would be stuck for every other worker.
        # aio-pika's publish holds the channel's lock until the writer has flushed each frame,
        # so a batch took one event-loop pass per event (docs/performance.md has what that cost
        # a busy worker). On the channel underneath, with wait=False, the lock is held only to queue
        # the frame; a window of events is then in flight at once, each awaiting its confirm.
        channel = cast(aiormq.Channel, await self._channel.get_underlay_channel())
        published: list[Any] = []
        counted = self._unannounced  # committed before this claim
        async with self._pool.acquire() as conn, conn.transaction():
            claiming, woken, self._woken_at = time.perf_counter(), self._woken_at, None
            rows = await conn.fetch(_CLAIM, self._batch)
            if not rows:
                self._announced(counted)
                return 0, 0
            if woken is not None:
                # From the first commit that woke the relay (the batch's longest wait).
                waited = self._metrics.stages["relay_wait"]
                for row in rows:
                    if _is_outcome(row):
                        waited.observe(claiming - woken)
            failures: list[BaseException] = []

            async def send(row: Any) -> None:
                # A sliding window: the next event goes as soon as one is confirmed. After a
                # failure nothing more is sent; the rest wait for the next attempt.
                async with self._slots:
                    if failures or channel.is_closed:
                        raise _NotSent
                    try:
                        await self._publish(channel, row)
                    except BaseException as exc:
                        failures.append(exc)
                        raise
                    published.append(row)

            try:
                async with asyncio.timeout(self._confirm_timeout_s):
                    await asyncio.gather(*(send(r) for r in rows), return_exceptions=True)
            except TimeoutError as exc:
                failures.append(exc)
            if failures:
                log.warning(
                    "outbox.publish.unconfirmed",
                    count=len(rows) - len(published),
                    error=repr(failures[0])[:300],
                )
            await conn.execute(_MARK, [r["id"] for r in published])
        if any(_not_taken(f) for f in failures) and not channel.is_closed:
            # Nacked or never confirmed on a live channel: after a node loss RabbitMQ can nack
            # everything on that channel for good, so the next attempt goes on a new one. Not
            # more often than every 5 s: the channel is shared (a full subscriber queue nacks
            # for longer, and a new channel would not change that).
            await broker.renew_channel(self._channel, channel, min_interval_s=5.0)
        for row in published:
            self._metrics.events_published.labels(event_type=_event_type(row)).inc()
        drained = len(rows) < self._batch and not failures
        self._announced(counted if drained else sum(map(_is_outcome, published)))
        return len(rows), len(published)

    def _announced(self, runs: int) -> None:
        self._unannounced = max(0, self._unannounced - runs)
        self._update_room()

    async def _publish(self, channel: aiormq.Channel, row: Any) -> None:
        with tracing.span(
            f"{row['exchange'] or 'reply'} publish",
            parent=row["headers"] or {},
            kind=tracing.SpanKind.PRODUCER,
            attributes={
                "messaging.system": "rabbitmq",
                "messaging.destination.name": row["exchange"],
                "messaging.rabbitmq.destination.routing_key": row["routing_key"],
                "messaging.message.id": str(row["event_id"]),
            },
        ):
            message_id, message_type = _identity(row)
            properties = aiormq.spec.Basic.Properties(
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT.value,
                message_id=message_id,
                correlation_id=row["correlation_id"],
                message_type=message_type,
                timestamp=datetime.now(UTC),
                headers=tracing.inject() or None,
            )
            # A nack raises DeliveryError; an event nobody has subscribed to is dropped, as an
            # event with no subscriber should be.
            started = time.perf_counter()
            await channel.basic_publish(
                row["body"],
                exchange=row["exchange"],
                routing_key=row["routing_key"],
                properties=properties,
                wait=False,
            )
            if _is_outcome(row):
                self._metrics.stages["publish_confirm"].observe(time.perf_counter() - started)


def _not_taken(exc: BaseException) -> bool:
    """A nack, or a confirm that did not come in time (not a lost channel or connection)."""
    return isinstance(exc, aiormq.exceptions.DeliveryError | TimeoutError)


def _is_outcome(row: Any) -> bool:
    """A run's outcome event (run.<status>.<type>): one per request, what its stages follow."""
    return bool(row["exchange"]) and str(row["routing_key"]).startswith("run.")


class _NotSent(Exception):
    """Left for the relay's next attempt: an earlier event of the batch failed."""


def _event_type(row: Any) -> str:
    # Replies go to the default exchange under the reply queue's name; the type is in the body.
    return str(row["routing_key"]) if row["exchange"] else "reply"


def _identity(row: Any) -> tuple[str, str]:
    """message_id and type: the event's id and type. A reply is a copy of the outcome event under
    an outbox id of its own (event ids are unique there), so its identity is read from its body."""
    if row["exchange"]:
        return str(row["event_id"]), str(row["routing_key"])
    body = orjson.loads(row["body"])
    return str(body["event_id"]), str(body["event_type"])
