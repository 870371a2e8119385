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
import time
import uuid

import aio_pika
import asyncpg

from benchmarks.harness import declare_events_queue
from db.migrate import migrate
from db.pool import connect
from producers import topology
from tests.support import infra
from worker.observability.metrics import Metrics
from worker.runtime.outbox import OutboxRelay

_INSERT = (
    "INSERT INTO outbox (event_id, exchange, routing_key, body, correlation_id, headers)"
    " VALUES ($1, $2, $3, $4, NULL, NULL)"
)


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _once(server_url: str, events: int, window: int) -> str:
    name = f"relay_alone_{uuid.uuid4().hex[:6]}"
    admin = await asyncpg.connect(server_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    db_url = infra.with_database(server_url, name)
    conn = await connect(db_url)
    await migrate(conn)
    await conn.close()
    try:
        with infra.fresh_vhost() as amqp_url:
            await declare_events_queue(amqp_url)
            pool = await asyncpg.create_pool(db_url, min_size=2, max_size=4)
            outcome, requested = b'{"x":' + b"1" * 1500 + b"}", b'{"e":1}' * 30
            rows = []
            for _ in range(events // 2):
                rows.append((uuid.uuid4(), "eglo.events", "run.completed.forecast", outcome))
                rows.append((uuid.uuid4(), "eglo.events", "embedding.requested", requested))
            await pool.executemany(_INSERT, rows)
            broker = await aio_pika.connect_robust(amqp_url)
            channel = await broker.channel(publisher_confirms=True)
            await topology.declare(channel)
            relay = OutboxRelay(pool, channel, Metrics(), batch=500, poll_s=0.5, window=window)
            started, cpu = time.perf_counter(), _cpu_s()
            sent = await relay.flush()
            took, cpu = time.perf_counter() - started, _cpu_s() - cpu
            await broker.close()
            await pool.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    return (
        f"window {window}: {sent} events in {took:.2f} s = {sent / took:,.0f}/s; "
        f"relay CPU {cpu * 1e6 / max(sent, 1):.0f} µs per event"
    )


async def main(events: int, windows: list[int]) -> None:
    infra.ensure_local_rabbitmq()
    with infra.postgres_server() as server_url:
        for window in windows:
            print(await _once(server_url, events, window), flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m benchmarks.relay_alone", description=__doc__)
    p.add_argument("--events", type=int, default=20_000)
    p.add_argument("--window", type=int, action="append")
    args = p.parse_args()
    asyncio.run(main(args.events, args.window or [16, 64, 256]))
