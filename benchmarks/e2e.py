"""End-to-end benchmarks of real consumer processes: eglo's worker, the FastStream baseline, two
eglo workers (scale-out), and the worker's memory on a large backlog.

Throughput: N requests are published first (confirmed), then the consumer process(es) start on
the backlog; completions are counted as `run.completed.#` events arriving in our own queue on
`eglo.events` (so eglo's outbox relay is inside the measurement), and rate and CPU are taken
between 5 % and 95 % of N. Latency: then, with the same process(es) still running, requests are
offered at half the measured rate with `Publisher.publish_many(rate=...)` and each is timed from
the publish call to its completion event.
"""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import asyncpg
import psutil

from benchmarks import stages
from benchmarks.harness import (
    EVENTS_QUEUE,
    Bench,
    Drain,
    Latency,
    Probes,
    QueueDepth,
    World,
    check_alive,
    declare_events_queue,
    measure_drain,
    measure_latency,
    publish_backlog,
    spawn_module,
    stop_all,
)
from producers import topology
from worker.ops.processes import free_port, spawn


@dataclass
class E2E:
    name: str
    processes: int
    drain: Drain
    latency: Latency | None
    backlog_publish_s: float
    stored: dict[str, int] = field(default_factory=dict)
    exit_codes: list[int] = field(default_factory=list)
    # eglo only: eglo_request_stage_duration_seconds over the latency phase, per stage
    # {"count", "mean_ms", "p50_ms", "p99_ms"} (benchmarks.stages)
    stages: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class Memory:
    backlog: int
    publish_s: float
    watched_s: float
    peak_rss_mb: float
    peak_at_s: float
    backlog_at_peak: int
    final_rss_mb: float
    backlog_at_end: int
    completed: int  # completion events sent while watched
    stored: int  # runs committed while watched
    start_rss_mb: float
    samples: list[tuple[float, float, int]]  # (seconds since start, RSS MB, backlog)


def spawn_worker(
    bench: Bench, world: World, index: int, port: int | None = None
) -> subprocess.Popen[bytes]:
    return spawn(
        ["worker"],
        bench.eglo_env(world, port or free_port()),
        world.log_dir / f"worker-{index}.log",
    )


async def _stored(db_url: str) -> dict[str, int]:
    conn = await asyncpg.connect(db_url)
    try:
        rows = await conn.fetch("SELECT status, count(*) AS n FROM optimization_runs GROUP BY 1")
        unsent = await conn.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL")
    finally:
        await conn.close()
    return {**{r["status"]: r["n"] for r in rows}, "outbox_unsent": unsent}


async def run_consumers(
    bench: Bench,
    name: str,
    start: Callable[[World], list[subprocess.Popen[bytes]]],
    requests: int,
    *,
    latency_rate: Callable[[Drain], float | None],
    latency_seconds: float,
    metrics_port: int | None = None,
) -> E2E:
    async with bench.world(name) as world:
        await declare_events_queue(world.amqp_url)
        backlog = bench.workload.requests(requests, name)
        _, publish_s = await publish_backlog(world.amqp_url, backlog)
        processes = start(world)
        try:
            probes = Probes(
                bench,
                {f"consumer-{i + 1}": psutil.Process(p.pid) for i, p in enumerate(processes)},
            )
            drain, _ = await measure_drain(world, probes, requests, processes=processes)
            latency = None
            breakdown: dict[str, dict[str, float]] = {}
            rate = latency_rate(drain)
            if rate and not drain.stalled:
                count = max(200, int(rate * latency_seconds))
                before = stages.scrape(metrics_port) if metrics_port else {}
                latency = await measure_latency(
                    world, bench.workload.requests(count, f"{name}-lat"), rate, probes=probes
                )
                if metrics_port:
                    await asyncio.sleep(1.0)  # the last confirms' observations
                    after = stages.scrape(metrics_port)
                    breakdown = {
                        k: dataclasses.asdict(v)
                        for k, v in stages.stage_breakdown(before, after).items()
                    }
            check_alive(processes)
        finally:
            codes = stop_all(processes, grace_s=40)
        return E2E(
            name=name,
            processes=len(processes),
            drain=drain,
            latency=latency,
            backlog_publish_s=publish_s,
            stored=await _stored(world.db_url),
            exit_codes=codes,
            stages=breakdown if latency else {},
        )


async def eglo(
    bench: Bench, requests: int, latency_seconds: float, *, workers: int = 1, latency: bool = True
) -> E2E:
    ports = [free_port() for _ in range(workers)]
    return await run_consumers(
        bench,
        f"eglo-{workers}w",
        lambda world: [spawn_worker(bench, world, i + 1, ports[i]) for i in range(workers)],
        requests,
        latency_rate=(lambda d: (d.sustained_per_s or 0) / 2) if latency else (lambda d: None),
        latency_seconds=latency_seconds,
        metrics_port=ports[0] if workers == 1 else None,
    )


async def baseline(bench: Bench, requests: int, latency_seconds: float) -> E2E:
    def start(world: World) -> list[subprocess.Popen[bytes]]:
        env = {
            "EGLO_AMQP_URL": world.amqp_url,
            "EGLO_DATABASE_URL": world.db_url,
            "EGLO_QNN_URL": bench.qnn_url,
            "EGLO_PREFETCH": "64",
        }
        return [
            spawn_module(
                "benchmarks.faststream_baseline", [], env, world.log_dir / "faststream.log"
            )
        ]

    return await run_consumers(
        bench,
        "faststream",
        start,
        requests,
        latency_rate=lambda d: (d.sustained_per_s or 0) / 2,
        latency_seconds=latency_seconds,
    )


async def memory(bench: Bench, backlog: int, watch_s: float) -> Memory:
    """Peak RSS of one worker started on `backlog` waiting requests, sampled every 0.5 s."""
    async with bench.world("memory") as world:
        await declare_events_queue(world.amqp_url)
        requests = bench.workload.requests(backlog, "mem")
        _, publish_s = await publish_backlog(world.amqp_url, requests)
        del requests
        process = spawn_worker(bench, world, 1)
        ps = psutil.Process(process.pid)
        samples: list[tuple[float, float, int]] = []
        completed = stored = 0
        conn = await asyncpg.connect(world.db_url)
        try:
            async with QueueDepth.open(world.amqp_url) as depth:
                started = time.perf_counter()
                while True:
                    check_alive([process])
                    rss = ps.memory_info().rss / 2**20
                    waiting = await depth.count(topology.REQUESTS_QUEUE)
                    elapsed = time.perf_counter() - started
                    samples.append((elapsed, rss, waiting))
                    if elapsed >= watch_s or waiting == 0:
                        break
                    await asyncio.sleep(0.5)
                completed = await depth.count(EVENTS_QUEUE)
                stored = int(await conn.fetchval("SELECT count(*) FROM optimization_runs"))
        finally:
            await conn.close()
            stop_all([process], grace_s=40)
    peak = max(samples, key=lambda s: s[1])
    return Memory(
        backlog=backlog,
        publish_s=publish_s,
        watched_s=samples[-1][0],
        peak_rss_mb=peak[1],
        peak_at_s=peak[0],
        backlog_at_peak=peak[2],
        final_rss_mb=samples[-1][1],
        backlog_at_end=samples[-1][2],
        completed=completed,
        stored=stored,
        start_rss_mb=samples[0][1],
        samples=samples,
    )
