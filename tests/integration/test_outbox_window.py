"""The outbox relay: its direct path (a commit's events sent from memory, their rows leased) and its
polling path; after a broker node loss no rows held while the channel is down, and at most `window`
events unconfirmed at any moment (so at most that many sent twice)."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import aiormq
import asyncpg
from aiormq import spec

from tests.support.harness import wait_for
from worker.core.records import OutboxEvent
from worker.observability.metrics import Metrics
from worker.runtime.outbox import OutboxRelay


class _Underlay:
    """Stands in for aiormq's channel: counts confirms outstanding, can stop confirming."""

    def __init__(self) -> None:
        self.is_closed = False
        self.in_flight = 0
        self.most_in_flight = 0
        self.sent = 0
        self.confirming = asyncio.Event()
        self.confirming.set()

    async def basic_publish(self, body: bytes, **_: Any) -> None:
        self.sent += 1
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.001)
            await self.confirming.wait()
        finally:
            self.in_flight -= 1


class _NackingUnderlay(_Underlay):
    """A channel left broken by a node loss: every publish is nacked (after reaching the
    queues that could take it, so each one sent may be a duplicate downstream)."""

    def __init__(self) -> None:
        super().__init__()
        self.nacking = True

    async def basic_publish(self, body: bytes, **kwargs: Any) -> None:
        await super().basic_publish(body, **kwargs)
        if self.nacking:
            raise aiormq.exceptions.DeliveryError(None, spec.Basic.Nack(multiple=True))


class _Channel:
    def __init__(self, underlay: _Underlay) -> None:
        self.underlay = underlay
        self.up = asyncio.Event()
        self.up.set()

    async def get_underlay_channel(self) -> _Underlay:
        await self.up.wait()  # as a robust channel does while its connection is down
        return self.underlay


async def _events(pool: asyncpg.Pool, n: int, *, lease_s: float | None = None) -> list[OutboxEvent]:
    """n outcome events in the outbox; with `lease_s`, leased as the store writes them."""
    events = [
        OutboxEvent(uuid.uuid4(), "eglo.events", "run.completed.forecast", b"{}") for _ in range(n)
    ]
    await pool.executemany(
        "INSERT INTO outbox (event_id, exchange, routing_key, body, lease_until)"
        " VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5::float8))",
        [(e.event_id, e.exchange, e.routing_key, e.body, lease_s) for e in events],
    )
    return events


async def _committed(relay: OutboxRelay, pool: asyncpg.Pool, runs: int) -> list[OutboxEvent]:
    """As the store does: `runs` runs committed, their events leased and handed to the relay."""
    since = time.perf_counter()
    events = await _events(pool, runs, lease_s=relay.lease_s)
    relay.committed(runs, events, since)
    return events


async def _direct_sends_done(relay: OutboxRelay) -> None:
    await wait_for(lambda: not relay._dispatches, within_s=5)


def _relay(pool: asyncpg.Pool, channel: _Channel, **kwargs: Any) -> OutboxRelay:
    return OutboxRelay(pool, channel, Metrics(), batch=500, poll_s=0.05, **kwargs)  # type: ignore[arg-type]


async def _unpublished(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL"))


async def _all_published(pool: asyncpg.Pool) -> bool:
    return await _unpublished(pool) == 0


async def test_at_most_window_events_unconfirmed(pool: asyncpg.Pool) -> None:
    await _events(pool, 300)
    underlay = _Underlay()
    assert await _relay(pool, _Channel(underlay), window=20).flush() == 300
    assert underlay.most_in_flight == 20
    assert await _unpublished(pool) == 0


async def test_no_rows_held_while_the_channel_is_down(pool: asyncpg.Pool) -> None:
    await _events(pool, 50)
    channel = _Channel(_Underlay())
    channel.up.clear()
    stuck = asyncio.create_task(_relay(pool, channel).flush())
    await asyncio.sleep(0.3)
    # Another worker's relay can claim every row meanwhile.
    async with pool.acquire() as conn, conn.transaction():
        claimed = await conn.fetch(
            "SELECT id FROM outbox WHERE published_at IS NULL FOR UPDATE SKIP LOCKED"
        )
    assert len(claimed) == 50
    stuck.cancel()


async def test_confirms_that_never_come_release_the_batch(pool: asyncpg.Pool) -> None:
    await _events(pool, 100)
    underlay = _Underlay()
    underlay.confirming.clear()  # the node died after taking the frames
    relay = _relay(pool, _Channel(underlay), window=10, confirm_timeout_s=0.3)
    assert await asyncio.wait_for(relay.flush(), 5) == 0
    assert underlay.sent == 10  # one window out, the rest never sent
    assert await _unpublished(pool) == 100
    underlay.confirming.set()
    assert await relay.flush() == 100


async def _held(relay: OutboxRelay) -> bool:
    room = asyncio.ensure_future(relay.room())
    await asyncio.sleep(0.05)
    held = not room.done()
    room.cancel()
    return held


async def test_direct_path_sends_a_commits_events_and_marks_them(pool: asyncpg.Pool) -> None:
    underlay = _Underlay()
    relay = _relay(pool, _Channel(underlay), window=4)
    await _committed(relay, pool, 30)
    await _direct_sends_done(relay)
    assert underlay.sent == 30
    assert underlay.most_in_flight == 4  # the window holds on the direct path too
    assert await _unpublished(pool) == 0


async def test_leased_rows_are_left_to_their_direct_send(pool: asyncpg.Pool) -> None:
    """Polling does not claim a row its own worker is sending (no duplicate), only once the
    lease has ended (that worker died before marking it)."""
    underlay = _Underlay()
    relay = _relay(pool, _Channel(underlay))
    await _events(pool, 7, lease_s=relay.lease_s)
    assert await relay.flush() == 0
    assert underlay.sent == 0
    await pool.execute("UPDATE outbox SET lease_until = now() - interval '1 second'")
    assert await relay.flush() == 7


async def test_a_failed_direct_send_goes_to_polling_at_once(pool: asyncpg.Pool) -> None:
    underlay = _Underlay()
    underlay.confirming.clear()  # the node died after taking the frames
    relay = _relay(pool, _Channel(underlay), window=10, confirm_timeout_s=0.3)
    await _committed(relay, pool, 25)
    await _direct_sends_done(relay)
    assert underlay.sent == 10
    assert await _unpublished(pool) == 25
    leased = await pool.fetchval("SELECT count(*) FROM outbox WHERE lease_until IS NOT NULL")
    assert leased == 0  # released, not left until the lease ends
    underlay.confirming.set()
    assert await relay.flush() == 25


async def test_a_direct_send_on_a_closed_channel_goes_to_polling_at_once(
    pool: asyncpg.Pool,
) -> None:
    underlay = _Underlay()
    underlay.is_closed = True  # the connection dropped between the commit and the send
    relay = _relay(pool, _Channel(underlay), max_unannounced=5)
    await _committed(relay, pool, 8)
    await _direct_sends_done(relay)
    assert underlay.sent == 0
    leased = await pool.fetchval("SELECT count(*) FROM outbox WHERE lease_until IS NOT NULL")
    assert leased == 0
    assert await _held(relay)  # still unannounced
    underlay.is_closed = False
    assert await relay.flush() == 8
    assert not await _held(relay)


class _FlakyPool:
    """The pool, but marking rows published fails `failures` times first (a database blip)."""

    def __init__(self, pool: asyncpg.Pool, failures: int) -> None:
        self._pool = pool
        self.failures = failures

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)

    async def execute(self, sql: str, *args: Any) -> str:
        if sql.startswith("UPDATE outbox SET published_at") and self.failures:
            self.failures -= 1
            raise ConnectionResetError("the database went away")
        return str(await self._pool.execute(sql, *args))


async def test_a_database_blip_after_the_confirms_does_not_send_them_again(
    pool: asyncpg.Pool,
) -> None:
    underlay = _Underlay()
    flaky = _FlakyPool(pool, failures=2)
    relay = OutboxRelay(flaky, _Channel(underlay), Metrics(), batch=500, poll_s=0.05)  # type: ignore[arg-type]
    await _committed(relay, pool, 6)
    await _direct_sends_done(relay)
    assert flaky.failures == 0
    assert await _unpublished(pool) == 0  # marked on the third try, within the lease
    assert underlay.sent == 6


async def test_a_channel_that_nacks_everything_is_not_flooded_with_retries(
    pool: asyncpg.Pool,
) -> None:
    """Many commits' sends and the polling path all meet the nacking channel: after the first
    nack they pause together (0.25, 0.5, 1 s, ...), so in about a second only a few windows
    go out, not every event again and again."""
    underlay = _NackingUnderlay()
    relay = _relay(pool, _Channel(underlay), window=4, confirm_timeout_s=5.0)
    running = asyncio.create_task(relay.run())
    try:
        for _ in range(20):
            await _committed(relay, pool, 5)
        await asyncio.sleep(1.2)
        assert underlay.sent <= 4 * 4  # at most a window per pause, and 3 pauses began
        underlay.nacking = False
        await wait_for(lambda: not relay._dispatches, within_s=10)
        await wait_for(lambda: _all_published(pool), within_s=10)
    finally:
        relay.stop()
        await asyncio.wait_for(running, 10)


async def test_new_requests_wait_while_announcing_trails_committing(pool: asyncpg.Pool) -> None:
    underlay = _Underlay()
    underlay.confirming.clear()
    relay = _relay(pool, _Channel(underlay), max_unannounced=10, confirm_timeout_s=0.3)
    await _committed(relay, pool, 12)
    assert await _held(relay)
    await _direct_sends_done(relay)  # nothing confirmed: still held
    assert await _held(relay)
    await relay.flush()
    assert await _held(relay)
    underlay.confirming.set()
    assert await relay.flush() == 12
    assert not await _held(relay)
    assert await relay.room() == 0.0


async def test_a_drained_outbox_releases_what_another_relay_announced(pool: asyncpg.Pool) -> None:
    underlay = _Underlay()
    underlay.confirming.clear()
    relay = _relay(pool, _Channel(underlay), max_unannounced=10, confirm_timeout_s=0.3)
    await _committed(relay, pool, 30)
    await _direct_sends_done(relay)
    assert await _held(relay)
    # Another worker's relay sends them.
    assert await _relay(pool, _Channel(_Underlay())).flush() == 30
    assert await relay.flush() == 0
    assert not await _held(relay)


async def test_stopping_releases_requests_held(pool: asyncpg.Pool) -> None:
    underlay = _Underlay()
    underlay.confirming.clear()
    relay = _relay(pool, _Channel(underlay), max_unannounced=1)
    await _committed(relay, pool, 5)
    room = asyncio.ensure_future(relay.room())
    await asyncio.sleep(0.05)
    relay.stop()
    assert await asyncio.wait_for(room, 1) > 0
    underlay.confirming.set()


async def test_a_commit_is_sent_while_an_earlier_commits_events_await_confirms(
    pool: asyncpg.Pool,
) -> None:
    underlay = _Underlay()
    underlay.confirming.clear()
    relay = _relay(pool, _Channel(underlay), window=20, confirm_timeout_s=5.0)
    running = asyncio.create_task(relay.run())
    try:
        await _committed(relay, pool, 5)
        await wait_for(lambda: underlay.sent == 5, within_s=5)
        await _committed(relay, pool, 5)  # committed while the first 5 await their confirms
        await wait_for(lambda: underlay.sent == 10, within_s=5)
        assert underlay.most_in_flight == 10
        underlay.confirming.set()
        await wait_for(lambda: underlay.in_flight == 0)
    finally:
        relay.stop()
        await asyncio.wait_for(running, 5)
    assert await _unpublished(pool) == 0
    assert underlay.sent == 10
