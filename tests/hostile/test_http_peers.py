"""Hostile HTTP peers: the real worker (real broker, real Postgres) against a QNN stand-in on
loopback that throttles with nonsense Retry-After values, sends a 300 MB body, a gzip bomb, or
trickles its answer. Each attack is a row of the hostile-world table (tests/hostile/rows.py).

The stand-in is hostile for its first calls, then answers with what a real emulator computes; so
each request must end completed, none lost, none dead-lettered, and the process's peak RSS
(this test process, which holds the worker) must stay within 150 MB of its idle level.

`before` figures: this module run against main before the HTTP client was rewritten (same
attacks, same settings; main ignores the settings it does not know).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import httpx
import orjson
import pytest
from aiohttp import web

from contracts.topology import DEAD_LETTER_QUEUE, REQUESTS_QUEUE
from producers.publisher import Publisher
from producers.reader import parse_request
from producers.sample import generate_requests
from tests.hostile.rows import Row, record
from tests.support.harness import drain_queue, make_settings, queue_depth, running_worker, wait_for

pytestmark = pytest.mark.hostile

RSS_BUDGET_MB = 150.0
LIMIT_BYTES = 4 << 20  # EGLO_QNN_MAX_RESPONSE_BYTES' default
DEADLINE_S = 2.0  # EGLO_QNN_DEADLINE_S, scaled down from its default 30 s
BOMB = Path(__file__).resolve().parents[2] / ".eglo" / "hostile" / "gzip-bomb-2g.gz"
BOMB_INFLATED = 2 << 30


# --------------------------------------------------------------------------- process memory


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise LookupError(key)


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the peak is this attack's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


# --------------------------------------------------------------------------- the hostile QNN

Attack = Callable[[web.Request, "HostileQnn", bytes], Awaitable[web.StreamResponse]]


@dataclass
class HostileQnn:
    """Predict calls: the attack while `hostile()` says so, then the emulator's own answer."""

    emulator_url: str
    attack: Attack
    hostile: Callable[[HostileQnn], bool]
    url: str = ""
    calls: int = 0
    hostile_calls: int = 0
    first_call: float | None = None
    bytes_sent: list[int] = field(default_factory=list)
    call_seconds: list[float] = field(default_factory=list)
    _emulator: httpx.AsyncClient | None = None

    async def answer(self, body: bytes) -> bytes:
        assert self._emulator is not None
        response = await self._emulator.post(
            "/api/v1/predictions/predict",
            content=body,
            headers={"Content-Type": "application/json"},
        )
        return response.content

    async def predict(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.calls += 1
        if self.first_call is None:
            self.first_call = time.monotonic()
        if self.hostile(self):
            self.hostile_calls += 1
            return await self.attack(request, self, body)
        return web.Response(body=await self.answer(body), content_type="application/json")


@contextlib.asynccontextmanager
async def hostile_qnn(
    emulator_url: str, attack: Attack, hostile: Callable[[HostileQnn], bool]
) -> AsyncIterator[HostileQnn]:
    stub = HostileQnn(emulator_url, attack, hostile)

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.add_routes(
        [
            web.post("/api/v1/predictions/predict", stub.predict),
            web.get("/api/v1/health/simple", health),
        ]
    )
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    stub.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    async with httpx.AsyncClient(base_url=emulator_url) as emulator:
        stub._emulator = emulator
        try:
            yield stub
        finally:
            await runner.cleanup()


def first_calls(n: int) -> Callable[[HostileQnn], bool]:
    return lambda stub: stub.calls <= n


def for_seconds(seconds: float) -> Callable[[HostileQnn], bool]:
    return lambda stub: stub.first_call is not None and time.monotonic() - stub.first_call < seconds


def throttle(retry_after: str) -> Attack:
    async def attack(_: web.Request, __: HostileQnn, ___: bytes) -> web.StreamResponse:
        return web.json_response(
            {"error": "rate limited"}, status=429, headers={"Retry-After": retry_after}
        )

    return attack


def whitespace_then_answer(total: int) -> Attack:
    """A chunked body: `total` bytes of whitespace, then a valid answer (valid JSON, all of it)."""

    async def attack(request: web.Request, stub: HostileQnn, body: bytes) -> web.StreamResponse:
        answer = await stub.answer(body)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        chunk = b" " * (64 << 10)
        sent = 0
        try:
            while sent < total:
                await response.write(chunk)
                sent += len(chunk)
            await response.write(answer)
            await response.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # the client hung up: what this attack hopes for
        stub.bytes_sent.append(sent)
        return response

    return attack


def gzip_bomb() -> Attack:
    async def attack(request: web.Request, stub: HostileQnn, _: bytes) -> web.StreamResponse:
        bomb = BOMB.read_bytes()
        response = web.StreamResponse(
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}
        )
        response.content_length = len(bomb)
        await response.prepare(request)
        try:
            await response.write(bomb)
            await response.write_eof()
        except (ConnectionError, RuntimeError):
            pass
        stub.bytes_sent.append(len(bomb))
        return response

    return attack


def trickle(count: int, interval_s: float) -> Attack:
    """One space every interval_s (under the per-read timeout), `count` of them, then the answer."""

    async def attack(request: web.Request, stub: HostileQnn, body: bytes) -> web.StreamResponse:
        started = time.monotonic()
        answer = await stub.answer(body)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            for _ in range(count):
                await response.write(b" ")
                await asyncio.sleep(interval_s)
            await response.write(answer)
            await response.write_eof()
        except (ConnectionError, RuntimeError):
            pass
        finally:
            stub.call_seconds.append(time.monotonic() - started)
        return response

    return attack


def _make_bomb() -> None:
    """2 GiB of zeros in ~2 MB of gzip (made once, kept under .eglo/hostile)."""
    if BOMB.exists():
        return
    BOMB.parent.mkdir(parents=True, exist_ok=True)
    deflate = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    zeros = bytes(16 << 20)
    parts = [deflate.compress(zeros) for _ in range(BOMB_INFLATED // len(zeros))]
    parts.append(deflate.flush())
    tmp = BOMB.with_suffix(".tmp")
    tmp.write_bytes(b"".join(parts))
    tmp.replace(BOMB)


# --------------------------------------------------------------------------- one attack, measured


@dataclass
class Outcome:
    statuses: dict[str, int]
    lost: int
    dead_lettered: int
    idle_mb: float
    peak_mb: float
    seconds: float
    ready_again_s: float | None

    @property
    def over_idle_mb(self) -> float:
        return self.peak_mb - self.idle_mb


async def _readiness(port: int, flips: list[tuple[float, int]], stop: asyncio.Event) -> None:
    """Record (time, status) each time /readyz changes its answer."""
    last = None
    async with httpx.AsyncClient(timeout=2.0) as client:
        while not stop.is_set():
            try:
                status = (await client.get(f"http://127.0.0.1:{port}/readyz")).status_code
            except httpx.HTTPError:
                status = 0
            if status != last:
                flips.append((time.monotonic(), status))
                last = status
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)


def _ready_again_s(flips: list[tuple[float, int]]) -> float | None:
    down = next((t for t, s in flips if s != 200), None)
    if down is None:
        return None
    up = next((t for t, s in flips if s == 200 and t > down), None)
    return None if up is None else up - down


async def run_attack(
    stub: HostileQnn,
    *,
    amqp_url: str,
    database_url: str,
    pool: asyncpg.Pool,
    amqp: aio_pika.abc.AbstractRobustConnection,
    count: int,
    seed: int,
    within_s: float = 60.0,
    **overrides: Any,
) -> Outcome:
    docs = generate_requests(count, seed=seed, id_prefix=f"hostile-{seed}")
    ids = {d["request_id"] for d in docs}
    settings = make_settings(amqp_url, database_url, stub.url, **overrides)
    flips: list[tuple[float, int]] = []
    stop = asyncio.Event()
    async with running_worker(settings) as worker:
        watcher = asyncio.create_task(_readiness(worker.metrics_port or 0, flips, stop))
        gc.collect()
        await asyncio.sleep(0.2)
        idle = _status_mb("VmRSS")
        if not _reset_peak():
            idle = _status_mb("VmHWM")
        started = time.monotonic()
        async with Publisher.connect(amqp_url) as publisher:
            await publisher.publish_many([parse_request(d) for d in docs])

        async def settled() -> bool:
            stored = await pool.fetchval(
                "SELECT count(*) FROM optimization_runs WHERE request_id = ANY($1::text[])",
                list(ids),
            )
            dead = await queue_depth(amqp, DEAD_LETTER_QUEUE)
            return bool(stored + dead >= count)

        await wait_for(settled, within_s=within_s, interval=0.1)
        seconds = time.monotonic() - started
        peak = _status_mb("VmHWM")
        await asyncio.sleep(0.3)
        stop.set()
        await watcher
        assert await queue_depth(amqp, REQUESTS_QUEUE) == 0
    rows = await pool.fetch(
        "SELECT request_id, status FROM optimization_runs WHERE request_id = ANY($1::text[])",
        list(ids),
    )
    async with amqp.channel() as channel:
        dlq = await channel.get_queue(DEAD_LETTER_QUEUE, ensure=True)
        dead_ids = {orjson.loads(m.body).get("request_id") for m in await drain_queue(dlq)}
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    accounted = {r["request_id"] for r in rows} | dead_ids
    return Outcome(
        statuses=statuses,
        lost=len(ids - accounted),
        dead_lettered=len(dead_ids & ids),
        idle_mb=idle,
        peak_mb=peak,
        seconds=seconds,
        ready_again_s=_ready_again_s(flips),
    )


def _did(outcome: Outcome, what: str) -> str:
    done = ", ".join(f"{n} {s}" for s, n in sorted(outcome.statuses.items())) or "nothing stored"
    return (
        f"{what}; {done} in {outcome.seconds:.1f} s; RSS {outcome.idle_mb:.0f} → "
        f"{outcome.peak_mb:.0f} MB (+{outcome.over_idle_mb:.0f})"
    )


def _assert_unhurt(outcome: Outcome, count: int) -> None:
    assert outcome.lost == 0
    assert outcome.dead_lettered == 0
    assert outcome.statuses == {"completed": count}
    assert outcome.over_idle_mb < RSS_BUDGET_MB


# --------------------------------------------------------------------------- the attacks

# Throttling: the 40 s throttle and the defaults (Retry-After cap 30 s, in-process budget
# 60 s, delay tiers 5/30/300 s), scaled by EGLO_HOSTILE_SCALE (1/10 unless told: a 4 s throttle).
SCALE = float(os.environ.get("EGLO_HOSTILE_SCALE", "0.1"))
THROTTLE_S = 40.0 * SCALE
THROTTLE_SETTINGS: dict[str, Any] = dict(
    qnn_retry_after_max_s=30.0 * SCALE,
    qnn_budget_s=60.0 * SCALE,
    qnn_backoff_initial_s=0.5 * SCALE,
    qnn_backoff_max_s=2.0 * SCALE,
    retry_delays_s=[5.0 * SCALE, 30.0 * SCALE, 300.0 * SCALE],
)

# This module on main at 1f3ee67, before worker/http_client.py (now worker/runtime/) (Python 3.11,
# loopback, a broker of its own): what main did, for the table's "before" column.
BEFORE: dict[str, str] = {
    "429 for 4 s with Retry-After: NaN": "stuck: asyncio.sleep(nan) never returns on 3.11 (3.12+: "
    "ValueError, unexpected error, dead-lettered by the delivery limit); 0 of 3 settled in 130 s",
    "429 for 4 s with Retry-After: inf": "capped; 3 completed in 7.6 s",
    "429 for 4 s with Retry-After: huge": "capped; 3 completed in 6.1 s",
    "429 for 4 s with Retry-After: garbage": "ignored; 3 completed in 5.2 s",
    "300 MB chunked body (whitespace, then a valid answer), twice": "read whole (300 MB sent): "
    "RSS 191 → 1094 MB (+903)",
    "2 MB gzip body inflating to 2 GiB, twice": "inflated whole: RSS 495 → 10035 MB (+9540), "
    "/readyz 503 for 5.1 s",
    "body trickling 1 byte / 0.5 s for 15 s, then the answer, twice": "waited 15.1 s on the "
    "call (the per-read timeout never fired)",
}


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("NaN", "NaN"),
        ("inf", "inf"),
        ("huge", "1" + "0" * 40),
        ("garbage", "soon, maybe"),
    ],
)
async def test_throttle_with_a_nonsense_retry_after_only_delays(
    name: str,
    value: str,
    amqp_url: str,
    database_url: str,
    pool: asyncpg.Pool,
    amqp: aio_pika.abc.AbstractRobustConnection,
    emulator: str,
) -> None:
    """429 for a while with Retry-After: NaN/inf/huge/garbage: requests wait, then complete."""
    attack = f"429 for {THROTTLE_S:g} s with Retry-After: {name}"
    async with hostile_qnn(emulator, throttle(value), for_seconds(THROTTLE_S)) as stub:
        outcome = await run_attack(
            stub,
            amqp_url=amqp_url,
            database_url=database_url,
            pool=pool,
            amqp=amqp,
            count=3,
            seed=41,
            within_s=60.0 + 10 * THROTTLE_S,
            **THROTTLE_SETTINGS,
        )
    record(
        Row(
            attack=attack,
            eglo_did=_did(outcome, f"{stub.hostile_calls} throttled calls waited out"),
            peak_rss_mb=outcome.peak_mb,
            lost=outcome.lost,
            dead_lettered=outcome.dead_lettered,
            ready_again_s=outcome.ready_again_s,
            before=BEFORE.get(attack, ""),
        )
    )
    _assert_unhurt(outcome, 3)
    assert outcome.seconds >= THROTTLE_S - 0.5  # it did wait the throttle out


async def test_a_300_mb_body_is_cut_at_the_limit(
    amqp_url: str,
    database_url: str,
    pool: asyncpg.Pool,
    amqp: aio_pika.abc.AbstractRobustConnection,
    emulator: str,
) -> None:
    """300 MB of chunked whitespace then a valid answer: read to 4 MiB, retried, completed."""
    attack = "300 MB chunked body (whitespace, then a valid answer), twice"
    async with hostile_qnn(emulator, whitespace_then_answer(300 << 20), first_calls(2)) as stub:
        outcome = await run_attack(
            stub,
            amqp_url=amqp_url,
            database_url=database_url,
            pool=pool,
            amqp=amqp,
            count=1,
            seed=42,
            qnn_max_response_bytes=LIMIT_BYTES,
            qnn_deadline_s=10.0,
        )
    sent_mb = max(stub.bytes_sent, default=0) / (1 << 20)
    record(
        Row(
            attack=attack,
            eglo_did=_did(outcome, f"cut each at the 4 MiB limit (peer sent ≤{sent_mb:.0f} MB)"),
            peak_rss_mb=outcome.peak_mb,
            lost=outcome.lost,
            dead_lettered=outcome.dead_lettered,
            ready_again_s=outcome.ready_again_s,
            before=BEFORE.get(attack, ""),
        )
    )
    _assert_unhurt(outcome, 1)
    # The peer could push the limit plus what loopback socket buffers hold, not 300 MB.
    assert stub.bytes_sent and max(stub.bytes_sent) < LIMIT_BYTES + (48 << 20)


async def test_a_gzip_bomb_is_cut_at_the_limit(
    amqp_url: str,
    database_url: str,
    pool: asyncpg.Pool,
    amqp: aio_pika.abc.AbstractRobustConnection,
    emulator: str,
) -> None:
    """2 MB of gzip inflating to 2 GiB: inflated to 4 MiB only, retried, completed."""
    await asyncio.to_thread(_make_bomb)
    attack = "2 MB gzip body inflating to 2 GiB, twice"
    async with hostile_qnn(emulator, gzip_bomb(), first_calls(2)) as stub:
        outcome = await run_attack(
            stub,
            amqp_url=amqp_url,
            database_url=database_url,
            pool=pool,
            amqp=amqp,
            count=1,
            seed=43,
            qnn_max_response_bytes=LIMIT_BYTES,
            qnn_deadline_s=10.0,
        )
    record(
        Row(
            attack=attack,
            eglo_did=_did(outcome, "inflated each to the 4 MiB limit, then refused it"),
            peak_rss_mb=outcome.peak_mb,
            lost=outcome.lost,
            dead_lettered=outcome.dead_lettered,
            ready_again_s=outcome.ready_again_s,
            before=BEFORE.get(attack, ""),
        )
    )
    _assert_unhurt(outcome, 1)
    assert stub.hostile_calls == 2


async def test_a_trickling_body_ends_at_the_deadline(
    amqp_url: str,
    database_url: str,
    pool: asyncpg.Pool,
    amqp: aio_pika.abc.AbstractRobustConnection,
    emulator: str,
) -> None:
    """A byte every 0.5 s (under the 2 s per-read timeout) for 15 s: cut at the 2 s deadline."""
    attack = "body trickling 1 byte / 0.5 s for 15 s, then the answer, twice"
    async with hostile_qnn(emulator, trickle(30, 0.5), first_calls(2)) as stub:
        outcome = await run_attack(
            stub,
            amqp_url=amqp_url,
            database_url=database_url,
            pool=pool,
            amqp=amqp,
            count=1,
            seed=44,
            qnn_timeout_s=2.0,
            qnn_deadline_s=DEADLINE_S,
        )
    longest = max(stub.call_seconds, default=0.0)
    record(
        Row(
            attack=attack,
            eglo_did=_did(outcome, f"ended each call at the {DEADLINE_S:.0f} s deadline"),
            peak_rss_mb=outcome.peak_mb,
            lost=outcome.lost,
            dead_lettered=outcome.dead_lettered,
            ready_again_s=outcome.ready_again_s,
            before=BEFORE.get(attack, ""),
        )
    )
    _assert_unhurt(outcome, 1)
    # The stub notices the hang-up at its next write (0.5 s at most after it).
    assert stub.hostile_calls == 2 and longest < DEADLINE_S + 1.0
