"""What one `eglo api` process holds: the database pool, the broker connection with a confirming
publisher, the reply queue its `?wait=` submissions listen on, and the QNN client."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import orjson
import structlog
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from producers import topology
from producers.broker import connect_broker
from producers.publisher import Publisher
from worker.runtime import connections
from worker.runtime.connections import database_url, open_pool
from worker.runtime.qnn import make_http_client
from worker.settings import Settings

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class ReplyMessage:
    """A reply the worker sent to our reply queue: a run outcome or `request.dead_lettered`."""

    event_type: str
    body: dict[str, Any]


class ReplyWaiter:
    """One exclusive reply queue per API process; replies are matched by `correlation_id`.

    The queue is named by eglo (not by the server), so a restored robust connection declares it
    again under the same name. A reply nobody waits for any more (its `?wait=` ran out) is
    dropped: the run is in the database either way.
    """

    def __init__(self) -> None:
        self.queue_name = f"eglo.api.replies.{uuid.uuid4().hex}"
        self._pending: dict[str, asyncio.Future[ReplyMessage]] = {}

    async def start(self, connection: AbstractRobustConnection) -> None:
        channel = await connection.channel()
        queue = await channel.declare_queue(self.queue_name, exclusive=True, auto_delete=True)
        await queue.consume(self._on_message, no_ack=True)

    def expect(self, correlation_id: str) -> asyncio.Future[ReplyMessage]:
        future: asyncio.Future[ReplyMessage] = asyncio.get_running_loop().create_future()
        self._pending[correlation_id] = future
        return future

    def forget(self, correlation_id: str) -> None:
        self._pending.pop(correlation_id, None)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        future = self._pending.get(message.correlation_id or "")
        if future is None or future.done():
            return  # nobody waits (any more), or a repeated reply
        try:
            body = orjson.loads(message.body)
        except orjson.JSONDecodeError:
            log.warning("api.reply.unreadable", correlation_id=message.correlation_id)
            return
        if isinstance(body, dict):
            future.set_result(ReplyMessage(str(message.type or body.get("event_type")), body))


@dataclass
class ApiState:
    settings: Settings
    pool: asyncpg.Pool
    connection: AbstractRobustConnection
    publisher: Publisher
    replies: ReplyWaiter
    qnn: httpx.AsyncClient

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, settings: Settings) -> AsyncIterator[ApiState]:
        pool = await open_pool(database_url(settings), size=settings.api_db_pool_size)
        try:
            connection = await connect_broker(
                connections.amqp_url(settings),
                name="eglo-api",
                reconnect_interval=settings.amqp_reconnect_interval_s,
                backoff_max_s=settings.amqp_reconnect_max_s,
            )
            async with connection, make_http_client(settings) as qnn:
                channel = await connection.channel(publisher_confirms=True)
                topo = await topology.declare(channel)
                replies = ReplyWaiter()
                await replies.start(connection)
                yield cls(
                    settings=settings,
                    pool=pool,
                    connection=connection,
                    # An HTTP caller waits: resend for a few seconds only, then 503 (send again).
                    publisher=Publisher(channel, topo.requests_exchange, resend_within_s=5.0),
                    replies=replies,
                    qnn=qnn,
                )
        finally:
            await pool.close()
