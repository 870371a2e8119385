"""The asyncpg pool, with JSON and pgvector codecs registered on every connection."""

from __future__ import annotations

from typing import Any

import asyncpg
import orjson
from pgvector.asyncpg import register_vector


async def _init_connection(conn: asyncpg.Connection) -> None:
    for pg_type in ("json", "jsonb"):
        await conn.set_type_codec(
            pg_type,
            schema="pg_catalog",
            encoder=lambda v: orjson.dumps(v).decode(),
            decoder=orjson.loads,
        )
    # The extension is created by the first migration; before it, there is no type to register.
    if await conn.fetchval("SELECT 1 FROM pg_type WHERE typname = 'vector'"):
        await register_vector(conn)


class _NoResetConnection(asyncpg.Connection):  # type: ignore[misc]
    """Skips the session reset query on every release back to the pool.

    eglo's pooled connections keep no session state (no LISTEN, no cursors, no session advisory
    locks, no SET outside a transaction), and the reset was a whole extra round trip per
    acquire. Open transactions are still rolled back by asyncpg regardless.
    """

    def get_reset_query(self) -> str:
        return ""


async def create_pool(url: str, *, size: int = 8, **kwargs: Any) -> asyncpg.Pool:
    kwargs.setdefault("connection_class", _NoResetConnection)
    pool = await asyncpg.create_pool(
        url, min_size=min(2, size), max_size=size, init=_init_connection, **kwargs
    )
    assert pool is not None
    return pool


async def connect(url: str) -> asyncpg.Connection:
    conn = await asyncpg.connect(url)
    await _init_connection(conn)
    return conn
