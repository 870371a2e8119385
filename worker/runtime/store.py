"""Writes runs, their metrics and their outbox events, many requests per transaction.

Commits are the cost of a run (fsync), so concurrent requests share them: whatever is waiting when
a writer becomes free goes into one transaction. At low load that is a batch of one and no added
latency; under load, batches grow by themselves. Every caller learns its own outcome only after the
commit, which is what lets the consumer ack after commit.
"""

from __future__ import annotations

import asyncio
import enum
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import asyncpg
import orjson
import structlog

from contracts.events import RunOutcome, outcome_routing_key
from contracts.results import ExecutionMetadata
from worker.core.records import OutboxEvent, Reply, RunRecord, outcome_event_id, outcome_reply
from worker.observability.metrics import Metrics

log = structlog.get_logger(__name__)


class SaveResult(enum.Enum):
    INSERTED = "inserted"
    DUPLICATE = "duplicate"  # the same request was stored before: drop this delivery
    CONFLICT = "conflict"  # the request_id was stored before with a different payload


@dataclass(frozen=True, slots=True)
class StoredRun:
    run_id: str
    fingerprint: str
    status: str


# One statement per batch: the run rows, then (joined to the rows actually written) their metrics,
# anomalies and outbox events. A single statement is atomic on its own, so a batch costs one round
# trip and one commit instead of BEGIN, four statements and COMMIT. Foreign keys to the runs written
# in the same statement hold: they are checked when the statement ends.
_SAVE_DEPENDENTS = """
metrics AS (
    INSERT INTO qnn_execution_metrics (
        optimization_run_id, model_id, device_used, circuit_depth, n_qubits, execution_time_ms,
        quantum_cost_usd, call_attempts, round_trip_ms)
    SELECT m.* FROM unnest($1::uuid[], $2::text[], $3::text[], $4::int[], $5::int[],
                           $6::float8[], $7::float8[], $8::int[], $9::float8[])
         AS m(run_id, model_id, device, depth, qubits, execution_ms, cost, tries, round_trip)
    JOIN saved ON saved.id = m.run_id
),
found AS (
    INSERT INTO anomalies (id, optimization_run_id, source, anomaly_type, severity, description,
                           details, suggested_actions, detected_at)
    SELECT a.id, a.run_id, 'eglo', a.anomaly_type, a.severity, a.description, a.details::jsonb,
           ARRAY(SELECT jsonb_array_elements_text(a.actions::jsonb)), a.detected_at
    FROM unnest($10::uuid[], $11::uuid[], $12::text[], $13::text[], $14::text[], $15::text[],
                $16::text[], $17::timestamptz[])
         AS a(id, run_id, anomaly_type, severity, description, details, actions, detected_at)
    JOIN saved ON saved.id = a.run_id
    ON CONFLICT (id) DO NOTHING
),
events AS (
    -- In array order: the relay publishes by outbox id.
    INSERT INTO outbox (event_id, exchange, routing_key, body, correlation_id, headers,
                        lease_until)
    SELECT e.event_id, e.exchange, e.routing_key, e.body, e.correlation_id, e.headers::jsonb,
           now() + make_interval(secs => $LEASE::float8)
    FROM unnest($18::uuid[], $19::uuid[], $20::text[], $21::text[], $22::bytea[], $23::text[],
                $24::text[]) WITH ORDINALITY
         AS e(run_id, event_id, exchange, routing_key, body, correlation_id, headers, n)
    JOIN saved ON saved.id = e.run_id
    ORDER BY e.n
)
SELECT id FROM saved
"""

_INSERT_RUNS = """
WITH saved AS (
    INSERT INTO optimization_runs (
        id, request_id, request_type, region, forecast_date, input_payload, request_fingerprint,
        result_payload, status, error_code, error_message, qnn_model_id, qnn_execution_time,
        attempts, published_at)
    SELECT id, request_id, request_type, region, forecast_date, input_payload::jsonb,
           fingerprint, result_payload::jsonb, status, error_code, error_message, model_id,
           execution_s, attempts, published_at
    FROM unnest($25::uuid[], $26::text[], $27::text[], $28::text[], $29::date[], $30::text[],
                $31::text[], $32::text[], $33::text[], $34::text[], $35::text[], $36::text[],
                $37::float8[], $38::int[], $39::timestamptz[])
         AS t(id, request_id, request_type, region, forecast_date, input_payload, fingerprint,
              result_payload, status, error_code, error_message, model_id, execution_s,
              attempts, published_at)
    ON CONFLICT (request_id) DO NOTHING
    RETURNING id
),""" + _SAVE_DEPENDENTS.replace("$LEASE", "$40")

# A replayed request re-running a stored failed run updates that row in place.
_REPLACE_FAILED = """
WITH saved AS (
    UPDATE optimization_runs AS r
    SET status = t.status, result_payload = t.result_payload::jsonb, error_code = t.error_code,
        error_message = t.error_message, qnn_model_id = t.model_id,
        qnn_execution_time = t.execution_s, attempts = r.attempts + t.attempts, updated_at = now()
    FROM unnest($25::uuid[], $26::text[], $27::text[], $28::text[], $29::text[], $30::text[],
                $31::float8[], $32::int[])
         AS t(id, status, result_payload, error_code, error_message, model_id, execution_s,
              attempts)
    WHERE r.id = t.id AND r.status = 'failed'
    RETURNING r.id
),""" + _SAVE_DEPENDENTS.replace("$LEASE", "$33")

_FIND = """
SELECT request_id, id::text AS run_id, request_fingerprint, status
FROM optimization_runs WHERE request_id = ANY($1::text[])
"""


_OUTCOME_BODY = "SELECT body FROM outbox WHERE event_id = $1"
# After the outbox's retention the outcome is rebuilt from the run (occurred_at: its last update).
_OUTCOME_ROW = """
SELECT r.request_id, r.request_type, r.region, r.forecast_date, r.status, r.attempts,
       r.result_payload::text AS result, r.error_code, r.error_message, r.updated_at,
       m.model_id, m.device_used, m.n_qubits, m.circuit_depth, m.execution_time_ms,
       m.quantum_cost_usd
FROM optimization_runs r
LEFT JOIN LATERAL (
    SELECT * FROM qnn_execution_metrics WHERE optimization_run_id = r.id
    ORDER BY created_at DESC LIMIT 1
) m ON true
WHERE r.id = $1
"""


def _json(value: object) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


class OnCommit(Protocol):
    def __call__(self, runs: int, events: Sequence[OutboxEvent], since: float) -> None: ...


class RunStore:
    """Group-committing writer of run records; `save` returns once its record is committed.

    After each commit `on_commit` gets the number of runs written, their events and when the
    write began (perf_counter); no relay claims those events' rows for `lease_s` seconds from the
    commit, so the caller may publish them straight away (the outbox relay's direct path)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        metrics: Metrics,
        *,
        batch_max: int,
        writers: int,
        on_commit: OnCommit | None = None,
        lease_s: float = 0.0,
    ) -> None:
        self._pool = pool
        self._metrics = metrics
        self._batch_max = batch_max
        self._writer_count = writers
        self._on_commit = on_commit
        self._lease_s = lease_s
        # Each record with when it was handed over (perf_counter), for the commit_wait stage.
        self._queue: asyncio.Queue[tuple[tuple[RunRecord, float], asyncio.Future[SaveResult]]] = (
            asyncio.Queue()
        )
        self._lookups: asyncio.Queue[tuple[str, asyncio.Future[StoredRun | None]]] = asyncio.Queue()
        self._writers: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._writers = [
            asyncio.create_task(self._write_loop(), name=f"store-writer-{i}")
            for i in range(self._writer_count)
        ]
        self._writers.append(asyncio.create_task(self._lookup_loop(), name="store-lookup"))

    async def close(self) -> None:
        for task in self._writers:
            task.cancel()
        await asyncio.gather(*self._writers, return_exceptions=True)
        closed = RuntimeError("store closed before commit")
        for queue in (self._queue, self._lookups):
            while not queue.empty():
                _fail([queue.get_nowait()], closed)

    async def find(self, request_id: str) -> StoredRun | None:
        """The stored run for a request_id, if any; concurrent lookups share one query."""
        future: asyncio.Future[StoredRun | None] = asyncio.get_running_loop().create_future()
        await self._lookups.put((request_id, future))
        return await future

    async def _lookup_loop(self) -> None:
        while True:
            batch = await _take_batch(self._lookups, self._batch_max)
            if not batch:
                continue
            try:
                rows = await self._pool.fetch(_FIND, [request_id for request_id, _ in batch])
            except asyncio.CancelledError:
                _fail(batch, RuntimeError("store closed before lookup"))
                raise
            except Exception as exc:  # noqa: BLE001 - every caller gets the failure and retries
                _fail(batch, exc)
                continue
            found = {
                r["request_id"]: StoredRun(r["run_id"], r["request_fingerprint"], r["status"])
                for r in rows
            }
            for request_id, future in batch:
                if not future.done():
                    future.set_result(found.get(request_id))

    async def outcome_reply(self, stored: StoredRun) -> Reply:
        """The stored run's outcome event, as its reply to a re-sent request."""
        run_id = uuid.UUID(stored.run_id)
        event_id = outcome_event_id(run_id, stored.status)
        body = await self._pool.fetchval(_OUTCOME_BODY, event_id)
        if body is not None:
            return Reply(event_id, orjson.loads(body)["event_type"], bytes(body))
        row = await self._pool.fetchrow(_OUTCOME_ROW, run_id)
        execution = None
        if row["model_id"] is not None or row["execution_time_ms"] is not None:
            execution = ExecutionMetadata(
                model_id=row["model_id"],
                device=row["device_used"],
                n_qubits=row["n_qubits"],
                circuit_depth=row["circuit_depth"],
                execution_time_ms=row["execution_time_ms"],
                cost_usd=row["quantum_cost_usd"],
            )
        return outcome_reply(
            RunOutcome(
                event_id=event_id,
                event_type=outcome_routing_key(row["status"], row["request_type"]),
                occurred_at=row["updated_at"],
                run_id=run_id,
                request_id=row["request_id"],
                request_type=row["request_type"],
                status=row["status"],
                region=row["region"],
                forecast_date=row["forecast_date"],
                attempts=row["attempts"],
                result=orjson.loads(row["result"]) if row["result"] else None,
                execution=execution,
                error_code=row["error_code"],
                error_message=row["error_message"],
            )
        )

    async def save(self, record: RunRecord) -> SaveResult:
        future: asyncio.Future[SaveResult] = asyncio.get_running_loop().create_future()
        await self._queue.put(((record, time.perf_counter()), future))
        return await future

    async def _write_loop(self) -> None:
        while True:
            batch = await _take_batch(self._queue, self._batch_max)
            if not batch:
                continue
            started = time.perf_counter()
            waited = self._metrics.stages["commit_wait"]
            for (_, handed_over), _ in batch:
                waited.observe(started - handed_over)
            try:
                results, events = await self._write_isolating_bad_rows([r for (r, _), _ in batch])
            except asyncio.CancelledError:
                _fail(batch, RuntimeError("store closed before commit"))
                raise
            except Exception as exc:  # noqa: BLE001 - every caller gets the failure and retries
                self._metrics.db_errors.labels(operation="write_runs").inc()
                log.warning("db.batch.failed", size=len(batch), error=repr(exc)[:300])
                _fail(batch, exc)
                continue
            took = time.perf_counter() - started
            self._metrics.db_write.observe(took)
            self._metrics.db_batch_size.observe(len(batch))
            committed = self._metrics.stages["commit"]
            for _ in batch:
                committed.observe(took)
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)
            if self._on_commit is not None:
                self._on_commit(sum(r is SaveResult.INSERTED for r in results), events, started)

    async def _write_isolating_bad_rows(
        self, records: list[RunRecord]
    ) -> tuple[list[SaveResult | Exception], list[OutboxEvent]]:
        """Write the batch; if a row breaks a constraint, write one by one so only it fails.
        Also returns the events of the runs written."""
        try:
            written, events = await self._write(records)
            return list(written), events
        except asyncpg.IntegrityConstraintViolationError:
            if len(records) == 1:
                raise
        results: list[SaveResult | Exception] = []
        events = []
        for record in records:
            try:
                written, more = await self._write([record])
            except asyncpg.IntegrityConstraintViolationError as exc:
                log.error("db.row.rejected", request_id=record.request.request_id, error=str(exc))
                results.append(exc)
                continue
            results.extend(written)
            events += more
        return results, events

    async def _write(self, records: list[RunRecord]) -> tuple[list[SaveResult], list[OutboxEvent]]:
        fresh = [r for r in records if not r.replaces_failed]
        reruns = [r for r in records if r.replaces_failed]
        events = {r.run_id: r.events() for r in records}
        lease = self._lease_s
        async with self._pool.acquire() as conn:
            if not reruns:
                saved = await _save(conn, _INSERT_RUNS, fresh, _run_columns(fresh), events, lease)
            else:  # rare (an operator's replay): both kinds in one transaction
                async with conn.transaction():
                    saved = await _save(
                        conn, _INSERT_RUNS, fresh, _run_columns(fresh), events, lease
                    )
                    columns = _run_columns(reruns)
                    saved |= await _save(
                        conn,
                        _REPLACE_FAILED,
                        reruns,
                        [columns[i] for i in (0, 8, 7, 9, 10, 11, 12, 13)],
                        events,
                        lease,
                    )
            existing: dict[str, str] = {}
            others = [r.request.request_id for r in records if r.run_id not in saved]
            if others:
                existing = {
                    row["request_id"]: row["request_fingerprint"]
                    for row in await conn.fetch(_FIND, others)
                }
        results = [
            SaveResult.INSERTED
            if r.run_id in saved
            else SaveResult.DUPLICATE
            if existing.get(r.request.request_id) == r.fingerprint
            else SaveResult.CONFLICT
            for r in records
        ]
        return results, [e for r in records if r.run_id in saved for e in events[r.run_id]]


async def _save(
    conn: asyncpg.Connection,
    sql: str,
    records: list[RunRecord],
    run_columns: list[list[object]],
    events_of: dict[uuid.UUID, list[OutboxEvent]],
    lease_s: float,
) -> set[uuid.UUID]:
    """Run one save statement; the ids of the runs it wrote (the rest were already stored)."""
    if not records:
        return set()
    with_metrics = [r for r in records if r.metadata is not None or r.call_attempts]
    found = [(r, i, a) for r in records for i, a in zip(r.anomaly_ids(), r.anomalies, strict=True)]
    events = [(r.run_id, e) for r in records for e in events_of[r.run_id]]
    rows = await conn.fetch(
        sql,
        *_metric_columns(with_metrics),
        [i for _, i, _ in found],
        [r.run_id for r, _, _ in found],
        [a.anomaly_type for _, _, a in found],
        [a.severity for _, _, a in found],
        [a.description for _, _, a in found],
        [_json(a.details) for _, _, a in found],
        [_json(list(a.suggested_actions)) for _, _, a in found],
        [r.occurred_at for r, _, _ in found],
        [run_id for run_id, _ in events],
        [e.event_id for _, e in events],
        [e.exchange for _, e in events],
        [e.routing_key for _, e in events],
        [e.body for _, e in events],
        [e.correlation_id for _, e in events],
        [_json(e.headers) if e.headers else None for _, e in events],
        *run_columns,
        lease_s,
    )
    return {row["id"] for row in rows}


def _run_columns(records: list[RunRecord]) -> list[list[object]]:
    return [
        [r.run_id for r in records],
        [r.request.request_id for r in records],
        [r.request.request_type for r in records],
        [r.request.region for r in records],
        [r.request.forecast_date for r in records],
        [_json(r.request.as_json) for r in records],
        [r.fingerprint for r in records],
        [_json(r.result) for r in records],
        [r.status for r in records],
        [r.error_code for r in records],
        [r.error_message for r in records],
        [r.metadata.model_id if r.metadata else None for r in records],
        [
            r.metadata.execution_time_ms / 1000
            if r.metadata and r.metadata.execution_time_ms is not None
            else None
            for r in records
        ],
        [r.attempts for r in records],
        [r.published_at for r in records],
    ]


def _metric_columns(records: list[RunRecord]) -> list[list[object]]:
    meta = [r.metadata for r in records]
    return [
        [r.run_id for r in records],
        [m.model_id if m else None for m in meta],
        [m.device if m else None for m in meta],
        [m.circuit_depth if m else None for m in meta],
        [m.n_qubits if m else None for m in meta],
        [m.execution_time_ms if m else None for m in meta],
        [m.cost_usd if m else None for m in meta],
        [r.call_attempts for r in records],
        [r.round_trip_ms for r in records],
    ]


async def _take_batch(
    queue: asyncio.Queue[tuple[Any, asyncio.Future[Any]]], most: int
) -> list[tuple[Any, asyncio.Future[Any]]]:
    """Wait for one item, then take whatever else is already waiting (up to `most`).

    Callers that gave up meanwhile (cancelled at shutdown) are dropped: they will not ack.
    """
    batch = [await queue.get()]
    while len(batch) < most and not queue.empty():
        batch.append(queue.get_nowait())
    return [(item, future) for item, future in batch if not future.done()]


def _fail(batch: list[tuple[Any, asyncio.Future[Any]]], exc: BaseException) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(exc)
