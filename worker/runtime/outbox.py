"""Publishes committed outbox events with publisher confirms.

Two paths, one window. The direct path: right after a commit, the store hands the committed
events to `committed`, which publishes them from memory and then marks their rows published. The
store writes those rows with a lease (`lease_s`), and no relay claims a leased row, so an event
is not sent twice while its own worker is sending it. The polling path catches everything else:
rows whose direct send failed (released at once), rows of a worker that died before marking them
(claimable once their lease ends), rows of older workers (no lease). Each batch is claimed with FOR
UPDATE SKIP LOCKED, so many workers poll safely; only events the broker confirmed are marked
published, and anything else is sent again later with the same event_id.

After a broker node is lost, what was sent but not confirmed is sent again (consumers dedupe by
event_id). To keep that small, at most `window` events are unconfirmed at any moment across both
paths (a sliding window: the next event goes out when one is confirmed). Every send gives up
after `confirm_timeout_s`, so rows are never held by a relay cut off from its broker.

The relay also owns how far announcing may trail committing. A worker that commits faster than
its events can be confirmed (a saturated machine, a slow broker) would otherwise keep taking
requests while its outcome events pile up unsent: latency grows without bound, and the work hides
in memory and the outbox where queue-depth autoscaling cannot see it. So `room()` holds new
requests while more than `max_unannounced` of this worker's committed runs await their outcome's
confirm; they wait in the broker's queue instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import cast

import aio_pika
import aiormq
import asyncpg
import orjson
import structlog
from aio_pika.abc import AbstractChannel

from producers import broker
from worker.core.records import OutboxEvent
from worker.observability import tracing
from worker.observability.metrics import Metrics

log = structlog.get_logger(__name__)

_PAUSE_FIRST_S = 0.25
_PAUSE_MAX_S = 5.0

_CLAIM = """
SELECT event_id, exchange, routing_key, body, correlation_id, headers
FROM outbox WHERE published_at IS NULL AND (lease_until IS NULL OR lease_until <= now())
ORDER BY id LIMIT $1
FOR UPDATE SKIP LOCKED
"""
_MARK = "UPDATE outbox SET published_at = now() WHERE event_id = ANY($1::uuid[])"
# A direct send that failed: the rows go to the polling path now, not when their lease ends.
_RELEASE = """
UPDATE outbox SET lease_until = NULL WHERE event_id = ANY($1::uuid[]) AND published_at IS NULL
"""
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
    ) -> None:
        self._pool = pool
        self._channel = channel
        self._metrics = metrics
        self._batch = batch
        self._poll_s = poll_s
        self._retention_h = retention_h
        self._slots = asyncio.Semaphore(window)  # shared by both paths
        self._confirm_timeout_s = confirm_timeout_s
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._max_unannounced = max_unannounced
        self._dispatches: set[asyncio.Task[None]] = set()
        # After a nack or a missing confirm, nothing is sent by either path until the pause is
        # over (doubling while it goes on): every send into a channel that nacks may still have
        # reached some queues, so retrying at once only multiplies duplicates.
        self._pause_s = 0.0
        self._paused_until = 0.0
        # Runs this process committed whose outcome event is not yet confirmed: exact for those
        # on the direct path; approximate for those left to polling (another worker's relay may
        # send them), so a claim that finds nothing else unclaimed settles that part: never held
        # for good.
        self._sending = 0
        self._left = 0
        self._room = asyncio.Event()
        self._room.set()

    @property
    def lease_s(self) -> float:
        """How long the store leaves a committed event to the direct path: a direct send ends
        within confirm_timeout_s, and the rest of the lease is room for marking the rows."""
        return 3 * self._confirm_timeout_s

    def committed(self, runs: int, events: Sequence[OutboxEvent], since: float) -> None:
        """The store's on_commit: `runs` new runs and their `events` were committed by a write
        that began at `since` (perf_counter; the rows' lease began after it). Publish now."""
        if not events:
            return
        self._sending += runs
        self._update_room()
        task = asyncio.create_task(self._dispatch(runs, events, since), name="outbox-direct")
        self._dispatches.add(task)
        task.add_done_callback(self._dispatches.discard)

    async def room(self) -> float:
        """Wait until announcing has caught up (see the module's docstring); the seconds held."""
        if self._room.is_set():
            return 0.0
        started = time.perf_counter()
        await self._room.wait()
        return time.perf_counter() - started

    def _update_room(self) -> None:
        if self._sending + self._left < self._max_unannounced or self._stopping:
            self._room.set()
        else:
            self._room.clear()

    def stop(self) -> None:
        """Finish the sends in hand, flush what is left, and return from `run`.

        Cancelling mid-send would leave published events unmarked, to be sent twice.
        """
        self._stopping = True
        self._room.set()
        self._wakeup.set()

    async def run(self) -> None:
        """Poll for events the direct path did not send until stopped; failures are logged and
        retried at the next poll. Then wait for the direct sends in hand, and flush."""
        polls = 0
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=self._poll_s)
            self._wakeup.clear()
            try:
                await self.flush()
                polls += 1
                if polls % 20 == 0:
                    await self._refresh_backlog()
                if polls % 1000 == 0:
                    await self._pool.execute(_PRUNE, self._retention_h)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the relay outlives broker and DB blips
                self._metrics.db_errors.labels(operation="outbox_relay").inc()
                log.warning("outbox.relay.failed", error=repr(exc)[:300])
                await asyncio.sleep(self._poll_s)
        await asyncio.gather(*self._dispatches, return_exceptions=True)
        await self.flush()

    async def flush(self) -> int:
        """Relay everything claimable now; returns how many events were confirmed."""
        total = 0
        while True:
            claimed, confirmed = await self._relay_batch()
            total += confirmed
            if claimed < self._batch or confirmed < claimed:
                return total

    async def _refresh_backlog(self) -> None:
        self._metrics.outbox_backlog.set(await self._pool.fetchval(_BACKLOG))

    async def _dispatch(self, runs: int, events: Sequence[OutboxEvent], since: float) -> None:
        """The direct path: send one commit's events, mark what was confirmed, release the rest
        to the polling path. Sending stops well inside the rows' lease."""
        committed = time.perf_counter()
        budget = min(self._confirm_timeout_s, since + self.lease_s / 2 - committed)
        published: list[OutboxEvent] = []
        try:
            published, failures = await self._send_all(events, budget, committed=committed)
            sent = {e.event_id for e in published}
            unsent = [e.event_id for e in events if e.event_id not in sent] if failures else []
            if published:
                await self._mark(list(sent), until=since + self.lease_s)
            if unsent:
                await self._pool.execute(_RELEASE, unsent)
                self._wakeup.set()
        except Exception as exc:  # noqa: BLE001 - the lease ends; the polling path sends them
            self._metrics.db_errors.labels(operation="outbox_relay").inc()
            log.warning("outbox.direct.failed", count=len(events), error=repr(exc)[:300])
        finally:
            self._sending -= runs
            self._left += runs - sum(map(_is_outcome, published))
            self._update_room()

    async def _mark(self, event_ids: list[object], *, until: float) -> None:
        """Mark confirmed events published, retrying (a database blip) until their lease ends:
        every mark that lands is an event no relay sends again."""
        delay = 0.1
        while True:
            try:
                await self._pool.execute(_MARK, event_ids)
                return
            except Exception:
                if self._stopping or time.perf_counter() + delay > until:
                    raise
                await asyncio.sleep(delay)
                delay = min(2 * delay, 2.0)

    async def _relay_batch(self) -> tuple[int, int]:
        """The polling path: claim a batch, send it, mark what was confirmed, in one
        transaction."""
        # The channel first, with no row claimed: a robust channel waits here while its broker
        # connection is down, and rows locked meanwhile would be stuck for every other worker.
        channel = cast(aiormq.Channel, await self._channel.get_underlay_channel())
        counted = self._left  # left to polling before this claim
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(_CLAIM, self._batch)
            if not rows:
                self._announced(counted)
                return 0, 0
            events = [
                OutboxEvent(
                    r["event_id"],
                    r["exchange"],
                    r["routing_key"],
                    bytes(r["body"]),
                    r["correlation_id"],
                    r["headers"] or {},
                )
                for r in rows
            ]
            published, failures = await self._send_all(
                events, self._confirm_timeout_s, channel=channel
            )
            await conn.execute(_MARK, [e.event_id for e in published])
        drained = len(rows) < self._batch and not failures
        self._announced(counted if drained else sum(map(_is_outcome, published)))
        return len(rows), len(published)

    def _announced(self, runs: int) -> None:
        self._left = max(0, self._left - runs)
        self._update_room()

    async def _send_all(
        self,
        events: Sequence[OutboxEvent],
        budget_s: float,
        *,
        channel: aiormq.Channel | None = None,
        committed: float | None = None,
    ) -> tuple[list[OutboxEvent], list[BaseException]]:
        """Send `events` through the window within `budget_s`; the confirmed ones, and what
        failed. Without a `channel`, waiting for one counts against the budget. `committed`: when
        the direct path got the events, for the relay_wait stage."""
        published: list[OutboxEvent] = []
        failures: list[BaseException] = []
        if budget_s <= 0:
            return published, [TimeoutError("no time left in the lease")]
        waited = self._metrics.stages["relay_wait"]

        async def send(event: OutboxEvent) -> None:
            # A sliding window: the next event goes as soon as one is confirmed. After a
            # failure nothing more is sent; the rest wait for the next attempt.
            async with self._slots:
                # A deadline that a later failure may push back, not an event to wait for.
                while (pause := self._paused_until - time.perf_counter()) > 0:  # noqa: ASYNC110
                    await asyncio.sleep(pause)
                if failures or channel is None or channel.is_closed:
                    raise _NotSent
                if committed is not None and _is_outcome(event):
                    waited.observe(time.perf_counter() - committed)
                try:
                    await self._publish(channel, event)
                except BaseException as exc:
                    failures.append(exc)
                    raise
                published.append(event)

        try:
            async with asyncio.timeout(budget_s):
                if channel is None:  # the direct path's rows are leased, not locked
                    channel = cast(aiormq.Channel, await self._channel.get_underlay_channel())
                await asyncio.gather(*(send(e) for e in events), return_exceptions=True)
        except TimeoutError as exc:
            failures.append(exc)
        if len(published) < len(events) and not failures:
            failures.append(_NotSent("the channel was closed"))
        if failures:
            log.warning(
                "outbox.publish.unconfirmed",
                count=len(events) - len(published),
                error=repr(failures[0])[:300],
            )
        if any(map(_not_taken, failures)):
            # At most half a send's budget, so a send after the pause still has time to go.
            longest = min(_PAUSE_MAX_S, self._confirm_timeout_s / 2)
            self._pause_s = min(max(2 * self._pause_s, _PAUSE_FIRST_S), longest)
            self._paused_until = time.perf_counter() + self._pause_s
            if channel is not None and not channel.is_closed:
                # Nacked or never confirmed on a live channel: after a node loss RabbitMQ can
                # nack everything on that channel for good, so the next attempt goes on a new
                # one. Not more often than every 5 s: the channel is shared (a full subscriber
                # queue nacks for longer, and a new channel would not change that).
                await broker.renew_channel(self._channel, channel, min_interval_s=5.0)
        elif published and not failures:
            self._pause_s = 0.0
        for event in published:
            self._metrics.events_published.labels(event_type=_event_type(event)).inc()
        return published, failures

    async def _publish(self, channel: aiormq.Channel, event: OutboxEvent) -> None:
        with tracing.span(
            f"{event.exchange or 'reply'} publish",
            parent=event.headers,
            kind=tracing.SpanKind.PRODUCER,
            attributes={
                "messaging.system": "rabbitmq",
                "messaging.destination.name": event.exchange,
                "messaging.rabbitmq.destination.routing_key": event.routing_key,
                "messaging.message.id": str(event.event_id),
            },
        ):
            message_id, message_type = _identity(event)
            properties = aiormq.spec.Basic.Properties(
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT.value,
                message_id=message_id,
                correlation_id=event.correlation_id,
                message_type=message_type,
                timestamp=datetime.now(UTC),
                headers=tracing.inject() or None,
            )
            # aio-pika's publish holds the channel's lock until the writer has flushed each
            # frame, so a batch took one event-loop pass per event (docs/performance.md has what
            # that cost a busy worker). On the channel underneath, with wait=False, the lock is
            # held only to queue the frame; a window of events is then in flight at once, each
            # awaiting its confirm. A nack raises DeliveryError; an event nobody has subscribed
            # to is dropped, as an event with no subscriber should be.
            started = time.perf_counter()
            await channel.basic_publish(
                event.body,
                exchange=event.exchange,
                routing_key=event.routing_key,
                properties=properties,
                wait=False,
            )
            if _is_outcome(event):
                self._metrics.stages["publish_confirm"].observe(time.perf_counter() - started)


def _not_taken(exc: BaseException) -> bool:
    """A nack, or a confirm that did not come in time (not a lost channel or connection)."""
    return isinstance(exc, aiormq.exceptions.DeliveryError | TimeoutError)


def _is_outcome(event: OutboxEvent) -> bool:
    """A run's outcome event (run.<status>.<type>): one per request, what its stages follow."""
    return bool(event.exchange) and event.routing_key.startswith("run.")


class _NotSent(Exception):
    """Left for the relay's next attempt: an earlier event of the batch failed."""


def _event_type(event: OutboxEvent) -> str:
    # Replies go to the default exchange under the reply queue's name; the type is in the body.
    return event.routing_key if event.exchange else "reply"


def _identity(event: OutboxEvent) -> tuple[str, str]:
    """message_id and type: the event's id and type. A reply is a copy of the outcome event under
    an outbox id of its own (event ids are unique there), so its identity is read from its body."""
    if event.exchange:
        return str(event.event_id), event.routing_key
    body = orjson.loads(event.body)
    return str(body["event_id"]), str(body["event_type"])
