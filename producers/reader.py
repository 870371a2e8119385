"""Read optimization requests from a file or stdin for `eglo publish FILE|-`.

Two layouts are accepted, chosen by the first non-whitespace character:

* ``[`` -- a single JSON array of request objects. The whole text is parsed at once;
  `ReadItem.line` is then the 1-based *position of the element in the array*
  (index + 1), and messages read ``item N: ...``. If the array itself is not valid
  JSON, a single error item with ``line == 0`` is yielded.
* anything else -- NDJSON: one JSON object per line, blank lines ignored, read
  lazily (works on pipes). `ReadItem.line` is the 1-based line number in the file,
  and messages read ``line N: ...``.

Every item is validated against `contracts.requests.OptimizationRequest`. A bad
item never stops reading: it yields a `ReadItem` with a one-line `error`, and the
good items around it still come through. JSON ``NaN``/``Infinity`` are rejected
at parse time with an explicit message (they are not JSON, and the contracts
would refuse them anyway).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Final, TextIO

import pydantic

from contracts import wire
from contracts.requests import AnyRequest, OptimizationRequest
from contracts.validation import format_validation_error, one_line

__all__ = ["ReadItem", "format_validation_error", "parse_request", "read_requests"]


_ADAPTER: Final[pydantic.TypeAdapter[AnyRequest]] = pydantic.TypeAdapter(OptimizationRequest)


@dataclass(frozen=True, slots=True)
class ReadItem:
    """One item read from the input: either a validated `request` or a one-line `error`.

    `line` is the 1-based line number for NDJSON input, or the 1-based position in
    the array (index + 1) for JSON-array input; 0 means the input as a whole.
    """

    line: int
    request: AnyRequest | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """True when the item holds a validated request."""
        return self.request is not None


class _NonFiniteNumberError(ValueError):
    """Raised by the JSON parser on NaN/Infinity literals."""


def _reject_constant(name: str) -> Any:
    raise _NonFiniteNumberError(f"{name} is not allowed (JSON numbers must be finite)")


def _loads(text: str) -> Any:
    """Parse strict JSON: NaN, Infinity and -Infinity literals are errors."""
    return json.loads(text, parse_constant=_reject_constant)


def parse_request(obj: Any) -> AnyRequest:
    """Validate one decoded JSON value as an optimization request (raises ValidationError)."""
    return wire.validate(_ADAPTER, obj)


def _item_from_value(line: int, label: str, obj: Any) -> ReadItem:
    try:
        return ReadItem(line=line, request=parse_request(obj))
    except pydantic.ValidationError as exc:
        return ReadItem(line=line, error=f"{label}: {format_validation_error(exc)}")


def _json_error(exc: ValueError) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return one_line(f"invalid JSON: {exc.msg} at column {exc.colno}")
    return one_line(f"invalid JSON: {exc}")


def _item_from_text(line: int, text: str) -> ReadItem:
    label = f"line {line}"
    try:
        obj = _loads(text)
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity
        return ReadItem(line=line, error=f"{label}: {_json_error(exc)}")
    except RecursionError:
        return ReadItem(line=line, error=f"{label}: invalid JSON: nested too deeply")
    if not isinstance(obj, dict):
        kind = type(obj).__name__ if obj is not None else "null"
        return ReadItem(line=line, error=f"{label}: expected a JSON object, got {kind}")
    return _item_from_value(line, label, obj)


def _read_array(first_line_no: int, text: str) -> Iterator[ReadItem]:
    try:
        # pad so JSON error positions are file line numbers
        data = _loads("\n" * (first_line_no - 1) + text)
    except ValueError as exc:
        if isinstance(exc, json.JSONDecodeError):
            reason = f"{exc.msg} at line {exc.lineno} column {exc.colno}"
        else:
            reason = str(exc)
        yield ReadItem(line=0, error=one_line(f"invalid JSON array: {reason}"))
        return
    except RecursionError:
        yield ReadItem(line=0, error="invalid JSON array: nested too deeply")
        return
    if not isinstance(data, list):  # cannot happen for text starting with "["; for mypy
        yield ReadItem(line=0, error="invalid JSON array: top level is not an array")
        return
    for index, obj in enumerate(data):
        position = index + 1
        label = f"item {position}"
        if not isinstance(obj, dict):
            kind = type(obj).__name__ if obj is not None else "null"
            yield ReadItem(line=position, error=f"{label}: expected a JSON object, got {kind}")
            continue
        yield _item_from_value(position, label, obj)


def read_requests(stream: TextIO | Iterable[str]) -> Iterator[ReadItem]:
    """Yield one `ReadItem` per request in NDJSON or JSON-array `stream`, in input order."""
    lines = iter(stream)
    line_no = 0
    for raw in lines:
        line_no += 1
        text = raw.lstrip("\ufeff") if line_no == 1 else raw  # tolerate a UTF-8 BOM
        stripped = text.strip()
        if not stripped:
            continue
        if stripped.startswith("["):
            yield from _read_array(line_no, text + "".join(lines))
            return
        yield _item_from_text(line_no, text.rstrip("\r\n"))
        break
    for raw in lines:
        line_no += 1
        if raw.strip():
            yield _item_from_text(line_no, raw.rstrip("\r\n"))
