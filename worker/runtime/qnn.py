"""The QNN prediction API client: one pooled client (runtime/http_client.py), retries with backoff
and Retry-After."""

from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import stamina
import structlog
from opentelemetry.trace import Span

from contracts.qnn import (
    HEALTH_PATH,
    PREDICT_PATH,
    MalformedResponse,
    build_predict_body,
    parse_predict_response,
)
from contracts.requests import AnyRequest
from worker.observability import tracing
from worker.observability.metrics import Metrics
from worker.runtime import http_client
from worker.runtime.breaker import CircuitBreaker
from worker.runtime.http_client import CallLimits, PeerFailure
from worker.runtime.qnn_limit import AdaptiveLimit
from worker.settings import Settings

log = structlog.get_logger(__name__)


_JSON_HEADERS = {"Content-Type": "application/json"}


class QnnError(Exception):
    """Base of what a QNN call can end in, other than an answer."""

    code = "qnn_error"


class QnnRejected(QnnError):
    """A 4xx the API means: this request will never succeed as sent."""

    code = "qnn_rejected"


class QnnUnavailable(QnnError):
    """Transient failures outlasted the in-process retry budget."""

    code = "qnn_unavailable"


class _Transient(Exception):
    """One try failed in a way worth retrying; carries the server's Retry-After, if any."""

    def __init__(self, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


@dataclass(frozen=True, slots=True)
class QnnAnswer:
    result: dict[str, Any]
    metadata: dict[str, Any]
    call_attempts: int
    round_trip_ms: float


# A health answer is a few bytes; anything much larger is not one.
_HEALTH_LIMIT_BYTES = 64 << 10


def make_http_client(settings: Settings) -> httpx.AsyncClient:
    """One client for the process, for predictions and the monitoring API alike."""
    key = settings.qnn_api_key
    return http_client.make_client(
        settings.qnn_url,
        timeout_s=settings.qnn_timeout_s,
        api_key=key.get_secret_value() if key is not None else None,
        max_connections=settings.qnn_max_connections,
        transport=settings.qnn_http_transport,
    )


def call_limits(settings: Settings) -> CallLimits:
    """What one call to the QNN may take: its body size and its whole duration."""
    return CallLimits(
        max_response_bytes=settings.qnn_max_response_bytes, deadline_s=settings.qnn_deadline_s
    )


class QnnClient:
    """Calls the QNN; the only place that knows HTTP status codes."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        settings: Settings,
        metrics: Metrics,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self._http = http
        self._settings = settings
        self._metrics = metrics
        self._breaker = breaker
        key = settings.qnn_api_key
        self._secrets = (key.get_secret_value(),) if key is not None else ()
        # Merged once: httpx re-parses a relative URL against base_url on every request.
        self._predict_url = httpx.URL(str(http.base_url).rstrip("/") + PREDICT_PATH)
        self._health_url = httpx.URL(str(http.base_url).rstrip("/") + HEALTH_PATH)
        self._limits = call_limits(settings)
        self._peer_failures = metrics.http_peer_failures
        self._concurrency: AdaptiveLimit | None = None
        if settings.qnn_adaptive_concurrency:
            self._concurrency = AdaptiveLimit(
                initial=settings.qnn_concurrency_initial,
                ceiling=min(settings.prefetch, settings.qnn_max_connections),
                floor=settings.qnn_concurrency_min,
                latency_tolerance=settings.qnn_latency_tolerance,
                on_change=metrics.qnn_concurrency_limit.set,
            )

    def _on_peer_failure(self, reason: str) -> None:
        self._peer_failures.labels(peer="qnn", reason=reason).inc()

    def _backoff(self, exc: Exception) -> bool | float:
        if isinstance(exc, _Transient):
            self._metrics.qnn_retries.labels(reason=exc.reason).inc()
            wait = exc.retry_after_s
            # Finite and non-negative by construction; checked again, as asyncio.sleep(nan) raises.
            return wait if wait is not None and math.isfinite(wait) and wait >= 0 else True
        return False

    async def predict(self, request: AnyRequest) -> QnnAnswer:
        s = self._settings
        body = build_predict_body(
            request,
            model_id=s.qnn_model_id,
            mode=s.qnn_mode,
            optimization_level=s.qnn_optimization_level,
        )
        started = time.perf_counter()
        with tracing.span(
            "qnn predict",
            kind=tracing.SpanKind.CLIENT,
            attributes={"server.address": s.qnn_url, "eglo.qnn.model_id": s.qnn_model_id},
        ) as span:
            span.set_attribute("eglo.qnn.tries", 1)
            # Most calls succeed first time; the retry machinery costs more than the call's own
            # bookkeeping, so it is entered only after a failure.
            try:
                result, metadata = await self._try_once(request.request_type, body)
                tries = 1
            except _Transient as first:
                result, metadata, tries = await self._retry(
                    request.request_type, body, first, span, deadline=started + s.qnn_budget_s
                )
        return QnnAnswer(result, metadata, tries, (time.perf_counter() - started) * 1000)

    async def _retry(
        self,
        request_type: str,
        body: dict[str, Any],
        first: _Transient,
        span: Span,
        *,
        deadline: float,
    ) -> tuple[dict[str, Any], dict[str, Any], int]:
        """Retry after a failed first try, within what is left of the attempts and the budget."""
        s = self._settings
        tries = 1
        wait = self._backoff(first)
        try:
            if s.qnn_attempts <= 1:
                raise first
            await asyncio.sleep(
                s.qnn_backoff_initial_s * (1 + random.random()) if wait is True else float(wait)
            )
            async for attempt in stamina.retry_context(
                on=self._backoff,
                attempts=s.qnn_attempts - 1,
                timeout=max(deadline - time.perf_counter(), 0.001),
                wait_initial=s.qnn_backoff_initial_s * 2,
                wait_max=s.qnn_backoff_max_s,
                wait_jitter=s.qnn_backoff_initial_s,
            ):
                with attempt:
                    tries += 1
                    result, metadata = await self._try_once(request_type, body)
        except _Transient as exc:
            raise QnnUnavailable(f"QNN unavailable after {tries} tries: {exc.reason}") from None
        finally:
            span.set_attribute("eglo.qnn.tries", tries)
        return result, metadata, tries

    async def _try_once(
        self, request_type: str, body: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """One call, once the circuit breaker lets calls through; its outcome feeds the breaker."""
        if self._breaker is not None:
            await self._breaker.wait_callable()
        try:
            if self._concurrency is None:
                answer = await self._call(request_type, body)
            else:
                answer = await self._call_within_limit(request_type, body, self._concurrency)
        except _Transient as exc:
            # Throttling means the API is up and asking us to slow down, not that it is broken.
            if self._breaker is not None and exc.reason != "http_429":
                self._breaker.record_failure()
            raise
        if self._breaker is not None:
            self._breaker.record_success()
        return answer

    async def _call_within_limit(
        self, request_type: str, body: dict[str, Any], limit: AdaptiveLimit
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """One call in one of the adaptive limit's slots; its outcome adapts the limit."""
        async with limit.slot():
            started = time.perf_counter()
            try:
                answer = await self._call(request_type, body)
            except _Transient as exc:
                if exc.reason == "http_429":
                    limit.throttled()
                raise
            limit.answered(time.perf_counter() - started)
            return answer

    async def _call(
        self, request_type: str, body: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        s = self._settings
        started = time.perf_counter()
        status = "error"
        try:
            response = await http_client.call(
                self._http,
                "POST",
                self._predict_url,
                limits=self._limits,
                content=orjson.dumps(body),
                headers=_JSON_HEADERS,
                on_failure=self._on_peer_failure,
            )
            status = str(response.status_code)
        except PeerFailure as exc:
            # timeout, deadline, too_large, bad_encoding: each its own label; transport: error.
            status = "error" if exc.reason.startswith("transport:") else exc.reason
            raise _Transient(exc.reason) from None
        finally:
            self._metrics.qnn_duration.labels(status=status).observe(time.perf_counter() - started)
        code = response.status_code
        if code == 429 or code == 408 or code >= 500:
            raise _Transient(f"http_{code}", response.retry_after_s(s.qnn_retry_after_max_s))
        if code >= 400:
            # The body may echo what we sent, key included; it ends up in the database.
            raise QnnRejected(f"QNN answered {code}: {response.error_text(self._secrets)}")
        try:
            return parse_predict_response(request_type, response.content)
        except MalformedResponse as exc:
            # A body that is not even well-formed is a glitch (a proxy page, a cut connection).
            log.warning("qnn.response.malformed", error=str(exc)[:200])
            raise _Transient("malformed_body") from None

    async def healthy(self) -> bool:
        seconds = min(5.0, self._settings.qnn_timeout_s)
        try:
            response = await http_client.call(
                self._http,
                "GET",
                self._health_url,
                limits=CallLimits(max_response_bytes=_HEALTH_LIMIT_BYTES, deadline_s=seconds),
                timeout_s=seconds,
            )
        except PeerFailure:
            return False
        return response.status_code == 200
