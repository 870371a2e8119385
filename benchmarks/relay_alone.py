"""`python -m benchmarks.relay_alone`: the outbox relay by itself, as fast as it goes.

N outbox rows (half outcome events of ~1.5 kB, half `embedding.requested`) in a fresh database,
one `OutboxRelay.flush()` on a fresh vhost with a queue bound to `run.completed.#`: events per
second and the relay process's CPU per event, for each `--window`.

    python -m benchmarks.relay_alone --events 20000 --window 16 --window 64 --window 256
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import tempfile
import time
import uuid
from pathlib import Path

import aio_pika
import asyncpg

from benchmarks.harness import Bench, declare_events_queue, open_bench
from producers import topology
from worker.observability.metrics import Metrics
from worker.runtime.outbox import OutboxRelay

_INSERT = (
    "INSERT INTO outbox (event_id, exchange, routing_key, body, correlation_id, headers)"
    " VALUES ($1, $2, $3, $4, NULL, NULL)"
)


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _once(bench: Bench, events: int, window: int) -> str:
    async with bench.world("relay-alone") as world:
        await declare_events_queue(world.amqp_url)
        pool = await asyncpg.create_pool(world.db_url, min_size=2, max_size=4)
        outcome, requested = b'{"x":' + b"1" * 1500 + b"}", b'{"e":1}' * 30
        rows = []
        for _ in range(events // 2):
            rows.append((uuid.uuid4(), "eglo.events", "run.completed.forecast", outcome))
            rows.append((uuid.uuid4(), "eglo.events", "embedding.requested", requested))
        await pool.executemany(_INSERT, rows)
        broker = await aio_pika.connect_robust(world.amqp_url)
        channel = await broker.channel(publisher_confirms=True)
        await topology.declare(channel)
        relay = OutboxRelay(pool, channel, Metrics(), batch=500, poll_s=0.5, window=window)
        started, cpu = time.perf_counter(), _cpu_s()
        sent = await relay.flush()
        took, cpu = time.perf_counter() - started, _cpu_s() - cpu
        await broker.close()
        await pool.close()
    return (
        f"window {window}: {sent} events in {took:.2f} s = {sent / took:,.0f}/s; "
        f"relay CPU {cpu * 1e6 / max(sent, 1):.0f} µs per event"
    )


async def main(events: int, windows: list[int]) -> None:
    """A fresh vhost and database per window, as the other benchmarks get (`Bench.world`)."""
    with tempfile.TemporaryDirectory() as logs:
        async with open_bench(distinct=4, log_dir=Path(logs), worker_env={}) as bench:
            for window in windows:
                print(await _once(bench, events, window), flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m benchmarks.relay_alone", description=__doc__)
    p.add_argument("--events", type=int, default=20_000)
    p.add_argument("--window", type=int, action="append")
    args = p.parse_args()
    asyncio.run(main(args.events, args.window or [16, 64, 256]))
