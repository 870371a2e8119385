"""The committed AsyncAPI document and JSON Schemas are fresh, well-formed and match the code."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml

from contracts import asyncapi
from contracts.requests import REQUEST_TYPES
from contracts.schemas import render_schemas
from contracts.vocabulary import DeadLetterReason

ROOT = Path(__file__).resolve().parents[2]
ASYNCAPI_FILE = ROOT / "docs" / "asyncapi.yaml"
SCHEMAS_DIR = ROOT / "docs" / "schemas"
REGENERATE = (
    "regenerate with `eglo asyncapi --out docs/asyncapi.yaml` "
    "(or python -c 'from pathlib import Path; from contracts.asyncapi import write_asyncapi; "
    'write_asyncapi(Path("docs/asyncapi.yaml"))\')'
)


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    loaded = yaml.safe_load(ASYNCAPI_FILE.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def test_committed_document_is_fresh() -> None:
    assert ASYNCAPI_FILE.read_text(encoding="utf-8") == asyncapi.render_asyncapi(), REGENERATE


def test_rendering_is_deterministic() -> None:
    assert asyncapi.render_asyncapi() == asyncapi.render_asyncapi()


def test_yaml_text_reads_back_as_the_document(document: dict[str, Any]) -> None:
    # JSON round trip: the document's tuples-free data compares equal to what a parser returns.
    assert document == json.loads(json.dumps(asyncapi.asyncapi_document()))


def test_write_asyncapi(tmp_path: Path) -> None:
    out = asyncapi.write_asyncapi(tmp_path / "nested" / "asyncapi.yaml")
    assert out.read_text(encoding="utf-8") == asyncapi.render_asyncapi()


def test_structure_is_asyncapi_3(document: dict[str, Any]) -> None:
    assert document["asyncapi"] == "3.0.0"
    assert {"title", "version"} <= document["info"].keys()
    assert document["channels"]
    assert document["operations"]
    assert document["components"]["messages"]
    for name, operation in document["operations"].items():
        assert operation["action"] in ("send", "receive"), name
        channel_ref = operation["channel"]["$ref"]
        assert channel_ref.startswith("#/channels/"), name
        for message in operation["messages"]:
            # AsyncAPI 3: an operation's messages must be messages of its own channel.
            assert message["$ref"].startswith(channel_ref + "/messages/"), name


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for value in node.values() for r in _refs(value)]
    if isinstance(node, list):
        return [r for item in node for r in _refs(item)]
    return []


def _resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), f"external or malformed ref {ref!r}"
    node: Any = document
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, f"dangling ref {ref!r}"
        node = node[part]
    return node


def test_every_ref_resolves_inside_the_document(document: dict[str, Any]) -> None:
    refs = _refs(document)
    assert refs
    for ref in refs:
        _resolve(document, ref)
    assert not any("$defs" in ref for ref in refs), "pydantic refs were not rewritten"


def test_channels_cover_the_topology(document: dict[str, Any]) -> None:
    channels = document["channels"]
    addresses = {c["address"] for c in channels.values()}
    assert {
        "request.{request_type}",
        "eglo.requests",
        "eglo.requests.dlq",
        "run.{status}.{request_type}",
        "embedding.requested",
        "anomaly.detected.{severity}",
    } <= addresses
    assert channels["requests"]["parameters"]["request_type"]["enum"] == list(REQUEST_TYPES)
    for name, channel in channels.items():
        amqp = channel.get("bindings", {}).get("amqp")
        if amqp is None:
            continue
        if amqp["is"] == "routingKey":
            assert amqp["exchange"]["type"] == "topic", name
            assert amqp["exchange"]["durable"] is True, name
    for name in ("requestsQueue", "deadLetters"):
        assert channels[name]["x-eglo-queue-arguments"]["x-queue-type"] == "quorum"


def test_names_match_the_worker() -> None:
    from producers import topology
    from worker.runtime import consumer, pipeline

    assert asyncapi.REQUESTS_EXCHANGE == topology.REQUESTS_EXCHANGE
    assert asyncapi.REQUESTS_QUEUE == topology.REQUESTS_QUEUE
    assert asyncapi.DEAD_LETTER_EXCHANGE == topology.DEAD_LETTER_EXCHANGE
    assert asyncapi.DEAD_LETTER_QUEUE == topology.DEAD_LETTER_QUEUE
    assert asyncapi.EVENTS_EXCHANGE == topology.EVENTS_EXCHANGE
    assert asyncapi.DELIVERY_LIMIT == topology.DELIVERY_LIMIT
    assert topology.delay_queue_name(5.0) == "eglo.requests.retry.5000ms"
    headers = asyncapi.DEAD_LETTER_HEADERS["properties"]
    expected = {consumer.REASON_HEADER, consumer.DETAIL_HEADER, pipeline.ATTEMPT_HEADER}
    assert expected <= headers.keys()


def test_documented_dead_letter_reasons_are_the_vocabulary() -> None:
    # DeadLetter.reason and Rejection.reason are typed with DeadLetterReason: mypy keeps the code
    # inside the vocabulary, and the document lists all of it.
    assert get_args(DeadLetterReason) == asyncapi.DEAD_LETTER_REASONS
    documented = asyncapi.DEAD_LETTER_HEADERS["properties"]["x-eglo-dead-letter-reason"]
    assert documented["examples"] == list(get_args(DeadLetterReason))


def test_payloads_come_from_the_contracts(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    rendered = {name: json.loads(text) for name, text in render_schemas().items()}
    for message, file_name in asyncapi.MESSAGE_SCHEMAS.items():
        payload = document["components"]["messages"][message]["payload"]
        assert payload == {"$ref": f"#/components/schemas/{message}"}
        if file_name not in rendered:
            continue  # documented as pending in the schema's description
        source, embedded = rendered[file_name], schemas[message]
        assert "$id" not in embedded and "$schema" not in embedded
        if "properties" in source:
            assert embedded["properties"].keys() == source["properties"].keys(), message
            assert embedded.get("required") == source.get("required"), message
    request = schemas["OptimizationRequest"]
    assert "discriminator" not in request  # not JSON Schema; ajv's strict mode refuses it
    assert len(request["oneOf"]) == len(REQUEST_TYPES)
    for branch in request["oneOf"]:
        target = schemas[branch["$ref"].rsplit("/", 1)[1]]
        assert target["properties"]["request_type"]["const"] in REQUEST_TYPES


def test_docs_schemas_are_fresh() -> None:
    expected = render_schemas()
    on_disk = {p.name for p in SCHEMAS_DIR.glob("*.json")}
    assert on_disk == set(expected), (
        "docs/schemas differs from render_schemas(): "
        "regenerate with `eglo schemas --out docs/schemas` (and delete stale files)"
    )
    for name, text in expected.items():
        assert (SCHEMAS_DIR / name).read_text(encoding="utf-8") == text, (
            f"{name} is stale: regenerate with `eglo schemas --out docs/schemas`"
        )


@pytest.mark.parametrize(
    "value",
    [
        "plain",
        "",
        "yes",
        "No",
        "on",
        "null",
        "~",
        "true",
        "1.0",
        "0x1F",
        "1e5",
        "- dash",
        "a: b",
        "#comment",
        'quote"and\\backslash',
        "line\nbreak\ttab\r",
        "unicode: ü — 😀",
        "\u2028\x85\x00\x7f",
        "@at",
        "*alias",
        "&anchor",
        "!tag",
        "%directive",
        "{flow}",
        "[flow]",
        "'single'",
        "trailing space ",
        "NaN",
        ".inf",
        "2024-01-01",
        "<<",
        0,
        -3,
        1.5,
        1e-05,
        1e16,
        -0.0,
        True,
        False,
        None,
        [],
        {},
        [[1, [2]], {"a": []}],
        {"on": {"yes": [None, {"x": {}}]}, "$ref": "#/a"},
    ],
)
def test_yaml_emitter_round_trips(value: Any) -> None:
    data = {"key": value, "list": [value, {"nested": value}]}
    assert yaml.safe_load(asyncapi.to_yaml(data)) == data
