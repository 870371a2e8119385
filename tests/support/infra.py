"""Where the tests' real broker and database come from.

Order of preference: EGLO_AMQP_URL / EGLO_DATABASE_URL when set; testcontainers when a Docker
engine answers; otherwise the local RabbitMQ (started if it is down) and an embedded Postgres.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote


def docker_engine_available() -> bool:
    try:
        import docker

        docker.from_env(timeout=2).ping()
    except Exception:  # noqa: BLE001 - any failure means: no engine to use
        return False
    return True


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    with socket.socket() as sock:
        sock.settimeout(timeout)
        return sock.connect_ex((host, port)) == 0


def ensure_local_rabbitmq(timeout_s: float = 60.0) -> None:
    """Start the machine's RabbitMQ if nothing listens on 5672, and wait until it accepts."""
    if port_open("127.0.0.1", 5672):
        return
    subprocess.run(["rabbitmq-server", "-detached"], check=False)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if port_open("127.0.0.1", 5672):
            subprocess.run(["rabbitmqctl", "await_startup"], check=False, capture_output=True)
            return
        time.sleep(0.5)
    raise RuntimeError("RabbitMQ did not start on 127.0.0.1:5672")


def rabbitmqctl(*args: str) -> None:
    # The CLI takes a distribution port from a small range shared by every rabbitmqctl on the
    # machine; a busy moment refuses it (exit 64), so a few tries before giving up.
    for attempt in range(5):
        done = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True)
        if done.returncode == 0 or attempt == 4:
            break
        time.sleep(0.5 * (attempt + 1))
    done.check_returncode()


@contextlib.contextmanager
def fresh_vhost(broker: Broker | None = None) -> Iterator[str]:
    """A throwaway vhost, so tests never see each other's queues."""
    broker = broker or Broker()
    vhost = f"eglo-test-{uuid.uuid4().hex[:10]}"
    broker.ctl("add_vhost", vhost)
    broker.ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    try:
        yield f"{broker.base_url}{quote(vhost, safe='')}"
    finally:
        with contextlib.suppress(Exception):
            broker.ctl("delete_vhost", vhost)


class Broker:
    """The local RabbitMQ, or one in a container; `ctl` runs rabbitmqctl against it."""

    def __init__(
        self, base_url: str = "amqp://guest:guest@127.0.0.1:5672/", container: Any = None
    ) -> None:
        self.base_url = base_url
        self._container = container

    def ctl(self, *args: str) -> None:
        if self._container is None:
            rabbitmqctl(*args)
            return
        code, output = self._container.exec_run(["rabbitmqctl", "-q", *args])
        if code != 0:
            raise RuntimeError(f"rabbitmqctl {args} failed: {output!r}")


@contextlib.contextmanager
def rabbitmq_broker() -> Iterator[Broker]:
    """A broker for the session: a testcontainer when a Docker engine answers, else local."""
    if not docker_engine_available():
        ensure_local_rabbitmq()
        yield Broker()
        return
    from testcontainers.rabbitmq import RabbitMqContainer

    with RabbitMqContainer("rabbitmq:3.13") as container:
        host = container.get_container_host_ip()
        port = container.get_exposed_port(5672)
        yield Broker(f"amqp://guest:guest@{host}:{port}/", container.get_wrapped_container())


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """A Postgres with pgvector for the session: configured, containerised, or embedded."""
    if url := os.environ.get("EGLO_DATABASE_URL"):
        yield url
        return
    if docker_engine_available():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("pgvector/pgvector:pg17", driver=None) as pg:
            yield pg.get_connection_url()
        return
    import pgserver

    # Short path: the server's Unix socket lives in the data dir and socket paths are limited.
    data_dir = Path(tempfile.mkdtemp(prefix="eglo-pg-"))
    server = pgserver.get_server(data_dir, cleanup_mode="delete")
    try:
        yield str(server.get_uri())
    finally:
        server.cleanup()
        shutil.rmtree(data_dir, ignore_errors=True)


def with_database(url: str, database: str) -> str:
    """The same server URL, pointing at another database (keeps query parameters like host)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))
