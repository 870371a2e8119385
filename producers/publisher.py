"""Publishing requests with publisher confirms: a request counts as sent only once the broker has
it, routed to a queue and persisted."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel, AbstractExchange
from opentelemetry import propagate, trace

from contracts.requests import AnyRequest
from contracts.topology import PUBLISHED_AT_HEADER
from producers import topology
from producers.broker import connect_broker

# Straight through OpenTelemetry's API: a producer application installs its own provider (or none).
_tracer = trace.get_tracer("eglo")


@dataclass
class PublishReport:
    confirmed: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


class Publisher:
    """Publishes requests to `eglo.requests`, persistent and mandatory, awaiting each confirm."""

    def __init__(self, channel: AbstractChannel, exchange: AbstractExchange) -> None:
        self._channel = channel
        self._exchange = exchange

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, amqp_url: str) -> AsyncIterator[Publisher]:
        connection = await connect_broker(amqp_url, name="eglo-publisher")
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            topo = await topology.declare(channel)
            yield cls(channel, topo.requests_exchange)

    async def publish(
        self, request: AnyRequest, *, reply_to: str | None = None, correlation_id: str | None = None
    ) -> None:
        """Send one request; returns once confirmed, raises if the broker refused or returned it."""
        body = orjson.dumps(request.model_dump(mode="json", exclude_none=True))
        await self.publish_raw(
            body,
            topology.request_routing_key(request.request_type),
            message_id=request.request_id,
            reply_to=reply_to,
            correlation_id=correlation_id,
        )

    async def publish_raw(
        self,
        body: bytes,
        routing_key: str,
        *,
        content_type: str | None = "application/json",
        **properties: Any,
    ) -> None:
        """Send arbitrary bytes (tests use it for malformed input)."""
        with _tracer.start_as_current_span(
            f"{topology.REQUESTS_EXCHANGE} publish",
            kind=trace.SpanKind.PRODUCER,
            attributes={
                "messaging.system": "rabbitmq",
                "messaging.rabbitmq.destination.routing_key": routing_key,
            },
        ):
            # Straight through OpenTelemetry: a producer application may install its own provider.
            headers = dict(properties.pop("headers", None) or {})
            propagate.inject(headers)
            now = datetime.now(UTC)
            headers[PUBLISHED_AT_HEADER] = now.isoformat()
            message = aio_pika.Message(
                body,
                content_type=content_type,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                timestamp=now,
                headers=headers or None,
                **properties,
            )
            await self._exchange.publish(message, routing_key=routing_key, mandatory=True)

    async def publish_many(
        self,
        requests: Iterable[AnyRequest],
        *,
        rate: float | None = None,
        window: int = 256,
        on_done: Callable[[], object] = lambda: None,
    ) -> PublishReport:
        """Publish with up to `window` confirms outstanding and at most `rate` per second."""
        report = PublishReport()
        slots = asyncio.Semaphore(window)
        started = time.monotonic()

        async def one(request: AnyRequest) -> None:
            try:
                await self.publish(request)
                report.confirmed.append(request.request_id)
            except Exception as exc:  # noqa: BLE001 - reported per request, the rest carry on
                report.failed.append((request.request_id, f"{type(exc).__name__}: {exc}"))
            finally:
                slots.release()
                on_done()

        tasks = []
        for sent, request in enumerate(requests):
            if rate:
                delay = started + sent / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            await slots.acquire()
            tasks.append(asyncio.create_task(one(request)))
        await asyncio.gather(*tasks)
        return report
