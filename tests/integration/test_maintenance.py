"""Retention: only runs older than the cutoff go, with their child rows, archived if asked."""

from __future__ import annotations

import asyncio
import gzip
import uuid
from datetime import UTC, date, datetime
from pathlib import Path

import asyncpg
import orjson
import pytest

from tests.support.runs import clean, forecast_result, hourly, import_days, insert_run
from worker.analytics.accuracy import score_pending
from worker.ops.maintenance import MAINTENANCE_LOCK_KEY, retention_cutoff, run_maintenance

NOW = datetime(2025, 6, 15, 12, 0, tzinfo=UTC)
KEPT = (datetime(2024, 6, 1, tzinfo=UTC), datetime(2025, 1, 20, tzinfo=UTC), NOW)
OLD = (
    datetime(2024, 3, 10, 8, 0, tzinfo=UTC),
    datetime(2024, 3, 31, 23, 59, tzinfo=UTC),
    datetime(2024, 5, 31, 23, 59, 59, tzinfo=UTC),
)


async def add_run(
    pool: asyncpg.Pool, created_at: datetime, day: date = date(2025, 1, 1)
) -> uuid.UUID:
    """A completed forecast run created at `created_at`, with one metrics row."""
    run_id = await insert_run(
        pool, forecast_date=day, result=forecast_result(hourly(0)), created_at=created_at
    )
    await pool.execute(
        """INSERT INTO qnn_execution_metrics (optimization_run_id, model_id, execution_time_ms,
               created_at) VALUES ($1, 'qnn-a', 12.5, $2)""",
        run_id,
        created_at,
    )
    return run_id


async def remaining(pool: asyncpg.Pool) -> set[uuid.UUID]:
    return {r["id"] for r in await pool.fetch("SELECT id FROM optimization_runs")}


def test_retention_cutoff_keeps_whole_months() -> None:
    """The cutoff is the first instant of the month N months back, in UTC."""
    assert retention_cutoff(NOW, 12) == datetime(2024, 6, 1, tzinfo=UTC)
    new_year = datetime(2025, 1, 1, tzinfo=UTC)
    assert retention_cutoff(new_year, 1) == datetime(2024, 12, 1, tzinfo=UTC)
    assert retention_cutoff(datetime(2025, 3, 31, 23, 0), 14) == datetime(2024, 1, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match="at least 1"):
        retention_cutoff(NOW, 0)


async def test_deletes_only_old_runs_and_their_children(pool: asyncpg.Pool) -> None:
    """Runs before the cutoff go with metrics and scores; runs from the cutoff on stay."""
    await clean(pool)
    old = [await add_run(pool, t) for t in OLD]
    kept = [await add_run(pool, t) for t in KEPT]
    await import_days(pool, {date(2025, 1, 1): hourly(0)})
    assert await score_pending(pool) == 6
    assert await pool.fetchval("SELECT runs FROM model_metrics") == 6

    report = await run_maintenance(pool, retention_months=12, archive_dir=None, now=NOW)
    assert not report.skipped
    assert report.cutoff == datetime(2024, 6, 1, tzinfo=UTC)
    assert report.runs_deleted == 3 and report.runs_archived == 0
    assert report.months == ["2024-03", "2024-05"]
    assert "optimization_runs" in report.vacuumed
    assert report.ranges_resummarized >= 2  # one range per BRIN index at least
    assert await remaining(pool) == set(kept)
    children = await pool.fetchval(
        "SELECT count(*) FROM qnn_execution_metrics WHERE optimization_run_id = ANY($1)", old
    )
    scores = await pool.fetchval("SELECT count(*) FROM forecast_scores WHERE run_id = ANY($1)", old)
    assert children == scores == 0
    assert await pool.fetchval("SELECT runs FROM model_metrics") == 3  # rollup follows
    again = await run_maintenance(pool, retention_months=12, archive_dir=None, now=NOW)
    assert again.runs_deleted == 0 and again.batches == 0


async def test_archives_each_month_before_deleting(pool: asyncpg.Pool, tmp_path: Path) -> None:
    """With an archive dir, old runs land in one gzip'd NDJSON file per month, then go."""
    await clean(pool)
    old = {await add_run(pool, t): t for t in OLD}
    kept = {await add_run(pool, t) for t in KEPT}
    report = await run_maintenance(pool, retention_months=12, archive_dir=tmp_path, now=NOW)
    assert report.runs_deleted == report.runs_archived == 3
    assert sorted(p.name for p in report.archive_files) == [
        "optimization_runs-2024-03.ndjson.gz",
        "optimization_runs-2024-05.ndjson.gz",
    ]
    archived: dict[str, dict[str, object]] = {}
    for path in report.archive_files:
        with gzip.open(path) as fh:
            for line in fh:
                doc = orjson.loads(line)
                archived[doc["id"]] = doc
    assert set(archived) == {str(i) for i in old}
    doc = archived[str(next(iter(old)))]
    assert doc["request_type"] == "forecast" and doc["status"] == "completed"
    assert doc["result_payload"] == forecast_result(hourly(0))
    assert doc["qnn_execution_metrics"] == [
        {**doc["qnn_execution_metrics"][0], "model_id": "qnn-a", "execution_time_ms": 12.5}  # type: ignore[index]
    ]
    assert await remaining(pool) == kept
    # A later run appends to the month's file (a new gzip member) instead of replacing it.
    extra = await add_run(pool, datetime(2024, 3, 1, tzinfo=UTC))
    await run_maintenance(pool, retention_months=12, archive_dir=tmp_path, now=NOW)
    with gzip.open(tmp_path / "optimization_runs-2024-03.ndjson.gz") as fh:
        ids = [orjson.loads(line)["id"] for line in fh]
    assert len(ids) == 3 and str(extra) in ids


async def test_batches_are_bounded(pool: asyncpg.Pool) -> None:
    """With one block per batch, many old runs take many small transactions, all deleted."""
    await clean(pool)
    for i in range(60):
        await add_run(pool, datetime(2023, 1 + i % 12, 1 + i % 28, tzinfo=UTC))
    kept = await add_run(pool, NOW)
    report = await run_maintenance(
        pool, retention_months=12, archive_dir=None, now=NOW, batch_blocks=1, vacuum=False
    )
    assert report.runs_deleted == 60
    assert report.batches >= 10
    assert report.vacuumed == []
    assert await remaining(pool) == {kept}


async def test_a_second_runner_skips_while_the_lock_is_held(pool: asyncpg.Pool) -> None:
    """If another maintenance holds the advisory lock, a run deletes nothing and says why."""
    await clean(pool)
    old = await add_run(pool, OLD[0])
    async with pool.acquire() as holder:
        assert await holder.fetchval("SELECT pg_try_advisory_lock($1)", MAINTENANCE_LOCK_KEY)
        try:
            report = await run_maintenance(pool, retention_months=12, archive_dir=None, now=NOW)
        finally:
            await holder.execute("SELECT pg_advisory_unlock($1)", MAINTENANCE_LOCK_KEY)
    assert report.skipped and "holds the lock" in str(report)
    assert await remaining(pool) == {old}
    after = await run_maintenance(pool, retention_months=12, archive_dir=None, now=NOW)
    assert not after.skipped and after.runs_deleted == 1


async def test_concurrent_runs_delete_everything_once(pool: asyncpg.Pool) -> None:
    """Started together, one runner works (the other skips or finds nothing left)."""
    await clean(pool)
    for t in OLD * 5:
        await add_run(pool, t)
    reports = await asyncio.gather(
        *(run_maintenance(pool, retention_months=12, archive_dir=None, now=NOW) for _ in range(3))
    )
    assert sum(r.runs_deleted for r in reports) == 15
    assert any(r.skipped for r in reports) or sorted(r.runs_deleted for r in reports) == [0, 0, 15]
    assert await remaining(pool) == set()
