"""Exchanges and queues eglo owns, declared idempotently by every process that needs them."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
)

from contracts.topology import (
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE,
    DELAY_QUEUE_ARGUMENTS,
    DELIVERY_LIMIT,
    EVENTS_EXCHANGE,
    ORIGINAL_EXPIRATION_HEADER,
    ORIGINAL_ROUTING_KEY_HEADER,
    ORIGINAL_USER_ID_HEADER,
    REPUBLISHED_AT_HEADER,
    REQUESTS_EXCHANGE,
    REQUESTS_QUEUE,
    delay_queue_name,
    request_routing_key,
)
from producers import amqp_codec

# Every process that consumes or republishes eglo's messages keeps their headers exact.
amqp_codec.install()

__all__ = [
    "DEAD_LETTER_EXCHANGE",
    "DEAD_LETTER_QUEUE",
    "DELIVERY_LIMIT",
    "EVENTS_EXCHANGE",
    "REQUESTS_EXCHANGE",
    "REQUESTS_QUEUE",
    "Topology",
    "declare",
    "delay_queue_name",
    "ready_messages",
    "republished_copy",
    "request_routing_key",
]


async def ready_messages(connection: AbstractConnection, names: list[str]) -> int:
    """Messages ready in these queues, summed (a passive declare on a channel of its own, since
    a missing queue closes the channel)."""
    async with connection.channel() as channel:
        total = 0
        for name in names:
            queue = await channel.declare_queue(name, passive=True)
            total += queue.declaration_result.message_count or 0
        return total


def republished_copy(message: AbstractIncomingMessage, headers: dict[str, Any]) -> aio_pika.Message:
    """A persistent copy of a delivery with these headers, keeping its body and every property.

    Used for dead letters, delay tiers and replays, so they keep the producer's ids. Two properties
    cannot travel on a copy and move into headers instead, as the broker's own dead-lettering does
    with `expiration`: a per-message TTL would expire the dead letter or race the delay tier, and
    the broker refuses a `user_id` other than the publishing connection's user.
    """
    headers.setdefault(ORIGINAL_ROUTING_KEY_HEADER, message.routing_key or "")
    headers[REPUBLISHED_AT_HEADER] = datetime.now(UTC).isoformat()
    if message.expiration is not None:
        headers.setdefault(ORIGINAL_EXPIRATION_HEADER, str(message.properties.expiration))
    if message.user_id is not None:
        headers.setdefault(ORIGINAL_USER_ID_HEADER, message.user_id)
    return aio_pika.Message(
        message.body,
        headers=headers,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        priority=message.priority,
        message_id=message.message_id,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        timestamp=message.timestamp,
        type=message.type,
        app_id=message.app_id,
    )


async def declare(channel: AbstractChannel, retry_delays_s: list[float] | None = None) -> Topology:
    """Declare the whole topology; safe to call from many processes at once."""
    requests_x = await channel.declare_exchange(
        REQUESTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
    )
    dlx = await channel.declare_exchange(
        DEAD_LETTER_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True
    )
    events_x = await channel.declare_exchange(
        EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
    )
    dlq = await channel.declare_queue(
        DEAD_LETTER_QUEUE, durable=True, arguments={"x-queue-type": "quorum"}
    )
    await dlq.bind(dlx)
    requests_q = await channel.declare_queue(
        REQUESTS_QUEUE,
        durable=True,
        arguments={
            "x-queue-type": "quorum",
            "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
            "x-delivery-limit": DELIVERY_LIMIT,
        },
    )
    await requests_q.bind(requests_x, routing_key="request.*")
    delay_queues = []
    for delay in retry_delays_s or []:
        # Quorum, so a tier outlives the loss of any one node (a classic queue lives on the node
        # that declared it: while that node was down, workers could not even start). Expired
        # messages go back through the default exchange straight onto eglo.requests.
        q = await channel.declare_queue(
            delay_queue_name(delay),
            durable=True,
            arguments={"x-message-ttl": int(delay * 1000), **DELAY_QUEUE_ARGUMENTS},
        )
        delay_queues.append(q)
    return Topology(requests_x, dlx, events_x, requests_q, dlq, delay_queues)


class Topology:
    """Handles to the declared exchanges and queues."""

    def __init__(
        self,
        requests_exchange: AbstractExchange,
        dead_letter_exchange: AbstractExchange,
        events_exchange: AbstractExchange,
        requests_queue: AbstractQueue,
        dead_letter_queue: AbstractQueue,
        delay_queues: list[AbstractQueue],
    ) -> None:
        self.requests_exchange = requests_exchange
        self.dead_letter_exchange = dead_letter_exchange
        self.events_exchange = events_exchange
        self.requests_queue = requests_queue
        self.dead_letter_queue = dead_letter_queue
        self.delay_queues = delay_queues
