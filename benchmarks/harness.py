"""Shared machinery of the performance benchmarks (`python -m benchmarks`, issue 4).

Everything here talks to the real local broker, the embedded (or configured) Postgres and real
child processes; nothing is mocked. One `Bench` holds what the whole run shares: the Postgres
server, the QNN emulator process, the request templates. Each benchmark gets its own vhost and
its own database (`Bench.world()`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aio_pika
import asyncpg
import orjson
import psutil

from contracts.requests import AnyRequest
from db.migrate import migrate
from db.pool import connect
from producers import topology
from producers.publisher import Publisher
from producers.reader import parse_request
from producers.sample import generate_requests
from tests.support import infra
from worker.ops.processes import free_port, spawn, stop, wait_http_ok

LOG_ROOT = Path(".eglo/bench")
EVENTS_QUEUE = "bench.events"
COMPLETED_BINDING = "run.completed.#"
SAMPLE_SEED = 4


# --------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Latency:
    """Publish→completion-event latencies in milliseconds."""

    offered_rate: float
    sent: int
    received: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    confirm_p50_ms: float  # publish call → broker confirm (part of the above)
    achieved_rate: float  # what publish_many actually offered
    cpu_per_1000: dict[str, float] = field(default_factory=dict)  # while under this load

    @classmethod
    def from_samples(
        cls,
        offered_rate: float,
        sent: int,
        samples_ms: list[float],
        confirm_ms: list[float],
        achieved_rate: float,
    ) -> Latency:
        if not samples_ms:
            nan = float("nan")
            return cls(offered_rate, sent, 0, nan, nan, nan, nan, nan, nan, achieved_rate)
        return cls(
            offered_rate=offered_rate,
            sent=sent,
            received=len(samples_ms),
            p50_ms=percentile(samples_ms, 50),
            p95_ms=percentile(samples_ms, 95),
            p99_ms=percentile(samples_ms, 99),
            max_ms=max(samples_ms),
            mean_ms=statistics.fmean(samples_ms),
            confirm_p50_ms=percentile(confirm_ms, 50) if confirm_ms else float("nan"),
            achieved_rate=achieved_rate,
        )


# --------------------------------------------------------------------------- CPU probes


def process_cpu(proc: psutil.Process) -> float:
    """User + system CPU seconds of one live process (0 if it is gone)."""
    try:
        t = proc.cpu_times()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return 0.0
    return float(t.user + t.system)


def tree_cpu(proc: psutil.Process) -> float:
    """A server's CPU: itself, its live children, and the children it has already reaped."""
    try:
        t = proc.cpu_times()
        total = float(t.user + t.system + t.children_user + t.children_system)
        children = proc.children(recursive=False)
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return 0.0
    for child in children:
        total += process_cpu(child)
    return total


def machine_busy_cpu() -> float:
    """CPU seconds the whole machine spent not idle (all cores)."""
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


def find_postmaster(db_url: str) -> psutil.Process | None:
    """The Postgres server process, when it runs here with its socket in its data dir."""
    parts = urlsplit(db_url)
    host = parse_qs(parts.query).get("host", [""])[0] or (parts.hostname or "")
    pid_file = Path(host) / "postmaster.pid" if host.startswith("/") else None
    if pid_file is None or not pid_file.exists():
        return None
    try:
        return psutil.Process(int(pid_file.read_text().split()[0]))
    except (psutil.NoSuchProcess, ValueError, IndexError):
        return None


def find_broker() -> psutil.Process | None:
    """The local RabbitMQ node (read-only: only its CPU times are looked at)."""
    nodes = [
        p
        for p in psutil.process_iter(["name", "cmdline", "create_time"])
        if p.info["name"] == "beam.smp"
    ]
    # rabbitmqctl runs a short-lived beam.smp of its own; the node is the one that booted rabbit.
    servers = [p for p in nodes if "rabbit boot" in " ".join(p.info["cmdline"] or [])]
    candidates = servers or nodes
    return min(candidates, key=lambda p: p.info["create_time"]) if candidates else None


# --------------------------------------------------------------------------- workload


@dataclass
class Workload:
    """Distinct sample requests (all four types, round-robin) reused under unique request ids."""

    templates: list[AnyRequest]

    @classmethod
    def build(cls, distinct: int) -> Workload:
        docs = generate_requests(distinct, seed=SAMPLE_SEED, id_prefix="tpl")
        return cls([parse_request(d) for d in docs])

    def requests(self, count: int, prefix: str) -> list[AnyRequest]:
        """`count` requests `{prefix}-{i:07d}`; request i is template i % distinct."""
        n = len(self.templates)
        return [
            self.templates[i % n].model_copy(update={"request_id": f"{prefix}-{i:07d}"})
            for i in range(count)
        ]

    def mix(self, count: int) -> dict[str, int]:
        out: dict[str, int] = {}
        n = len(self.templates)
        for i in range(count):
            t = self.templates[i % n].request_type
            out[t] = out.get(t, 0) + 1
        return out

    def mean_body_bytes(self) -> float:
        return statistics.fmean(
            len(orjson.dumps(t.model_dump(mode="json", exclude_none=True))) for t in self.templates
        )


def template_index(request_id: str, distinct: int) -> int:
    return int(request_id.rsplit("-", 1)[1]) % distinct


class TimedPublisher(Publisher):
    """`Publisher` that notes when each request was handed to the broker and when confirmed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent: dict[str, float] = {}
        self.confirmed: dict[str, float] = {}

    async def publish(
        self, request: AnyRequest, *, reply_to: str | None = None, correlation_id: str | None = None
    ) -> None:
        self.sent[request.request_id] = time.perf_counter()
        await super().publish(request, reply_to=reply_to, correlation_id=correlation_id)
        self.confirmed[request.request_id] = time.perf_counter()


# --------------------------------------------------------------------------- the world


@dataclass
class World:
    """One benchmark's own vhost and database."""

    name: str
    amqp_url: str
    db_url: str
    log_dir: Path


@dataclass
class Bench:
    """What a whole run shares: server URLs, the emulator, templates, process probes."""

    workload: Workload
    server_url: str
    emulator_port: int
    emulator: subprocess.Popen[bytes]
    log_dir: Path
    worker_env: dict[str, str] = field(default_factory=dict)
    postmaster: psutil.Process | None = None
    broker: psutil.Process | None = None
    _emulator_ps: psutil.Process | None = None

    @property
    def qnn_url(self) -> str:
        return f"http://127.0.0.1:{self.emulator_port}"

    @property
    def emulator_ps(self) -> psutil.Process:
        if self._emulator_ps is None:
            self._emulator_ps = psutil.Process(self.emulator.pid)
        return self._emulator_ps

    @contextlib.asynccontextmanager
    async def world(self, name: str) -> AsyncIterator[World]:
        """A fresh vhost and a fresh migrated database, both removed afterwards."""
        db_name = f"bench_{name.replace('-', '_')}_{uuid.uuid4().hex[:6]}"
        conn = await asyncpg.connect(self.server_url)
        try:
            await conn.execute(f'CREATE DATABASE "{db_name}"')
        finally:
            await conn.close()
        db_url = infra.with_database(self.server_url, db_name)
        mconn = await connect(db_url)
        try:
            await migrate(mconn)
        finally:
            await mconn.close()
        try:
            with infra.fresh_vhost() as amqp_url:
                yield World(name, amqp_url, db_url, self.log_dir / name)
        finally:
            conn = await asyncpg.connect(self.server_url)
            try:
                await conn.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
            finally:
                await conn.close()

    def eglo_env(self, world: World, metrics_port: int) -> dict[str, str]:
        return {
            "EGLO_AMQP_URL": world.amqp_url,
            "EGLO_DATABASE_URL": world.db_url,
            "EGLO_QNN_URL": self.qnn_url,
            "EGLO_METRICS_PORT": str(metrics_port),
            "EGLO_METRICS_HOST": "127.0.0.1",
            **self.worker_env,
        }

    def start_worker(self, world: World, index: int = 1) -> subprocess.Popen[bytes]:
        """`eglo worker` in its own process, returned once it is consuming (/readyz)."""
        port = free_port()
        process = spawn(
            ["worker"], self.eglo_env(world, port), world.log_dir / f"worker-{index}.log"
        )
        wait_http_ok(f"http://127.0.0.1:{port}/readyz", process=process, within_s=60)
        return process


@contextlib.asynccontextmanager
async def open_bench(
    *,
    distinct: int,
    log_dir: Path,
    worker_env: Mapping[str, str],
    emulator_args: Sequence[str] = ("--latency-ms", "20"),
) -> AsyncIterator[Bench]:
    """Start a Postgres server of the run's own and the emulator (`eglo emulator --latency-ms
    20`). The server: EGLO_DATABASE_URL when set, else an embedded PostgreSQL in a temp dir
    (not the shared one under .eglo/, which tests and other benchmarks may be loading)."""
    infra.ensure_local_rabbitmq()
    with infra.postgres_server() as server_url:
        async with _with_emulator(
            server_url, distinct, log_dir, worker_env, emulator_args
        ) as bench:
            yield bench


@contextlib.asynccontextmanager
async def _with_emulator(
    server_url: str,
    distinct: int,
    log_dir: Path,
    worker_env: Mapping[str, str],
    emulator_args: Sequence[str],
) -> AsyncIterator[Bench]:
    workload = Workload.build(distinct)
    port = free_port()
    emulator = spawn(
        ["emulator", "--port", str(port), "--seed", "3", *emulator_args],
        {},
        log_dir / "emulator.log",
    )
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/api/v1/health/simple", process=emulator)
        yield Bench(
            workload=workload,
            server_url=server_url,
            emulator_port=port,
            emulator=emulator,
            log_dir=log_dir,
            worker_env=dict(worker_env),
            postmaster=find_postmaster(server_url),
            broker=find_broker(),
        )
    finally:
        stop(emulator, grace_s=5)


# --------------------------------------------------------------------------- measuring


@dataclass
class Sample:
    t: float
    done: int  # completion events arrived in our queue
    stored: int | None  # runs committed (None without a database)
    cpu: dict[str, float]
    rss: dict[str, float]


@dataclass
class Drain:
    """A backlog drained by some consumer process(es).

    `runs_per_s` counts completion events (what downstream sees: eglo's outbox relay is inside),
    `commits_per_s` counts committed runs in the database; each between 5 % and 95 % of N.
    """

    requests: int
    runs_per_s: float
    commits_per_s: float | None
    window_runs: int
    window_s: float
    total_s: float  # consumer start until the last completion event
    stored_all_s: float | None  # consumer start until the last run was committed
    cpu_per_1000: dict[str, float]  # label -> CPU seconds per 1,000 runs, over the window
    peak_rss_mb: dict[str, float]
    completed: int
    max_relay_backlog: int | None  # most runs committed but not yet announced, at one sample
    stalled: bool = False

    @property
    def sustained_per_s(self) -> float | None:
        """The lower of the completion-event and commit rates (None if neither was measured).
        On a short backlog eglo's relay announces committed runs in bursts, and the 5-95 %
        window of events alone can come out several times too fast (1,457 events/s beside 134
        commits/s in one 1,500-request quick run)."""
        rates = [r for r in (self.runs_per_s, self.commits_per_s) if r is not None and r > 0]
        return min(rates) if rates else None

    @property
    def foreign_cores(self) -> float:
        """Cores other work on the machine used during the window (not ours, not the broker's,
        Postgres' or the emulator's)."""
        per_run = self.cpu_per_1000.get("unaccounted", 0.0) / 1000
        return max(per_run * self.runs_per_s, 0.0) if self.runs_per_s == self.runs_per_s else 0.0


class Probes:
    """CPU (and RSS) readers for the processes of interest."""

    def __init__(self, bench: Bench, consumers: Mapping[str, psutil.Process]) -> None:
        self.bench = bench
        self.consumers = dict(consumers)

    def cpu(self) -> dict[str, float]:
        out = {label: process_cpu(p) for label, p in self.consumers.items()}
        out["emulator"] = process_cpu(self.bench.emulator_ps)
        out["driver"] = process_cpu(psutil.Process())
        if self.bench.broker is not None:
            out["broker"] = process_cpu(self.bench.broker)
        if self.bench.postmaster is not None:
            out["postgres"] = tree_cpu(self.bench.postmaster)
        out["machine"] = machine_busy_cpu()
        return out

    def rss(self) -> dict[str, float]:
        out = {}
        for label, p in self.consumers.items():
            with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
                out[label] = p.memory_info().rss / 2**20
        return out


def cpu_per_1000(
    before: Mapping[str, float], after: Mapping[str, float], runs: int
) -> dict[str, float]:
    """CPU seconds per 1,000 runs by label; `unaccounted` = machine minus everything named."""
    if runs <= 0:
        return {}
    cpu = {k: (after[k] - before[k]) / runs * 1000 for k in after if k in before}
    if "machine" in cpu:
        cpu["unaccounted"] = cpu["machine"] - sum(v for k, v in cpu.items() if k != "machine")
    return cpu


async def wait_quiet(
    *, max_busy_cores: float = 0.35, window_s: float = 2.0, max_wait_s: float = 60.0
) -> tuple[float, float]:
    """Wait (up to max_wait_s) until the machine is nearly idle before a measurement; the
    machine is shared with whatever else runs here. Returns (seconds waited, busy cores)."""
    started = time.perf_counter()
    while True:
        before = machine_busy_cpu()
        await asyncio.sleep(window_s)
        busy = (machine_busy_cpu() - before) / window_s
        waited = time.perf_counter() - started
        if busy <= max_busy_cores or waited >= max_wait_s:
            return waited, busy


async def declare_events_queue(amqp_url: str) -> None:
    """Our own queue on eglo.events, bound to run.completed.# (what a downstream team would do)."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await topology.declare(channel)
        queue = await channel.declare_queue(EVENTS_QUEUE, durable=False)
        await queue.bind(topology.EVENTS_EXCHANGE, routing_key=COMPLETED_BINDING)


class QueueDepth:
    """Reads message counts with passive declares on one plain connection."""

    def __init__(self, connection: aio_pika.abc.AbstractConnection) -> None:
        self._connection = connection
        self._channel: aio_pika.abc.AbstractChannel | None = None

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, amqp_url: str) -> AsyncIterator[QueueDepth]:
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            yield cls(connection)

    async def count(self, name: str) -> int:
        if self._channel is None or self._channel.is_closed:
            self._channel = await self._connection.channel()
        queue = await self._channel.declare_queue(name, passive=True)
        return int(queue.declaration_result.message_count or 0)

    async def consumers(self, name: str) -> int:
        if self._channel is None or self._channel.is_closed:
            self._channel = await self._connection.channel()
        queue = await self._channel.declare_queue(name, passive=True)
        return int(queue.declaration_result.consumer_count or 0)

    async def purge(self, name: str) -> None:
        if self._channel is None or self._channel.is_closed:
            self._channel = await self._connection.channel()
        queue = await self._channel.declare_queue(name, passive=True)
        await queue.purge()


async def publish_backlog(amqp_url: str, requests: Iterable[AnyRequest]) -> tuple[int, float]:
    """Publish with confirms as fast as `Publisher.publish_many` goes; (confirmed, seconds)."""
    started = time.perf_counter()
    async with Publisher.connect(amqp_url) as publisher:
        report = await publisher.publish_many(requests)
    if report.failed:
        raise RuntimeError(f"{len(report.failed)} requests not confirmed: {report.failed[0]}")
    return len(report.confirmed), time.perf_counter() - started


class ProcessDied(RuntimeError):
    pass


def check_alive(processes: Iterable[subprocess.Popen[bytes]]) -> None:
    for p in processes:
        if p.poll() is not None:
            raise ProcessDied(f"{p.args!s} exited with {p.returncode}")


async def measure_drain(
    world: World,
    probes: Probes,
    total: int,
    *,
    processes: Sequence[subprocess.Popen[bytes]] = (),
    with_db: bool = True,
    interval_s: float = 0.2,
    stall_s: float = 60.0,
) -> tuple[Drain, list[Sample]]:
    """Sample completion events (depth of our unconsumed events queue) and committed runs until
    `total` events have arrived. Rates and CPU are taken between the first samples at >= 5 %
    and >= 95 % of `total`, so process start-up and the tail do not count."""
    samples: list[Sample] = []
    started = time.perf_counter()
    last_progress = started
    stalled = False
    conn = await asyncpg.connect(world.db_url) if with_db else None
    try:
        async with QueueDepth.open(world.amqp_url) as depth:
            while True:
                done = await depth.count(EVENTS_QUEUE)
                stored = (
                    int(await conn.fetchval("SELECT count(*) FROM optimization_runs"))
                    if conn is not None
                    else None
                )
                now = time.perf_counter()
                progress = (done, stored)
                if not samples or progress != (samples[-1].done, samples[-1].stored):
                    last_progress = now
                samples.append(Sample(now, done, stored, probes.cpu(), probes.rss()))
                if done >= total:
                    break
                check_alive(processes)
                if now - last_progress > stall_s:
                    stalled = True
                    break
                await asyncio.sleep(interval_s)
    finally:
        if conn is not None:
            await conn.close()
    return summarise_drain(samples, total, started, stalled), samples


def _window(samples: list[Sample], total: int, key: Callable[[Sample], int]) -> tuple[
    Sample, Sample
]:
    lo = next((s for s in samples if key(s) >= 0.05 * total), samples[0])
    hi = next((s for s in samples if key(s) >= 0.95 * total), samples[-1])
    return lo, hi


def summarise_drain(samples: list[Sample], total: int, started: float, stalled: bool) -> Drain:
    lo, hi = _window(samples, total, lambda s: s.done)
    runs = hi.done - lo.done
    seconds = hi.t - lo.t
    rate = runs / seconds if seconds > 0 and runs > 0 else float("nan")
    commits_rate = stored_all = relay_backlog = None
    if samples[-1].stored is not None:
        clo, chi = _window(samples, total, lambda s: s.stored or 0)
        commits = (chi.stored or 0) - (clo.stored or 0)
        commits_rate = commits / (chi.t - clo.t) if chi.t > clo.t and commits > 0 else None
        stored_all = next((s.t - started for s in samples if (s.stored or 0) >= total), None)
        relay_backlog = max((s.stored or 0) - s.done for s in samples)
    peak: dict[str, float] = {}
    for s in samples:
        for label, mb in s.rss.items():
            peak[label] = max(peak.get(label, 0.0), mb)
    return Drain(
        requests=total,
        runs_per_s=rate,
        commits_per_s=commits_rate,
        window_runs=runs,
        window_s=seconds,
        total_s=samples[-1].t - started,
        stored_all_s=stored_all,
        cpu_per_1000=cpu_per_1000(lo.cpu, hi.cpu, runs),
        peak_rss_mb=peak,
        completed=samples[-1].done,
        max_relay_backlog=relay_backlog,
        stalled=stalled,
    )


async def measure_latency(
    world: World,
    requests: list[AnyRequest],
    rate: float,
    *,
    probes: Probes | None = None,
    settle_s: float = 60.0,
) -> Latency:
    """Offer `requests` at `rate`/s with `Publisher.publish_many`; time each to its completion
    event on our own `run.completed.#` queue. Clock: the driver's perf_counter, taken when the
    request is handed to `Publisher.publish` (before the confirm)."""
    wanted = {r.request_id for r in requests}
    arrived: dict[str, float] = {}
    all_in = asyncio.Event()

    async def on_event(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        now = time.perf_counter()
        rid = orjson.loads(message.body).get("request_id")
        if rid in wanted and rid not in arrived:
            arrived[rid] = now
            if len(arrived) == len(wanted):
                all_in.set()

    connection = await aio_pika.connect(world.amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=512)
        queue = await channel.declare_queue(EVENTS_QUEUE, passive=True)
        await queue.purge()
        tag = await queue.consume(on_event, no_ack=True)
        async with TimedPublisher.connect(world.amqp_url) as publisher:
            assert isinstance(publisher, TimedPublisher)
            cpu0 = probes.cpu() if probes else {}
            t0 = time.perf_counter()
            report = await publisher.publish_many(requests, rate=rate)
            achieved = len(report.confirmed) / (time.perf_counter() - t0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(all_in.wait(), timeout=settle_s)
            cpu = cpu_per_1000(cpu0, probes.cpu(), len(arrived)) if probes else {}
            await queue.cancel(tag)
            sent = publisher.sent
            samples = [(arrived[rid] - sent[rid]) * 1000 for rid in arrived if rid in sent]
            confirms = [
                (publisher.confirmed[rid] - publisher.sent[rid]) * 1000
                for rid in publisher.confirmed
            ]
    latency = Latency.from_samples(rate, len(requests), samples, confirms, achieved)
    latency.cpu_per_1000 = cpu
    return latency


async def wait_for_consumers(world: World, queue: str, count: int, within_s: float = 60.0) -> None:
    deadline = time.monotonic() + within_s
    async with QueueDepth.open(world.amqp_url) as depth:
        while await depth.consumers(queue) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{count} consumer(s) did not appear on {queue}")
            await asyncio.sleep(0.1)


def spawn_module(
    module: str, args: list[str], env: Mapping[str, str], log_path: Path
) -> subprocess.Popen[bytes]:
    """`python -m MODULE ARGS` in a child process (the benchmark's own consumers)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        env={**os.environ, **env},
        stdout=log,
        stderr=subprocess.STDOUT,
    )


async def drain_then_time(
    bench: Bench,
    world: World,
    process: subprocess.Popen[bytes],
    requests: int,
    latency_rate: float | None,
    latency_seconds: float,
    tag: str,
    *,
    with_db: bool = True,
) -> tuple[Drain, Latency | None]:
    """A ceiling's two measurements, then its process stopped: the drain of the backlog of
    `requests` already published (throughput, CPU), then requests offered at `latency_rate`
    (None: half the maximum just measured) and timed."""
    try:
        probes = Probes(bench, {"consumer": psutil.Process(process.pid)})
        drain, _ = await measure_drain(
            world, probes, requests, processes=[process], with_db=with_db
        )
        latency = None
        rate = latency_rate or drain.runs_per_s / 2
        if rate > 0 and not drain.stalled:
            count = max(200, int(rate * latency_seconds))
            latency = await measure_latency(
                world, bench.workload.requests(count, tag), rate, probes=probes
            )
    finally:
        stop_all([process], grace_s=10)
    return drain, latency


def stop_all(processes: Iterable[subprocess.Popen[bytes]], grace_s: float = 30.0) -> list[int]:
    return [stop(p, grace_s=grace_s) for p in processes]
