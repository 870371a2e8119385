"""Exchanges and queues eglo owns, declared idempotently by every process that needs them."""

from __future__ import annotations

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue

REQUESTS_EXCHANGE = "eglo.requests"
REQUESTS_QUEUE = "eglo.requests"
DEAD_LETTER_EXCHANGE = "eglo.requests.dlx"
DEAD_LETTER_QUEUE = "eglo.requests.dlq"
EVENTS_EXCHANGE = "eglo.events"
# Poison messages that crash the process on every delivery stop looping after this many.
DELIVERY_LIMIT = 20


def request_routing_key(request_type: str) -> str:
    return f"request.{request_type}"


def delay_queue_name(delay_s: float) -> str:
    return f"eglo.requests.delay.{int(delay_s * 1000)}ms"


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
        # Expired messages go back through the default exchange straight onto eglo.requests.
        q = await channel.declare_queue(
            delay_queue_name(delay),
            durable=True,
            arguments={
                "x-message-ttl": int(delay * 1000),
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": REQUESTS_QUEUE,
            },
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
