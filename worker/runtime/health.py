"""The metrics port: `/metrics` for Prometheus, `/healthz` (alive) and `/readyz` (can work)."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from worker.observability.metrics import Metrics


def build_app(metrics: Metrics, ready: Callable[[], tuple[bool, str]]) -> web.Application:
    # eglo_ready mirrors /readyz at every scrape, so alerts see readiness without probing it.
    metrics.ready.set_function(lambda: 1.0 if ready()[0] else 0.0)

    async def metrics_view(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def healthz(_: web.Request) -> web.Response:
        # Answering at all shows the event loop is not stuck.
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        ok, detail = ready()
        return web.json_response(
            {"status": "ready" if ok else "not_ready", "detail": detail}, status=200 if ok else 503
        )

    app = web.Application()
    app.add_routes(
        [
            web.get("/metrics", metrics_view),
            web.get("/healthz", healthz),
            web.get("/readyz", readyz),
        ]
    )
    return app


async def start(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve app; returns the runner (to clean up) and the bound port (port 0 picks one)."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    # aiohttp does not expose the bound port; port 0 (tests) needs it.
    sockets = getattr(site._server, "sockets", None) or []
    bound = sockets[0].getsockname()[1] if sockets else port
    return runner, int(bound)
