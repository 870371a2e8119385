"""`eglo events tail` against the real local broker, each test in a vhost of its own."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import aio_pika
import orjson
import pytest
from aio_pika.abc import AbstractExchange, AbstractRobustConnection

from contracts.events import RunOutcome
from producers import topology
from worker.ops.events_tail import format_event, tail_events

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 15.0


@pytest.fixture
async def events_exchange(
    amqp: AbstractRobustConnection,
) -> AsyncIterator[AbstractExchange]:
    channel = await amqp.channel(publisher_confirms=True)
    topo = await topology.declare(channel)
    yield topo.events_exchange
    await channel.close()


async def publish(exchange: AbstractExchange, routing_key: str, body: bytes) -> None:
    await exchange.publish(
        aio_pika.Message(body, content_type="application/json"), routing_key=routing_key
    )


def outcome(status: str = "completed", request_type: str = "forecast") -> bytes:
    event = RunOutcome(
        event_id=uuid.uuid4(),
        event_type=f"run.{status}.{request_type}",
        occurred_at=datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC),
        run_id=uuid.uuid4(),
        request_id=f"req-{uuid.uuid4().hex[:8]}",
        request_type=request_type,
        status=status,
        region="DE-BW",
        forecast_date=date(2025, 1, 3),
        attempts=1,
        result={"forecast": [1.5, 2.0]} if status == "completed" else None,
        error_code=None if status == "completed" else "qnn_rejected",
    )
    # Indented on purpose: the tail must print it compact.
    return orjson.dumps(event.model_dump(mode="json"), option=orjson.OPT_INDENT_2)


async def start_tail(
    amqp_url: str, pattern: str, limit: int | None, out: io.StringIO
) -> asyncio.Task[int]:
    ready = asyncio.Event()
    task = asyncio.create_task(tail_events(amqp_url, pattern, limit=limit, out=out, ready=ready))
    waiter = asyncio.create_task(ready.wait())
    done, _ = await asyncio.wait({task, waiter}, timeout=TIMEOUT_S, return_when="FIRST_COMPLETED")
    waiter.cancel()
    if task in done:
        task.result()  # raises what the tail raised
    assert ready.is_set(), "tail did not bind its queue in time"
    return task


def parse_lines(text: str) -> list[tuple[str, Any]]:
    lines = text.splitlines()
    assert text.endswith("\n") or not text
    return [(key, json.loads(body)) for key, body in (line.split(" ", 1) for line in lines)]


async def test_prints_only_matching_events_until_the_limit(
    amqp_url: str, events_exchange: AbstractExchange
) -> None:
    out = io.StringIO()
    task = await start_tail(amqp_url, "run.*.forecast", 2, out)
    first, second = outcome("completed", "forecast"), outcome("failed", "forecast")
    await publish(events_exchange, "run.completed.storage", outcome("completed", "storage"))
    await publish(events_exchange, "run.completed.forecast", first)
    await publish(events_exchange, "embedding.requested", b"{}")
    await publish(events_exchange, "run.failed.forecast", second)
    await publish(events_exchange, "run.expired.forecast", outcome("expired", "forecast"))

    assert await asyncio.wait_for(task, TIMEOUT_S) == 0
    lines = parse_lines(out.getvalue())
    assert [key for key, _ in lines] == ["run.completed.forecast", "run.failed.forecast"]
    assert [body for _, body in lines] == [orjson.loads(first), orjson.loads(second)]
    for line in out.getvalue().splitlines():
        # Compact: what orjson writes without options, no indentation or spaces after separators.
        _key, body = line.split(" ", 1)
        assert body == orjson.dumps(orjson.loads(body)).decode()


async def test_default_pattern_sees_every_event_type(
    amqp_url: str, events_exchange: AbstractExchange
) -> None:
    out = io.StringIO()
    task = await start_tail(amqp_url, "#", 3, out)
    keys = ["anomaly.detected.high", "embedding.requested", "run.expired.grid_switch"]
    for key in keys:
        await publish(events_exchange, key, orjson.dumps({"event_type": key}))

    assert await asyncio.wait_for(task, TIMEOUT_S) == 0
    assert parse_lines(out.getvalue()) == [(key, {"event_type": key}) for key in keys]


async def test_tail_takes_nothing_from_other_consumers(
    amqp_url: str, amqp: AbstractRobustConnection, events_exchange: AbstractExchange
) -> None:
    channel = await amqp.channel()
    audit = await channel.declare_queue(f"audit-{uuid.uuid4().hex[:6]}", auto_delete=True)
    await audit.bind(topology.EVENTS_EXCHANGE, routing_key="#")
    out = io.StringIO()
    task = await start_tail(amqp_url, "run.#", 1, out)
    await publish(events_exchange, "run.completed.simulation", b'{"n": 1}')

    await asyncio.wait_for(task, TIMEOUT_S)
    message = await audit.get(timeout=5)
    assert message is not None and message.body == b'{"n": 1}'
    await message.ack()
    assert parse_lines(out.getvalue()) == [("run.completed.simulation", {"n": 1})]
    await channel.close()


async def test_non_json_body_stays_on_one_line(
    amqp_url: str, events_exchange: AbstractExchange
) -> None:
    out = io.StringIO()
    task = await start_tail(amqp_url, "#", 1, out)
    await publish(events_exchange, "run.failed.storage", b"not json\nsecond line \xff")

    await asyncio.wait_for(task, TIMEOUT_S)
    # The invalid byte shows as U+FFFD, the newline as the two characters \n.
    assert out.getvalue() == 'run.failed.storage "not json\\nsecond line \ufffd"\n'


async def test_limit_zero_returns_at_once() -> None:
    # No broker needed: nothing to print means nothing to connect to.
    assert await tail_events("amqp://guest:guest@127.0.0.1:1/", limit=0) == 0


def _vhost(amqp_url: str) -> str:
    return unquote(urlsplit(amqp_url).path.removeprefix("/")) or "/"


def _queues(vhost: str) -> list[dict[str, Any]]:
    listed = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "-p", vhost, "name", "exclusive", "auto_delete",
         "--formatter", "json"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    queues: list[dict[str, Any]] = json.loads(listed.stdout or "[]")
    return queues


def _tail_queues(vhost: str) -> list[dict[str, Any]]:
    # topology.declare creates the durable eglo.* queues; the tail's own is named by aio-pika's
    # robust channel (amq_<hex>, so it can be declared again after a failover).
    return [q for q in _queues(vhost) if q["name"].startswith(("amq.gen-", "amq_"))]


async def test_ctrl_c_stops_the_cli_cleanly_and_the_queue_goes_away(
    amqp_url: str, events_exchange: AbstractExchange
) -> None:
    if os.environ.get("EGLO_AMQP_URL"):
        pytest.skip("inspects queues with the local rabbitmqctl")
    vhost = _vhost(amqp_url)
    env = {**os.environ, "EGLO_AMQP_URL": amqp_url, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker.ops.events_tail", "anomaly.detected.*",
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    try:
        banner = await asyncio.wait_for(proc.stderr.readline(), TIMEOUT_S)
        assert banner.startswith(b"tailing eglo.events"), banner

        [queue] = _tail_queues(vhost)
        assert queue["exclusive"] is True and queue["auto_delete"] is True

        await publish(events_exchange, "anomaly.detected.critical", b'{"severity": "critical"}')
        line = await asyncio.wait_for(proc.stdout.readline(), TIMEOUT_S)
        assert line == b'anomaly.detected.critical {"severity":"critical"}\n'

        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), TIMEOUT_S) == 0
        assert b"Traceback" not in await proc.stderr.read()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert _tail_queues(vhost) == []


def test_format_event() -> None:
    assert format_event("run.completed.forecast", b'{ "a": [1, 2],\n "b": null }') == (
        'run.completed.forecast {"a":[1,2],"b":null}'
    )
    assert format_event("", b"") == ' ""'
    assert format_event("k", b"[1]") == "k [1]"
    assert "\n" not in format_event("k", b"a\nb")


def test_cli_reports_an_unreachable_broker(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from worker.ops.events_tail import add_arguments, run

    monkeypatch.setenv("EGLO_AMQP_URL", "amqp://guest:guest@127.0.0.1:1/")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run(parser.parse_args(["run.#", "--limit", "1"])) == 1
    assert "cannot reach the broker" in capsys.readouterr().err
