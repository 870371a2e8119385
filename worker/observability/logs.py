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


def _orjson_text(value: Any, **_: Any) -> str:
    return orjson.dumps(value, default=str).decode()


# The libraries eglo runs on log through the stdlib; their lines are formatted by structlog too.
LIBRARY_LOGGERS = ("aio_pika", "aiormq", "asyncpg", "aiohttp", "httpx", "httpcore")


def configure(level: str = "INFO", *, json: bool = True, secrets: tuple[str, ...] = ()) -> None:
    """eglo's own events and every library's log records come out as one stream of JSON lines
    (`event`, `level`, `timestamp`, and `logger` for a library's), secrets scrubbed."""
    scrub = _scrubber(secrets)
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    _route_stdlib_logging(level, json=json, scrub=scrub, timestamper=timestamper)
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
            timestamper,
            structlog.processors.format_exc_info,
            scrub,
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


def _route_stdlib_logging(
    level: str,
    *,
    json: bool,
    scrub: structlog.types.Processor,
    timestamper: structlog.types.Processor,
) -> None:
    """One handler on the root logger that renders stdlib records as eglo's lines (aio-pika's
    "Reconnecting after 5 seconds" was plain text in the middle of the JSON stream)."""
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            timestamper,
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            scrub,
            structlog.processors.JSONRenderer(serializer=_orjson_text)
            if json
            else structlog.dev.ConsoleRenderer(colors=False),
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    handler.set_name(_HANDLER_NAME)
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


_HANDLER_NAME = "eglo-structlog"
