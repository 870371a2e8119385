"""Models AsyncAPI Modelina generates from docs/asyncapi.yaml decode every real event and reply.

The real worker runs requests of all four types (completed, failed, expired, with and without
reply_to; one with an anomaly; two whose QNN answer reports zero cost, depth, qubits and time; one
dead-lettered with a reply_to), every event and reply is captured into a directory (a file each:
routing_key, properties, body), and then, as real subprocesses: tests/codegen/generate.mjs generates
TypeScript and Go models from the committed document, tsc --strict compiles the TypeScript models
with tests/codegen/decode.ts, go build compiles the Go models with tests/codegen/decode_go, and
both decoders round-trip every captured message (decode into the generated type, encode again)
and report each field of the original body that is missing or changed.

Needs Node (run `npm ci --prefix tests/codegen` once) and Go (standard library only).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from aiohttp import web

from producers import topology
from producers.publisher import Publisher
from producers.reader import parse_request
from producers.sample import generate_requests
from tests.support import stub_qnn as stubs
from tests.support.harness import (
    bind_event_queue,
    drain_queue,
    events_sent,
    make_settings,
    running_worker,
    save_figures,
    wait_for,
)

CODEGEN = Path(__file__).resolve().parents[1] / "codegen"
NODE_MODULES = CODEGEN / "node_modules"
TSC = NODE_MODULES / "typescript" / "bin" / "tsc"
GO_ENV = {"GOFLAGS": "-mod=mod", "GOPROXY": "off", "GOTOOLCHAIN": "local", "GO111MODULE": "on"}
PROPERTIES = (
    "content_type",
    "content_encoding",
    "delivery_mode",
    "priority",
    "correlation_id",
    "reply_to",
    "expiration",
    "message_id",
    "timestamp",
    "type",
    "user_id",
    "app_id",
    "headers",
)


def _toolchain() -> tuple[str, str]:
    """node and go, or a failure that says what to install."""
    if not (NODE_MODULES / "@asyncapi" / "modelina").is_dir() or not TSC.is_file():
        pytest.fail(f"{NODE_MODULES} is missing: run `npm ci --prefix tests/codegen` first")
    node, go = shutil.which("node"), shutil.which("go")
    if node is None:
        pytest.fail("node is not on PATH: install Node 20+, then `npm ci --prefix tests/codegen`")
    if go is None:
        pytest.fail("go is not on PATH: install Go (e.g. `apt-get install golang-go`)")
    return node, go


# -- requests -------------------------------------------------------------------------------------

ZEROED = ("n_qubits", "circuit_depth", "execution_time_ms", "cost_usd")


def _requests() -> dict[str, list[dict[str, Any]]]:
    """Requests by what the QNN stand-in does with them (their request_id prefix says it)."""
    completing = generate_requests(8, seed=41, id_prefix="codegen")
    spiky = next(
        r
        for r in generate_requests(8, seed=17, id_prefix="codegen-spiky")
        if r["request_type"] == "forecast" and len(r["payload"]["historical_loads"]) >= 168
    )
    loads = list(spiky["payload"]["historical_loads"])
    loads[len(loads) // 2] *= 3  # an input_spike anomaly
    spiky["payload"] = {**spiky["payload"], "historical_loads": loads}
    spiky["payload"].pop("temperature_c", None)
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    return {
        "completing": [*completing, spiky],
        # The QNN reports zero cost, depth, qubits and time: valid values a decoder must keep.
        "zeroed": generate_requests(2, seed=44, id_prefix="codegen-zeroed"),
        "expiring": [
            {**d, "deadline": past} for d in generate_requests(2, seed=42, id_prefix="codegen-late")
        ],
        "rejected": generate_requests(4, seed=43, id_prefix="codegen-rejected"),
    }


def _zero(doc: Any) -> Any:
    if isinstance(doc, dict):
        return {k: 0 if k in ZEROED else _zero(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_zero(v) for v in doc]
    return doc


@contextlib.asynccontextmanager
async def _qnn(emulator: str) -> AsyncIterator[str]:
    """A QNN that forwards to the emulator, rejects codegen-rejected-*, zeroes codegen-zeroed-*."""
    async with aiohttp.ClientSession() as session:

        async def predict(body: dict[str, Any]) -> web.Response:
            request_id = body["inputs"]["request_id"]
            if request_id.startswith("codegen-rejected"):
                return await stubs.validation_error(body)
            async with session.post(f"{emulator}/api/v1/predictions/predict", json=body) as answer:
                doc = await answer.json()
                if request_id.startswith("codegen-zeroed"):
                    doc = _zero(doc)
                return web.json_response(doc, status=answer.status)

        async with stubs.stub_qnn(predict) as qnn:
            yield qnn.url


# -- capture --------------------------------------------------------------------------------------


def _record(source: str, message: AbstractIncomingMessage) -> dict[str, Any]:
    properties = {name: getattr(message, name, None) for name in PROPERTIES}
    return {
        "source": source,
        "routing_key": message.routing_key,
        "properties": {k: v for k, v in properties.items() if v is not None},
        "body": orjson.loads(message.body),
    }


def _write(records: list[dict[str, Any]], out: Path) -> None:
    out.mkdir()
    for i, record in enumerate(records):
        name = f"{i:03d}-{record['source']}-{record['body'].get('event_type', 'unknown')}.json"
        (out / name).write_bytes(orjson.dumps(record, default=str, option=orjson.OPT_INDENT_2))


def _save(path: Path, text: str) -> None:
    path.write_text(text)


async def _runs_stored(pool: asyncpg.Pool, count: int) -> bool:
    stored = await pool.fetchval("SELECT count(*) FROM optimization_runs")
    return stored >= count and await events_sent(pool)


async def _dead_letters(amqp: AbstractRobustConnection) -> int:
    async with amqp.channel() as channel:
        queue = await channel.declare_queue(topology.DEAD_LETTER_QUEUE, passive=True)
        return int(queue.declaration_result.message_count or 0)


async def _capture(
    amqp: AbstractRobustConnection,
    amqp_url: str,
    database_url: str,
    emulator: str,
    pool: asyncpg.Pool,
    out: Path,
) -> list[dict[str, Any]]:
    """Run the worker on requests of every kind; write every event and reply into `out`."""
    events = await bind_event_queue(amqp, "#")
    channel = await amqp.channel()
    replies = await channel.declare_queue(exclusive=True)
    docs = [doc for group in _requests().values() for doc in group]
    async with (
        _qnn(emulator) as qnn,
        running_worker(make_settings(amqp_url, database_url, qnn)),
        Publisher.connect(amqp_url) as publisher,
    ):
        for i, doc in enumerate(docs):
            asks = i % 2 == 0  # every other request wants a reply
            await publisher.publish(
                parse_request(doc),
                reply_to=replies.name if asks else None,
                correlation_id=f"corr-{doc['request_id']}" if asks else None,
            )
        # Never a run: dead-lettered, and answered if the worker replies to dead letters.
        await publisher.publish_raw(
            b'{"request_type": "forecast"}',
            topology.request_routing_key("forecast"),
            message_id="codegen-invalid",
            reply_to=replies.name,
            correlation_id="corr-codegen-invalid",
        )
        await wait_for(lambda: _runs_stored(pool, len(docs)), within_s=30)
        await wait_for(lambda: _dead_letters(amqp), within_s=30)
        records = [_record("event", m) for m in await drain_queue(events, idle_s=0.5)]
        records += [_record("reply", m) for m in await drain_queue(replies, idle_s=0.5)]
    _write(records, out)
    kinds = {r["body"]["event_type"].rsplit(".", 1)[0] for r in records if r["source"] == "event"}
    assert {"run.completed", "run.failed", "run.expired", "embedding", "anomaly.detected"} <= kinds
    assert sum(r["source"] == "reply" for r in records) >= (len(docs) + 1) // 2
    zeroed = [r["body"] for r in records if r["body"].get("request_id", "").startswith("codegen-z")]
    assert any(b.get("execution", {}).get("cost_usd") == 0 for b in zeroed), "no zero-cost event"
    return records


# -- toolchain ------------------------------------------------------------------------------------


async def _run(*argv: str | Path, cwd: Path, limit_s: float = 60.0) -> tuple[int, str, str]:
    env = {**os.environ, **GO_ENV}
    process = await asyncio.create_subprocess_exec(
        *map(str, argv),
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(limit_s):
            stdout, stderr = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


def _summary(decoder: str, step: tuple[int, str, str]) -> dict[str, Any]:
    code, stdout, stderr = step
    lines = stdout.strip().splitlines()
    if code != 0 or not lines:
        return {"decoder": decoder, "error": f"exit {code}: {stderr.strip()[-2000:]}"}
    summary: dict[str, Any] = orjson.loads(lines[-1])
    return summary


async def _typescript(node: str, out: Path, messages: Path) -> dict[str, Any]:
    tsc = await _run(node, TSC, "-p", out / "tsconfig.json", "--strict", cwd=out, limit_s=120)
    decoder = out / "build" / "decode.js"
    # tsc emits even with type errors, so losses are reported either way.
    decoded = (
        _summary("ts", await _run(node, decoder, messages, cwd=out))
        if decoder.is_file()
        else {"decoder": "ts", "error": "tsc emitted nothing"}
    )
    return {"tsc": {"exit": tsc[0], "output": (tsc[1] + tsc[2]).strip()[-3000:]}, "decode": decoded}


async def _go(go: str, out: Path, messages: Path) -> dict[str, Any]:
    root = out / "go"
    binary = out / "decode-go"
    build = await _run(go, "build", "-o", binary, "./decode", cwd=root, limit_s=180)
    vet = await _run(go, "vet", ".", cwd=root, limit_s=180)
    decoded = (
        _summary("go", await _run(binary, messages, cwd=root))
        if build[0] == 0
        else {"decoder": "go", "error": "not built"}
    )
    return {
        "build": {"exit": build[0], "output": (build[1] + build[2]).strip()[-3000:]},
        "vet": {"exit": vet[0], "output": (vet[1] + vet[2]).strip()[-1500:]},
        "decode": decoded,
    }


def _problems(report: dict[str, Any], expected: int) -> list[str]:
    """What failed, each with enough of the report to act on (the whole one is in report.json)."""
    ts, go = report["typescript"], report["go"]
    problems = []
    if ts["tsc"]["exit"] != 0:
        problems.append(f"tsc --strict failed:\n{ts['tsc']['output'][:2000]}")
    if go["build"]["exit"] != 0:
        problems.append(f"go build failed:\n{go['build']['output'][:2000]}")
    for name, summary in (("TypeScript", ts["decode"]), ("Go", go["decode"])):
        if summary.get("messages") == summary.get("lossless") == expected:
            continue
        brief = {k: summary.get(k) for k in ("messages", "decoded", "lossless", "lossy", "error")}
        lines = [f"{name} models: {orjson.dumps(brief).decode()}"]
        lines += [
            f"  lost {field!r} in {n} message(s)"
            for field, n in summary.get("lost_fields", {}).items()
        ]
        lines += [f"  e.g. {orjson.dumps(f).decode()}" for f in summary.get("failures", [])[:3]]
        problems.append("\n".join(lines))
    return problems


async def test_generated_models_decode_every_event_and_reply_losslessly(
    amqp: AbstractRobustConnection,
    amqp_url: str,
    database_url: str,
    pool: asyncpg.Pool,
    emulator: str,
    tmp_path: Path,
) -> None:
    """Generation, tsc --strict and go build succeed; both decoders lose nothing of any message."""
    node, go = _toolchain()
    messages, out = tmp_path / "messages", tmp_path / "generated"
    records = await _capture(amqp, amqp_url, database_url, emulator, pool, messages)

    generate = await _run(node, CODEGEN / "generate.mjs", out, cwd=CODEGEN, limit_s=120)
    assert generate[0] == 0, f"generate.mjs failed:\n{generate[2][-3000:]}"
    ts, golang = await asyncio.gather(_typescript(node, out, messages), _go(go, out, messages))

    report = {
        "messages": len(records),
        "routes": orjson.loads(generate[1].splitlines()[-1])["routes"],
        "typescript": ts,
        "go": golang,
    }
    text = orjson.dumps(report, option=orjson.OPT_INDENT_2).decode()
    _save(tmp_path / "report.json", text)
    save_figures("codegen", report)
    print(text, file=sys.stderr)
    problems = _problems(report, len(records))
    assert not problems, "\n".join([*problems, f"(whole report: {tmp_path / 'report.json'})"])
