"""Consumes `eglo.requests` and settles every delivery in one place.

Settling rules: Ack → ack (the pipeline only says Ack after its commit). DeadLetter → a copy with
the reason in headers is published to the dead-letter exchange and confirmed, then the original is
acked. Delay → a copy with the next attempt number goes to a delay queue, confirmed, then ack.
A decision's reply goes to the request's reply_to, confirmed, before the ack.
A copy that cannot be published (whatever the headers, whatever the broker says) → reject without
requeue: the queue's own dead-letter exchange takes the original, with the broker's x-death.
An unexpected error → reject with requeue; on the delivery the queue's limit would make its last,
the message is dead-lettered by the consumer instead, as `unexpected_error`, so it carries a
reason like any other. (A failure that is not the message's, such as the database refusing, never
gets here: the pipeline waits it out with consumption paused.)
Anything unsettled when the channel closes (crash, shutdown) is redelivered by the broker; a
delivery that could not be settled on an open channel makes the worker unready.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from datetime import UTC, datetime
from typing import Any

import aio_pika
import aiormq
import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from contracts.topology import (
    ATTEMPT_HEADER,
    DETAIL_HEADER,
    PUBLISHED_AT_HEADER,
    REASON_HEADER,
    RULE_HEADER,
)
from producers import amqp_codec
from producers.topology import (
    DEAD_LETTER_EXCHANGE,
    DELIVERY_LIMIT,
    REQUESTS_QUEUE,
    delay_queue_name,
    republished_copy,
)
from worker.core.records import Reply
from worker.observability import tracing
from worker.observability.metrics import Metrics
from worker.runtime.pipeline import (
    Ack,
    DeadLetter,
    Decision,
    Delay,
    Delivery,
    Pipeline,
    unexpected_failure,
)

# The content header frame must fit one frame (RabbitMQ's default frame_max, 128 KiB); a larger
# one makes the broker close the whole connection, so such a copy is never attempted.
_MAX_HEADER_BYTES = 131072 - 4096
# Quorum queues count a message's earlier deliveries in this header (absent on the first).
DELIVERY_COUNT_HEADER = "x-delivery-count"

log = structlog.get_logger(__name__)


def to_delivery(message: AbstractIncomingMessage) -> Delivery:
    timestamp = _published_at(message)
    return Delivery(
        body=message.body,
        content_type=message.content_type,
        headers=dict(message.headers or {}),
        timestamp=timestamp,
        reply_to=message.reply_to,
        correlation_id=message.correlation_id,
        routing_key=message.routing_key,
    )


def _deliveries(message: AbstractIncomingMessage) -> int:
    """This delivery's number: quorum queues count earlier ones in `x-delivery-count`."""
    previous = (message.headers or {}).get(DELIVERY_COUNT_HEADER, 0)
    return (previous if isinstance(previous, int) and previous >= 0 else 0) + 1


def _published_at(message: AbstractIncomingMessage) -> datetime | None:
    """When the producer published: eglo's millisecond header if present, else AMQP's
    whole-second timestamp property."""
    header = (message.headers or {}).get(PUBLISHED_AT_HEADER)
    if isinstance(header, bytes):
        header = header.decode()
    if isinstance(header, str):
        try:
            parsed = datetime.fromisoformat(header)
        except ValueError:
            parsed = None
        if parsed is not None and parsed.tzinfo is not None:
            return parsed
    timestamp = message.timestamp
    if timestamp is not None and timestamp.tzinfo is None:
        timestamp = timestamp.replace(tzinfo=UTC)
    return timestamp


class Consumer:
    def __init__(
        self,
        pipeline: Pipeline,
        consume_channel: AbstractChannel,
        publish_channel: AbstractChannel,
        metrics: Metrics,
    ) -> None:
        self._pipeline = pipeline
        self._consume_channel = consume_channel
        self._publish_channel = publish_channel
        self._metrics = metrics
        self._queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.idle = asyncio.Event()
        self.idle.set()
        self.unsettled = 0
        reopened = getattr(consume_channel, "reopen_callbacks", None)
        if reopened is not None:
            # Deliveries of the channel that went away are the broker's again.
            reopened.add(self._forget_unsettled)

    def _forget_unsettled(self, *_: object) -> None:
        self.unsettled = 0
        self._metrics.unsettled.set(0)

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    @property
    def consuming(self) -> bool:
        return self._consumer_tag is not None

    async def start(self) -> None:
        """Begin (or resume) taking deliveries."""
        if self._consumer_tag is not None:
            return
        if self._queue is None:
            # declare_queue, not get_queue: only queues declared on a robust channel are
            # re-registered after a reconnect; a get_queue consumer silently never comes back.
            self._queue = await self._consume_channel.declare_queue(REQUESTS_QUEUE, passive=True)
        self._consumer_tag = await self._queue.consume(self._on_message)
        log.info("consumer.started", queue=REQUESTS_QUEUE)

    async def pause(self) -> None:
        """Stop taking new deliveries; those in flight carry on."""
        if self._queue is None or self._consumer_tag is None:
            return
        tag, self._consumer_tag = self._consumer_tag, None
        try:
            await self._queue.cancel(tag)
        except (aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError) as exc:
            # The channel went away (a broker restart, say, while it was being restored): its
            # consumer went with it, and whatever it had delivered unacked comes back.
            log.warning("consumer.cancel_failed", error=repr(exc)[:200])
        log.info("consumer.paused", in_flight=self.in_flight)

    async def drain(self, grace_s: float) -> bool:
        """Wait up to grace_s for in-flight work; True if all of it finished."""
        try:
            await asyncio.wait_for(self.idle.wait(), grace_s)
        except TimeoutError:
            return False
        return True

    async def abandon(self) -> None:
        """Cancel in-flight work; its deliveries stay unacked and the broker redelivers them."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.create_task(self._handle(message))
        self._tasks.add(task)
        self.idle.clear()
        self._metrics.in_flight.set(len(self._tasks))
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._metrics.in_flight.set(len(self._tasks))
        if not self._tasks:
            self.idle.set()

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(message_id=message.message_id)
        with tracing.span(
            f"{REQUESTS_QUEUE} process",
            parent=message.headers or {},
            kind=tracing.SpanKind.CONSUMER,
            attributes={
                "messaging.system": "rabbitmq",
                "messaging.destination.name": REQUESTS_QUEUE,
                "messaging.message.id": message.message_id or "",
            },
        ):
            await self._handle_in_span(message)

    async def _handle_in_span(self, message: AbstractIncomingMessage) -> None:
        try:
            decision = await self._pipeline.handle(to_delivery(message))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            deliveries = _deliveries(message)
            log.exception(
                "request.unexpected_error", redelivered=message.redelivered, deliveries=deliveries
            )
            self._metrics.unexpected_errors.inc()
            if deliveries >= DELIVERY_LIMIT:
                self._metrics.messages.labels(
                    request_type="unknown", outcome="dead_lettered"
                ).inc()
                decision = unexpected_failure(to_delivery(message), exc, deliveries)
                await self._settle_quietly(self._settle(message, decision))
                return
            await asyncio.sleep(1.0)  # do not spin on a message that fails every time
            await self._settle_quietly(message.reject(requeue=True))
            return
        await self._settle_quietly(self._settle(message, decision))

    async def _settle_quietly(self, settling: Awaitable[None]) -> None:
        try:
            await settling
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the broker redelivers what we could not settle
            # The channel went away (broker restart, connection loss) between the commit and the
            # ack: the message comes back, and the stored run turns it into a duplicate ack.
            log.warning("request.settle_failed", error=repr(exc)[:200])
            if not self._consume_channel.is_closed:
                # Not redelivered until this channel closes: say so at /readyz.
                self.unsettled += 1
                self._metrics.unsettled.set(self.unsettled)

    async def _settle(self, message: AbstractIncomingMessage, decision: Decision) -> None:
        if isinstance(decision, DeadLetter | Delay):
            copied = await self._copy(message, decision)
            if isinstance(decision, DeadLetter):
                self._metrics.dead_letters.labels(reason=decision.reason).inc()
                log.warning(
                    "request.dead_lettered",
                    reason=decision.reason,
                    rule=decision.rule,
                    detail=decision.detail,
                    by="eglo" if copied else "broker",
                )
            if not copied:
                # The queue's own dead-letter exchange takes the original, with x-death.
                await message.reject(requeue=False)
                if isinstance(decision, DeadLetter):
                    await self._reply_quietly(message, decision.reply)
                return
        if isinstance(decision, Ack | DeadLetter) and decision.reply is not None:
            try:
                await self._reply(message, decision.reply)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - redelivery sends the reply again
                log.warning("request.reply_failed", error=repr(exc)[:300])
                await message.reject(requeue=True)
                return
        await message.ack()

    async def _copy(self, message: AbstractIncomingMessage, decision: DeadLetter | Delay) -> bool:
        """Publish the dead-letter or delay copy; False if it cannot be published at all."""
        try:
            await self._publish_copy(message, decision)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever stops the copy, the original moves
            kind = "dead_letter" if isinstance(decision, DeadLetter) else "delay"
            self._metrics.settle_fallbacks.labels(decision=kind).inc()
            log.error("request.copy_failed", decision=kind, error=repr(exc)[:300])
            return False
        return True

    async def _publish_copy(
        self, message: AbstractIncomingMessage, decision: DeadLetter | Delay
    ) -> None:
        if isinstance(decision, DeadLetter):
            extra: dict[str, object] = {
                REASON_HEADER: decision.reason,
                DETAIL_HEADER: decision.detail[:1000],
            }
            if decision.rule is not None:
                extra[RULE_HEADER] = decision.rule
            await self._republish(
                message,
                DEAD_LETTER_EXCHANGE,
                routing_key=message.routing_key or "",
                extra_headers=extra,
            )
        else:
            await self._republish(
                message,
                "",
                routing_key=delay_queue_name(decision.delay_s),
                extra_headers={ATTEMPT_HEADER: amqp_codec.Int64(decision.attempt)},
            )

    async def _reply(self, message: AbstractIncomingMessage, reply: Reply) -> None:
        if not message.reply_to:
            return
        await self._publish_channel.default_exchange.publish(
            aio_pika.Message(
                reply.body,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=str(reply.event_id),
                correlation_id=message.correlation_id,
                type=reply.event_type,
                timestamp=datetime.now(UTC),
            ),
            routing_key=message.reply_to,
        )
        self._metrics.replies.labels(outcome=reply.event_type).inc()

    async def _reply_quietly(self, message: AbstractIncomingMessage, reply: Reply | None) -> None:
        if reply is None:
            return
        try:
            await self._reply(message, reply)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the original is settled already
            log.warning("request.reply_failed", error=repr(exc)[:300])

    async def _republish(
        self,
        message: AbstractIncomingMessage,
        exchange_name: str,
        *,
        routing_key: str,
        extra_headers: dict[str, object],
    ) -> None:
        headers: dict[str, Any] = dict(message.headers or {})
        headers.update(extra_headers)
        copy = republished_copy(message, headers)
        size = len(amqp_codec.encode_table(copy.headers))
        if size > _MAX_HEADER_BYTES:
            raise ValueError(f"headers of {size} bytes would not fit one AMQP frame")
        exchange = (
            self._publish_channel.default_exchange
            if exchange_name == ""
            else await self._publish_channel.get_exchange(exchange_name, ensure=False)
        )
        await exchange.publish(copy, routing_key=routing_key)
