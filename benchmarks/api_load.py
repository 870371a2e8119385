"""The HTTP API under load (issue 14): `eglo api`, one `eglo worker` and the emulator as real
processes, in a fresh vhost and database; the load comes from this driver over aiohttp.

Requests are the run's sample workload (`Bench.workload`: all four types round-robin, unique
request ids), each sent to its type's submit route (`POST /forecast`, `/storage-optimize`,
`/grid-switch-optimize`, `/simulate`) with a submitter's bearer token.

1. Submit rate: `requests` submissions without `?wait=`, as fast as `clients` concurrent HTTP
   clients go (closed loop: each sends its next request when the last one is answered). The
   rate counts 202 answers over the time from the first send to the last answer; p50/p99 are of
   the 202s. The worker consumes meanwhile (it shares the machine), as it would in production.
2. Then, once the worker has stored that backlog, `?wait=W` submissions at a fixed load (open
   loop, evenly spaced arrivals for `seconds`): each is timed from its scheduled send time (so a
   late driver does not hide queueing), p50/p95/p99 of the 200 answers (stored within W), and
   how many came back 202 (still running after W) instead.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import aiohttp
import asyncpg
import orjson
import psutil

from benchmarks.harness import Bench, Probes, World, check_alive, cpu_per_1000, percentile, stop_all
from benchmarks.report import num
from contracts.requests import AnyRequest
from worker.api.app import SUBMIT_ROUTES
from worker.ops.processes import free_port, spawn, wait_http_ok

ROUTES = {request_type: path for path, request_type in SUBMIT_ROUTES.items()}
DISTURBED_CORES = 0.3  # as run.py flags a phase


# --------------------------------------------------------------------------- pure parts


def arrivals(rate: float, seconds: float, *, poisson: bool = False, seed: int = 14) -> list[float]:
    """Send times, in seconds from the start, of an open-loop load of `rate` requests/s lasting
    `seconds`: evenly spaced (round(rate * seconds) of them), or a Poisson process (exponential
    gaps, seeded)."""
    if rate <= 0 or seconds <= 0:
        return []
    if not poisson:
        return [i / rate for i in range(round(rate * seconds))]
    rng = random.Random(seed)
    out: list[float] = []
    t = rng.expovariate(rate)
    while t < seconds:
        out.append(t)
        t += rng.expovariate(rate)
    return out


@dataclass
class HttpLoad:
    """The answers to one load: how many of each status, and the latencies of one status."""

    name: str
    sent: int
    seconds: float  # first send until the last answer
    statuses: dict[str, int]  # "200", "202", ..., or "error: ClientOSError"
    counted_status: int  # the status the latencies and the rate are of
    count: int
    per_s: float  # answers with counted_status per second over `seconds`
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    clients: int | None = None  # closed loop
    offered_rate: float | None = None  # open loop
    max_send_lag_ms: float = 0.0  # open loop: how late the driver sent, at worst
    cpu_per_1000: dict[str, float] = field(default_factory=dict)  # per 1,000 answers
    foreign_cores: float = 0.0

    @property
    def answered(self) -> int:
        return sum(n for k, n in self.statuses.items() if not k.startswith("error"))


def summarise(
    name: str,
    samples: Sequence[tuple[int | str, float]],
    seconds: float,
    counted_status: int,
    **extra: float | int | None,
) -> HttpLoad:
    """(status or error name, latency ms) per request → an HttpLoad; percentiles are
    nearest-rank over the answers with `counted_status` only (NaN when there are none)."""
    statuses: dict[str, int] = {}
    for status, _ in samples:
        key = str(status) if isinstance(status, int) else f"error: {status}"
        statuses[key] = statuses.get(key, 0) + 1
    counted = [ms for status, ms in samples if status == counted_status]
    nan = float("nan")
    return HttpLoad(
        name=name,
        sent=len(samples),
        seconds=seconds,
        statuses=dict(sorted(statuses.items())),
        counted_status=counted_status,
        count=len(counted),
        per_s=len(counted) / seconds if seconds > 0 else nan,
        p50_ms=percentile(counted, 50) if counted else nan,
        p95_ms=percentile(counted, 95) if counted else nan,
        p99_ms=percentile(counted, 99) if counted else nan,
        max_ms=max(counted) if counted else nan,
        **extra,  # type: ignore[arg-type]
    )


def bodies(requests: Sequence[AnyRequest]) -> list[tuple[str, bytes]]:
    """(submit route, JSON body) per request: the route of its type, the body as a client
    would send it (no nulls)."""
    return [
        (ROUTES[r.request_type], orjson.dumps(r.model_dump(mode="json", exclude_none=True)))
        for r in requests
    ]


# --------------------------------------------------------------------------- the load


@dataclass
class ApiBench:
    submit: HttpLoad
    wait: HttpLoad
    wait_s: float  # the ?wait= of the second load
    mix: dict[str, int]  # routes of the submit load
    drained_s: float  # after the submit load, until the worker had stored all of it
    api_peak_rss_mb: float
    stored: int
    exit_codes: list[int] = field(default_factory=list)

    @property
    def foreign_cores(self) -> float:
        return max(self.submit.foreign_cores, self.wait.foreign_cores)


class _Client:
    def __init__(self, session: aiohttp.ClientSession, base_url: str, token: str) -> None:
        self.session = session
        self.base_url = base_url
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    async def post(self, path: str, body: bytes) -> int | str:
        try:
            async with self.session.post(
                self.base_url + path, data=body, headers=self.headers
            ) as response:
                await response.read()
                return response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            return type(exc).__name__


async def closed_loop(
    client: _Client, work: Sequence[tuple[str, bytes]], clients: int
) -> tuple[list[tuple[int | str, float]], float]:
    samples: list[tuple[int | str, float]] = []
    queue: Iterator[tuple[str, bytes]] = iter(work)

    async def one_client() -> None:
        for path, body in queue:  # shared: each request is taken by exactly one client
            t0 = time.perf_counter()
            status = await client.post(path, body)
            samples.append((status, (time.perf_counter() - t0) * 1000))

    started = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(clients)))
    return samples, time.perf_counter() - started


async def open_loop(
    client: _Client, work: Sequence[tuple[str, bytes]], offsets: Sequence[float], query: str
) -> tuple[list[tuple[int | str, float]], float, float]:
    """Send work[i] at offsets[i] whatever the earlier ones are doing; (samples, seconds from
    the first scheduled send to the last answer, worst send lag in ms)."""
    samples: list[tuple[int | str, float]] = []
    lag = 0.0

    async def one(path: str, body: bytes, due: float) -> None:
        status = await client.post(path + query, body)
        samples.append((status, (time.perf_counter() - due) * 1000))

    start = time.perf_counter() + 0.05
    tasks = []
    for (path, body), offset in zip(work, offsets, strict=False):
        due = start + offset
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        lag = max(lag, time.perf_counter() - due)
        tasks.append(asyncio.create_task(one(path, body, due)))
    await asyncio.gather(*tasks)
    return samples, time.perf_counter() - start, lag * 1000


async def _stored(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM optimization_runs"))


async def _wait_stored(
    conn: asyncpg.Connection, at_least: int, processes: Sequence[subprocess.Popen[bytes]],
    within_s: float = 300.0,
) -> float:
    started = time.perf_counter()
    while await _stored(conn) < at_least:
        check_alive(processes)
        if time.perf_counter() - started > within_s:
            raise TimeoutError(f"the worker did not store {at_least} runs within {within_s:g} s")
        await asyncio.sleep(0.2)
    return time.perf_counter() - started


def _cpu(probes: Probes, before: dict[str, float], answers: int, seconds: float) -> tuple[
    dict[str, float], float
]:
    cpu = cpu_per_1000(before, probes.cpu(), answers)
    foreign = cpu.get("unaccounted", 0.0) * answers / 1000 / seconds if seconds > 0 else 0.0
    return cpu, max(foreign, 0.0)


def start_api(bench: Bench, world: World, token: str) -> tuple[subprocess.Popen[bytes], str]:
    """`eglo api` on a free loopback port with one submitter token; returned once /readyz."""
    world.log_dir.mkdir(parents=True, exist_ok=True)
    tokens = world.log_dir / "api-tokens"
    tokens.write_text(f"bench submitter {token}\n")
    tokens.chmod(0o600)
    port = free_port()
    process = spawn(
        ["api", "--host", "127.0.0.1", "--port", str(port)],
        {**bench.eglo_env(world, free_port()), "EGLO_API_TOKENS_FILE": str(tokens)},
        world.log_dir / "api.log",
    )
    url = f"http://127.0.0.1:{port}"
    wait_http_ok(f"{url}/readyz", process=process, within_s=60)
    return process, url


async def run(
    bench: Bench,
    requests: int,
    *,
    clients: int,
    wait_rate: float,
    wait_seconds: float,
    wait_s: float = 5.0,
) -> ApiBench:
    async with bench.world("api") as world:
        worker = bench.start_worker(world)
        processes = [worker]
        token = secrets.token_urlsafe(24)
        try:
            api, url = start_api(bench, world, token)
            processes.append(api)
            api_ps = psutil.Process(api.pid)
            probes = Probes(bench, {"api": api_ps, "worker": psutil.Process(worker.pid)})
            timeout = aiohttp.ClientTimeout(total=wait_s + 60)
            conn = await asyncpg.connect(world.db_url)
            connector = aiohttp.TCPConnector(limit=0)  # the loads bound their own concurrency
            try:
                async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                    client = _Client(session, url, token)
                    # Warm-up, not counted: connections, pools, the worker's first runs.
                    warm = bodies(bench.workload.requests(40, "api-warm"))
                    await closed_loop(client, warm, 4)
                    await open_loop(client, warm[:8], [0.05 * i for i in range(8)], "?wait=5")
                    await _wait_stored(conn, len(warm), processes)

                    work = bench.workload.requests(requests, "api-submit")
                    mix: dict[str, int] = {}
                    for r in work:
                        mix[ROUTES[r.request_type]] = mix.get(ROUTES[r.request_type], 0) + 1
                    check_alive(processes)
                    cpu0 = probes.cpu()
                    samples, seconds = await closed_loop(client, bodies(work), clients)
                    submit = summarise("submit", samples, seconds, 202, clients=clients)
                    submit.cpu_per_1000, submit.foreign_cores = _cpu(
                        probes, cpu0, submit.sent, seconds
                    )
                    rss = api_ps.memory_info().rss / 2**20
                    drained = await _wait_stored(conn, len(warm) + submit.count, processes)

                    offsets = arrivals(wait_rate, wait_seconds)
                    timed = bench.workload.requests(len(offsets), "api-wait")
                    cpu0 = probes.cpu()
                    samples, seconds, lag = await open_loop(
                        client, bodies(timed), offsets, f"?wait={wait_s:g}"
                    )
                    waited = summarise(
                        "wait", samples, seconds, 200, offered_rate=wait_rate,
                        max_send_lag_ms=lag,
                    )
                    waited.cpu_per_1000, waited.foreign_cores = _cpu(
                        probes, cpu0, waited.sent, seconds
                    )
                    rss = max(rss, api_ps.memory_info().rss / 2**20)
                    check_alive(processes)
                    stored = await _stored(conn)
            finally:
                await conn.close()
        finally:
            codes = stop_all(processes, grace_s=40)
    return ApiBench(
        submit=submit,
        wait=waited,
        wait_s=wait_s,
        mix=mix,
        drained_s=drained,
        api_peak_rss_mb=rss,
        stored=stored,
        exit_codes=codes,
    )


# --------------------------------------------------------------------------- the table


def _statuses(load: HttpLoad) -> str:
    return ", ".join(f"{k}: {num(v)}" for k, v in load.statuses.items())


def _other_cpu(load: HttpLoad) -> str:
    order = ("worker", "emulator", "broker", "postgres", "driver", "unaccounted", "machine")
    return " · ".join(f"{k} {num(load.cpu_per_1000[k], 2)}" for k in order
                      if k in load.cpu_per_1000)


def _flag(load: HttpLoad) -> str:
    cores = load.foreign_cores
    return f" ⚠ other work used {cores:.2f} cores" if cores > DISTURBED_CORES else ""


def format_api(a: ApiBench) -> list[str]:
    s, w = a.submit, a.wait
    still = w.statuses.get("202", 0)
    lines = [
        "| # | HTTP API load | sent | answers | rate | latency p50 / p95 / p99 / max ms "
        "| `eglo api` CPU s / 1,000 requests | other CPU s / 1,000 requests |",
        "|---|---|---|---|---|---|---|---|",
        f"| 9a | submit without `?wait=`: {s.clients} concurrent clients, closed loop "
        f"| {num(s.sent)} | {_statuses(s)} | **{num(s.per_s)} req/s** answered 202{_flag(s)} "
        f"| {num(s.p50_ms, 1)} / {num(s.p95_ms, 1)} / {num(s.p99_ms, 1)} / {num(s.max_ms)} "
        f"(of the 202s) | {num(s.cpu_per_1000.get('api'), 2)} | {_other_cpu(s)} |",
        f"| 9b | `?wait={a.wait_s:g}` at {num(w.offered_rate)} req/s, evenly spaced, open loop, "
        f"{num(w.sent / (w.offered_rate or 1))} s | {num(w.sent)} | {_statuses(w)} "
        f"| {num(w.per_s, 1)} req/s answered 200; **{num(still)} still running (202)**{_flag(w)} "
        f"| {num(w.p50_ms)} / {num(w.p95_ms)} / {num(w.p99_ms)} / {num(w.max_ms)} "
        f"(of the 200s) | {num(w.cpu_per_1000.get('api'), 2)} | {_other_cpu(w)} |",
    ]
    routes = ", ".join(f"`{k}` {num(v)}" for k, v in sorted(a.mix.items()))
    lines += [
        "",
        f"HTTP API (9): `eglo api` (uvicorn, one process, default settings) + 1 `eglo worker` + "
        "the emulator, real processes in a fresh vhost and database; load from this driver "
        f"over aiohttp, the sample requests each to its type's route ({routes} in 9a), a "
        "submitter's bearer token. 9a's rate is 202 answers over first send → last answer; "
        "the worker consumes meanwhile, and had stored the whole backlog "
        f"{num(a.drained_s, 1)} s after the last 202. 9b starts after that; each request is "
        "timed from its scheduled send (worst driver lag "
        f"{num(w.max_send_lag_ms, 1)} ms); a 200 carries the stored run, a 202 means not "
        f"stored within {a.wait_s:g} s. `eglo api` peak RSS {num(a.api_peak_rss_mb)} MB; exit "
        f"codes (worker, api) {a.exit_codes}.",
    ]
    return lines
