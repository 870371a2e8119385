"""structlog setup: JSON lines with bound request context; secrets scrubbed on the way out."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import orjson
import structlog

# user:password@ in URLs, and bearer tokens or api keys in free text (error messages included).
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://[^:/@\s]+:)[^@\s]+@", re.I)
_TOKEN = re.compile(r"(?P<key>bearer\s+|api[_-]?key[\"'=:\s]+)[A-Za-z0-9._~+/=-]{4,}", re.I)


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    text = _URL_PASSWORD.sub(r"\g<scheme>***@", text)
    text = _TOKEN.sub(r"\g<key>***", text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def _scrubber(secrets: tuple[str, ...]) -> structlog.types.Processor:
    def scrub(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for key, value in event.items():
            if isinstance(value, str):
                event[key] = redact(value, secrets)
        return event

    return scrub


def _orjson_dumps(value: Any, **_: Any) -> bytes:
    return orjson.dumps(value, default=str)


def configure(level: str = "INFO", *, json: bool = True, secrets: tuple[str, ...] = ()) -> None:
    logging.basicConfig(format="%(message)s", stream=sys.stderr, level=level.upper())
    # Per-request INFO lines from the HTTP and AMQP libraries would drown eglo's own events.
    for noisy in ("httpx", "aio_pika", "aiormq"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer(serializer=_orjson_dumps)
        if json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _scrubber(secrets),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=(
            structlog.BytesLoggerFactory(sys.stderr.buffer)
            if json
            else structlog.PrintLoggerFactory(sys.stderr)
        ),
        cache_logger_on_first_use=True,
    )
