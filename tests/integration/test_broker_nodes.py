"""EGLO_AMQP_URL as a list of nodes: parsing, TLS options per node, connecting to a live node,
and failing over to the next node when the connection is lost."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import aio_pika
import pytest
from pydantic import SecretStr, ValidationError

from producers.broker import (
    BrokerUrlError,
    FailoverConnection,
    broker_urls,
    connect_broker,
    node_address,
)
from worker.observability.metrics import Metrics
from worker.ops.processes import free_port
from worker.runtime import connections
from worker.runtime.gates import BrokerWatch
from worker.settings import Settings


def test_single_url_unchanged() -> None:
    assert broker_urls("amqp://u:p@h:5672/v?heartbeat=5") == ["amqp://u:p@h:5672/v?heartbeat=5"]


def test_bare_entries_inherit_the_first_entrys_credentials_vhost_and_query() -> None:
    urls = broker_urls("amqps://u:p%2Cq@a:5671/v%2F1?heartbeat=5, b:6000 ,c")
    assert urls == [
        "amqps://u:p%2Cq@a:5671/v%2F1?heartbeat=5",
        "amqps://u:p%2Cq@b:6000/v%2F1?heartbeat=5",
        "amqps://u:p%2Cq@c:5671/v%2F1?heartbeat=5",
    ]


def test_whole_url_entries_stand_on_their_own() -> None:
    urls = broker_urls("amqp://u:p@a/,amqp://x:y@b:5673/w")
    assert urls[1] == "amqp://x:y@b:5673/w"
    assert node_address(urls[0]) == "a:5672"


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("a:5672,b:5672", "first entry"),
        ("amqp://u:p@a/,,b", "empty entry"),
        ("amqp://u:p@a/,b/vhost", "write host"),
        ("amqp://u:p@a/,http://b", "not an AMQP URL"),
        ("amqp://u:p@a/,b:port", "b:port"),
    ],
)
def test_bad_lists_refused_with_a_reason(value: str, words: str) -> None:
    with pytest.raises(BrokerUrlError, match=words):
        broker_urls(value)


def test_settings_refuse_a_bad_list_at_start() -> None:
    with pytest.raises(ValidationError, match="first entry"):
        Settings(amqp_url=SecretStr("rabbit-0:5672,rabbit-1:5672"))


def test_tls_options_go_to_every_node(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    settings = Settings(amqp_url=SecretStr("amqps://u:p@a:5671/,b,c:5999"), amqp_ca_file=ca)
    urls = connections.amqp_url(settings).split(",")
    assert [urlsplit(u).netloc for u in urls] == ["u:p@a:5671", "u:p@b:5671", "u:p@c:5999"]
    assert all(f"cafile={str(ca).replace('/', '%2F')}" in u for u in urls)


def test_tls_files_need_amqps_on_every_node(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    with pytest.raises(ValidationError, match="amqp://, not amqps://"):
        Settings(amqp_url=SecretStr("amqps://u:p@a/,amqp://u:p@b/"), amqp_ca_file=ca)


class _Proxy:
    """A TCP proxy to the broker: a second 'node' whose loss can be staged."""

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self._target_port = target_port
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target_port)
        self._writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def kill(self) -> None:
        """The node is gone: refuse new connections, cut the open ones."""
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        await self._server.wait_closed()


@contextlib.asynccontextmanager
async def _proxy(amqp_url: str) -> AsyncIterator[_Proxy]:
    proxy = _Proxy(urlsplit(amqp_url).port or 5672)
    await proxy.start()
    try:
        yield proxy
    finally:
        with contextlib.suppress(Exception):
            await proxy.kill()


def _with_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    return parts._replace(netloc=f"{parts.netloc.rpartition('@')[0]}@127.0.0.1:{port}").geturl()


async def test_connects_to_a_live_node_when_the_first_is_down(amqp_url: str) -> None:
    dead = _with_port(amqp_url, free_port())
    connection = await connect_broker(f"{dead},{amqp_url}", name="t", shuffle=False)
    async with connection:
        assert isinstance(connection, FailoverConnection)
        assert connection.node == node_address(amqp_url)


async def test_no_live_node_raises_the_error_of_the_last_one(amqp_url: str) -> None:
    dead = [_with_port(amqp_url, free_port()) for _ in range(2)]
    with pytest.raises(ConnectionError):
        await connect_broker(",".join(dead), name="t", shuffle=False)


async def test_fails_over_to_the_next_node_when_its_node_is_lost(amqp_url: str) -> None:
    async with _proxy(amqp_url) as proxy:
        first = _with_port(amqp_url, proxy.port)
        connection = await connect_broker(
            f"{first},{amqp_url}", name="t", shuffle=False, reconnect_interval=5
        )
        async with connection:
            assert isinstance(connection, FailoverConnection)
            watch = BrokerWatch(connection, Metrics())
            restored = asyncio.Event()

            async def on_restore() -> None:
                restored.set()

            watch.subscribe(on_restore)
            channel = await connection.channel()
            queue = await channel.declare_queue("", exclusive=True)
            assert connection.node == f"127.0.0.1:{proxy.port}"
            await proxy.kill()
            # Not the dead node again and again: the live one, well before reconnect_interval.
            await asyncio.wait_for(restored.wait(), timeout=4)
            assert connection.node == node_address(amqp_url)
            assert watch.problem() is None
            await channel.default_exchange.publish(
                aio_pika.Message(b"x"), routing_key=queue.name
            )
            assert (await queue.get(timeout=5)).body == b"x"


async def test_processes_spread_over_the_nodes(amqp_url: str) -> None:
    """connect_broker tries the nodes in a shuffled order: each is someone's first choice."""
    async with _proxy(amqp_url) as a, _proxy(amqp_url) as b:
        url = f"{_with_port(amqp_url, a.port)},{_with_port(amqp_url, b.port)},{amqp_url}"
        chosen = set()
        for _ in range(20):
            connection = await connect_broker(url, name="t")
            async with connection:
                assert isinstance(connection, FailoverConnection)
                chosen.add(connection.node)
    assert len(chosen) == 3
