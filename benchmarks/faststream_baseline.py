"""The baseline: eglo's pipeline written the straightforward way with FastStream (not part of eglo).

One FastStream subscriber on the `eglo.requests` quorum queue (prefetch 64), and per message:
validate the request (eglo's pydantic contract) → one httpx call to the QNN → check the result
(eglo's checks) → one transaction writing the same rows eglo writes (run, metrics, the two event
rows, stored as published since they are sent right after the commit) → publish the two events
with confirms → ack (FastStream acks when the handler returns, requeues on an exception).
Default asyncio loop, FastStream's default logging, httpx's own pool, an asyncpg pool of 8.

    EGLO_AMQP_URL=... EGLO_DATABASE_URL=... EGLO_QNN_URL=... \
        python -m benchmarks.faststream_baseline
"""

from __future__ import annotations

import asyncio
import os
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import orjson
from faststream import FastStream
from faststream.middlewares import AckPolicy
from faststream.rabbit import (
    Channel,
    ExchangeType,
    QueueType,
    RabbitBroker,
    RabbitExchange,
    RabbitMessage,
    RabbitQueue,
)

from contracts.events import EMBEDDING_REQUESTED, EmbeddingRequested, RunOutcome
from contracts.qnn import PREDICT_PATH, build_predict_body, parse_predict_response
from contracts.requests import request_fingerprint
from producers.reader import parse_request
from worker.core.result_checks import check_result

PREFETCH = int(os.environ.get("EGLO_PREFETCH", "64"))

broker = RabbitBroker(
    os.environ.get("EGLO_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
    default_channel=Channel(prefetch_count=PREFETCH),
)
app = FastStream(broker)
events = RabbitExchange("eglo.events", type=ExchangeType.TOPIC, durable=True)
requests_queue = RabbitQueue(
    "eglo.requests",
    queue_type=QueueType.QUORUM,
    durable=True,
    arguments={"x-dead-letter-exchange": "eglo.requests.dlx", "x-delivery-limit": 20},
)
state: dict[str, Any] = {}


@app.on_startup
async def open_clients() -> None:
    state["db"] = await asyncpg.create_pool(
        os.environ["EGLO_DATABASE_URL"], min_size=8, max_size=8
    )
    state["http"] = httpx.AsyncClient(
        base_url=os.environ.get("EGLO_QNN_URL", "http://127.0.0.1:8099"), timeout=10.0
    )


@app.after_shutdown
async def close_clients() -> None:
    await state["http"].aclose()
    await state["db"].close()


@broker.subscriber(requests_queue, ack_policy=AckPolicy.NACK_ON_ERROR)
async def handle(body: dict[str, Any], message: RabbitMessage) -> None:
    request = parse_request(body)  # the pydantic contract; raises on invalid input
    response = await state["http"].post(
        PREDICT_PATH,
        json=build_predict_body(
            request, model_id="PRETRAINED_QNN_GRID_MODEL", mode="quantum", optimization_level=1
        ),
    )
    response.raise_for_status()
    raw, raw_meta = parse_predict_response(request.request_type, response.content)
    result, metadata = check_result(request, raw, raw_meta)

    run_id = uuid.uuid4()
    now = datetime.now(UTC)
    outcome = RunOutcome(
        event_id=uuid.uuid5(run_id, "outcome:completed"),
        event_type=f"run.completed.{request.request_type}",
        occurred_at=now,
        run_id=run_id,
        request_id=request.request_id,
        request_type=request.request_type,
        status="completed",
        region=request.region,
        forecast_date=request.forecast_date,
        attempts=1,
        result=result,
        execution=metadata,
    )
    embedding = EmbeddingRequested(
        event_id=uuid.uuid5(run_id, EMBEDDING_REQUESTED),
        event_type=EMBEDDING_REQUESTED,
        occurred_at=now,
        run_id=run_id,
        request_id=request.request_id,
        request_type=request.request_type,
    )
    sends = [
        (e.event_id, e.event_type, orjson.dumps(e.model_dump(mode="json", exclude_none=True)))
        for e in (outcome, embedding)
    ]

    async with state["db"].acquire() as conn, conn.transaction():
        await conn.execute(
            """INSERT INTO optimization_runs (id, request_id, request_type, region, forecast_date,
                   input_payload, request_fingerprint, result_payload, status, qnn_model_id,
                   qnn_execution_time, attempts, published_at)
               VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8::jsonb, 'completed', $9, $10, 1,
                       $11)""",
            run_id,
            request.request_id,
            request.request_type,
            request.region,
            request.forecast_date,
            orjson.dumps(request.model_dump(mode="json")).decode(),
            request_fingerprint(request),
            orjson.dumps(result).decode(),
            metadata.model_id,
            (metadata.execution_time_ms or 0) / 1000,
            message.raw_message.timestamp,
        )
        await conn.execute(
            """INSERT INTO qnn_execution_metrics (optimization_run_id, model_id, device_used,
                   circuit_depth, n_qubits, execution_time_ms, quantum_cost_usd, call_attempts,
                   round_trip_ms)
               VALUES ($1, $2, $3, $4, $5, $6, $7, 1, NULL)""",
            run_id,
            metadata.model_id,
            metadata.device,
            metadata.circuit_depth,
            metadata.n_qubits,
            metadata.execution_time_ms,
            metadata.cost_usd,
        )
        await conn.executemany(
            """INSERT INTO outbox (event_id, exchange, routing_key, body, published_at)
               VALUES ($1, 'eglo.events', $2, $3, now())""",
            [(event_id, key, data) for event_id, key, data in sends],
        )
    for event_id, key, data in sends:
        await broker.publish(
            data,
            exchange=events,
            routing_key=key,
            persist=True,
            mandatory=False,
            message_id=str(event_id),
            content_type="application/json",
        )


def main() -> None:
    asyncio.run(app.run())


if __name__ == "__main__":
    main()
