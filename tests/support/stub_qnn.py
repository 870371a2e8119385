"""Tiny real HTTP servers standing in for a misbehaving QNN, one behaviour each."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

Handler = Callable[[dict[str, Any]], Awaitable[web.Response]]


@dataclass
class StubQnn:
    url: str
    calls: list[dict[str, Any]] = field(default_factory=list)


@contextlib.asynccontextmanager
async def stub_qnn(handler: Handler) -> AsyncIterator[StubQnn]:
    """Serve `handler` as the predict endpoint (health always answers 200)."""
    stub = StubQnn(url="")

    async def predict(request: web.Request) -> web.Response:
        body = await request.json()
        stub.calls.append(body)
        return await handler(body)

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.add_routes(
        [web.post("/api/v1/predictions/predict", predict), web.get("/api/v1/health/simple", health)]
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    stub.url = f"http://127.0.0.1:{port}"
    try:
        yield stub
    finally:
        await runner.cleanup()


async def wrong_length_forecast(body: dict[str, Any]) -> web.Response:
    return web.json_response({"success": True, "data": {"prediction": {"forecast": [1.0]}}})


async def validation_error(body: dict[str, Any]) -> web.Response:
    return web.json_response({"success": False, "error": {"code": "validation_error"}}, status=422)


async def always_unavailable(body: dict[str, Any]) -> web.Response:
    return web.json_response({"error": "maintenance"}, status=503)
