"""`eglo api` as a process: it opens its own connections in the ASGI lifespan, serves, keeps
tokens out of its logs, and exits 0 on SIGTERM. Without a tokens file it refuses to start."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

import asyncpg
import httpx

from tests.support.api_support import OPERATOR, SUBMITTER, TOKENS_TEXT, bearer, sample
from tests.support.harness import wait_for

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _environment(amqp_url: str, database_url: str, emulator: str, tokens: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EGLO_")}
    env.update(
        EGLO_AMQP_URL=amqp_url,
        EGLO_DATABASE_URL=database_url,
        EGLO_QNN_URL=emulator,
        EGLO_API_HOST="127.0.0.1",
        EGLO_API_TOKENS_FILE=str(tokens),
        EGLO_LOG_JSON="true",
        EGLO_LOG_LEVEL="DEBUG",
    )
    return env


async def test_api_process_serves_hides_tokens_and_stops_on_sigterm(
    amqp_url: str, database_url: str, pool: asyncpg.Pool, emulator: str, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKENS_TEXT)
    port = _free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker.cli",
        "api",
        "--port",
        str(port),
        env=_environment(amqp_url, database_url, emulator, tokens),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:

            async def ready() -> bool:
                try:
                    return (await client.get("/readyz")).status_code == 200
                except httpx.TransportError:
                    return False

            await wait_for(ready, within_s=30)
            health = (await client.get("/health")).json()
            assert health["status"] == "ok", health
            response = await client.post(
                "/forecast", json=sample("forecast", prefix="proc"), headers=bearer(SUBMITTER)
            )
            assert response.status_code == 202, response.text
            assert (await client.get("/runs", headers=bearer("w" * 40))).status_code == 401
            audit = await client.post(
                "/dead-letters/replay", json={"limit": 1}, headers=bearer(OPERATOR)
            )
            assert audit.json() == {"replayed": 0, "kept": 0}
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(process.communicate(), timeout=30)
    log = output.decode()
    assert process.returncode == 0, log[-3000:]
    assert "api.submitted" in log
    for secret in (SUBMITTER, OPERATOR, "w" * 40):
        assert secret not in log


async def test_api_refuses_to_start_without_tokens(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EGLO_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker.cli",
        "api",
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 2
    assert "EGLO_API_TOKENS_FILE is not set" in err.decode()
