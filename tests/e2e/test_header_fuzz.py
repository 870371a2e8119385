"""Settling never wedges, whatever headers a request carries, and copies keep them exactly.

Each case goes through both copy paths of the real worker: a valid request against a QNN that is
always unavailable is delayed once (a delay-tier copy) and then dead-lettered as
retries_exhausted (a dead-letter copy of the copy); an invalid one is dead-lettered at once. Every
header must arrive in the dead-letter queue with its AMQP type and value. Headers too large to
copy fall back to the queue's broker-level dead-lettering. Nothing may stay unacked.
"""

from __future__ import annotations

import decimal
from typing import Any

import aio_pika
import asyncpg
import orjson
from aio_pika.abc import AbstractRobustConnection

from contracts.topology import (
    ATTEMPT_HEADER,
    ORIGINAL_EXPIRATION_HEADER,
    ORIGINAL_USER_ID_HEADER,
    REASON_HEADER,
)
from producers import amqp_codec as codec
from producers import topology
from producers.sample import generate_requests
from tests.support import stub_qnn as stubs
from tests.support.harness import (
    drain_queue,
    make_settings,
    queue_depth,
    running_worker,
    save_figures,
    wait_for,
)


def _decimal(scale: int, value: int) -> codec.AmqpDecimal:
    typed = codec.AmqpDecimal(decimal.Decimal(value).scaleb(-scale))
    typed.raw = bytes([scale]) + value.to_bytes(4, "big", signed=True)
    return typed


def _cases() -> dict[str, dict[str, Any]]:
    return {
        "huge_double": {"x-price": codec.Float64(1.7e308), "x-tiny": codec.Float64(5e-324)},
        "tenth_double": {"x-ratio": codec.Float64(0.1)},
        "float32": {"x-f": codec.Float32(0.5)},
        # No ±inf or NaN: RabbitMQ itself closes a connection that publishes one.
        "negative_zero": {"x-neg": codec.Float64(-0.0)},
        "decimal": {"x-amount": _decimal(3, 12345), "x-neg": _decimal(2, -5)},
        "int_widths": {
            "x-i8": codec.Int8(-5),
            "x-u8": codec.UInt8(200),
            "x-i16": codec.Int16(-3000),
            "x-u16": codec.UInt16(60000),
            "x-i32": codec.Int32(-2_000_000_000),
            "x-u32": codec.UInt32(4_000_000_000),
            "x-i64": codec.Int64(5),
            "x-max": codec.Int64(2**63 - 1),
        },
        "nested_tables": {"x-n": {"a": {"b": {"c": [codec.Int64(1), {"d": codec.Float64(0.1)}]}}}},
        "byte_array": {"x-blob": bytearray(range(256))},
        "non_utf8_string": {"x-raw": codec.LongBytes(b"\xff\xfe\x00latin\xe9")},
        "ms_timestamp": {"x-when": codec._timestamp_from_raw(1_733_400_000_123)},
        "void_and_bool": {"x-none": None, "x-yes": True, "x-arr": [None, False, "s"]},
        "long_key": {"x-" + "k" * 250: "v"},
        "ten_thousand": {f"h{i:05d}": codec.Int32(i) for i in range(10_000)},
    }


# Encodable by a producer (under frame_max) but leaving no room for eglo's own headers on a copy.
OVERSIZED = {f"h{i:05d}": codec.Int32(i) for i in range(10_600)}
PROPERTIES: dict[str, Any] = {
    "content_type": "application/json; charset=utf-8",
    "content_encoding": "identity",
    "priority": 3,
    "correlation_id": "corr-1",
    "app_id": "scada-gw",
    "type": "optimization.request",
    "user_id": "guest",
    "expiration": 600,
    "timestamp": codec._timestamp_from_raw(1_733_400_000_456),
}


def _same(sent: Any, got: Any) -> bool:
    if isinstance(sent, dict):
        return isinstance(got, dict) and sent.keys() == got.keys() and all(
            _same(sent[k], got[k]) for k in sent
        )
    if isinstance(sent, list):
        return isinstance(got, list) and len(sent) == len(got) and all(
            _same(a, b) for a, b in zip(sent, got, strict=True)
        )
    if isinstance(sent, codec.AmqpTimestamp):
        return isinstance(got, codec.AmqpTimestamp) and got.raw == sent.raw
    if isinstance(sent, codec.AmqpDecimal):
        return isinstance(got, codec.AmqpDecimal) and got.raw == sent.raw
    if isinstance(sent, float):
        return type(got) is type(sent) and repr(got) == repr(sent)
    return type(got) is type(sent) and got == sent


async def test_any_headers_are_settled_and_copied_exactly(
    amqp: AbstractRobustConnection, amqp_url: str, database_url: str, pool: asyncpg.Pool
) -> None:
    cases = _cases()
    valid = generate_requests(len(cases), seed=31, id_prefix="hdr")
    sent: dict[str, dict[str, Any]] = {}
    channel = await amqp.channel(publisher_confirms=True)
    await topology.declare(channel, [0.1])
    exchange = await channel.get_exchange(topology.REQUESTS_EXCHANGE)
    messages = []
    for (name, headers), doc in zip(cases.items(), valid, strict=True):
        for kind, body in (("valid", orjson.dumps(doc)), ("invalid", b'{"oops":')):
            message_id = f"{name}:{kind}"
            sent[message_id] = headers
            messages.append((message_id, body, headers, doc["request_type"]))
    messages.append(("oversized:invalid", b"[]", OVERSIZED, "forecast"))
    for message_id, body, headers, request_type in messages:
        await exchange.publish(
            aio_pika.Message(body, headers=dict(headers), message_id=message_id, **PROPERTIES),
            routing_key=topology.request_routing_key(request_type),
        )

    async with stubs.stub_qnn(stubs.always_unavailable) as down:
        settings = make_settings(
            amqp_url, database_url, down.url, qnn_attempts=1, retry_delays_s=[0.1]
        )
        async with running_worker(settings) as worker:
            dlq = await channel.get_queue(topology.DEAD_LETTER_QUEUE, ensure=False)
            await wait_for(
                lambda: _depth(amqp, topology.DEAD_LETTER_QUEUE, len(messages)), within_s=60
            )
            assert await queue_depth(amqp, topology.REQUESTS_QUEUE) == 0
            unsettled = worker.metrics.unsettled._value.get()
            fallbacks = worker.metrics.settle_fallbacks.labels(decision="dead_letter")._value.get()

    letters = {m.message_id: m for m in await drain_queue(dlq, idle_s=0.5)}
    assert set(letters) == {m[0] for m in messages}, "every message settled into the DLQ"
    assert unsettled == 0
    for message_id, headers in sent.items():
        letter = letters[message_id]
        got = letter.headers or {}
        wrong = [k for k, v in headers.items() if not _same(v, got.get(k))]
        assert not wrong, f"{message_id}: {wrong[:3]} changed"
        reason = str(got[REASON_HEADER])
        assert reason == ("retries_exhausted" if message_id.endswith(":valid") else "invalid_json")
        if message_id.endswith(":valid"):
            assert type(got[ATTEMPT_HEADER]) is codec.Int64 and got[ATTEMPT_HEADER] == 1
        for prop in ("content_type", "content_encoding", "priority", "correlation_id", "app_id"):
            assert getattr(letter, prop) == PROPERTIES[prop], (message_id, prop)
        assert letter.type == PROPERTIES["type"]
        assert letter.timestamp.raw == PROPERTIES["timestamp"].raw
        assert letter.expiration is None and got[ORIGINAL_EXPIRATION_HEADER] == "600000"
        assert letter.user_id is None and got[ORIGINAL_USER_ID_HEADER] == "guest"

    # The copy would not fit one frame: the broker dead-lettered the original itself.
    oversized = letters["oversized:invalid"]
    assert REASON_HEADER not in (oversized.headers or {})
    assert oversized.headers["x-first-death-reason"] == "rejected"
    assert _same(OVERSIZED, {k: v for k, v in oversized.headers.items() if k.startswith("h")})
    assert fallbacks == 1
    save_figures(
        "headers",
        {
            "cases": len(cases),
            "sent": len(messages),
            "settled": len(letters),
            "copied_exactly": len(sent),
            "fell_back_to_broker": int(fallbacks),
            "stuck": len(messages) - len(letters) + int(unsettled),
        },
    )


async def _depth(connection: AbstractRobustConnection, name: str, n: int) -> bool:
    return await queue_depth(connection, name) == n
