"""Turning a delivery's bytes into a valid request, or a precise reason why not (pure)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import TypeAdapter, ValidationError

from contracts import wire
from contracts.requests import REQUEST_TYPES, SCHEMA_VERSION, AnyRequest, OptimizationRequest
from contracts.rules import RULE_ERROR
from contracts.topology import request_routing_key
from contracts.validation import format_validation_error
from contracts.vocabulary import DeadLetterReason

_REQUEST = TypeAdapter[AnyRequest](OptimizationRequest)
_ROUTING_PREFIX = request_routing_key("")


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a message can never become a run; `reason` is a stable machine-readable code, `rule`
    the id of the broken cross-field rule (contracts.rules) when that is why."""

    reason: DeadLetterReason
    detail: str
    rule: str | None = None


def parse_request(
    body: bytes,
    content_type: str | None,
    *,
    max_bytes: int,
    routing_key: str | None = None,
) -> AnyRequest | Rejection:
    """`routing_key` is the key the producer published with; when it is `request.<type>`, the
    type must be the body's."""
    if len(body) > max_bytes:
        return Rejection("body_too_large", f"{len(body)} bytes, limit {max_bytes}")
    try:
        wire.check_json_content_type(content_type)
    except wire.MediaTypeError as exc:
        return Rejection(exc.reason, str(exc))
    try:
        doc: Any = wire.loads(body)
    except orjson.JSONDecodeError as exc:
        return Rejection("invalid_json", str(exc)[:300])
    if not isinstance(doc, dict):
        return Rejection("invalid_request", f"body is a JSON {type(doc).__name__}, not an object")
    version = doc.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION or isinstance(version, bool):
        return Rejection(
            "unsupported_schema_version", f"schema_version {version!r}, supported {SCHEMA_VERSION}"
        )
    request_type = doc.get("request_type")
    if not isinstance(request_type, str) or request_type not in REQUEST_TYPES:
        return Rejection(
            "unknown_request_type",
            f"request_type {request_type!r}, expected one of {REQUEST_TYPES}",
        )
    if (
        routing_key is not None
        and routing_key.startswith(_ROUTING_PREFIX)
        and routing_key != request_routing_key(request_type)
    ):
        return Rejection(
            "routing_key_mismatch",
            f"published with routing key {routing_key!r} but request_type is {request_type!r}",
        )
    try:
        return wire.validate(_REQUEST, doc)
    except ValidationError as exc:
        rule = next(
            (e["ctx"]["rule"] for e in exc.errors() if e["type"] == RULE_ERROR and "ctx" in e),
            None,
        )
        return Rejection("invalid_request", format_validation_error(exc), rule)


def identify(body: bytes) -> tuple[str | None, str | None]:
    """The request_id and request_type of a rejected body, where they can be read, for its reply."""
    try:
        doc = wire.loads(body)
    except orjson.JSONDecodeError:
        return None, None
    if not isinstance(doc, dict):
        return None, None
    request_id, request_type = doc.get("request_id"), doc.get("request_type")
    return (
        request_id if isinstance(request_id, str) and 0 < len(request_id) <= 128 else None,
        request_type if request_type in REQUEST_TYPES else None,
    )
