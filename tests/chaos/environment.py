"""Throwaway broker vhosts and a Postgres of the suite's own, which it may stop and start."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg

from db.migrate import migrate
from db.pool import connect
from tests.support import infra


class ChaosDatabase:
    """An embedded Postgres in a temp dir, so stopping it (scenario 3) harms nothing else."""

    def __init__(self) -> None:
        import pgserver

        self._dir = Path(tempfile.mkdtemp(prefix="eglo-chaos-pg-"))
        self._server: Any = pgserver.get_server(self._dir, cleanup_mode="delete")
        self.server_url = str(self._server.get_uri())

    def stop(self) -> None:
        from pgserver import pg_ctl

        pg_ctl(["-w", "stop", "-m", "immediate"], pgdata=self._dir, user="pgserver")

    def start(self) -> None:
        self._server.ensure_postgres_running()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._server.cleanup()
        shutil.rmtree(self._dir, ignore_errors=True)

    async def fresh_database(self) -> str:
        name = f"chaos_{uuid.uuid4().hex[:8]}"
        conn = await asyncpg.connect(self.server_url)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        url = infra.with_database(self.server_url, name)
        conn = await connect(url)
        try:
            await migrate(conn)
        finally:
            await conn.close()
        return url


@contextlib.contextmanager
def chaos_database() -> Iterator[ChaosDatabase]:
    db = ChaosDatabase()
    try:
        yield db
    finally:
        db.close()


def close_broker_connections(vhost: str) -> None:
    subprocess.run(
        ["rabbitmqctl", "-q", "close_all_connections", "--vhost", vhost, "chaos"],
        check=True,
        capture_output=True,
    )


async def refuse_broker(vhost: str, down_s: float) -> None:
    """The broker goes away for this run's clients: their user loses the vhost and every
    connection to it is closed, for down_s; then the user is let back in. The machine's shared
    node is never stopped (other runs use it); the cluster scenarios stop nodes of their own."""
    await _rabbitmqctl("clear_permissions", "-p", vhost, "guest")
    await _rabbitmqctl("close_all_connections", "--vhost", vhost, "chaos: broker away")
    await asyncio.sleep(down_s)
    await _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")


async def _rabbitmqctl(*args: str) -> None:
    process = await asyncio.create_subprocess_exec(
        "rabbitmqctl",
        "-q",
        *args,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    if await process.wait() != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed")
