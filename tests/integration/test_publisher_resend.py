"""The Publisher sends again what the broker did not take (issue 13): a publish in flight when its
channel goes is confirmed on the next one, and a nacked one is sent again on a new channel until
the broker takes it, or raises once `resend_within_s` have passed. On the local broker; the node
losses themselves are in tests/chaos/test_cluster.py."""

from __future__ import annotations

import asyncio

import aio_pika
import pytest
from aiormq.exceptions import DeliveryError

from producers import broker
from producers.publisher import Publisher
from producers.reader import parse_request
from producers.sample import generate_requests
from producers.topology import REQUESTS_QUEUE


async def test_a_batch_outlives_its_channel_being_replaced(amqp_url: str) -> None:
    docs = generate_requests(300, seed=13, id_prefix="resend")
    renewing: list[asyncio.Task[bool]] = []

    async with Publisher.connect(amqp_url) as publisher:
        first = await publisher._channel.get_underlay_channel()
        done = 0

        def on_done() -> None:
            nonlocal done
            done += 1
            if done == 50:
                # Mid-batch, with publishes awaiting their confirms on the channel that goes.
                renew = broker.renew_channel(publisher._channel)
                renewing.append(asyncio.get_running_loop().create_task(renew))

        report = await publisher.publish_many(
            (parse_request(d) for d in docs), window=256, on_done=on_done
        )
        assert await renewing[0]
        assert await publisher._channel.get_underlay_channel() is not first
        assert publisher.resent >= 1
    assert report.failed == []
    assert sorted(report.confirmed) == sorted(d["request_id"] for d in docs)
    connection = await broker.connect_broker(amqp_url, name="resend-check")
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(REQUESTS_QUEUE, passive=True)
        seen = set()
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            seen.add(message.message_id)
    assert seen == {d["request_id"] for d in docs}


async def _full_queue(amqp_url: str) -> tuple[aio_pika.abc.AbstractRobustConnection, str]:
    """An exchange routed to a quorum queue that holds one message and nacks the next."""
    connection = await broker.connect_broker(amqp_url, name="resend-setup")
    channel = await connection.channel()
    exchange = await channel.declare_exchange("resend.x", aio_pika.ExchangeType.FANOUT)
    queue = await channel.declare_queue(
        "resend.full",
        durable=True,
        arguments={"x-queue-type": "quorum", "x-max-length": 1, "x-overflow": "reject-publish"},
    )
    await queue.bind(exchange)
    for _ in range(10):  # until the queue is full and says so (a quorum queue may take one more)
        try:
            await exchange.publish(aio_pika.Message(b"filler"), routing_key="")
        except DeliveryError:
            break
    else:
        raise AssertionError("the queue never refused a publish")
    return connection, exchange.name


async def test_a_nacked_publish_is_sent_again_on_a_new_channel(amqp_url: str) -> None:
    setup, name = await _full_queue(amqp_url)
    connection = await broker.connect_broker(amqp_url, name="resend-publisher")
    async with setup, connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(name)
        publisher = Publisher(channel, exchange, resend_within_s=60)
        first = await channel.get_underlay_channel()
        publishing = asyncio.create_task(publisher.publish_raw(b"second", ""))
        while publisher.resent == 0:
            assert not publishing.done(), publishing
            await asyncio.sleep(0.01)
        # The queue takes it once there is room: the publish is then confirmed.
        purge = await setup.channel()
        await (await purge.declare_queue("resend.full", passive=True)).purge()
        await publishing
        assert await channel.get_underlay_channel() is not first


async def test_a_publish_never_taken_raises_after_resend_within_s(amqp_url: str) -> None:
    setup, name = await _full_queue(amqp_url)
    connection = await broker.connect_broker(amqp_url, name="resend-publisher")
    async with setup, connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(name)
        publisher = Publisher(channel, exchange, resend_within_s=1.0)
        with pytest.raises(DeliveryError):
            await publisher.publish_raw(b"second", "")
        assert publisher.resent >= 1
