"""Publishing requests with publisher confirms: a request counts as sent only once the broker has
it, routed to a queue and persisted."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel, AbstractExchange
from aiormq.exceptions import ChannelClosed, ChannelInvalidStateError, DeliveryError, PublishError
from opentelemetry import propagate, trace

from contracts.requests import AnyRequest
from contracts.topology import PUBLISHED_AT_HEADER
from producers import broker, topology

# Straight through OpenTelemetry's API: a producer application installs its own provider (or none).
_tracer = trace.get_tracer("eglo")


@dataclass
class PublishReport:
    confirmed: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


class Publisher:
    """Publishes requests to `eglo.requests`, persistent and mandatory, awaiting each confirm.

    At least once: a publish the broker did not confirm (the connection or channel was lost, the
    broker nacked it, or no confirm came within `confirm_timeout_s`) is sent again on a live
    channel, until it is confirmed or `resend_within_s` have passed (then the last error is
    raised). After a nack or a missing confirm the channel itself is renewed (see
    producers/broker.py renew_channel). The worker stores a request_id once, so a request sent twice
    runs once.
    """

    def __init__(
        self,
        channel: AbstractChannel,
        exchange: AbstractExchange,
        *,
        confirm_timeout_s: float = 15.0,
        resend_within_s: float = 60.0,
    ) -> None:
        self._channel = channel
        self._exchange = exchange
        self.confirm_timeout_s = confirm_timeout_s
        self.resend_within_s = resend_within_s
        self.resent = 0  # publishes sent again after a failure

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, amqp_url: str) -> AsyncIterator[Publisher]:
        connection = await broker.connect_broker(amqp_url, name="eglo-publisher")
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
            await self._publish_confirmed(message, routing_key)

    async def _publish_confirmed(self, message: aio_pika.Message, routing_key: str) -> None:
        deadline = time.monotonic() + self.resend_within_s
        attempt = 0
        while True:
            failed = None
            try:
                failed = await self._channel.get_underlay_channel()
                await self._exchange.publish(
                    message, routing_key=routing_key, mandatory=True, timeout=self.confirm_timeout_s
                )
                return
            except Exception as exc:
                nacked = isinstance(exc, DeliveryError) and not isinstance(exc, PublishError)
                lost = isinstance(
                    exc, ConnectionError | ChannelInvalidStateError | broker.ChannelRenewed
                ) or (type(exc) is ChannelClosed)  # not a refusal (NOT_FOUND, ACCESS_REFUSED...)
                left = deadline - time.monotonic()
                if not (nacked or lost or isinstance(exc, TimeoutError)) or left <= 0:
                    raise
            self.resent += 1
            attempt += 1
            if not lost:
                await broker.renew_channel(self._channel, failed, wait_s=left)
            elif not await broker.channel_ready(self._channel, wait_s=min(left, 5.0)):
                await asyncio.sleep(min(1.0, left))  # not robust, or still reconnecting
            # Spread the resends: right after a loss the broker may refuse for a moment.
            pause = min(0.05 * 2**attempt, 2.0, max(0.0, deadline - time.monotonic()))
            await asyncio.sleep(random.uniform(pause / 2, pause))

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
