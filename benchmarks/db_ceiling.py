"""DB ceiling: plain asyncpg writing what eglo writes per request, with durable commits.

Per request, the rows eglo writes (`worker/runtime/store.py`, `worker/core/records.py`):
one optimization_runs
row (the request as input_payload, the real QNN result of its template as result_payload), one
qnn_execution_metrics row, two outbox rows (run.completed.<type> and embedding.requested, real
bodies). Writers take batches of `batch` requests, each batch one transaction of three
`INSERT ... SELECT FROM unnest(...)` statements, over `writers` connections; after the commit the
writer marks the batch's events published (`UPDATE outbox SET published_at = now() WHERE
event_id = ANY(...)`, its own commit), which is what eglo's outbox relay does to the database
once the broker has confirmed them (worker/runtime/outbox.py, fast path). No broker. Runs in the
benchmark's own process; its CPU and the Postgres server's are reported.
"""

from __future__ import annotations

import asyncio
import resource
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from benchmarks.fixtures import Fixture
from benchmarks.harness import Bench, template_index, tree_cpu

_INSERT_RUNS = """
INSERT INTO optimization_runs (
    id, request_id, request_type, region, forecast_date, input_payload, request_fingerprint,
    result_payload, status, qnn_model_id, qnn_execution_time, attempts, published_at)
SELECT id, request_id, request_type, region, forecast_date, input_payload::jsonb, fingerprint,
       result_payload::jsonb, 'completed', model_id, execution_s, 1, published_at
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::date[], $6::text[], $7::text[],
            $8::text[], $9::text[], $10::float8[], $11::timestamptz[])
     AS t(id, request_id, request_type, region, forecast_date, input_payload, fingerprint,
          result_payload, model_id, execution_s, published_at)
ON CONFLICT (request_id) DO NOTHING
"""
_INSERT_METRICS = """
INSERT INTO qnn_execution_metrics (
    optimization_run_id, model_id, device_used, circuit_depth, n_qubits, execution_time_ms,
    quantum_cost_usd, call_attempts, round_trip_ms)
SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::int[], $5::int[], $6::float8[],
                     $7::float8[], $8::int[], $9::float8[])
"""
_INSERT_OUTBOX = """
INSERT INTO outbox (event_id, exchange, routing_key, body)
SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::bytea[])
"""
_MARK = (
    "UPDATE outbox SET published_at = now() WHERE event_id = ANY($1::uuid[]) "
    "AND published_at IS NULL"
)


@dataclass
class DbCeiling:
    requests: int
    runs_per_s: float
    seconds: float
    cpu_per_1000: dict[str, float]  # client (this process), postgres
    writers: int
    batch: int
    settings: dict[str, str]


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _columns(
    fixtures: list[Fixture], inputs: list[dict[str, Any]], ids: list[str]
) -> tuple[list[list[Any]], list[list[Any]], list[list[Any]]]:
    n = len(fixtures)
    now = datetime.now(UTC)
    iso = now.isoformat()
    runs: list[list[Any]] = [[] for _ in range(11)]
    metrics: list[list[Any]] = [[] for _ in range(9)]
    outbox: list[list[Any]] = [[] for _ in range(4)]
    for request_id in ids:
        i = template_index(request_id, n)
        fx = fixtures[i]
        req = fx.request
        meta = fx.metadata
        run_id = uuid.uuid4()
        for column, value in zip(
            runs,
            (
                run_id,
                request_id,
                req.request_type,
                req.region,
                req.forecast_date,
                orjson.dumps({**inputs[i], "request_id": request_id}).decode(),
                fx.fingerprint,
                orjson.dumps(fx.result).decode(),
                meta.model_id,
                (meta.execution_time_ms or 0) / 1000,
                now,
            ),
            strict=True,
        ):
            column.append(value)
        for column, value in zip(
            metrics,
            (
                run_id,
                meta.model_id,
                meta.device,
                meta.circuit_depth,
                meta.n_qubits,
                meta.execution_time_ms,
                meta.cost_usd,
                1,
                fx.round_trip_ms,
            ),
            strict=True,
        ):
            column.append(value)
        ids_doc = {"run_id": str(run_id), "request_id": request_id, "occurred_at": iso}
        for key, doc, kind in (
            (fx.outcome_key, fx.outcome_doc, "outcome:completed"),
            ("embedding.requested", fx.embedding_doc, "embedding.requested"),
        ):
            event_id = uuid.uuid5(run_id, kind)
            outbox[0].append(event_id)
            outbox[1].append("eglo.events")
            outbox[2].append(key)
            outbox[3].append(orjson.dumps({**doc, **ids_doc, "event_id": str(event_id)}))
    return runs, metrics, outbox


async def run(
    bench: Bench, fixtures: list[Fixture], requests: int, *, writers: int = 4, batch: int = 100
) -> DbCeiling:
    inputs = [f.request.model_dump(mode="json") for f in fixtures]
    ids = [f"db-{i:07d}" for i in range(requests)]
    async with bench.world("db-ceiling") as world:
        pool = await asyncpg.create_pool(world.db_url, min_size=writers, max_size=writers)
        assert pool is not None
        try:
            settings = {
                name: str(await pool.fetchval(f"SHOW {name}"))
                for name in ("synchronous_commit", "fsync", "wal_sync_method", "server_version")
            }
            next_batch = 0

            async def writer() -> None:
                nonlocal next_batch
                while next_batch < requests:
                    start = next_batch
                    next_batch += batch
                    runs, metrics, outbox = _columns(fixtures, inputs, ids[start:start + batch])
                    async with pool.acquire() as conn:
                        async with conn.transaction():
                            await conn.execute(_INSERT_RUNS, *runs)
                            await conn.execute(_INSERT_METRICS, *metrics)
                            await conn.execute(_INSERT_OUTBOX, *outbox)
                        await conn.execute(_MARK, outbox[0])

            pg0 = tree_cpu(bench.postmaster) if bench.postmaster else float("nan")
            cpu0 = _self_cpu()
            t0 = time.perf_counter()
            async with asyncio.TaskGroup() as group:
                for _ in range(writers):
                    group.create_task(writer())
            seconds = time.perf_counter() - t0
            cpu = _self_cpu() - cpu0
            pg = (tree_cpu(bench.postmaster) - pg0) if bench.postmaster else float("nan")
            stored = await pool.fetchval("SELECT count(*) FROM optimization_runs")
            unsent = await pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL")
            if stored != requests or unsent:
                raise RuntimeError(f"db ceiling stored {stored}/{requests}, {unsent} unmarked")
        finally:
            await pool.close()
    return DbCeiling(
        requests=requests,
        runs_per_s=requests / seconds,
        seconds=seconds,
        cpu_per_1000={"client": cpu / requests * 1000, "postgres": pg / requests * 1000},
        writers=writers,
        batch=batch,
        settings=settings,
    )
