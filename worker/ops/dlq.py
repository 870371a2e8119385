"""Operator tools for `eglo.requests.dlq`: look at dead letters and re-inject them."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from contracts.topology import (
    ATTEMPT_HEADER,
    DETAIL_HEADER,
    ORIGINAL_ROUTING_KEY_HEADER,
    REASON_HEADER,
    REPLAY_PASS_HEADER,
    REPLAYED_HEADER,
    REPUBLISHED_AT_HEADER,
    RULE_HEADER,
)
from producers import topology
from producers.broker import connect_broker

# Headers that describe the dead-lettering itself; a replayed message starts clean.
_DEAD_LETTER_HEADERS = (
    REASON_HEADER,
    DETAIL_HEADER,
    RULE_HEADER,
    ATTEMPT_HEADER,
    REPUBLISHED_AT_HEADER,
    ORIGINAL_ROUTING_KEY_HEADER,
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
    "x-delivery-count",
)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    message_id: str | None
    routing_key: str
    reason: str
    detail: str
    body_preview: str
    size: int
    dead_lettered_at: datetime | None = None  # UTC


def dead_lettered_at(headers: dict[str, Any]) -> datetime | None:
    """When the message was dead-lettered, in UTC: eglo's copy says when it was republished
    (`x-eglo-republished-at`), the broker's own dead-lettering (delivery limit) records the time
    in `x-death`; None when neither says."""
    if REASON_HEADER in headers:
        value = headers.get(REPUBLISHED_AT_HEADER)
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                moment = datetime.fromisoformat(value)
                if moment.tzinfo is not None:
                    return moment.astimezone(UTC)
        return None
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        died = deaths[0].get("time")  # the latest death comes first; pamqp decodes it in UTC
        if isinstance(died, datetime) and died.tzinfo is not None:
            return died.astimezone(UTC)
    return None


def describe(message: AbstractIncomingMessage) -> DeadLetter:
    headers = message.headers or {}
    reason = headers.get(REASON_HEADER) or headers.get("x-first-death-reason") or "unknown"
    return DeadLetter(
        message_id=message.message_id,
        routing_key=str(headers.get(ORIGINAL_ROUTING_KEY_HEADER) or message.routing_key or ""),
        reason=str(reason),
        detail=str(headers.get(DETAIL_HEADER, "")),
        body_preview=message.body[:120].decode("utf-8", "replace"),
        size=len(message.body),
        dead_lettered_at=dead_lettered_at(dict(headers)),
    )


@contextlib.asynccontextmanager
async def _dlq_channel(amqp_url: str) -> AsyncIterator[AbstractChannel]:
    connection = await connect_broker(amqp_url, name="eglo-dlq")
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await topology.declare(channel)
        yield channel


async def list_dead_letters(amqp_url: str, *, limit: int = 100) -> list[DeadLetter]:
    """Peek at up to `limit` dead letters; they stay in the queue."""
    async with _dlq_channel(amqp_url) as channel:
        queue = await channel.get_queue(topology.DEAD_LETTER_QUEUE)
        held: list[AbstractIncomingMessage] = []
        # Held unacked until the end, so the same message is not fetched twice; the channel
        # closing puts them all back.
        while len(held) < limit:
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                break
            held.append(message)
        return [describe(m) for m in held]


async def replay_dead_letters(
    amqp_url: str, *, reason: str | None = None, limit: int | None = None
) -> tuple[int, int]:
    """Re-publish the dead letters in the DLQ now (optionally only one reason) to `eglo.requests`,
    each at most once.

    A bounded snapshot: while workers run, a replayed letter that fails again is dead-lettered
    behind the others before the pass has drained the queue, and a pass that read until the queue
    was empty replayed it round and round (20 letters: 200 replays at limit=200; no end without
    a limit). So a pass fetches at most the messages that were ready when it started, and stops
    at the first copy of its own that came back (each copy carries the pass's id in
    REPLAY_PASS_HEADER), which covers letters a concurrent peek held when the count was taken.
    Letters it leaves (another reason) are held unacked until the end, so none is fetched twice.

    Returns (replayed, kept): kept counts the snapshot's letters left in the DLQ. Each message is
    acked on the DLQ only after the broker confirmed its replay, so a crash mid-way duplicates at
    most, never loses; the worker's idempotency absorbs the duplicate.
    """
    replayed = kept = 0
    pass_id = uuid.uuid4().hex
    async with _dlq_channel(amqp_url) as channel:
        queue = await channel.declare_queue(topology.DEAD_LETTER_QUEUE, passive=True)
        snapshot = int(queue.declaration_result.message_count or 0)
        exchange = await channel.get_exchange(topology.REQUESTS_EXCHANGE)
        held: list[AbstractIncomingMessage] = []
        fetched = 0
        while fetched < snapshot:
            if limit is not None and replayed >= limit:
                kept += snapshot - fetched  # not looked at: they stay
                break
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                break
            if (message.headers or {}).get(REPLAY_PASS_HEADER) == pass_id:
                held.append(message)  # replayed by this pass and back already: done
                break
            fetched += 1
            letter = describe(message)
            if reason is not None and letter.reason != reason:
                held.append(message)
                kept += 1
                continue
            headers: dict[str, Any] = {
                k: v for k, v in (message.headers or {}).items() if k not in _DEAD_LETTER_HEADERS
            }
            headers[REPLAYED_HEADER] = True
            headers[REPLAY_PASS_HEADER] = pass_id
            await exchange.publish(
                topology.republished_copy(message, headers),
                routing_key=letter.routing_key or "request.unknown",
                mandatory=True,
            )
            await message.ack()
            replayed += 1
        for message in held:
            await message.nack(requeue=True)
    return replayed, kept


def format_dead_letters(letters: list[DeadLetter]) -> str:
    lines = [f"{'message_id':<28} {'reason':<28} {'bytes':>7}  detail"]
    for d in letters:
        lines.append(
            f"{(d.message_id or '-')[:28]:<28} {d.reason[:28]:<28} {d.size:>7}  {d.detail[:80]}"
        )
    lines.append(f"{len(letters)} dead letter(s) shown")
    return "\n".join(lines)
