"""The wire layer alone (no services): strict types, media types, rule ids, exact AMQP tables."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest
from pamqp import decode

from contracts.rules import RULES
from contracts.wire import MediaTypeError, check_json_content_type, parse_media_type
from producers import amqp_codec as codec
from producers.sample import generate_requests
from worker.core.intake import Rejection, parse_request


def _doc(kind: str) -> dict[str, Any]:
    return copy.deepcopy(next(r for r in generate_requests(8, seed=3) if r["request_type"] == kind))


def _parse(doc: dict[str, Any], **kwargs: Any) -> Any:
    return parse_request(
        orjson.dumps(doc), kwargs.pop("content_type", None), max_bytes=10**6, **kwargs
    )


@pytest.mark.parametrize(
    "value",
    [
        "application/json",
        "Application/JSON;charset=UTF-8",  # Spring's constant
        "application/json; charset=utf-8",
        'application/json ; charset="utf-8"',
        "application/json;",
        "text/json",
        "application/vnd.scada+json; version=1",
        None,
        "",
    ],
)
def test_json_media_types_are_accepted(value: str | None) -> None:
    check_json_content_type(value)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("text/plain", "unsupported_content_type"),
        ("application/jsonx", "unsupported_content_type"),
        ("json", "unsupported_content_type"),
        ("application/json x", "unsupported_content_type"),
        ("application/json; charset=latin1", "unsupported_charset"),
        ('application/json; charset="UTF-16"', "unsupported_charset"),
    ],
)
def test_other_media_types_get_their_own_reason(value: str, reason: str) -> None:
    with pytest.raises(MediaTypeError) as caught:
        check_json_content_type(value)
    assert caught.value.reason == reason


def test_media_type_parameters_are_unquoted() -> None:
    assert parse_media_type('application/json; Charset="a\\"b"') == (
        "application/json",
        {"charset": 'a"b'},
    )


@pytest.mark.parametrize(
    ("kind", "path", "value"),
    [
        ("forecast", ("payload", "horizon_steps"), "24"),
        ("forecast", ("payload", "horizon_steps"), True),
        ("forecast", ("payload", "horizon_steps"), 1.5),
        ("forecast", ("payload", "resolution_minutes"), "60"),
        ("storage", ("payload", "efficiency"), True),
        ("storage", ("payload", "capacity_kwh"), "100"),
        ("storage", ("forecast_date",), 1_700_000_000),
        ("storage", ("forecast_date",), "2025-06-07T00:00:00Z"),
        ("storage", ("forecast_date",), "20250607"),
        ("storage", ("deadline",), "2025-06-07T06:00:00"),
        ("storage", ("deadline",), "2025-06-07 06:00:00Z"),
        ("storage", ("deadline",), 1_700_000_000),
        ("storage", ("deadline",), None),
        ("grid_switch", ("region",), "north\u0000"),
        ("grid_switch", ("schema_version",), True),
    ],
)
def test_no_coercion(kind: str, path: tuple[str, ...], value: Any) -> None:
    doc = _doc(kind)
    node = doc
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    rejected = _parse(doc)
    assert isinstance(rejected, Rejection), f"{path}={value!r} was accepted"
    assert rejected.reason in ("invalid_request", "unsupported_schema_version")


def test_what_json_schema_calls_an_integer_is_one() -> None:
    doc = _doc("forecast")
    doc["payload"]["horizon_steps"] = 24.0
    doc["schema_version"] = 1.0
    assert _parse(doc).payload.horizon_steps == 24


def test_instants_carry_an_offset_and_any_precision() -> None:
    doc = _doc("storage")
    doc["deadline"] = "2099-01-01t00:00:00.123456789+05:30"
    assert _parse(doc).deadline.utcoffset().total_seconds() == 5.5 * 3600


def test_a_broken_rule_is_named() -> None:
    doc = _doc("storage")
    doc["payload"]["soc_initial_kwh"] = doc["payload"]["soc_max_kwh"] + 1
    rejected = _parse(doc)
    assert isinstance(rejected, Rejection)
    assert rejected.rule == "storage.soc_initial" and rejected.rule in RULES
    assert "(rule storage.soc_initial)" in rejected.detail


def test_the_routing_key_must_name_the_body_type() -> None:
    doc = _doc("storage")
    assert not isinstance(_parse(doc, routing_key="request.storage"), Rejection)
    assert not isinstance(_parse(doc, routing_key="eglo.requests"), Rejection)  # a delay tier
    rejected = _parse(doc, routing_key="request.forecast")
    assert isinstance(rejected, Rejection) and rejected.reason == "routing_key_mismatch"


def test_typed_tables_round_trip_byte_for_byte() -> None:
    codec.install()
    table = {
        "d": codec.Float64(0.1),
        "big": codec.Float64(1.7e308),
        "f": codec.Float32(0.5),
        "l": codec.Int64(5),
        "u8": codec.UInt8(200),
        "s": codec.LongBytes(b"\xff\xfe"),
        "x": bytearray(b"\x00\x01"),
        "t": codec._timestamp_from_raw(1_733_400_000_123),
        "n": {"a": [codec.Int32(1), {"b": None}]},
        "k" * 200: "long key",
    }
    encoded = codec.encode_table(table)
    _, decoded = decode.field_table(encoded)
    assert codec.encode_table(decoded) == encoded
    assert type(decoded["d"]) is codec.Float64 and repr(decoded["d"]) == "0.1"
    assert type(decoded["l"]) is codec.Int64 and decoded["t"].raw == 1_733_400_000_123


def test_plain_floats_are_doubles() -> None:
    codec.install()
    _, decoded = decode.field_table(codec.encode_table({"x": 0.1, "y": 1e300}))
    assert decoded == {"x": 0.1, "y": 1e300}
