"""The QNN circuit breaker: pure state machine, and the worker pausing while the QNN is down."""

from __future__ import annotations

import asyncio

import asyncpg
import httpx

from producers.publisher import Publisher
from producers.reader import parse_request
from producers.sample import generate_requests
from tests.support.harness import make_settings, running_worker, scrape, wait_for
from worker.runtime.breaker import CircuitBreaker, State


async def test_opens_after_threshold_probes_and_closes() -> None:
    """Consecutive failures open it; a healthy probe half-opens; a success closes it."""
    healthy = asyncio.Event()

    async def probe() -> bool:
        return healthy.is_set()

    seen: list[State] = []

    async def listener(state: State) -> None:
        seen.append(state)

    breaker = CircuitBreaker(failure_threshold=3, probe_interval_s=0.01, probe=probe)
    breaker.subscribe(listener)
    for _ in range(2):
        breaker.record_failure()
    assert breaker.state is State.CLOSED
    breaker.record_failure()
    assert breaker.state is State.OPEN
    waiter = asyncio.create_task(breaker.wait_callable())
    await asyncio.sleep(0.05)
    assert not waiter.done()  # calls wait while open
    healthy.set()
    await asyncio.wait_for(waiter, 1)
    assert breaker.state is State.HALF_OPEN
    breaker.record_success()
    assert breaker.state is State.CLOSED
    await asyncio.sleep(0)
    assert seen == [State.OPEN, State.HALF_OPEN, State.CLOSED]
    await breaker.close()


async def test_half_open_failure_reopens() -> None:
    """One failure while half-open opens the circuit again."""

    async def probe() -> bool:
        return True

    breaker = CircuitBreaker(failure_threshold=1, probe_interval_s=0.01, probe=probe)
    breaker.record_failure()
    await asyncio.wait_for(breaker.wait_callable(), 1)
    assert breaker.state is State.HALF_OPEN
    breaker.record_failure()
    assert breaker.state is State.OPEN
    await breaker.close()


async def test_worker_pauses_while_qnn_down_and_loses_nothing(
    amqp_url: str, database_url: str, pool: asyncpg.Pool
) -> None:
    """QNN down: the circuit opens, consuming stops, nothing fails; back up: all complete."""
    from qnn_emulator.server import running_emulator
    from qnn_emulator.settings import EmulatorSettings

    requests = [parse_request(r) for r in generate_requests(30, seed=31, id_prefix="outage")]
    async with running_emulator(EmulatorSettings()) as qnn_url, httpx.AsyncClient() as admin:
        await admin.post(f"{qnn_url}/admin/health?ok=false")
        settings = make_settings(
            amqp_url,
            database_url,
            qnn_url,
            prefetch=4,
            breaker_failure_threshold=5,
            breaker_probe_interval_s=0.2,
        )
        async with running_worker(settings) as worker, Publisher.connect(amqp_url) as publisher:
            await publisher.publish_many(requests)
            port = worker.metrics_port or 0
            await wait_for(lambda: _breaker_state(port, 2))
            async with httpx.AsyncClient() as client:
                ready = await client.get(f"http://127.0.0.1:{port}/readyz")
            assert ready.status_code == 503  # paused: a load balancer should look elsewhere
            await asyncio.sleep(1.0)
            assert await pool.fetchval("SELECT count(*) FROM optimization_runs") == 0
            await admin.post(f"{qnn_url}/admin/health?ok=true")
            await wait_for(lambda: pool.fetchval("SELECT count(*) = 30 FROM optimization_runs"))
            await wait_for(lambda: _breaker_state(port, 0))
    statuses = await pool.fetch("SELECT status, count(*) FROM optimization_runs GROUP BY 1")
    assert {r["status"]: r["count"] for r in statuses} == {"completed": 30}
    attempts = await pool.fetch("SELECT attempts FROM optimization_runs")
    assert max(r["attempts"] for r in attempts) == 1


async def _breaker_state(port: int, value: int) -> bool:
    samples = await scrape(port)
    return samples.get(("eglo_qnn_circuit_state", frozenset())) == value
