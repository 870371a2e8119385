"""How the worker's processes reach the broker and the database from their settings.

The TLS settings are written into the connection URLs (producers/tls.py), so every connection
made from these URLs uses them, and a failed handshake is explained in terms of the setting.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg

from db import pool
from db.embedded import embedded_database_url
from producers.broker import broker_urls
from producers.tls import explain, url_query, with_query
from worker.settings import Settings


def amqp_url(settings: Settings) -> str:
    """EGLO_AMQP_URL with EGLO_AMQP_CA_FILE / _CERT_FILE / _KEY_FILE as aiormq's query options.

    With several nodes (producers/broker.py), every node gets them, each as a whole URL.
    """
    extra: dict[str, Path | str | None] = {
        "cafile": settings.amqp_ca_file,
        "certfile": settings.amqp_cert_file,
        "keyfile": settings.amqp_key_file,
    }
    return ",".join(
        with_query(url, extra) for url in broker_urls(settings.amqp_url.get_secret_value())
    )


def database_tls_url(url: str, settings: Settings) -> str:
    """A Postgres URL with EGLO_DATABASE_CA_FILE / _CERT_FILE / _KEY_FILE as libpq's parameters.

    With a CA file and no `sslmode` in the URL, the mode is `verify-full`: the server's
    certificate must chain to that CA and name the URL's host.
    """
    extra: dict[str, Path | str | None] = {
        "sslrootcert": settings.database_ca_file,
        "sslcert": settings.database_cert_file,
        "sslkey": settings.database_key_file,
    }
    if settings.database_ca_file is not None and "sslmode" not in url_query(url):
        extra["sslmode"] = "verify-full"
    return with_query(url, extra)


def database_url(settings: Settings) -> str:
    """The configured URL (with the TLS settings as libpq parameters), or the embedded server's."""
    if settings.database_url is not None:
        return database_tls_url(settings.database_url.get_secret_value(), settings)
    return embedded_database_url(settings.data_dir)


async def open_pool(url: str, *, size: int, **kwargs: Any) -> asyncpg.Pool:
    """db.pool's pool, with a failed TLS handshake explained."""
    with _explained(url):
        return await pool.create_pool(url, size=size, **kwargs)


async def connect_database(url: str) -> asyncpg.Connection:
    """db.pool's single connection, with a failed TLS handshake explained."""
    with _explained(url):
        return await pool.connect(url)


@contextlib.contextmanager
def _explained(url: str) -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        if (error := explain(exc, url, server="Postgres", setting="EGLO_DATABASE")) is not None:
            raise error from exc
        raise
