"""runtime/http_client: Retry-After parsed totally, bodies bounded while streaming and decoded,
one deadline per call, and the clients built on it (QNN, embeddings) treating each as transient."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import math
import time
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from producers.reader import parse_request
from producers.sample import generate_requests
from worker.embedder.backends import EmbedderUnavailable, EmbeddingRejected, OpenAIEmbedder
from worker.observability.metrics import Metrics
from worker.runtime import http_client
from worker.runtime.http_client import CallLimits, PeerFailure, retry_after_seconds
from worker.runtime.qnn import QnnClient, QnnRejected, QnnUnavailable
from worker.settings import Settings

CAP = 30.0
KEY = "sk-test-secret-key-0123456789"


def _date(delta_s: float) -> str:
    return format_datetime(datetime.now(UTC) + timedelta(seconds=delta_s), usegmt=True)


# --------------------------------------------------------------------------- Retry-After


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("5", 5.0),
        (" 7 ", 7.0),
        ("0", 0.0),
        ("1.5", 1.5),
        ("NaN", None),
        ("nan", None),
        ("-inf", None),
        ("-5", None),
        ("inf", CAP),
        ("+Infinity", CAP),
        ("1e400", CAP),
        ("99999999999999999999999999", CAP),
        ("9" * 5000, CAP),
        ("soon", None),
        ("", None),
        ("   ", None),
        ("\x00\xff", None),
        (None, None),
        ("Fri, 31 Dec 9999 23:59:59 GMT", CAP),
        ("Mon, 01 Jan 1990 00:00:00 GMT", 0.0),
        ("Mon, 99 Foo 2020 99:99:99 GMT", None),
        ("Wed, 21 Oct 2015 07:28:00 -0000", 0.0),
    ],
)
def test_retry_after_is_total_and_capped(value: str | None, expected: float | None) -> None:
    assert retry_after_seconds(value, cap_s=CAP) == expected


def test_retry_after_http_date_in_the_future() -> None:
    seconds = retry_after_seconds(_date(10), cap_s=CAP)
    assert seconds is not None and 8.0 <= seconds <= 10.0


def test_retry_after_with_a_useless_cap() -> None:
    assert retry_after_seconds("5", cap_s=math.nan) is None
    assert retry_after_seconds("5", cap_s=math.inf) is None
    assert retry_after_seconds("5", cap_s=0.0) == 0.0


@given(st.text(max_size=80))
def test_retry_after_never_leaves_zero_to_cap(value: str) -> None:
    """Whatever the header holds: None, or a finite delay in [0, cap]."""
    seconds = retry_after_seconds(value, cap_s=CAP)
    assert seconds is None or (math.isfinite(seconds) and 0.0 <= seconds <= CAP)


# --------------------------------------------------------------------------- bodies and deadline


def _streamed(status: int, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    """A response whose body arrives as a stream, as from a socket (not read in advance)."""
    return httpx.Response(status, headers=headers, stream=httpx.ByteStream(body))


def _client(handler: Callable[[httpx.Request], Any], **kwargs: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url="http://peer.test", transport=httpx.MockTransport(handler), **kwargs
    )


Peer = Callable[..., Awaitable[httpx.AsyncClient]]


@pytest.fixture(params=["mock", "aiohttp"])
async def peer(request: pytest.FixtureRequest) -> AsyncIterator[Peer]:
    """A client for a handler: through httpx's MockTransport, or as the worker calls its peers
    (`make_client`: the aiohttp session) against the handler served on loopback."""
    runners: list[web.AppRunner] = []

    async def make(
        handler: Callable[[httpx.Request], httpx.Response], **kwargs: Any
    ) -> httpx.AsyncClient:
        if request.param == "mock":
            return _client(handler, **kwargs)
        runner = await _serve(handler)
        runners.append(runner)
        client = http_client.make_client(
            f"http://127.0.0.1:{runner.addresses[0][1]}", timeout_s=5.0
        )
        client.headers.update(kwargs.get("headers", {}))
        return client

    yield make
    for runner in runners:
        await runner.cleanup()


async def _serve(handler: Callable[[httpx.Request], httpx.Response]) -> web.AppRunner:
    """An HTTP server that answers with what `handler` returns, its body sent as it streams and
    its headers as they are (a Content-Length or Content-Encoding that lies included)."""

    async def answer(request: web.Request) -> web.StreamResponse:
        given = handler(httpx.Request(request.method, str(request.url), headers=request.headers))
        headers = {k: v for k, v in given.headers.items() if k != "transfer-encoding"}
        response = web.StreamResponse(status=given.status_code, headers=headers)
        await response.prepare(request)
        chunks = _once(given.content) if given.is_stream_consumed else given.aiter_raw()
        with contextlib.suppress(ConnectionError):
            async for chunk in chunks:
                await response.write(chunk)
            await response.write_eof()
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner


async def _once(body: bytes) -> AsyncIterator[bytes]:
    yield body


async def _call(client: httpx.AsyncClient, limits: CallLimits, **kwargs: Any) -> Any:
    reasons: list[str] = []
    try:
        reply = await http_client.call(
            client, "GET", "/x", limits=limits, on_failure=reasons.append, **kwargs
        )
    finally:
        await client.aclose()
    return reply, reasons


LIMITS = CallLimits(max_response_bytes=1 << 20, deadline_s=5.0)


@pytest.mark.parametrize(
    ("encoding", "encode"),
    [
        ("", lambda b: b),
        ("identity", lambda b: b),
        ("gzip", gzip.compress),
        ("x-gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", lambda b: zlib.compress(b)[2:-4]),  # raw deflate, as some servers send
        ("gzip, gzip", lambda b: gzip.compress(gzip.compress(b))),
    ],
)
async def test_bodies_within_the_limit_are_decoded(
    peer: Peer, encoding: str, encode: Callable[[bytes], bytes]
) -> None:
    body = orjson.dumps({"values": list(range(20_000))})
    headers = {"Content-Encoding": encoding} if encoding else {}
    client = await peer(lambda _: _streamed(200, encode(body), headers))
    reply, reasons = await _call(client, LIMITS)
    assert (reply.status_code, reply.content, reasons) == (200, body, [])
    assert reply.json()["values"][-1] == 19_999


async def test_a_gzip_bomb_stops_at_the_limit_without_inflating(peer: Peer) -> None:
    """256 MiB of zeros in ~250 KiB of gzip: refused once 1 MiB is decoded; memory stays small."""
    bomb = gzip.compress(bytes(256 << 20), compresslevel=9)
    assert len(bomb) < 300 << 10
    client = await peer(lambda _: _streamed(200, bomb, {"Content-Encoding": "gzip"}))
    tracemalloc.start()
    try:
        with pytest.raises(PeerFailure) as failure:
            await _call(client, LIMITS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert failure.value.reason == "too_large"
    assert "decoded" in str(failure.value)
    assert peak < 8 << 20, f"peak {peak} bytes traced"


async def test_a_long_body_is_read_only_to_the_limit(peer: Peer) -> None:
    """A body that never ends (whitespace, chunk after chunk) is cut at the limit."""
    served = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal served
        chunk = b" " * 65536
        while True:
            served += len(chunk)
            yield chunk

    client = await peer(lambda _: httpx.Response(200, content=endless()))
    with pytest.raises(PeerFailure, match="on the wire") as failure:
        await _call(client, LIMITS)
    assert failure.value.reason == "too_large"
    # Over a socket the kernel's buffers take some more before the server notices.
    assert served <= (1 << 20) + 65536 or isinstance(client._transport, http_client.PeerTransport)


async def test_a_declared_length_over_the_limit_is_refused_before_reading(peer: Peer) -> None:
    client = await peer(lambda _: _streamed(200, b"{}", {"Content-Length": str(1 << 30)}))
    with pytest.raises(PeerFailure, match="Content-Length") as failure:
        await _call(client, LIMITS)
    assert failure.value.reason == "too_large"


@pytest.mark.parametrize(
    ("encoding", "body"),
    [("br", b"\x1b\x00"), ("gzip", b"not gzip at all"), ("gzip, gzip, gzip", b"")],
)
async def test_undecodable_bodies_are_a_transient_failure(
    peer: Peer, encoding: str, body: bytes
) -> None:
    client = await peer(lambda _: _streamed(200, body, {"Content-Encoding": encoding}))
    with pytest.raises(PeerFailure) as failure:
        await _call(client, LIMITS)
    assert failure.value.reason == "bad_encoding"


async def test_a_trickling_body_ends_at_the_deadline(peer: Peer) -> None:
    """One byte every 50 ms never trips a per-read timeout; the whole-call deadline ends it."""

    async def trickle() -> AsyncIterator[bytes]:
        while True:
            await asyncio.sleep(0.05)
            yield b" "

    client = await peer(lambda _: httpx.Response(200, content=trickle()))
    started = time.perf_counter()
    with pytest.raises(PeerFailure) as failure:
        await _call(client, CallLimits(deadline_s=0.5), timeout_s=0.2)
    elapsed = time.perf_counter() - started
    assert failure.value.reason == "deadline"
    assert 0.45 <= elapsed < 1.5


async def test_redirects_are_replies_not_followed(peer: Peer) -> None:
    seen: list[tuple[str, str | None]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.path, request.headers.get("Authorization")))
        return httpx.Response(302, headers={"Location": "http://elsewhere.test/steal"})

    client = await peer(handler, headers={"Authorization": f"Bearer {KEY}"})
    reply, _ = await _call(client, LIMITS)
    assert (reply.status_code, reply.headers["location"]) == (302, "http://elsewhere.test/steal")
    assert seen == [("/x", f"Bearer {KEY}")]


def test_error_text_redacts_an_echoed_key() -> None:
    reply = http_client.Reply(
        422, httpx.Headers(), f'{{"headers": {{"Authorization": "Bearer {KEY}"}}}}'.encode()
    )
    assert KEY not in reply.error_text((KEY,))


# --------------------------------------------------------------------------- the QNN client


def _qnn(
    handler: Callable[[httpx.Request], Any], **overrides: Any
) -> tuple[QnnClient, Metrics, httpx.AsyncClient]:
    values: dict[str, Any] = dict(
        qnn_url="http://qnn.test",
        qnn_api_key=KEY,
        qnn_backoff_initial_s=0.001,
        qnn_backoff_max_s=0.01,
        qnn_retry_after_max_s=0.05,
        qnn_max_response_bytes=64 << 10,
        qnn_deadline_s=0.5,
    )
    values.update(overrides)
    settings = Settings(**values)
    metrics = Metrics()
    http = httpx.AsyncClient(base_url=settings.qnn_url, transport=httpx.MockTransport(handler))
    return QnnClient(http, settings, metrics), metrics, http


def _forecast_answer(_: httpx.Request) -> httpx.Response:
    # The client only locates the result; worker.core.result_checks judges the numbers.
    return httpx.Response(200, json={"success": True, "data": {"prediction": {"forecast": [1.0]}}})


def _request() -> Any:
    doc = next(r for r in generate_requests(8, seed=3) if r["request_type"] == "forecast")
    return parse_request(doc)


def _sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return value or 0.0


@pytest.mark.parametrize("header", ["NaN", "inf", "-inf", "1e400", "garbage", "-3"])
async def test_qnn_throttle_with_any_retry_after_only_delays(header: str) -> None:
    """429s with a nonsense Retry-After are retried (within the cap), then the answer is used."""
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls <= 3:
            return httpx.Response(429, headers={"Retry-After": header})
        return _forecast_answer(request)

    client, metrics, http = _qnn(handler)
    started = time.perf_counter()
    try:
        answer = await client.predict(_request())
    finally:
        await http.aclose()
    assert answer.call_attempts == 4
    assert time.perf_counter() - started < 1.0  # capped at 0.05 s a wait
    assert _sample(metrics, "eglo_qnn_retries_total", reason="http_429") == 3


@pytest.mark.parametrize(
    ("reason", "response"),
    [
        ("too_large", lambda: _streamed(200, b" " * (128 << 10))),
        (
            "too_large",
            lambda: _streamed(200, gzip.compress(bytes(16 << 20)), {"Content-Encoding": "gzip"}),
        ),
        (
            "bad_encoding",
            lambda: _streamed(200, b"x", {"Content-Encoding": "br"}),
        ),
    ],
)
async def test_qnn_over_limit_is_transient_with_its_own_reason(
    reason: str, response: Callable[[], httpx.Response]
) -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return response() if calls == 1 else _forecast_answer(request)

    client, metrics, http = _qnn(handler)
    try:
        answer = await client.predict(_request())
    finally:
        await http.aclose()
    assert answer.call_attempts == 2
    assert _sample(metrics, "eglo_qnn_retries_total", reason=reason) == 1
    assert _sample(metrics, "eglo_http_peer_failures_total", peer="qnn", reason=reason) == 1
    assert _sample(metrics, "eglo_qnn_request_duration_seconds_count", status=reason) == 1


async def test_qnn_past_the_deadline_is_unavailable_after_its_tries() -> None:
    async def trickle() -> AsyncIterator[bytes]:
        while True:
            await asyncio.sleep(0.02)
            yield b" "

    client, metrics, http = _qnn(
        lambda _: httpx.Response(200, content=trickle()), qnn_attempts=2, qnn_deadline_s=0.2
    )
    try:
        with pytest.raises(QnnUnavailable, match="deadline"):
            await client.predict(_request())
    finally:
        await http.aclose()
    assert _sample(metrics, "eglo_http_peer_failures_total", peer="qnn", reason="deadline") == 2


async def test_qnn_rejection_redacts_the_echoed_key() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(422, json={"echo": dict(request.headers)})

    client, _, http = _qnn(handler)
    http.headers["Authorization"] = f"Bearer {KEY}"
    try:
        with pytest.raises(QnnRejected) as rejected:
            await client.predict(_request())
    finally:
        await http.aclose()
    assert KEY not in str(rejected.value)


# --------------------------------------------------------------------------- the embeddings client


async def test_embedder_rejection_redacts_the_echoed_key() -> None:
    """The embedder's 4xx message is redacted like the QNN's (it was not before)."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"echo": request.headers["Authorization"]})

    http = httpx.AsyncClient(
        base_url="http://emb.test/v1/",
        headers={"Authorization": f"Bearer {KEY}"},
        transport=httpx.MockTransport(handler),
    )
    embedder = OpenAIEmbedder(api_key=KEY, client=http)
    try:
        with pytest.raises(EmbeddingRejected, match="401") as rejected:
            await embedder.embed_texts(["a"])
    finally:
        await http.aclose()
    assert KEY not in str(rejected.value)


async def test_embedder_over_limit_is_retried_then_unavailable() -> None:
    reasons: list[str] = []
    http = httpx.AsyncClient(
        base_url="http://emb.test/v1/",
        transport=httpx.MockTransport(lambda _: httpx.Response(200, content=b" " * (8 << 10))),
    )
    embedder = OpenAIEmbedder(
        client=http,
        attempts=2,
        backoff_initial_s=0.001,
        backoff_max_s=0.01,
        max_response_bytes=4096,
        on_failure=reasons.append,
    )
    try:
        with pytest.raises(EmbedderUnavailable, match="too_large"):
            await embedder.embed_texts(["a"])
    finally:
        await http.aclose()
    assert reasons == ["too_large", "too_large"]


# --------------------------------------------------------------------------- the monitoring calls


async def test_monitoring_calls_are_bounded_too() -> None:
    """`eglo anomalies sync` and `eglo qnn logs` read through the same limits."""
    from worker.ops import monitoring

    bomb = gzip.compress(bytes(64 << 20))
    http = _client(lambda _: _streamed(200, bomb, {"Content-Encoding": "gzip"}))
    limits = CallLimits(max_response_bytes=1 << 20, deadline_s=5.0)
    try:
        with pytest.raises(PeerFailure) as failure:
            await monitoring.sync_anomalies(None, http, limits=limits)  # type: ignore[arg-type]
        assert failure.value.reason == "too_large"
        with pytest.raises(PeerFailure):
            await monitoring.model_logs(http, "m", limits=limits)
    finally:
        await http.aclose()
