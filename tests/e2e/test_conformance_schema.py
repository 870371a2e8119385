"""The published schema and the worker agree, request by request, against the real worker.

Requests are generated from docs/schemas/request.v1.json by a third-party generator
(hypothesis-jsonschema) and checked by a third-party validator (jsonschema, with formats asserted,
as ajv-formats does). Every schema-valid request must become a run, unless it breaks one of the
published cross-field rules (docs/schemas/request.rules.v1.json), in which case its dead-letter
reply names that rule. Every mutation the schema rejects must be dead-lettered. Every request is
sent with reply_to and must get exactly one reply; each accepted request is then sent again and
must be answered with its run's outcome (same event_id). The run's figures go to
.eglo/conformance/schema.json.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from datetime import date, datetime
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis_jsonschema import from_schema

from contracts import wire
from contracts.rules import RULES
from producers import topology
from tests.support.harness import make_settings, running_worker, save_figures

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((ROOT / "docs/schemas/request.v1.json").read_text())
PUBLISHED_RULES = json.loads((ROOT / "docs/schemas/request.rules.v1.json").read_text())


def _ecma_pattern(
    validator: Any, pattern: str, instance: Any, schema: dict[str, Any]
) -> Iterator[jsonschema.ValidationError]:
    # JSON Schema patterns are ECMA-262, where `$` ends the string; Python's also matches
    # before a final newline, and then calls "abc\n" valid for ^[a-z]+$.
    if not isinstance(instance, str):
        return
    match = re.search(pattern, instance)
    if match is None or (pattern.endswith("$") and match.end() != len(instance)):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


_FORMATS = jsonschema.FormatChecker()


@_FORMATS.checks("date", raises=ValueError)
def _is_date(value: object) -> bool:
    # RFC 3339 full-date only (Python's fromisoformat also takes 20240101).
    return not isinstance(value, str) or bool(
        re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", value) and date.fromisoformat(value)
    )


@_FORMATS.checks("date-time", raises=ValueError)
def _is_date_time(value: object) -> bool:
    return not isinstance(value, str) or bool(
        re.fullmatch(wire.DATE_TIME_PATTERN.strip("^$"), value)
        and datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
    )


VALIDATOR = jsonschema.validators.extend(
    jsonschema.Draft202012Validator, {"pattern": _ecma_pattern}
)(SCHEMA, format_checker=_FORMATS)
TYPES = {
    "forecast": "ForecastRequest",
    "storage": "StorageRequest",
    "grid_switch": "GridSwitchRequest",
    "simulation": "SimulationRequest",
}
PER_TYPE = int(os.environ.get("EGLO_CONFORMANCE_PER_TYPE", "40"))
MUTATED_PER_TYPE = 3


def _generate(definition: str, count: int) -> list[dict[str, Any]]:
    strategy = from_schema({"$defs": SCHEMA["$defs"], "$ref": f"#/$defs/{definition}"})
    found: list[dict[str, Any]] = []

    @settings(
        max_examples=count,
        database=None,
        deadline=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(doc: dict[str, Any]) -> None:
        found.append(doc)

    collect()
    return found[:count]


def _paths(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], Any]]:
    out = [(path, node)]
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _paths(value, (*path, i))
    return out


def _set(doc: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    node: Any = doc
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return doc


def _first(doc: dict[str, Any], kind: type | tuple[type, ...]) -> tuple[Any, ...] | None:
    for path, value in _paths(doc["payload"], ("payload",)):
        if isinstance(value, kind) and not isinstance(value, bool) and path[-1] != "request_type":
            return path
    return None


def _mutants(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Edits a lax reader would let through; only those the schema rejects are kept."""
    out: list[tuple[str, dict[str, Any]]] = []
    number = _first(doc, (int, float))
    if number is not None:
        value = _get(doc, number)
        out.append(("number_as_string", _set(doc, number, str(value))))
        out.append(("boolean_for_number", _set(doc, number, True)))
    array = _first(doc, list)
    if array is not None:
        out.append(("string_for_array", _set(doc, array, "1,2,3")))
    out.append(("null_for_optional", {**doc, "deadline": None}))
    out.append(("datetime_for_date", {**doc, "forecast_date": doc["forecast_date"] + "T00:00:00Z"}))
    out.append(("timestamp_for_date", {**doc, "forecast_date": 1700000000}))
    out.append(("naive_deadline", {**doc, "deadline": "2030-01-01T00:00:00"}))
    out.append(("space_in_deadline", {**doc, "deadline": "2030-01-01 00:00:00Z"}))
    out.append(("unknown_field", {**doc, "priority": 1}))
    out.append(("missing_region", {k: v for k, v in doc.items() if k != "region"}))
    out.append(("control_char_in_region", {**doc, "region": "grid\u0000north"}))
    out.append(("schema_version_true", {**doc, "schema_version": True}))
    payload = doc["payload"]
    if "horizon_steps" in payload or doc["request_type"] == "forecast":
        out.append(("fraction_for_integer", _set(doc, ("payload", "horizon_steps"), 1.5)))
        out.append(("boolean_for_integer", _set(doc, ("payload", "horizon_steps"), True)))
    return [(name, m) for name, m in out if not VALIDATOR.is_valid(m)]


def _get(doc: dict[str, Any], path: tuple[Any, ...]) -> Any:
    node: Any = doc
    for part in path:
        node = node[part]
    return node


class Replies:
    """Replies by correlation_id, as a client of the AsyncAPI document would collect them."""

    def __init__(self) -> None:
        self.by_id: dict[str, list[dict[str, Any]]] = {}
        self.arrived = asyncio.Event()

    async def on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        body = json.loads(message.body)
        assert message.message_id == body["event_id"]
        assert message.type == body["event_type"]
        assert message.timestamp is not None
        self.by_id.setdefault(str(message.correlation_id), []).append(body)
        self.arrived.set()
        await message.ack()

    async def wait_for(self, ids: set[str], within_s: float) -> None:
        deadline = asyncio.get_running_loop().time() + within_s
        while not ids <= self.by_id.keys():
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                missing = sorted(ids - self.by_id.keys())
                raise AssertionError(f"{len(missing)} requests got no reply, e.g. {missing[:5]}")
            self.arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), min(remaining, 1.0))


async def _publish(
    channel: aio_pika.abc.AbstractChannel, reply_queue: str, cases: dict[str, dict[str, Any]]
) -> None:
    exchange = await channel.get_exchange(topology.REQUESTS_EXCHANGE)
    await asyncio.gather(
        *(
            exchange.publish(
                aio_pika.Message(
                    json.dumps(doc).encode(),
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    reply_to=reply_queue,
                    correlation_id=case_id,
                ),
                routing_key=topology.request_routing_key(str(doc.get("request_type"))),
            )
            for case_id, doc in cases.items()
        )
    )


@pytest.mark.timeout(600)
async def test_what_the_schema_accepts_the_worker_accepts(
    amqp_url: str, database_url: str, emulator: str, pool: asyncpg.Pool
) -> None:
    assert PUBLISHED_RULES["rules"] == [{"id": k, "rule": v} for k, v in RULES.items()]
    valid: dict[str, dict[str, Any]] = {}
    invalid: dict[str, tuple[str, dict[str, Any]]] = {}
    artifacts = 0
    for request_type, definition in TYPES.items():
        docs = _generate(definition, PER_TYPE)
        assert len(docs) == PER_TYPE, f"the generator gave {len(docs)} {request_type} requests"
        for i, doc in enumerate(docs):
            doc["request_id"] = f"gen-{request_type}-{i}"
            if not VALIDATOR.is_valid(doc):
                # The generator reads patterns with Python's `$` (see _ecma_pattern): what it
                # made is schema-invalid, and is sent as such.
                artifacts += 1
                invalid[f"invalid:{request_type}:{i}:generator_pattern"] = ("python_dollar", doc)
                continue
            valid[f"valid:{request_type}:{i}"] = doc
            if i < MUTATED_PER_TYPE:
                for name, mutant in _mutants(doc):
                    mutant["request_id"] = f"mut-{request_type}-{i}-{name}"
                    invalid[f"invalid:{request_type}:{i}:{name}"] = (name, mutant)

    replies = Replies()
    connection = await aio_pika.connect_robust(amqp_url)
    async with connection, running_worker(
        make_settings(amqp_url, database_url, emulator, retry_delays_s=[0.1])
    ):
        channel = await connection.channel(publisher_confirms=True)
        reply_queue = await channel.declare_queue(exclusive=True)
        await reply_queue.consume(replies.on_message)
        await _publish(
            channel, reply_queue.name, {**valid, **{k: m for k, (_, m) in invalid.items()}}
        )
        await replies.wait_for(set(valid) | set(invalid), within_s=300)

        accepted = {
            case_id: bodies[0]
            for case_id, bodies in replies.by_id.items()
            if case_id in valid and bodies[0]["event_type"].startswith("run.")
        }
        resent = {f"again:{case_id}": valid[case_id] for case_id in accepted}
        await _publish(channel, reply_queue.name, resent)
        await replies.wait_for(set(resent), within_s=120)
        await asyncio.sleep(1.0)  # a second reply to anything would arrive by now

    problems: list[str] = []
    figures: dict[str, Any] = {
        "generated": {t: PER_TYPE for t in TYPES},
        "generated_but_schema_invalid": artifacts,
        "accepted": Counter(),
        "rejected_by_rule": Counter(),
        "mutants": Counter(),
        "mutants_dead_lettered": Counter(),
        "replies": Counter(),
    }
    for case_id, bodies in replies.by_id.items():
        if len(bodies) != 1 and len({b["event_id"] for b in bodies}) != 1:
            problems.append(f"{case_id}: {len(bodies)} different replies")
        body = bodies[0]
        outcome = (
            "duplicate"
            if case_id.startswith("again:")
            else body.get("status", "dead_lettered")
        )
        figures["replies"][outcome] += 1
        if case_id in valid:
            request_type = valid[case_id]["request_type"]
            if body["event_type"].startswith("run."):
                figures["accepted"][request_type] += 1
            elif body.get("reason") == "invalid_request" and body.get("rule") in RULES:
                assert f"(rule {body['rule']})" in body["detail"]
                figures["rejected_by_rule"][body["rule"]] += 1
            else:
                problems.append(f"schema-valid {case_id} rejected without a rule: {body}")
        elif case_id in invalid:
            name = invalid[case_id][0]
            figures["mutants"][name] += 1
            if body["event_type"].startswith("run."):
                problems.append(f"schema-invalid {case_id} was accepted: {invalid[case_id][1]}")
            else:
                figures["mutants_dead_lettered"][body["reason"]] += 1
        else:
            original = accepted[case_id.removeprefix("again:")]
            if body["event_id"] != original["event_id"]:
                problems.append(f"{case_id}: duplicate answered with another outcome")

    stored = await pool.fetch(
        "SELECT request_id, count(*) OVER (PARTITION BY request_id) AS n FROM optimization_runs"
    )
    assert {r["request_id"] for r in stored} == {valid[c]["request_id"] for c in accepted}
    assert all(r["n"] == 1 for r in stored)

    figures["failed_runs_by_error"] = {
        r["error_code"]: r["n"]
        for r in await pool.fetch(
            "SELECT error_code, count(*) AS n FROM optimization_runs WHERE status = 'failed' "
            "GROUP BY error_code"
        )
    }
    save_figures("schema", figures)
    assert not problems, "\n".join(problems[:20])
    assert sum(figures["accepted"].values()) > 0 and figures["mutants"]
