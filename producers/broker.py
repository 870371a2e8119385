"""Several broker nodes behind one EGLO_AMQP_URL, and a robust connection that fails over.

`EGLO_AMQP_URL` is one URL or a comma-separated list of a cluster's nodes:

    amqp://eglo:secret@rabbit-0:5672/eglo,rabbit-1:5672,rabbit-2

The first entry is a whole URL. A later entry is either `host[:port]`, which inherits the first
entry's scheme, user, password, vhost and query (the port defaults to the scheme's), or a whole
URL of its own, used as written. Connection options that aio-pika reads once (heartbeat, timeouts)
come from the first entry. A comma inside a password or vhost is written `%2C`.

`FailoverConnection` is aio-pika's RobustConnection with one change: every connection attempt goes
to the next node of the process's own (shuffled) order, so a lost node is tried last instead of
forever, and the pause between rounds (once every node refused) is jittered, and grows up to
`backoff_max_s` when that is above the base interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import structlog
from aio_pika import RobustConnection
from aio_pika.abc import AbstractRobustConnection
from yarl import URL

from producers.tls import explain

log = structlog.get_logger(__name__)

_DEFAULT_PORTS = {"amqp": 5672, "amqps": 5671}


class BrokerUrlError(ValueError):
    """EGLO_AMQP_URL cannot be read as one URL or a list of nodes."""


def broker_urls(value: str) -> list[str]:
    """The nodes of EGLO_AMQP_URL, each as a whole URL (bare `host:port` entries filled in)."""
    entries = [entry.strip() for entry in value.split(",")]
    if not entries or any(not entry for entry in entries):
        raise BrokerUrlError("EGLO_AMQP_URL has an empty entry (two commas, or a trailing one)")
    first = urlsplit(entries[0])
    if first.scheme.lower() not in _DEFAULT_PORTS or not first.hostname:
        raise BrokerUrlError(
            "EGLO_AMQP_URL's first entry must be a whole amqp:// or amqps:// URL, "
            f"got scheme {first.scheme or 'none'!r}"
        )
    userinfo = first.netloc.rpartition("@")[0]
    urls = [entries[0]]
    for entry in entries[1:]:
        if "://" in entry:
            parts = urlsplit(entry)
            if parts.scheme.lower() not in _DEFAULT_PORTS or not parts.hostname:
                raise BrokerUrlError(f"EGLO_AMQP_URL entry {_safe(entry)!r} is not an AMQP URL")
            urls.append(entry)
            continue
        if "/" in entry or "@" in entry or "?" in entry:
            raise BrokerUrlError(
                f"EGLO_AMQP_URL entry {_safe(entry)!r}: write host[:port], or a whole URL"
            )
        host = entry
        try:
            port = urlsplit(f"//{host}").port
        except ValueError as exc:
            raise BrokerUrlError(f"EGLO_AMQP_URL entry {entry!r}: {exc}") from None
        if port is None:
            host = f"{host}:{first.port or _DEFAULT_PORTS[first.scheme.lower()]}"
        netloc = f"{userinfo}@{host}" if userinfo else host
        urls.append(urlunsplit(first._replace(netloc=netloc)))
    return urls


def node_address(url: URL | str) -> str:
    """host:port of a node URL, for logs (never the credentials)."""
    parsed = URL(str(url))
    port = parsed.port or _DEFAULT_PORTS.get(parsed.scheme.lower(), 5672)
    return f"{parsed.host}:{port}"


def _safe(entry: str) -> str:
    return entry.rpartition("@")[2]


class FailoverConnection(RobustConnection):
    """A RobustConnection over several nodes: each attempt goes to the next node in turn."""

    def __init__(
        self,
        nodes: Sequence[str],
        *,
        backoff_max_s: float = 30.0,
        **kwargs: Any,
    ) -> None:
        self._nodes = [URL(node) for node in nodes]
        self._index = 0
        self._backoff_max_s = backoff_max_s
        self._base_s = 1.0
        self._delay_s = 1.0
        self._failures = 0  # consecutive failed attempts, over all nodes
        self._connected_to: int | None = None
        self._lost = False
        super().__init__(self._nodes[0], **kwargs)

    @property
    def reconnect_interval(self) -> float:
        """The pause before the next attempt, set by the last one (jittered, see _after)."""
        return self._delay_s

    @reconnect_interval.setter
    def reconnect_interval(self, value: float) -> None:
        self._base_s = self._delay_s = float(value)

    @property
    def node(self) -> str:
        """host:port of the node connected to (or being tried)."""
        return node_address(self._nodes[self._index])

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        if self._connected_to is not None and not self._close_called:
            # Lost: the next attempt goes to the next node, the lost one comes last.
            self._index = (self._connected_to + 1) % len(self._nodes)
            self._connected_to = None
            self._lost = True
        await super()._on_connection_close(closing)

    async def _RobustConnection__connect_transport(self) -> None:
        """One attempt, on the current node (aio-pika's reconnect loop calls this)."""
        if self._lost and len(self._nodes) > 1:
            # Spread the reconnects of many processes that lost the same node.
            await asyncio.sleep(random.uniform(0, min(self._base_s, 0.5)))
        self._lost = False
        self.url = self._nodes[self._index]
        try:
            await RobustConnection._RobustConnection__connect_transport(self)  # type: ignore[attr-defined]
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                self._failed(exc)
            raise
        self._connected_to = self._index
        self._failures = 0
        # aio-pika's loop sleeps this long after a successful attempt too, before it listens for
        # the next loss: no pause there, so a node lost soon after a reconnect is left at once.
        self._delay_s = 0.0
        log.info("broker.connected", node=self.node, nodes=len(self._nodes))

    def _failed(self, exc: BaseException) -> None:
        self._failures += 1
        failed = self.node
        self._index = (self._index + 1) % len(self._nodes)
        rounds = (self._failures - 1) // len(self._nodes)
        if self._failures % len(self._nodes) != 0:
            # The next node at once, or nearly: only a whole round of refusals means waiting.
            self._delay_s = random.uniform(0, min(self._base_s, 0.5))
        else:
            # Doubling per round up to backoff_max_s; never below the base interval.
            ceiling = max(self._base_s, min(self._backoff_max_s, self._base_s * 2**rounds))
            self._delay_s = random.uniform(ceiling / 2, ceiling)
        log.warning(
            "broker.connect.failed",
            node=failed,
            next_node=self.node,
            retry_in_s=round(self._delay_s, 2),
            error=repr(exc)[:200],
        )


async def connect_broker(
    url: str, *, name: str, shuffle: bool = True, **kwargs: Any
) -> AbstractRobustConnection:
    """A robust connection to any live node of `url` (one URL or a comma-separated list, see
    producers/broker.py), tried in a shuffled order so processes spread over the nodes; after a loss
    it fails over to the next node. kwargs go to the connection (e.g. reconnect_interval,
    backoff_max_s). A failed TLS handshake raises TlsError at once; if no node answers, the
    last node's error is raised."""
    nodes = broker_urls(url)
    if shuffle:
        random.shuffle(nodes)
    last: Exception | None = None
    for start in range(len(nodes)):
        order = nodes[start:] + nodes[:start]
        connection = FailoverConnection(
            order, client_properties={"connection_name": name}, **kwargs
        )
        try:
            await connection.connect()
            return connection
        except Exception as exc:
            await connection.close()
            if (
                error := explain(exc, order[0], server="the broker", setting="EGLO_AMQP")
            ) is not None:
                raise error from exc
            last = exc
    assert last is not None
    raise last
class ChannelRenewed(Exception):
    """Why a channel was closed by `renew_channel` (its robust channel opens a new one)."""


async def renew_channel(
    channel: Any, failed: Any = None, *, wait_s: float = 10.0, min_interval_s: float = 1.0
) -> bool:
    """Replace `channel`'s channel on the broker with a new one; True if it did.

    After a node is lost, RabbitMQ (3.10.8 here) can leave a channel opened on a surviving node
    nacking every publish to a quorum queue for as long as it lives, while a new channel on the
    same connection publishes fine (measured: chaos/test_cluster.py, issue 13). aio-pika restores
    a channel only when it is closed, so a publisher that only retries keeps retrying on the
    broken one. Closing the channel underneath makes the robust channel open a new one; this
    waits until it has (at most `wait_s`, see `channel_ready`). `failed` is the underlying
    channel a publish failed on: if it has been replaced already (many publishes fail at once),
    or the channel was renewed less than `min_interval_s` ago, nothing is done. A channel that
    is not robust would stay closed, so it is left alone.
    """
    if not hasattr(channel, "reopen_callbacks"):  # not an aio-pika RobustChannel
        return False
    current = await channel.get_underlay_channel()
    last = getattr(channel, "_eglo_renewed_at", 0.0)
    now = time.monotonic()
    if (failed is not None and current is not failed) or current.is_closed:
        return False
    if now - last < min_interval_s:
        await channel_ready(channel, wait_s=min(wait_s, min_interval_s))
        return False
    channel._eglo_renewed_at = now
    log.warning("broker.channel.renewed", channel=current.number)
    with contextlib.suppress(Exception):
        await current.close(ChannelRenewed("publishes nacked or unconfirmed: a new channel"))
    await channel_ready(channel, wait_s=wait_s)
    return True


async def channel_ready(channel: Any, *, wait_s: float) -> bool:
    """Wait up to `wait_s` for a robust channel to be usable again; True if it is.

    aio-pika reopens a closed channel from the channel's close callback, once; if that attempt
    fails (the connection was failing over at that moment: its restore raises and is only
    logged), the channel stays closed until the connection itself is lost again. So while the
    connection is up and the channel is not, the restore is asked for again, once a second.
    """
    ready = getattr(channel, "ready", None)
    if ready is None:  # not robust: nothing brings it back
        return not channel.is_closed
    deadline = time.monotonic() + wait_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        try:
            async with asyncio.timeout(min(left, 1.0)):
                await ready()
            return True
        except TimeoutError:
            pass
        connection = getattr(channel, "_connection", None)
        if connection is not None and connection.connected.is_set():
            with contextlib.suppress(Exception):
                async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                    await channel.restore()
