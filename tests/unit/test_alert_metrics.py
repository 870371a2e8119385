"""The metrics the alerts in deploy/prometheus/alerts.yml rely on move when they should."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from worker.observability.metrics import Metrics
from worker.runtime import health as http
from worker.runtime.consumer import Consumer


def test_ready_gauge_mirrors_readyz_at_each_scrape() -> None:
    metrics = Metrics()
    state = {"ok": False}

    async def scrape_twice() -> list[tuple[int, float]]:
        runner, port = await http.start(
            http.build_app(metrics, lambda: (state["ok"], "test")), "127.0.0.1", 0
        )
        seen = []
        try:
            for ok in (False, True):
                state["ok"] = ok
                readyz = await asyncio.to_thread(_status, f"http://127.0.0.1:{port}/readyz")
                body = await asyncio.to_thread(_read, f"http://127.0.0.1:{port}/metrics")
                families = text_string_to_metric_families(body)
                [ready] = [f.samples[0].value for f in families if f.name == "eglo_ready"]
                seen.append((readyz, ready))
        finally:
            await runner.cleanup()
        return seen

    assert asyncio.run(scrape_twice()) == [(503, 0.0), (200, 1.0)]


def _read(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        body: bytes = response.read()
        return body.decode()


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


class _Boom:
    async def handle(self, _: Any) -> Any:
        raise RuntimeError('relation "runs" does not exist')


def test_unexpected_errors_are_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    metrics = Metrics()
    rejected: list[bool] = []

    async def reject(requeue: bool = False) -> None:
        rejected.append(requeue)

    message = SimpleNamespace(
        body=b"{}",
        content_type="application/json",
        headers={},
        timestamp=None,
        reply_to=None,
        correlation_id=None,
        routing_key="forecast",
        message_id="m1",
        redelivered=False,
        reject=reject,
    )
    channel = SimpleNamespace(is_closed=False)
    consumer = Consumer(_Boom(), channel, channel, metrics)  # type: ignore[arg-type]

    async def no_sleep(_: float) -> None:
        return None

    monkeypatch.setattr("worker.runtime.consumer.asyncio.sleep", no_sleep)
    assert metrics.registry.get_sample_value("eglo_unexpected_errors_total") == 0.0
    asyncio.run(consumer._handle_in_span(message))  # type: ignore[arg-type]
    assert rejected == [True]
    assert metrics.registry.get_sample_value("eglo_unexpected_errors_total") == 1.0
