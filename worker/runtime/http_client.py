"""The one HTTP client eglo talks to peers with: the QNN, an embeddings API, QNN monitoring.

A peer may be broken or hostile; whatever it sends, a call here ends, and soon, in either a
`Reply` (status, headers, a body of bounded size) or a `PeerFailure` with a short reason:

- the whole call (connect, headers and body) has one deadline, not only each read;
- the body is read as a stream and decoded here, a bounded step at a time, so neither a long
  body nor a small compressed one that inflates to gigabytes is ever held beyond the limit;
- `Retry-After` is parsed totally: any header value becomes a finite delay within a cap, or none;
- redirects are never followed (a redirect is a reply like any other, so a key never travels).

Every failure here is transient by nature: the caller retries it like a timeout.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
import zlib
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any, Final, Protocol

import aiohttp
import httpx
import orjson
from httpx_aiohttp import AiohttpTransport
from httpx_aiohttp.transport import map_aiohttp_exceptions

from worker.observability.logs import redact

DEFAULT_MAX_RESPONSE_BYTES: Final = 4 << 20
# What one decompression step may produce; a gzip bomb is inflated this much at a time.
_STEP: Final = 64 << 10
# The encodings decoded here; peers are asked for nothing else.
ACCEPT_ENCODING: Final = "gzip, deflate"

# Reasons of a PeerFailure (also metric label values).
TIMEOUT: Final = "timeout"
DEADLINE: Final = "deadline"
TOO_LARGE: Final = "too_large"
BAD_ENCODING: Final = "bad_encoding"


class PeerFailure(Exception):
    """A call that produced no usable reply: `reason` is a short, bounded label."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class FailureObserver(Protocol):
    def __call__(self, reason: str) -> None: ...


@dataclass(frozen=True, slots=True)
class CallLimits:
    """How much of a peer's time and memory one call may take."""

    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    deadline_s: float = 30.0


@dataclass(frozen=True, slots=True)
class Reply:
    """A response read whole (within the limit), decoded."""

    status_code: int
    headers: Mapping[str, str]  # case-insensitive (httpx's or aiohttp's)
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return orjson.loads(self.content)

    def error_text(self, secrets: tuple[str, ...] = (), limit: int = 300) -> str:
        """The start of the body for an error message, with secrets (an echoed key) removed."""
        return redact(self.text[: limit + 200], secrets)[:limit]

    def retry_after_s(self, cap_s: float) -> float | None:
        return retry_after_seconds(self.headers.get("Retry-After"), cap_s=cap_s)

    def raise_for_status(self) -> None:
        if self.status_code >= 400:
            raise PeerStatusError(self.status_code, self.text[:300])


class PeerStatusError(Exception):
    def __init__(self, status_code: int, body: str) -> None:
        super().__init__(f"HTTP {status_code}: {body}")
        self.status_code = status_code


# --------------------------------------------------------------------------- Retry-After


def retry_after_seconds(
    value: str | None, *, cap_s: float, now: float | None = None
) -> float | None:
    """Retry-After as a delay in [0, cap_s], or None when the header says nothing usable.

    Total over any input: delta-seconds and HTTP-dates are honoured; NaN, negative numbers and
    garbage are ignored (None: back off as usual); +inf, huge numbers and far dates are capped.
    """
    if value is None or not math.isfinite(cap_s) or cap_s < 0:
        return None
    text = value.strip()[:64]
    if not text:
        return None
    seconds: float
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
            # A date already passed means: now.
            seconds = max(when.timestamp() - (time.time() if now is None else now), 0.0)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    if math.isnan(seconds) or seconds < 0:
        return None
    return min(seconds, cap_s)


# --------------------------------------------------------------------------- bounded decoding


class _Inflate:
    """zlib inflation that never produces more than _STEP bytes per step."""

    def __init__(self, encoding: str) -> None:
        self._deflate = encoding == "deflate"
        self._fresh = True
        wbits = zlib.MAX_WBITS | 16 if not self._deflate else zlib.MAX_WBITS
        self._z = zlib.decompressobj(wbits)

    def feed(self, data: bytes) -> Iterator[bytes]:
        if self._fresh and data and self._deflate:
            self._fresh = False
            # "deflate" is zlib-wrapped by the RFC, raw by some servers: try the RFC first.
            try:
                zlib.decompressobj().decompress(data[:2], 1)
            except zlib.error:
                self._z = zlib.decompressobj(-zlib.MAX_WBITS)
        pending = data
        while True:
            out = self._z.decompress(pending, _STEP)
            pending = self._z.unconsumed_tail
            if out:
                yield out
            if self._z.eof or (not pending and len(out) < _STEP):
                return

    def flush(self) -> Iterator[bytes]:
        out = self._z.flush()
        if out:
            yield out


def _decoders(content_encoding: str) -> list[_Inflate]:
    """The decoders for a Content-Encoding, in the order to apply them."""
    decoders = []
    for token in reversed([t.strip().lower() for t in content_encoding.split(",")]):
        if token in ("", "identity"):
            continue
        if token in ("gzip", "x-gzip"):
            decoders.append(_Inflate("gzip"))
        elif token == "deflate":
            decoders.append(_Inflate("deflate"))
        else:
            raise PeerFailure(BAD_ENCODING, f"unsupported content-encoding {token[:40]!r}")
    if len(decoders) > 2:
        raise PeerFailure(BAD_ENCODING, f"{len(decoders)} content-encodings stacked")
    return decoders


def _decode(decoders: list[_Inflate], chunk: bytes, *, final: bool = False) -> Iterator[bytes]:
    pieces: Iterator[bytes] = iter((chunk,)) if chunk else iter(())
    for decoder in decoders:
        pieces = _through(decoder, pieces, final=final)
    return pieces


def _through(decoder: _Inflate, pieces: Iterator[bytes], *, final: bool) -> Iterator[bytes]:
    for piece in pieces:
        yield from decoder.feed(piece)
    if final:
        yield from decoder.flush()


async def read_limited(response: httpx.Response, max_bytes: int) -> bytes:
    """The decoded body of an httpx response, read as it streams, within `max_bytes`."""
    if response.is_stream_consumed:
        # Read and decoded already (a test's MockTransport): too late to bound, not to refuse.
        _refuse_declared(response.headers, max_bytes)
        if len(response.content) > max_bytes:
            raise PeerFailure(TOO_LARGE, f"body over {max_bytes} bytes")
        return response.content
    return await _read_body(response.headers, response.aiter_raw(), max_bytes)


def _refuse_declared(headers: Mapping[str, str], max_bytes: int) -> None:
    declared = headers.get("Content-Length", "")
    if declared.isdigit() and len(declared) < 20 and int(declared) > max_bytes:
        raise PeerFailure(TOO_LARGE, f"Content-Length {declared} over {max_bytes} bytes")


async def _read_body(
    headers: Mapping[str, str], chunks: AsyncIterator[bytes], max_bytes: int
) -> bytes:
    """The decoded body; PeerFailure(too_large) as soon as it passes max_bytes.

    Both the bytes on the wire and the decoded bytes count, so neither a long body nor a
    compression bomb is held beyond the limit (plus one decoding step).
    """
    _refuse_declared(headers, max_bytes)
    decoders = _decoders(headers.get("Content-Encoding", ""))
    body = bytearray()
    raw = 0
    try:
        async for chunk in chunks:
            raw += len(chunk)
            if raw > max_bytes:
                raise PeerFailure(TOO_LARGE, f"body over {max_bytes} bytes on the wire")
            for piece in _decode(decoders, chunk):
                body += piece
                if len(body) > max_bytes:
                    raise PeerFailure(TOO_LARGE, f"body over {max_bytes} bytes decoded")
        for piece in _decode(decoders, b"", final=True):
            body += piece
            if len(body) > max_bytes:
                raise PeerFailure(TOO_LARGE, f"body over {max_bytes} bytes decoded")
    except zlib.error as exc:
        raise PeerFailure(BAD_ENCODING, f"undecodable body: {exc}") from None
    return bytes(body)


# --------------------------------------------------------------------------- calls


class PeerTransport(AiohttpTransport):
    """httpx-aiohttp's transport, whose aiohttp session `call` also drives directly."""

    def session(self) -> aiohttp.ClientSession:
        if not isinstance(self.client, aiohttp.ClientSession):
            self.client = self.get_client()
        return self.client


def make_client(
    base_url: str,
    *,
    timeout_s: float,
    api_key: str | None = None,
    max_connections: int = 100,
    transport: str = "aiohttp",
) -> httpx.AsyncClient:
    """A pooled client for one peer. Redirects are not followed; bodies arrive undecoded."""
    headers = {"User-Agent": "eglo/0.1", "Accept-Encoding": ACCEPT_ENCODING}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    limits = httpx.Limits(
        max_connections=max_connections, max_keepalive_connections=max_connections
    )
    # The aiohttp transport: httpx's own pool collapses under load.
    http_transport: httpx.AsyncBaseTransport = (
        PeerTransport(limits=limits)
        if transport == "aiohttp"
        else httpx.AsyncHTTPTransport(limits=limits)
    )
    return httpx.AsyncClient(
        base_url=base_url,
        headers=headers,
        timeout=httpx.Timeout(timeout_s),
        transport=http_transport,
        follow_redirects=False,
    )


async def call(
    client: httpx.AsyncClient,
    method: str,
    url: httpx.URL | str,
    *,
    limits: CallLimits,
    content: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout_s: float | None = None,
    on_failure: FailureObserver | None = None,
) -> Reply:
    """One request, its body read within `limits`; a Reply or a PeerFailure, nothing else.

    `timeout_s` bounds each phase (connect, each read); `limits.deadline_s` bounds the call.
    """
    deadline = asyncio.timeout(limits.deadline_s)
    try:
        async with deadline:
            target = client._merge_url(url)
            transport = client._transport_for_url(target)
            if isinstance(transport, PeerTransport):
                with map_aiohttp_exceptions():
                    return await _via_session(
                        transport.session(),
                        client,
                        method,
                        target,
                        content,
                        headers,
                        timeout_s,
                        limits.max_response_bytes,
                    )
            extra: dict[str, Any] = {} if timeout_s is None else {"timeout": timeout_s}
            request = client.build_request(
                method, target, content=content, headers=headers, **extra
            )
            # Not `client.send`: eglo's peers use no auth flows (keys travel as a default
            # header), no redirects (never followed), no cookies, and need no log line per
            # request; on the hot path those cost more CPU than the transport's own work.
            response = await transport.handle_async_request(request)
            try:
                body = await read_limited(response, limits.max_response_bytes)
            finally:
                await response.aclose()
            return Reply(response.status_code, response.headers, body)
    except PeerFailure as exc:
        _observe(on_failure, exc.reason)
        raise
    except TimeoutError:
        if not deadline.expired():
            _observe(on_failure, TIMEOUT)
            raise PeerFailure(TIMEOUT) from None
        _observe(on_failure, DEADLINE)
        raise PeerFailure(DEADLINE, f"no whole reply within {limits.deadline_s:g} s") from None
    except httpx.TimeoutException:
        _observe(on_failure, TIMEOUT)
        raise PeerFailure(TIMEOUT) from None
    except (httpx.TransportError, httpx.DecodingError, aiohttp.ClientError) as exc:
        # aiohttp's errors that httpx-aiohttp leaves unmapped (a malformed status line, ...).
        reason = f"transport:{type(exc).__name__}"
        _observe(on_failure, reason)
        raise PeerFailure(reason) from None


async def _via_session(
    session: aiohttp.ClientSession,
    client: httpx.AsyncClient,
    method: str,
    url: httpx.URL,
    content: bytes | None,
    headers: Mapping[str, str] | None,
    timeout_s: float | None,
    max_bytes: int,
) -> Reply:
    """The call on the transport's aiohttp session, as the transport would make it (same pool,
    same options, aiohttp's errors mapped to httpx's), without building an httpx request and
    response around it: that wrapping cost as much CPU as aiohttp's own work
    (docs/performance.md)."""
    merged = dict(client.headers.items())
    if headers:
        merged.update(headers)
    t = client.timeout
    timeout = (
        _timeout(timeout_s, timeout_s, timeout_s)
        if timeout_s is not None
        else _timeout(t.connect, t.read, t.pool)
    )
    async with session.request(
        method,
        str(url),
        data=content or None,
        headers=merged,
        allow_redirects=False,
        auto_decompress=False,
        compress=False,
        timeout=timeout,
    ) as response:
        body = await _read_body(response.headers, response.content.iter_any(), max_bytes)
        return Reply(response.status, response.headers, body)


@functools.lru_cache(maxsize=16)
def _timeout(
    connect: float | None, read: float | None, pool: float | None
) -> aiohttp.ClientTimeout:
    """httpx's phase timeouts as httpx-aiohttp maps them (no total: the deadline is ours)."""
    return aiohttp.ClientTimeout(sock_connect=connect, sock_read=read, connect=pool)


def _observe(on_failure: FailureObserver | None, reason: str) -> None:
    if on_failure is not None:
        on_failure(reason)
