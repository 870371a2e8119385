"""Shared pieces of the API tests: tokens, the app on the real broker and database, samples."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import uvicorn

from producers.sample import generate_requests
from worker.api.app import create_app
from worker.api.auth import TokenTable
from worker.api.state import ApiState
from worker.settings import Settings

READER = "reader-token-0123456789abcdef"
SUBMITTER = "submitter-token-0123456789abcdef"
OPERATOR = "operator-token-0123456789abcdef"
TOKENS_TEXT = f"""# name role token
ana reader {READER}
sam submitter {SUBMITTER}
olga operator {OPERATOR}
"""
API_TABLES = ("api_submissions", "audit_log")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def tokens() -> TokenTable:
    return TokenTable.parse(TOKENS_TEXT)


async def empty_api_tables(pool: asyncpg.Pool) -> None:
    await pool.execute(f"TRUNCATE {', '.join(API_TABLES)}")


@contextlib.asynccontextmanager
async def api_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The app in this event loop through httpx's ASGI transport, on its own connections."""
    async with ApiState.open(settings) as state:
        app = create_app(settings, tokens(), state=state)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://eglo.test", timeout=60
        ) as client:
            yield client


def sample(request_type: str, *, seed: int = 3, prefix: str = "api") -> dict[str, Any]:
    """A valid request body of one type, from the sample generator."""
    for doc in generate_requests(8, seed, id_prefix=prefix):
        if doc["request_type"] == request_type:
            return doc
    raise LookupError(request_type)


@contextlib.asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[str]:
    """The API under a real uvicorn in this event loop; yields its base URL."""
    async with ApiState.open(settings) as state:
        app = create_app(settings, tokens(), state=state)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        server = uvicorn.Server(
            uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
        )
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.02)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
            await task
            sock.close()
