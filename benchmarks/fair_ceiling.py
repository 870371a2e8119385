"""Fair ceiling: eglo's whole pipeline written by hand, as lean as this stack allows (issue 15).

The AMQP and DB ceilings each leave out most of the work (no HTTP call, no broker or no
database); this one does all of it, the minimal way, in its own process:

- consume from the `eglo.requests` quorum queue (aio-pika, prefetch 256), parse the body with
  orjson (no pydantic model, no contract checks);
- one aiohttp call per request to the same emulator (`eglo emulator`), the same predict body
  eglo sends, built from the parsed JSON; the answer parsed with orjson, its result and
  execution metadata taken as they are (no result checks, no anomaly detection);
- a group commit: answered requests wait in one in-process queue; `--writers` tasks each take
  whatever waits (at most `--batch`) and write it in one transaction of three
  `INSERT … SELECT FROM unnest(…)` statements, the rows eglo writes (a completed run with input
  and result JSON, its metrics row, two outbox rows): `benchmarks.db_ceiling`'s own statements
  and row builder, so both ceilings write the same thing;
- after the commit, the two events per request (`run.completed.<type>` with this answer,
  `embedding.requested`) are published to `eglo.events` with publisher confirms, on the channel
  underneath aio-pika with `wait=False` and aiormq's frame buffer raised to 1,024 (what eglo's
  relay does; aio-pika's own publish holds the channel lock per frame); once confirmed, the
  deliveries are acked and the events marked published (`UPDATE outbox SET published_at`).

What it leaves out, and eglo does: request validation, result checks, anomaly detection, the
duplicate lookup, retries, deadlines, dead-lettering, crash recovery of unpublished events (no
relay sweep), metrics, tracing, logging. It is a ceiling, not a product. Its process settles its
heap at start as eglo's service processes do (`worker.runtime.service.settle_heap`).

With `--checks` it also does, per request, the CPU work of eglo's pure core as the worker calls
it: the request parsed and validated (`worker.core.intake`), its fingerprint, the predict body
built from the model and the answer parsed (`contracts.qnn`), the result checked
(`worker.core.result_checks`) and anomalies detected against per-type recent baselines
(`worker.core.anomalies`); it stores the checked result. Still no duplicate lookup (a query),
anomaly rows, metrics or retries. Against eglo it prices eglo's runtime alone; against the plain
ceiling, the checks.

    python -m benchmarks.fair_ceiling --fixtures FILE [--checks]   # the consumer process; env
                                   # EGLO_AMQP_URL, EGLO_DATABASE_URL, EGLO_QNN_URL
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, cast

import aio_pika
import aiohttp
import aiormq
import asyncpg
import orjson
from aio_pika.abc import AbstractIncomingMessage

from benchmarks import db_ceiling
from benchmarks.fixtures import Fixture
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
from contracts.qnn import PREDICT_PATH, build_predict_body, parse_predict_response
from contracts.requests import AnyRequest, request_fingerprint
from producers import topology
from worker.core import intake
from worker.core.result_checks import check_result
from worker.runtime.pipeline import OperationalBaselines
from worker.runtime.service import settle_heap
from worker.settings import Settings

EXECUTION_FIELDS = ("model_id", "device", "n_qubits", "circuit_depth", "execution_time_ms",
                    "cost_usd")
_JSON = {"Content-Type": "application/json"}


def _describe(doc: dict[str, Any]) -> str:
    """`contracts.qnn._describe` on the parsed JSON instead of the pydantic model."""
    payload = doc["payload"]
    kind = doc["request_type"]
    parts = [f"Region={doc['region']}", f"Date={doc['forecast_date']}"]
    if kind == "forecast":
        tail = ",".join(f"{v:g}" for v in payload["historical_loads"][-3:])
        parts += [f"PastLoads=[...{tail}]", f"ForecastGoal=Next{payload['horizon_steps']}Steps"]
    elif kind == "storage":
        parts += [f"Capacity={payload['capacity_kwh']:g}kWh", "Goal=MinimiseEnergyCost"]
    elif kind == "grid_switch":
        parts += [f"Sources={len(payload['sources'])}", "Goal=MinimiseSupplyCost"]
    else:
        parts += [f"Base={payload['base']['request_type']}",
                  f"Scenarios={len(payload['scenarios'])}"]
    return "; ".join(parts)


def predict_body(doc: dict[str, Any]) -> dict[str, Any]:
    """`contracts.qnn.build_predict_body` on the parsed JSON."""
    return {
        "code": _describe(doc),
        "model_id": "PRETRAINED_QNN_GRID_MODEL",
        "mode": "quantum",
        "optimization_level": 1,
        "inputs": {
            "request_id": doc["request_id"],
            "request_type": doc["request_type"],
            "region": doc["region"],
            "forecast_date": doc["forecast_date"],
            "payload": doc["payload"],
        },
    }


class EgloCore:
    """eglo's pure-core work on one request, as `worker.runtime.pipeline` calls it (--checks)."""

    def __init__(self) -> None:
        self._settings = Settings()
        self._baselines = OperationalBaselines()

    def parse(self, message: AbstractIncomingMessage) -> AnyRequest:
        request = intake.parse_request(
            message.body,
            message.content_type,
            max_bytes=self._settings.max_body_bytes,
            routing_key=message.routing_key,
        )
        if isinstance(request, intake.Rejection):  # the sample requests are all valid
            raise ValueError(request.detail)
        request_fingerprint(request)
        return request

    def predict_body(self, request: AnyRequest) -> dict[str, Any]:
        s = self._settings
        return build_predict_body(
            request,
            model_id=s.qnn_model_id,
            mode=s.qnn_mode,
            optimization_level=s.qnn_optimization_level,
        )

    def check(
        self, request: AnyRequest, body: bytes, round_trip_ms: float
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The checked result and execution metadata, after anomaly detection on them."""
        raw_result, raw_metadata = parse_predict_response(request.request_type, body)
        result, metadata = check_result(request, raw_result, raw_metadata)
        self._baselines.detect(request, result, round_trip_ms, metadata.cost_usd)
        return result, metadata.model_dump(mode="json")


async def serve(
    amqp_url: str,
    db_url: str,
    qnn_url: str,
    fixtures: list[Fixture],
    *,
    prefetch: int,
    writers: int,
    batch: int,
    qnn_connections: int,
    checks: bool = False,
) -> int:
    stop = asyncio.Event()
    core = EgloCore() if checks else None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    aiormq.Connection.FRAME_BUFFER_SIZE = 1024  # as eglo's worker does (worker/runtime/app.py)
    n = len(fixtures)
    answered: asyncio.Queue[tuple[db_ceiling.Written, AbstractIncomingMessage]] = asyncio.Queue()
    predict_url = qnn_url.rstrip("/") + PREDICT_PATH
    pool = await asyncpg.create_pool(db_url, min_size=writers, max_size=writers)
    assert pool is not None
    connection = await aio_pika.connect_robust(
        amqp_url, client_properties={"connection_name": "bench-fair-ceiling"}
    )
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=qnn_connections),
        timeout=aiohttp.ClientTimeout(total=30),
        json_serialize=lambda obj: orjson.dumps(obj).decode(),
    )
    try:
        consume_channel = await connection.channel()
        await consume_channel.set_qos(prefetch_count=prefetch)
        publish_channel = await connection.channel(publisher_confirms=True)
        channel = cast(aiormq.Channel, await publish_channel.get_underlay_channel())
        queue = await consume_channel.declare_queue(topology.REQUESTS_QUEUE, passive=True)

        async def handle(message: AbstractIncomingMessage) -> None:
            doc = orjson.loads(message.body)
            request_id = doc["request_id"]
            request = None
            if core is None:
                sent = predict_body(doc)
            else:
                request = core.parse(message)
                sent = core.predict_body(request)
            started = time.perf_counter()
            try:
                async with session.post(
                    predict_url, data=orjson.dumps(sent), headers=_JSON
                ) as response:
                    body = await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"QNN answered {response.status}")
            except Exception:  # noqa: BLE001 - a ceiling: requeue and let it come back
                await message.nack(requeue=True)
                return
            round_trip_ms = (time.perf_counter() - started) * 1000
            if core is None or request is None:
                answer = orjson.loads(body)["data"]
                result = answer["prediction"]
                raw_execution = answer.get("execution") or {}
            else:
                result, raw_execution = core.check(request, body, round_trip_ms)
            execution = {k: raw_execution[k] for k in EXECUTION_FIELDS if k in raw_execution}
            written = db_ceiling.Written(
                request_id,
                fixtures[template_index(request_id, n)],
                doc,
                result,
                execution,
                round_trip_ms,
            )
            answered.put_nowait((written, message))  # bounded by the prefetch

        async def publish(event_id: Any, key: str, body: bytes) -> None:
            await channel.basic_publish(
                body,
                exchange=topology.EVENTS_EXCHANGE,
                routing_key=key,
                properties=aiormq.spec.Basic.Properties(
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT.value,
                    message_id=str(event_id),
                    message_type=key,
                ),
                wait=False,
            )

        async def writer() -> None:
            while True:
                items = [await answered.get()]
                while len(items) < batch and not answered.empty():
                    items.append(answered.get_nowait())
                runs, metrics, outbox = db_ceiling.columns([w for w, _ in items])
                async with pool.acquire() as conn:
                    await db_ceiling.write_batch(conn, runs, metrics, outbox)
                    results = await asyncio.gather(
                        *(publish(*e) for e in zip(outbox[0], outbox[2], outbox[3], strict=True)),
                        return_exceptions=True,
                    )
                    failed = [r for r in results if isinstance(r, BaseException)]
                    if failed:  # not expected on loopback; keep the rows unmarked, say so
                        print(f"fair ceiling: {len(failed)} events unconfirmed: {failed[0]!r}",
                              file=sys.stderr, flush=True)
                    else:
                        await db_ceiling.mark_published(conn, outbox[0])
                for _, message in items:
                    await message.ack()

        tasks = [asyncio.create_task(writer()) for _ in range(writers)]
        tag = await queue.consume(handle)
        await stop.wait()
        await queue.cancel(tag)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
    finally:
        await session.close()
        await connection.close()
        await pool.close()
    return 0


async def run(
    bench: Bench,
    fixtures_path: Path,
    requests: int,
    latency_rate: float | None,
    latency_seconds: float,
    *,
    prefetch: int = 256,
    writers: int = 2,
    batch: int = 100,
    checks: bool = False,
) -> tuple[Drain, Latency | None]:
    """Drain a backlog of `requests` (throughput, CPU), then time requests at `latency_rate`
    (None: at half the maximum just measured)."""
    name = "fair-ceiling-checks" if checks else "fair-ceiling"
    async with bench.world(name) as world:
        await declare_events_queue(world.amqp_url)
        await publish_backlog(world.amqp_url, bench.workload.requests(requests, "fair"))
        process = spawn_module(
            "benchmarks.fair_ceiling",
            [
                "--fixtures", str(fixtures_path),
                "--prefetch", str(prefetch),
                "--writers", str(writers),
                "--batch", str(batch),
                *(["--checks"] if checks else []),
            ],
            {
                "EGLO_AMQP_URL": world.amqp_url,
                "EGLO_DATABASE_URL": world.db_url,
                "EGLO_QNN_URL": bench.qnn_url,
            },
            world.log_dir / f"{name}.log",
        )
        return await drain_then_time(
            bench, world, process, requests, latency_rate, latency_seconds, f"{name}-lat"
        )


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fair_ceiling")
    parser.add_argument("--fixtures", required=True, type=Path)
    parser.add_argument("--prefetch", type=int, default=256)
    parser.add_argument("--writers", type=int, default=2, help="transactions committing at once")
    parser.add_argument("--batch", type=int, default=100, help="most requests per transaction")
    parser.add_argument("--qnn-connections", type=int, default=128)
    parser.add_argument("--checks", action="store_true", help="also do eglo's pure-core work")
    args = parser.parse_args()
    fixtures = [Fixture.from_json(doc) for doc in orjson.loads(args.fixtures.read_bytes())]
    import uvloop

    settle_heap()  # as eglo's service processes: the same process-level tuning for both

    return uvloop.run(
        serve(
            os.environ["EGLO_AMQP_URL"],
            os.environ["EGLO_DATABASE_URL"],
            os.environ["EGLO_QNN_URL"],
            fixtures,
            prefetch=args.prefetch,
            writers=args.writers,
            batch=args.batch,
            qnn_connections=args.qnn_connections,
            checks=args.checks,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
