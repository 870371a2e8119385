"""Strict reading of what other teams send: JSON types exactly as the published schema says.

Pydantic's lax mode would turn `"24"` into 24, `true` into 1.0 and a Unix timestamp into a date;
the schema rejects all of them, so the wire must too. Documents are validated in strict mode with
the `WIRE` context; the annotated types below keep the few conversions JSON Schema itself allows
(an integral number such as `24.0` is an `integer`) and parse dates and instants from the exact
RFC 3339 forms only. Python code building models from Python values is unaffected.
"""

from __future__ import annotations

import re
import uuid
from datetime import date, datetime
from typing import Annotated, Any, Final, Literal, TypeVar

import orjson
from pydantic import BeforeValidator, Field, TypeAdapter, ValidationInfo, WithJsonSchema

T = TypeVar("T")
WIRE: Final = {"wire": True}

_DATE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")
# RFC 3339 date-time: `T` separator, seconds, and an offset (ISO 8601 allows much more).
DATE_TIME_PATTERN: Final = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})$"
)
_DATE_TIME = re.compile(DATE_TIME_PATTERN)
_UUID = re.compile(r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")


def on_wire(info: ValidationInfo) -> bool:
    return isinstance(info.context, dict) and bool(info.context.get("wire"))


def integral(value: Any) -> Any:
    # JSON Schema's `integer` is any number with a zero fractional part, `true` is not one.
    if isinstance(value, bool):
        raise ValueError("must be a JSON number, not a boolean")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _date(value: Any) -> Any:
    if isinstance(value, str):
        if not _DATE.fullmatch(value):
            raise ValueError("must be a date written YYYY-MM-DD")
        return date.fromisoformat(value)
    if isinstance(value, datetime):
        raise ValueError("must be a date written YYYY-MM-DD, not a date-time")
    return value


def _date_time(value: Any) -> Any:
    if isinstance(value, str):
        if not _DATE_TIME.fullmatch(value):
            raise ValueError(
                "must be an RFC 3339 date-time with an offset, e.g. 2025-06-07T06:00:00Z"
            )
        return datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
    return value


def _uuid(value: Any) -> Any:
    if isinstance(value, str):
        if not _UUID.fullmatch(value):
            raise ValueError("must be a UUID written 8-4-4-4-12")
        return uuid.UUID(value)
    return value


Integer = Annotated[int, BeforeValidator(integral)]
# Published as a bounded integer, not `const`: TypeScript generators drop an integer const.
SchemaVersion = Annotated[
    Literal[1],
    BeforeValidator(integral),
    WithJsonSchema({"type": "integer", "minimum": 1, "maximum": 1, "default": 1}),
]
Resolution = Annotated[Literal[15, 30, 60], BeforeValidator(integral)]
WireDate = Annotated[date, BeforeValidator(_date)]
WireDateTime = Annotated[
    datetime, BeforeValidator(_date_time), Field(json_schema_extra={"pattern": DATE_TIME_PATTERN})
]
WireUUID = Annotated[uuid.UUID, BeforeValidator(_uuid)]


def validate(adapter: TypeAdapter[T], doc: Any) -> T:
    """Validate a decoded JSON document exactly as the published schema reads it."""
    return adapter.validate_python(doc, strict=True, context=WIRE)


def loads(body: bytes | str) -> Any:
    """JSON as the wire has it: orjson rejects NaN and Infinity, which JSON does not have."""
    return orjson.loads(body)


class MediaTypeError(ValueError):
    """A content type that is not JSON (`reason` "unsupported_content_type") or JSON in a
    charset other than UTF-8 (`reason` "unsupported_charset")."""

    def __init__(
        self, reason: Literal["unsupported_content_type", "unsupported_charset"], detail: str
    ) -> None:
        super().__init__(detail)
        self.reason = reason


_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_MEDIA_TYPE = re.compile(rf"^[ \t]*({_TOKEN})/({_TOKEN})[ \t]*(.*)$", re.DOTALL)
_PARAMETER = re.compile(
    rf'^;[ \t]*(?:({_TOKEN})=({_TOKEN}|"(?:[^"\\]|\\.)*"))?[ \t]*(.*)$', re.DOTALL
)
JSON_MEDIA_TYPES: Final = frozenset({"application/json", "text/json"})


def parse_media_type(value: str) -> tuple[str, dict[str, str]]:
    """RFC 9110 media type: `type/subtype` lower-cased, and its parameters (names lower-cased,
    quoted values unquoted). Raises ValueError when the text is not a media type."""
    match = _MEDIA_TYPE.match(value)
    if match is None:
        raise ValueError(f"not a media type: {value!r}")
    media_type = f"{match[1]}/{match[2]}".lower()
    parameters: dict[str, str] = {}
    rest = match[3]
    while rest.strip(" \t"):
        rest = rest.lstrip(" \t")
        param = _PARAMETER.match(rest)
        if param is None:
            raise ValueError(f"malformed parameters in media type: {value!r}")
        if param[1] is not None:  # RFC 9110 allows empty parameters (`application/json;`)
            raw = param[2]
            if raw.startswith('"'):
                raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
            parameters[param[1].lower()] = raw
        rest = param[3]
    return media_type, parameters


def check_json_content_type(value: str | None) -> None:
    """Accept JSON (`application/json`, `text/json`, any `+json` type) in UTF-8, or no content
    type at all (producers in other languages often leave it unset); raise MediaTypeError else."""
    if not value:
        return
    try:
        media_type, parameters = parse_media_type(value)
    except ValueError as exc:
        raise MediaTypeError("unsupported_content_type", str(exc)) from None
    if media_type not in JSON_MEDIA_TYPES and not media_type.endswith("+json"):
        raise MediaTypeError(
            "unsupported_content_type", f"content_type {value!r} is not JSON (application/json)"
        )
    charset = parameters.get("charset", "utf-8").lower()
    if charset not in ("utf-8", "utf8"):
        raise MediaTypeError(
            "unsupported_charset", f"content_type {value!r}: JSON is read as UTF-8 only"
        )
