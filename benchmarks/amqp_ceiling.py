"""AMQP ceiling: plain aio-pika doing only eglo's broker work, in its own process.

Per request: consume from the `eglo.requests` quorum queue (prefetch 256), parse the JSON body,
publish the two events eglo would publish (`run.completed.<type>` with the real result of that
request's template, and `embedding.requested`) to `eglo.events` with publisher confirms, then
ack. No HTTP, no database.

    python -m benchmarks.amqp_ceiling --fixtures FILE [--prefetch 256]   # the consumer process
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractIncomingMessage

from benchmarks.harness import (
    Bench,
    Drain,
    Latency,
    declare_events_queue,
    drain_then_time,
    publish_backlog,
    spawn_module,
    template_index,
)
from producers import topology


async def serve(amqp_url: str, fixtures: list[dict[str, Any]], prefetch: int) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    connection = await aio_pika.connect_robust(
        amqp_url, client_properties={"connection_name": "bench-amqp-ceiling"}
    )
    async with connection:
        consume_channel = await connection.channel()
        await consume_channel.set_qos(prefetch_count=prefetch)
        publish_channel = await connection.channel(publisher_confirms=True)
        events = await publish_channel.get_exchange(topology.EVENTS_EXCHANGE, ensure=False)
        queue = await consume_channel.declare_queue(topology.REQUESTS_QUEUE, passive=True)
        n = len(fixtures)

        async def publish(doc: dict[str, Any], routing_key: str, event_id: str) -> None:
            await events.publish(
                aio_pika.Message(
                    orjson.dumps(doc),
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    message_id=event_id,
                    type=routing_key,
                ),
                routing_key=routing_key,
            )

        async def handle(message: AbstractIncomingMessage) -> None:
            request = orjson.loads(message.body)
            request_id = request["request_id"]
            fixture = fixtures[template_index(request_id, n)]
            run_id = uuid.uuid4()
            occurred_at = datetime.now(UTC).isoformat()
            ids = {"run_id": str(run_id), "request_id": request_id, "occurred_at": occurred_at}
            outcome_id = str(uuid.uuid5(run_id, "outcome:completed"))
            embedding_id = str(uuid.uuid5(run_id, "embedding.requested"))
            await asyncio.gather(
                publish(
                    {**fixture["outcome"], **ids, "event_id": outcome_id},
                    fixture["outcome_key"],
                    outcome_id,
                ),
                publish(
                    {**fixture["embedding"], **ids, "event_id": embedding_id},
                    "embedding.requested",
                    embedding_id,
                ),
            )
            await message.ack()

        tag = await queue.consume(handle)
        await stop.wait()
        await queue.cancel(tag)
    return 0


async def run(
    bench: Bench, fixtures_path: Path, requests: int, latency_rate: float | None,
    latency_seconds: float, prefetch: int = 256,
) -> tuple[Drain, Latency | None]:
    """Drain a backlog of `requests` (throughput, CPU), then time requests at `latency_rate`
    (None: at half the maximum just measured)."""
    async with bench.world("amqp-ceiling") as world:
        await declare_events_queue(world.amqp_url)
        await publish_backlog(world.amqp_url, bench.workload.requests(requests, "amqp"))
        process = spawn_module(
            "benchmarks.amqp_ceiling",
            ["--fixtures", str(fixtures_path), "--prefetch", str(prefetch)],
            {"EGLO_AMQP_URL": world.amqp_url},
            world.log_dir / "amqp-ceiling.log",
        )
        return await drain_then_time(
            bench, world, process, requests, latency_rate, latency_seconds, "amqp-lat",
            with_db=False,
        )


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.amqp_ceiling")
    parser.add_argument("--fixtures", required=True, type=Path)
    parser.add_argument("--prefetch", type=int, default=256)
    args = parser.parse_args()
    fixtures = orjson.loads(args.fixtures.read_bytes())
    amqp_url = os.environ["EGLO_AMQP_URL"]
    import uvloop

    return uvloop.run(serve(amqp_url, fixtures, args.prefetch))


if __name__ == "__main__":
    sys.exit(main())

