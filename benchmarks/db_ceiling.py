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
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

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


class Written(NamedTuple):
    """One request's answer, as the rows are built from it (the DB ceiling: its template's
    recorded answer; the fair ceiling: what the emulator just returned)."""

    request_id: str
    fixture: Fixture  # the request's template: type, region, date, fingerprint, event bodies
    input_doc: dict[str, Any]  # the request as stored in input_payload
    result: dict[str, Any]
    execution: dict[str, Any]  # ExecutionMetadata's fields
    round_trip_ms: float | None


def columns(
    batch: Sequence[Written],
) -> tuple[list[list[Any]], list[list[Any]], list[list[Any]]]:
    """The unnest() columns of `_INSERT_RUNS`, `_INSERT_METRICS`, `_INSERT_OUTBOX` for a batch:
    per request a completed run, its metrics and its two events (outcome, embedding.requested),
    the bodies eglo's records produce for the template with this request's ids and answer."""
    now = datetime.now(UTC)
    iso = now.isoformat()
    runs: list[list[Any]] = [[] for _ in range(11)]
    metrics: list[list[Any]] = [[] for _ in range(9)]
    outbox: list[list[Any]] = [[] for _ in range(4)]
    for w in batch:
        fx = w.fixture
        req = fx.request
        ex = w.execution
        run_id = uuid.uuid4()
        for column, value in zip(
            runs,
            (
                run_id,
                w.request_id,
                req.request_type,
                req.region,
                req.forecast_date,
                orjson.dumps(w.input_doc).decode(),
                fx.fingerprint,
                orjson.dumps(w.result).decode(),
                ex.get("model_id"),
                (ex.get("execution_time_ms") or 0) / 1000,
                now,
            ),
            strict=True,
        ):
            column.append(value)
        for column, value in zip(
            metrics,
            (
                run_id,
                ex.get("model_id"),
                ex.get("device"),
                ex.get("circuit_depth"),
                ex.get("n_qubits"),
                ex.get("execution_time_ms"),
                ex.get("cost_usd"),
                1,
                w.round_trip_ms,
            ),
            strict=True,
        ):
            column.append(value)
        ids_doc = {"run_id": str(run_id), "request_id": w.request_id, "occurred_at": iso}
        outcome_id = uuid.uuid5(run_id, "outcome:completed")
        embedding_id = uuid.uuid5(run_id, "embedding.requested")
        for event_id, key, doc in (
            (
                outcome_id,
                fx.outcome_key,
                {**fx.outcome_doc, **ids_doc, "result": w.result, "execution": ex,
                 "event_id": str(outcome_id)},
            ),
            (
                embedding_id,
                "embedding.requested",
                {**fx.embedding_doc, **ids_doc, "event_id": str(embedding_id)},
            ),
        ):
            outbox[0].append(event_id)
            outbox[1].append("eglo.events")
            outbox[2].append(key)
            outbox[3].append(orjson.dumps(doc))
    return runs, metrics, outbox


async def write_batch(
    conn: asyncpg.Connection,
    runs: list[list[Any]],
    metrics: list[list[Any]],
    outbox: list[list[Any]],
) -> None:
    """One transaction: the batch's runs, metrics and outbox rows (events not yet published)."""
    async with conn.transaction():
        await conn.execute(_INSERT_RUNS, *runs)
        await conn.execute(_INSERT_METRICS, *metrics)
        await conn.execute(_INSERT_OUTBOX, *outbox)


async def mark_published(conn: asyncpg.Connection, event_ids: list[uuid.UUID]) -> None:
    """What eglo's outbox relay does to the database once the broker confirmed the events."""
    await conn.execute(_MARK, event_ids)


def recorded(fixtures: list[Fixture], request_id: str) -> Written:
    """The DB ceiling's rows for one request: its template's recorded answer."""
    fx = fixtures[template_index(request_id, len(fixtures))]
    return Written(
        request_id,
        fx,
        {**fx.request_doc, "request_id": request_id},
        fx.result,
        fx.execution,
        fx.round_trip_ms,
    )


async def run(
    bench: Bench, fixtures: list[Fixture], requests: int, *, writers: int = 4, batch: int = 100
) -> DbCeiling:
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
                    runs, metrics, outbox = columns(
                        [recorded(fixtures, rid) for rid in ids[start:start + batch]]
                    )
                    async with pool.acquire() as conn:
                        await write_batch(conn, runs, metrics, outbox)
                        await mark_published(conn, outbox[0])

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
