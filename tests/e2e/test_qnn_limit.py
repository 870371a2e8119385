"""The adaptive QNN concurrency limit (runtime/qnn_limit.py) and the emulator quota it meets."""

from __future__ import annotations

import asyncio
import itertools

import asyncpg

from producers.publisher import Publisher
from producers.reader import parse_request
from producers.sample import generate_requests
from qnn_emulator.faults import FaultInjector
from qnn_emulator.settings import FaultKnobs
from tests.support.harness import make_settings, metric, running_worker, scrape, wait_for
from worker.runtime.qnn_limit import AdaptiveLimit


async def test_no_more_calls_in_flight_than_the_limit() -> None:
    limit = AdaptiveLimit(initial=2, ceiling=10)
    entered = 0
    release = asyncio.Event()

    async def call() -> None:
        nonlocal entered
        async with limit.slot():
            entered += 1
            await release.wait()

    tasks = [asyncio.create_task(call()) for _ in range(5)]
    await asyncio.sleep(0.01)
    assert entered == 2 and limit.in_flight == 2
    limit.answered(0.1)  # slow start: one more
    await asyncio.sleep(0.01)
    assert entered == 3
    release.set()
    await asyncio.gather(*tasks)
    assert entered == 5 and limit.in_flight == 0


async def test_a_cancelled_waiter_gives_its_turn_on() -> None:
    limit = AdaptiveLimit(initial=1, ceiling=1)
    async with limit.slot():
        waiting = asyncio.create_task(limit.slot().__aenter__())
        await asyncio.sleep(0)
        waiting.cancel()
    await asyncio.sleep(0)
    async with limit.slot():
        assert limit.in_flight == 1
    assert limit.in_flight == 0


def test_slow_start_then_one_slot_less_per_429_then_slow_growth() -> None:
    seen: list[float] = []
    limit = AdaptiveLimit(initial=4, ceiling=100, on_change=seen.append)
    for _ in range(16):
        limit.answered(0.2)
    assert limit.limit == 20 and limit.slow_start
    for _ in range(3):  # three calls over the quota
        limit.throttled()
    assert limit.limit == 17 and not limit.slow_start
    for _ in range(17 * 6):  # six windows of answers (0.17 a window): about one slot more
        limit.answered(0.2)
    assert 17.9 < limit.limit < 18.1
    assert seen[0] == 4 and seen[-1] == limit.limit


async def test_after_a_429_call_starts_are_spaced_a_round_trip_per_limit_apart() -> None:
    limit = AdaptiveLimit(initial=10, ceiling=10)
    limit.answered(0.2)
    limit.throttled()  # limit 9, pacing 0.2 s / 9 apart
    loop = asyncio.get_running_loop()
    starts: list[float] = []

    async def call() -> None:
        async with limit.slot():
            starts.append(loop.time())

    await asyncio.gather(*(call() for _ in range(5)))
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert all(gap > 0.015 for gap in gaps), gaps


def test_never_below_one_nor_above_the_ceiling() -> None:
    limit = AdaptiveLimit(initial=500, ceiling=64)
    assert limit.limit == 64
    for _ in range(100):
        limit.answered(0.01)
    assert limit.limit == 64
    for _ in range(200):
        limit.throttled()
    assert limit.limit == 1


def test_random_429s_cannot_take_the_limit_below_its_floor() -> None:
    """One 429 in ten, whatever the load: without a floor the limit settles near 2."""
    floored = AdaptiveLimit(initial=8, ceiling=64, floor=8)
    bare = AdaptiveLimit(initial=8, ceiling=64)
    for i in range(2000):
        for limit in (floored, bare):
            limit.throttled() if i % 10 == 0 else limit.answered(0.02)
    assert 8 <= floored.limit < 9
    assert bare.limit < 4


def test_latency_far_above_the_fastest_answer_counts_as_a_signal() -> None:
    limit = AdaptiveLimit(initial=10, ceiling=100, latency_tolerance=3.0)
    limit.answered(0.1)
    assert limit.limit == 11
    limit.answered(0.5)  # five times the fastest
    assert limit.limit == 10 and not limit.slow_start
    off = AdaptiveLimit(initial=10, ceiling=100)
    off.answered(0.1)
    off.answered(5.0)
    assert off.limit == 12


def test_the_emulator_quota_is_a_token_bucket() -> None:
    faults = FaultInjector(FaultKnobs(rate_limit_per_s=10, rate_limit_burst=2))
    assert [faults.admit(0.0) for _ in range(3)] == [True, True, False]
    assert faults.admit(0.1) and not faults.admit(0.1)
    assert faults.admit(1.0) and faults.admit(1.0) and not faults.admit(1.0)
    assert FaultInjector(FaultKnobs()).admit(0.0)  # no quota


async def test_the_worker_adapts_to_a_quota(
    amqp_url: str, database_url: str, pool: asyncpg.Pool
) -> None:
    """Against a QNN allowing 40 calls/s at 100 ms each (4 calls per round trip, below the
    default floor of 8, so the floor is lowered as an operator with such a quota would), with
    prefetch 64: every request completes, the limit settles well below the prefetch, and few
    calls are answered 429."""
    from qnn_emulator.server import running_emulator
    from qnn_emulator.settings import EmulatorSettings

    quota = EmulatorSettings.isolated(
        latency_ms=100, rate_limit_per_s=40, rate_limit_burst=4, retry_after_s=1, seed=5
    )
    requests = generate_requests(160, seed=91, id_prefix="quota")
    async with running_emulator(quota) as qnn_url:
        settings = make_settings(
            amqp_url, database_url, qnn_url, prefetch=64, qnn_concurrency_min=1
        )
        async with running_worker(settings) as worker, Publisher.connect(amqp_url) as publisher:
            await publisher.publish_many(parse_request(r) for r in requests)
            await wait_for(
                lambda: pool.fetchval(
                    "SELECT count(*) = 160 FROM optimization_runs WHERE id IS NOT NULL"
                    " AND request_id LIKE 'quota%'"
                ),
                within_s=90,
            )
            samples = await scrape(worker.metrics_port or 0)
    throttled = metric(samples, "eglo_qnn_request_duration_seconds_count", status="429")
    answered = metric(samples, "eglo_qnn_request_duration_seconds_count", status="200")
    assert answered == 160
    assert throttled < 0.2 * (answered + throttled), (throttled, answered)
    assert 1 <= metric(samples, "eglo_qnn_concurrency_limit") < 16
