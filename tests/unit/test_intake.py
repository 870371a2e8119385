"""Turning delivery bytes into requests or precise rejections."""

from __future__ import annotations

import orjson
import pytest

from contracts.requests import ForecastRequest
from producers.sample import generate_requests
from worker.core.intake import Rejection, parse_request

MAX = 1 << 20


def _valid() -> dict[str, object]:
    return generate_requests(4, seed=3)[0]


def test_valid_request_parses() -> None:
    """A sample request comes back as its typed model."""
    doc = next(r for r in generate_requests(4, seed=3) if r["request_type"] == "forecast")
    parsed = parse_request(orjson.dumps(doc), "application/json", max_bytes=MAX)
    assert isinstance(parsed, ForecastRequest)
    assert parsed.request_id == doc["request_id"]


def test_missing_content_type_is_accepted() -> None:
    """Producers in other languages often omit content_type; the body decides."""
    parsed = parse_request(orjson.dumps(_valid()), None, max_bytes=MAX)
    assert not isinstance(parsed, Rejection)


@pytest.mark.parametrize(
    ("body", "content_type", "reason"),
    [
        (b"{not json", "application/json", "invalid_json"),
        (b'{"a": NaN}', "application/json", "invalid_json"),
        (b"[1, 2]", "application/json", "invalid_request"),
        (b"{}", "text/plain", "unsupported_content_type"),
        (b'{"schema_version": 2}', "application/json", "unsupported_schema_version"),
        (b'{"request_type": "teleport"}', "application/json", "unknown_request_type"),
    ],
)
def test_rejections_have_stable_reasons(body: bytes, content_type: str, reason: str) -> None:
    """Each kind of bad input maps to its own machine-readable reason."""
    parsed = parse_request(body, content_type, max_bytes=MAX)
    assert isinstance(parsed, Rejection)
    assert parsed.reason == reason


def test_oversized_body_is_rejected_before_parsing() -> None:
    """A body over the limit is refused by size alone."""
    parsed = parse_request(b" " * 2048, "application/json", max_bytes=1024)
    assert parsed == Rejection("body_too_large", "2048 bytes, limit 1024")


def test_negative_capacity_names_the_field() -> None:
    """Validation errors say which field is wrong."""
    doc = next(r for r in generate_requests(4, seed=3) if r["request_type"] == "storage")
    doc["payload"]["capacity_kwh"] = -5  # type: ignore[index]
    parsed = parse_request(orjson.dumps(doc), "application/json", max_bytes=MAX)
    assert isinstance(parsed, Rejection)
    assert parsed.reason == "invalid_request"
    assert "payload.capacity_kwh" in parsed.detail


def test_history_over_bound_is_rejected() -> None:
    """Arrays over their bounds are rejected, keeping memory per message bounded."""
    doc = next(r for r in generate_requests(4, seed=3) if r["request_type"] == "forecast")
    doc["payload"]["historical_loads"] = [1.0] * 100_000  # type: ignore[index]
    parsed = parse_request(orjson.dumps(doc), "application/json", max_bytes=MAX * 2)
    assert isinstance(parsed, Rejection)
    assert "historical_loads" in parsed.detail
