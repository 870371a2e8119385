"""Turning validation errors into short, machine- and human-readable reasons."""

from __future__ import annotations

import re
from typing import Any, Final

import pydantic

from contracts.requests import REQUEST_TYPES

MAX_REASON_CHARS: Final = 500
_MAX_ERRORS_SHOWN: Final = 3
_TAG_ERRORS: Final = frozenset({"union_tag_invalid", "union_tag_not_found"})
_CONTROL_CHARS: Final = re.compile(r"[\x00-\x1f\x7f]+")


def one_line(text: str) -> str:
    return _CONTROL_CHARS.sub(" ", text).strip()


def _format_loc(error: Any) -> str:
    """Dotted field path of a pydantic error, without discriminator tags.

    Pydantic prefixes locations inside a tagged union with the tag (for example
    ``("forecast", "payload", ...)``, or ``"base", "storage"`` inside a simulation);
    these are not fields of the document, so they are dropped. Errors about the
    tag itself get the ``request_type`` field appended.
    """
    parts: list[str] = []
    for i, part in enumerate(error["loc"]):
        if isinstance(part, str) and part in REQUEST_TYPES and (i == 0 or parts[-1:] == ["base"]):
            continue
        parts.append(str(part))
    if error["type"] in _TAG_ERRORS:
        parts.append("request_type")
    return ".".join(parts)


def format_validation_error(exc: pydantic.ValidationError) -> str:
    """Summarise a validation error on one short line: ``loc: msg; loc: msg (+N more)``.

    At most the first three errors are shown and the result is capped at about 500
    characters, so it fits a log line or a dead-letter ``reason`` header.
    """
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    shown: list[str] = []
    for error in errors[:_MAX_ERRORS_SHOWN]:
        loc = _format_loc(error)
        msg = one_line(str(error["msg"]))
        if error["type"] == "value_error":  # drop pydantic's "Value error, " prefix
            msg = msg.removeprefix("Value error, ")
        shown.append(f"{loc}: {msg}" if loc else msg)
    text = "; ".join(shown) or one_line(str(exc))
    extra = len(errors) - len(shown)
    if extra > 0:
        text += f" (+{extra} more error{'s' if extra > 1 else ''})"
    if len(text) > MAX_REASON_CHARS:
        text = text[: MAX_REASON_CHARS - 3].rstrip() + "..."
    return text
