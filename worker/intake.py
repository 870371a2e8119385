"""Turning a delivery's bytes into a valid request, or a precise reason why not (pure)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import TypeAdapter, ValidationError

from contracts.requests import REQUEST_TYPES, SCHEMA_VERSION, AnyRequest, OptimizationRequest
from contracts.validation import format_validation_error

_REQUEST = TypeAdapter[AnyRequest](OptimizationRequest)
JSON_CONTENT_TYPES = {"application/json", "application/json; charset=utf-8", "text/json"}


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a message can never become a run; `reason` is a stable machine-readable code."""

    reason: str
    detail: str


def parse_request(
    body: bytes, content_type: str | None, *, max_bytes: int
) -> AnyRequest | Rejection:
    if len(body) > max_bytes:
        return Rejection("body_too_large", f"{len(body)} bytes, limit {max_bytes}")
    # Producers in other languages often leave content_type unset; an explicit non-JSON one is
    # a producer bug worth surfacing.
    if content_type and content_type.lower() not in JSON_CONTENT_TYPES:
        return Rejection("unsupported_content_type", f"content_type {content_type!r}")
    try:
        doc: Any = orjson.loads(body)  # rejects NaN and Infinity, which JSON does not have
    except orjson.JSONDecodeError as exc:
        return Rejection("invalid_json", str(exc)[:300])
    if not isinstance(doc, dict):
        return Rejection("invalid_request", f"body is a JSON {type(doc).__name__}, not an object")
    version = doc.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        return Rejection(
            "unsupported_schema_version", f"schema_version {version!r}, supported {SCHEMA_VERSION}"
        )
    if doc.get("request_type") not in REQUEST_TYPES:
        return Rejection(
            "unknown_request_type",
            f"request_type {doc.get('request_type')!r}, expected one of {REQUEST_TYPES}",
        )
    try:
        return _REQUEST.validate_python(doc)
    except ValidationError as exc:
        return Rejection("invalid_request", format_validation_error(exc))
