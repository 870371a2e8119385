"""Consumer: the one place a Decision becomes broker operations, with a fake delivery and channel.

What is checked here is the order and the fallbacks: the copy (dead letter, delay tier) or the
reply is published before the original is acked; a copy that cannot be published rejects the
original to the queue's own dead-letter exchange; an unexpected error requeues, and on the last
delivery the queue allows becomes a reasoned dead letter; a settle that fails on an open channel
makes the worker unready. tests/e2e/test_outcomes.py and tests/e2e/test_header_fuzz.py do the
same on the real broker.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aio_pika
import pytest

from contracts.topology import ATTEMPT_HEADER, DETAIL_HEADER, REASON_HEADER
from producers.amqp_codec import Int64
from producers.topology import DEAD_LETTER_EXCHANGE, DELIVERY_LIMIT, delay_queue_name
from worker.core.records import Reply
from worker.observability.metrics import Metrics
from worker.runtime import consumer as consumer_module
from worker.runtime.consumer import DELIVERY_COUNT_HEADER, Consumer
from worker.runtime.pipeline import Ack, DeadLetter, Decision, Delay, Delivery


@dataclass
class FakeMessage:
    """The parts of aio-pika's IncomingMessage the consumer reads and calls."""

    log: list[tuple[str, Any]]
    headers: dict[str, Any] = field(default_factory=dict)
    body: bytes = b'{"request_id": "r-1", "request_type": "forecast"}'
    content_type: str | None = "application/json"
    content_encoding: str | None = None
    routing_key: str | None = "request.forecast"
    reply_to: str | None = None
    correlation_id: str | None = "c-1"
    message_id: str | None = "r-1"
    timestamp: datetime | None = field(default_factory=lambda: datetime.now(UTC))
    expiration: Any = None
    user_id: str | None = None
    priority: int | None = None
    type: str | None = None
    app_id: str | None = None
    redelivered: bool = False
    ack_fails: bool = False

    async def ack(self) -> None:
        if self.ack_fails:
            raise ConnectionError("channel is closing")
        self.log.append(("ack", None))

    async def reject(self, requeue: bool = False) -> None:
        self.log.append(("reject", requeue))


@dataclass
class FakeExchange:
    name: str
    log: list[tuple[str, Any]]
    refuse: bool = False

    async def publish(self, message: aio_pika.Message, routing_key: str) -> None:
        if self.refuse:
            raise ConnectionError("NOT_FOUND - no exchange 'eglo.requests.dlx'")
        self.log.append(("publish", (self.name, routing_key, message)))


class FakeChannel:
    def __init__(self, log: list[tuple[str, Any]], refuse: bool = False) -> None:
        self.default_exchange = FakeExchange("", log, refuse)
        self._log, self._refuse = log, refuse
        self.is_closed = False

    async def get_exchange(self, name: str, ensure: bool = False) -> FakeExchange:
        return FakeExchange(name, self._log, self._refuse)


class FakePipeline:
    def __init__(self, decision: Decision | Exception) -> None:
        self.decision = decision

    async def handle(self, delivery: Delivery) -> Decision:
        if isinstance(self.decision, Exception):
            raise self.decision
        return self.decision


async def run(
    decision: Decision | Exception, *, refuse: bool = False, **message: Any
) -> tuple[list[tuple[str, Any]], Consumer, Metrics]:
    """One delivery through a Consumer whose pipeline decides `decision`; the log holds every
    publish and settle, in order."""
    log: list[tuple[str, Any]] = []
    metrics = Metrics()
    channel = FakeChannel(log, refuse)
    consumer = Consumer(FakePipeline(decision), channel, channel, metrics)  # type: ignore[arg-type]
    await consumer._handle(FakeMessage(log, **message))  # type: ignore[arg-type]
    return log, consumer, metrics


def ops(log: list[tuple[str, Any]]) -> list[str]:
    return [op for op, _ in log]


async def test_ack_is_just_an_ack() -> None:
    log, _, _ = await run(Ack("completed"))
    assert log == [("ack", None)]


async def test_a_dead_letter_is_copied_with_its_reason_then_acked() -> None:
    log, _, metrics = await run(DeadLetter("invalid_request", "horizon_steps: not an integer"))
    assert ops(log) == ["publish", "ack"]
    exchange, routing_key, copy = log[0][1]
    assert (exchange, routing_key) == (DEAD_LETTER_EXCHANGE, "request.forecast")
    assert copy.headers[REASON_HEADER] == "invalid_request"
    assert copy.headers[DETAIL_HEADER] == "horizon_steps: not an integer"
    assert copy.message_id == "r-1" and copy.body == FakeMessage(log).body
    assert metrics.dead_letters.labels(reason="invalid_request")._value.get() == 1


async def test_a_delay_goes_to_its_tier_with_the_next_attempt_as_int64() -> None:
    log, _, _ = await run(Delay(2, 30.0, "qnn_unavailable"))
    assert ops(log) == ["publish", "ack"]
    exchange, routing_key, copy = log[0][1]
    assert (exchange, routing_key) == ("", delay_queue_name(30.0))
    assert isinstance(copy.headers[ATTEMPT_HEADER], Int64) and copy.headers[ATTEMPT_HEADER] == 2


async def test_a_copy_the_broker_refuses_rejects_the_original_to_the_queues_dlx() -> None:
    log, consumer, metrics = await run(DeadLetter("invalid_json", "x"), refuse=True)
    assert log == [("reject", False)]
    assert metrics.settle_fallbacks.labels(decision="dead_letter")._value.get() == 1
    assert consumer.unsettled == 0


async def test_a_reply_is_published_before_the_ack() -> None:
    reply = Reply(uuid.uuid4(), "run.completed.forecast", b'{"status": "completed"}')
    log, _, metrics = await run(Ack("completed", reply), reply_to="amq.gen-reply")
    assert ops(log) == ["publish", "ack"]
    exchange, routing_key, message = log[0][1]
    assert (exchange, routing_key) == ("", "amq.gen-reply")
    assert message.message_id == str(reply.event_id) and message.type == reply.event_type
    assert message.correlation_id == "c-1"
    assert metrics.replies.labels(outcome="run.completed.forecast")._value.get() == 1


async def test_an_unexpected_error_requeues_after_a_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    paused: list[float] = []

    async def no_sleep(seconds: float) -> None:
        paused.append(seconds)

    monkeypatch.setattr(consumer_module.asyncio, "sleep", no_sleep)
    log, _, metrics = await run(RuntimeError("bug"))
    assert log == [("reject", True)] and paused == [1.0]
    assert metrics.unexpected_errors._value.get() == 1


async def test_an_unexpected_error_on_the_last_delivery_is_a_reasoned_dead_letter() -> None:
    log, _, _ = await run(
        RuntimeError("bug"), headers={DELIVERY_COUNT_HEADER: DELIVERY_LIMIT - 1}
    )
    assert ops(log) == ["publish", "ack"]
    copy = log[0][1][2]
    assert copy.headers[REASON_HEADER] == "unexpected_error"
    assert f"failed on {DELIVERY_LIMIT} deliveries" in copy.headers[DETAIL_HEADER]


async def test_a_settle_that_fails_on_an_open_channel_makes_the_worker_unready() -> None:
    log, consumer, metrics = await run(Ack("completed"), ack_fails=True)
    assert log == []
    assert consumer.unsettled == 1 and metrics.unsettled._value.get() == 1
