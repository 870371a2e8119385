"""Fake embeddings: perturbed twins of a request, stable vectors, an OpenAI-compatible fake API."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any

import numpy as np
from aiohttp import web

from worker.embedder.backends import (
    scenario_core,
)
from worker.runtime import health as http

PROFILE_KEYS = {
    "forecast": "historical_loads",
    "storage": "price_schedule",
    "grid_switch": "load_forecast",
}


def perturbed(request: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """The same situation measured again: profile scaled by up to 3%, 1% noise, a week apart."""
    twin = copy.deepcopy(request)
    core_type, payload = scenario_core(twin)
    key = PROFILE_KEYS[core_type]
    scale = rng.uniform(0.97, 1.03)
    payload[key] = [round(x * scale * (1 + rng.gauss(0, 0.01)), 4) for x in payload[key]]  # type: ignore[index]
    day = date.fromisoformat(twin["forecast_date"]) + timedelta(days=rng.choice((-7, 0, 7)))
    twin["forecast_date"] = day.isoformat()
    twin["request_id"] = twin["request_id"] + "-twin"
    return twin


def fake_vector(text: str, dimensions: int) -> list[float]:
    """What the fake API answers for a text: deterministic, unit length."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
    v = np.random.default_rng(seed).normal(size=dimensions)
    return (v / np.linalg.norm(v)).tolist()  # type: ignore[no-any-return]


@dataclass
class FakeEmbeddingsAPI:
    """A tiny OpenAI-compatible /v1/embeddings server; `failures` are answered first, in order."""

    url: str = ""
    api_key: str = "test-key"
    failures: list[int] = field(default_factory=list)
    batches: list[int] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            self.statuses.append(401)
            return web.json_response({"error": {"message": "bad key"}}, status=401)
        if self.failures:
            status = self.failures.pop(0)
            self.statuses.append(status)
            return web.json_response(
                {"error": {"message": "try later"}}, status=status, headers={"Retry-After": "0"}
            )
        body = await request.json()
        texts = body["input"]
        dimensions = int(body.get("dimensions", 1536))
        self.batches.append(len(texts))
        self.statuses.append(200)
        # Out of order on purpose: clients must place vectors by index.
        data = [
            {"object": "embedding", "index": i, "embedding": fake_vector(t, dimensions)}
            for i, t in enumerate(texts)
        ][::-1]
        return web.json_response({"object": "list", "data": data, "model": body["model"]})


@contextlib.asynccontextmanager
async def running_fake_api() -> AsyncIterator[FakeEmbeddingsAPI]:
    """The fake API on a free loopback port, for as long as the block runs."""
    api = FakeEmbeddingsAPI()
    app = web.Application()
    app.router.add_post("/v1/embeddings", api.handle)
    runner, port = await http.start(app, "127.0.0.1", 0)
    api.url = f"http://127.0.0.1:{port}/v1"
    try:
        yield api
    finally:
        await runner.cleanup()
