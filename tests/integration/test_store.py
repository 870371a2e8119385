"""RunStore against the real database: a batch is one statement, and one bad row spoils nothing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from contracts.requests import AnyRequest, request_fingerprint
from contracts.results import ExecutionMetadata
from producers.reader import parse_request
from producers.sample import generate_requests
from worker.core.anomalies import Anomaly
from worker.core.records import RunRecord
from worker.observability.metrics import Metrics
from worker.runtime.store import RunStore, SaveResult

META = ExecutionMetadata(model_id="m1", device="sim", n_qubits=8, circuit_depth=40, cost_usd=0.01)
SPIKE = Anomaly(
    anomaly_type="input_spike",
    severity="high",
    description="a spike",
    suggested_actions=("check the meter",),
    details={"z": 7.5},
)


@pytest.fixture
async def store(pool: asyncpg.Pool) -> AsyncIterator[RunStore]:
    # One writer: whatever is queued when it looks goes into a single batch.
    store = RunStore(pool, Metrics(), batch_max=100, writers=1)
    store.start()
    yield store
    await store.close()


def _requests(count: int, seed: int) -> list[AnyRequest]:
    return [parse_request(doc) for doc in generate_requests(count, seed, id_prefix=f"st{seed}")]


def _record(request: AnyRequest, **fields: Any) -> RunRecord:
    defaults: dict[str, Any] = {
        "status": "completed",
        "result": {"value": 1.0},
        "metadata": META,
        "call_attempts": 1,
        "round_trip_ms": 21.0,
    }
    return RunRecord(
        request=request,
        fingerprint=request_fingerprint(request),
        attempts=1,
        **(defaults | fields),
    )


def _batches(store: RunStore) -> tuple[float | None, float | None]:
    registry = store._metrics.registry
    return (
        registry.get_sample_value("eglo_db_batch_size_runs_count"),
        registry.get_sample_value("eglo_db_batch_size_runs_sum"),
    )


async def test_a_batch_writes_runs_metrics_anomalies_and_ordered_events(
    store: RunStore, pool: asyncpg.Pool
) -> None:
    """Concurrent saves share one batch; every dependent row is written, events in run order."""
    records = [_record(r) for r in _requests(6, seed=1)]
    records[2] = _record(records[2].request, anomalies=(SPIKE,))

    results = await asyncio.gather(*(store.save(r) for r in records))

    assert results == [SaveResult.INSERTED] * 6
    assert _batches(store) == (1.0, 6.0)
    ids = [r.run_id for r in records]
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM qnn_execution_metrics WHERE optimization_run_id = ANY($1)", ids
        )
        == 6
    )
    anomaly = await pool.fetchrow(
        "SELECT optimization_run_id, severity, suggested_actions FROM anomalies"
    )
    assert anomaly is not None
    assert (anomaly["optimization_run_id"], anomaly["severity"]) == (records[2].run_id, "high")
    assert anomaly["suggested_actions"] == ["check the meter"]
    stored = await pool.fetch("SELECT event_id FROM outbox ORDER BY id")
    assert [row["event_id"] for row in stored] == [e.event_id for r in records for e in r.events()]


async def test_duplicates_and_conflicts_write_nothing_of_their_own(
    store: RunStore, pool: asyncpg.Pool
) -> None:
    """A repeat is a duplicate, a reused request_id a conflict; neither adds metrics or events."""
    first, other, fresh = _requests(3, seed=2)
    assert await store.save(_record(first)) is SaveResult.INSERTED
    repeat = _record(first)
    reused = _record(other.model_copy(update={"request_id": first.request_id}))
    assert request_fingerprint(reused.request) != request_fingerprint(first)

    results = await asyncio.gather(
        store.save(repeat), store.save(reused), store.save(_record(fresh))
    )

    assert results == [SaveResult.DUPLICATE, SaveResult.CONFLICT, SaveResult.INSERTED]
    assert await pool.fetchval("SELECT count(*) FROM optimization_runs") == 2
    losers = (repeat, reused)
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM qnn_execution_metrics WHERE optimization_run_id = ANY($1)",
            [r.run_id for r in losers],
        )
        == 0
    )
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM outbox WHERE event_id = ANY($1)",
            [e.event_id for r in losers for e in r.events()],
        )
        == 0
    )


async def test_one_new_request_twice_in_a_batch_is_stored_once(
    store: RunStore, pool: asyncpg.Pool
) -> None:
    """Two deliveries of a new request committed together: one run, one set of events."""
    [request] = _requests(1, seed=5)
    twins = [_record(request), _record(request)]

    results = await asyncio.gather(*(store.save(r) for r in twins))

    assert sorted(r.value for r in results) == ["duplicate", "inserted"]
    assert _batches(store) == (1.0, 2.0)
    assert await pool.fetchval("SELECT count(*) FROM optimization_runs") == 1
    assert await pool.fetchval("SELECT count(*) FROM qnn_execution_metrics") == 1
    assert await pool.fetchval("SELECT count(*) FROM outbox") == 2


async def test_a_row_that_breaks_a_constraint_fails_alone(
    store: RunStore, pool: asyncpg.Pool
) -> None:
    """The batch is retried row by row: the bad one gets the error, its neighbours are stored."""
    good_1, bad, good_2 = _requests(3, seed=3)
    # Past the contract's own validation, as a buggy caller could: the database's CHECK refuses it.
    broken = ExecutionMetadata.model_construct(circuit_depth=-1)

    results = await asyncio.gather(
        store.save(_record(good_1)),
        store.save(_record(bad, metadata=broken)),
        store.save(_record(good_2)),
        return_exceptions=True,
    )

    assert results[0] is SaveResult.INSERTED and results[2] is SaveResult.INSERTED
    assert isinstance(results[1], asyncpg.IntegrityConstraintViolationError)
    stored = {r["request_id"] for r in await pool.fetch("SELECT request_id FROM optimization_runs")}
    assert stored == {good_1.request_id, good_2.request_id}
    assert await pool.fetchval("SELECT count(*) FROM outbox") == 4  # two events per good run


async def test_a_replayed_failure_is_rerun_in_place_beside_fresh_runs(
    store: RunStore, pool: asyncpg.Pool
) -> None:
    """A replay updates the failed row (attempts add up) and emits its completion event."""
    failed_request, fresh = _requests(2, seed=4)
    failed = _record(
        failed_request,
        status="failed",
        result=None,
        metadata=None,
        error_code="qnn_unavailable",
        error_message="down",
    )
    assert await store.save(failed) is SaveResult.INSERTED
    rerun = _record(failed_request, run_id=failed.run_id, replaces_failed=True)

    results = await asyncio.gather(store.save(rerun), store.save(_record(fresh)))

    assert results == [SaveResult.INSERTED, SaveResult.INSERTED]
    row = await pool.fetchrow(
        "SELECT status, attempts, error_code FROM optimization_runs WHERE id = $1", failed.run_id
    )
    assert row is not None
    assert dict(row) == {"status": "completed", "attempts": 2, "error_code": None}
    events = {r["routing_key"] for r in await pool.fetch("SELECT routing_key FROM outbox")}
    assert f"run.completed.{failed_request.request_type}" in events
    assert f"run.failed.{failed_request.request_type}" in events
    # Replaying the same failure again finds nothing failed to replace: a duplicate.
    again = _record(failed_request, run_id=failed.run_id, replaces_failed=True)
    assert await store.save(again) is SaveResult.DUPLICATE


async def test_each_commit_hands_over_the_events_of_the_runs_it_wrote(pool: asyncpg.Pool) -> None:
    """What the outbox relay's direct path gets: the events of new runs only (not of a duplicate),
    their rows leased for as long as the store was told."""
    commits: list[tuple[int, list[Any], float]] = []
    store = RunStore(
        pool,
        Metrics(),
        batch_max=100,
        writers=1,
        on_commit=lambda runs, events, since: commits.append((runs, list(events), since)),
        lease_s=60.0,
    )
    store.start()
    try:
        first, second = _requests(2, seed=41)
        before = time.perf_counter()
        assert await store.save(_record(first)) is SaveResult.INSERTED
        assert await store.save(_record(first)) is SaveResult.DUPLICATE
        assert await store.save(
            _record(
                second, status="failed", result=None, error_code="qnn_rejected", error_message="no"
            )
        ) is (SaveResult.INSERTED)
    finally:
        await store.close()
    assert [runs for runs, _, _ in commits] == [1, 0, 1]
    handed = [e for _, events, _ in commits for e in events]
    assert [e.routing_key for e in handed] == [
        f"run.completed.{first.request_type}",
        "embedding.requested",
        f"run.failed.{second.request_type}",
    ]
    assert all(since >= before for _, _, since in commits)
    rows = await pool.fetch(
        "SELECT event_id, lease_until > now() + interval '50 s' AS leased FROM outbox"
    )
    assert {r["event_id"] for r in rows} == {e.event_id for e in handed}
    assert all(r["leased"] for r in rows)
