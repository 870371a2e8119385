"""Retention: runs older than the retention period are archived (optionally) and deleted.

The layout stays a single `optimization_runs` table with a BRIN index on `created_at`
(docs/retention.md has the measurements behind that choice). Old runs are removed in bounded
batches of physical blocks: one BRIN-guided pass finds which blocks hold old rows, then each batch
is a TID range scan of `BATCH_BLOCKS` blocks, so the whole job reads each old block about twice
however many batches it takes (a `LIMIT n` loop would re-read the dead rows of earlier batches
every time). Child rows (`qnn_execution_metrics`, `anomalies`, `optimization_embeddings`,
`forecast_scores`) go with their run through `ON DELETE CASCADE`.

With an archive directory, every batch is first appended to one gzip'd NDJSON file per month of
`created_at` (`optimization_runs-YYYY-MM.ndjson.gz`, one run per line with its metrics, anomalies
and score nested; embeddings are derived data and are not archived), flushed to disk, and only then
deleted in the same transaction that read it. A crash between the two leaves the batch in both
places: the next run archives it again, so readers should keep the last line per `id`.

Deleting leaves BRIN summaries wide: a block range keeps the created_at span of the rows it once
held, and new runs written into the freed space widen it to "a year ago .. today", so that after a
year of monthly deletes every range matches every time-range query. After the VACUUM, the ranges
that held deleted rows are therefore summarised afresh (`brin_desummarize_range` +
`brin_summarize_range`), and new runs widen them only as far as they really reach.

Only one maintenance runs at a time: a second caller finds the advisory lock taken and returns a
report saying it skipped.
"""

from __future__ import annotations

import asyncio
import gzip
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import asyncpg
import structlog

from worker.analytics.accuracy import refresh_model_metrics

log = structlog.get_logger(__name__)

# Shared by every eglo process; distinct from the migration and scoring locks.
MAINTENANCE_LOCK_KEY: Final = 0x6567_6C6F_4D54  # "egloMT"
BATCH_BLOCKS: Final = 256  # 2 MB of heap per transaction: a few thousand runs at most
ARCHIVE_PREFIX: Final = "optimization_runs"
ARCHIVE_GZIP_LEVEL: Final = 6  # gzip's default 9 costs ~2x the CPU for a few % smaller files
# The BRIN indexes (on created_at) of the tables rows are deleted from, from db/migrations/0001.
BRIN_INDEXES: Final = {
    "optimization_runs": "optimization_runs_created_at_brin",
    "qnn_execution_metrics": "qnn_execution_metrics_created_at_brin",
}
DEFAULT_PAGES_PER_RANGE: Final = 128


@dataclass
class MaintenanceReport:
    skipped: bool = False
    reason: str = ""
    cutoff: datetime | None = None
    runs_deleted: int = 0
    runs_archived: int = 0
    batches: int = 0
    months: list[str] = field(default_factory=list)
    archive_files: list[Path] = field(default_factory=list)
    vacuumed: list[str] = field(default_factory=list)
    ranges_resummarized: int = 0
    seconds: float = 0.0
    tidy_seconds: float = 0.0  # VACUUM and BRIN re-summarising, included in seconds

    def __str__(self) -> str:
        if self.skipped:
            return f"maintenance skipped: {self.reason}"
        months = ", ".join(self.months) or "none"
        archived = f", archived {self.runs_archived}" if self.archive_files else ""
        return (
            f"retention cutoff {self.cutoff:%Y-%m-%d %H:%M} UTC: deleted {self.runs_deleted} runs"
            f"{archived} from months {months} in {self.batches} batches, {self.seconds:.1f} s"
            + (f"; vacuumed {', '.join(self.vacuumed)}" if self.vacuumed else "")
        )


def retention_cutoff(now: datetime, retention_months: int) -> datetime:
    """Start (UTC) of the month `retention_months` months before `now`'s month.

    Whole months are kept: with 12 months on 2025-06-15, runs from 2024-06-01 on stay.
    """
    if retention_months < 1:
        raise ValueError("retention_months must be at least 1")
    now = now.astimezone(UTC) if now.tzinfo else now.replace(tzinfo=UTC)
    index = now.year * 12 + (now.month - 1) - retention_months
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


# Which blocks hold old rows, grouped by $2 blocks: a BRIN bitmap scan reading only the block
# ranges whose created_at summary reaches below the cutoff.
_OLD_BLOCK_GROUPS = """
SELECT DISTINCT ((ctid::text::point)[0]::bigint / $2) AS grp
FROM {table} WHERE created_at < $1
ORDER BY grp
"""

_PAGES_PER_RANGE = """
SELECT coalesce((SELECT option_value::int FROM pg_options_to_table(c.reloptions)
                 WHERE option_name = 'pages_per_range'), $2)
FROM pg_class c WHERE c.oid = to_regclass($1)
"""

_CHUNK_PREDICATE = """
ctid >= format('(%s,0)', $2::bigint * $3)::tid
AND ctid < format('(%s,0)', ($2::bigint + 1) * $3)::tid
AND created_at < $1
"""

_DELETE_CHUNK = f"""
DELETE FROM optimization_runs WHERE {_CHUNK_PREDICATE}
RETURNING to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM') AS month
"""

_ARCHIVE_CHUNK = f"""
SELECT r.id, to_char(r.created_at AT TIME ZONE 'UTC', 'YYYY-MM') AS month,
       (to_jsonb(r) || jsonb_build_object(
            'qnn_execution_metrics', coalesce(
                (SELECT jsonb_agg(to_jsonb(m) - 'optimization_run_id' ORDER BY m.created_at)
                 FROM qnn_execution_metrics m WHERE m.optimization_run_id = r.id), '[]'),
            'anomalies', coalesce(
                (SELECT jsonb_agg(to_jsonb(a) - 'optimization_run_id' ORDER BY a.detected_at)
                 FROM anomalies a WHERE a.optimization_run_id = r.id), '[]'),
            'forecast_score',
                (SELECT to_jsonb(s) - 'run_id' FROM forecast_scores s WHERE s.run_id = r.id)
        ))::text AS line
FROM optimization_runs r WHERE {_CHUNK_PREDICATE}
FOR UPDATE
"""

_DELETE_IDS = "DELETE FROM optimization_runs WHERE id = ANY($1::uuid[])"

VACUUM_TABLES: Final = (
    "optimization_runs",
    "qnn_execution_metrics",
    "anomalies",
    "optimization_embeddings",
    "forecast_scores",
)


def _append_archive(path: Path, lines: list[str]) -> None:
    """Append one gzip member and make it durable before the rows it holds are deleted."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as raw:
        with gzip.GzipFile(fileobj=raw, mode="ab", compresslevel=ARCHIVE_GZIP_LEVEL) as gz:
            gz.write(("\n".join(lines) + "\n").encode())
        raw.flush()
        os.fsync(raw.fileno())


async def _archive_chunk(
    conn: asyncpg.Connection,
    cutoff: datetime,
    chunk: int,
    batch_blocks: int,
    archive_dir: Path,
    report: MaintenanceReport,
) -> list[str]:
    rows = await conn.fetch(_ARCHIVE_CHUNK, cutoff, chunk, batch_blocks)
    if not rows:
        return []
    by_month: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        by_month[r["month"]].append(r["line"])
    for month, lines in sorted(by_month.items()):
        path = archive_dir / f"{ARCHIVE_PREFIX}-{month}.ndjson.gz"
        await asyncio.to_thread(_append_archive, path, lines)
        if path not in report.archive_files:
            report.archive_files.append(path)
    await conn.execute(_DELETE_IDS, [r["id"] for r in rows])
    report.runs_archived += len(rows)
    return [r["month"] for r in rows]


async def run_maintenance(
    pool: asyncpg.Pool,
    *,
    retention_months: int,
    archive_dir: Path | None,
    now: datetime | None = None,
    batch_blocks: int = BATCH_BLOCKS,
    vacuum: bool = True,
) -> MaintenanceReport:
    """Archive (if `archive_dir`) and delete runs created before the retention cutoff.

    Returns a report; `skipped=True` when another maintenance holds the lock. VACUUM needs the
    table owner (the migrating role); under a role that may not, it is skipped and logged.
    """
    started = time.perf_counter()
    cutoff = retention_cutoff(now or datetime.now(UTC), retention_months)
    report = MaintenanceReport(cutoff=cutoff)
    async with pool.acquire() as conn:
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", MAINTENANCE_LOCK_KEY):
            report.skipped = True
            report.reason = "another maintenance run holds the lock"
            log.info("maintenance.skipped", reason=report.reason)
            return report
        try:
            # Found before deleting: afterwards nothing says where the deleted rows were.
            touched = await _old_brin_ranges(conn, cutoff)
            await _delete_old_runs(conn, cutoff, archive_dir, batch_blocks, report)
            if report.runs_deleted:
                # Deleted runs took their scores along; the rollups must not keep counting them.
                await refresh_model_metrics(conn)
                if vacuum:
                    tidy_started = time.perf_counter()
                    await _vacuum(conn, report)
                    await _resummarize(conn, touched, report)
                    report.tidy_seconds = time.perf_counter() - tidy_started
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", MAINTENANCE_LOCK_KEY)
    report.seconds = time.perf_counter() - started
    log.info(
        "maintenance.done",
        cutoff=cutoff.isoformat(),
        deleted=report.runs_deleted,
        archived=report.runs_archived,
        batches=report.batches,
        seconds=round(report.seconds, 2),
    )
    return report


async def _delete_old_runs(
    conn: asyncpg.Connection,
    cutoff: datetime,
    archive_dir: Path | None,
    batch_blocks: int,
    report: MaintenanceReport,
) -> None:
    sql = _OLD_BLOCK_GROUPS.format(table="optimization_runs")
    chunks = [r["grp"] for r in await conn.fetch(sql, cutoff, batch_blocks)]
    months: set[str] = set()
    for chunk in chunks:
        async with conn.transaction():
            if archive_dir is not None:
                deleted = await _archive_chunk(
                    conn, cutoff, chunk, batch_blocks, archive_dir, report
                )
            else:
                deleted = [
                    r["month"]
                    for r in await conn.fetch(_DELETE_CHUNK, cutoff, chunk, batch_blocks)
                ]
        report.batches += 1
        report.runs_deleted += len(deleted)
        months.update(deleted)
    report.months = sorted(months)


_MAY_VACUUM = """
SELECT pg_has_role(c.relowner, 'MEMBER')
       OR (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
FROM pg_class c WHERE c.oid = $1::regclass
"""


async def _vacuum(conn: asyncpg.Connection, report: MaintenanceReport) -> None:
    for table in VACUUM_TABLES:
        # A non-owner's VACUUM only warns and skips; say so instead of reporting it done.
        if not await conn.fetchval(_MAY_VACUUM, table):
            log.warning("maintenance.vacuum.not_permitted", table=table)
            continue
        # Makes the freed space reusable and summarises new BRIN ranges.
        await conn.execute(f"VACUUM (ANALYZE) {table}")
        report.vacuumed.append(table)


async def _old_brin_ranges(conn: asyncpg.Connection, cutoff: datetime) -> dict[str, list[int]]:
    """{index: first block of each range holding rows older than the cutoff}."""
    ranges: dict[str, list[int]] = {}
    for table, index in BRIN_INDEXES.items():
        per_range = await conn.fetchval(_PAGES_PER_RANGE, index, DEFAULT_PAGES_PER_RANGE)
        if per_range is None:  # the index is not there (renamed or dropped): nothing to redo
            continue
        sql = _OLD_BLOCK_GROUPS.format(table=table)
        ranges[index] = [r["grp"] * per_range for r in await conn.fetch(sql, cutoff, per_range)]
    return ranges


async def _resummarize(
    conn: asyncpg.Connection, ranges: dict[str, list[int]], report: MaintenanceReport
) -> None:
    for index, starts in ranges.items():
        table = next(t for t, i in BRIN_INDEXES.items() if i == index)
        if not await conn.fetchval(_MAY_VACUUM, table):
            log.warning("maintenance.brin.not_permitted", index=index)
            continue
        for start in starts:
            # Desummarising first is what narrows the range: summarising only ever widens.
            await conn.execute("SELECT brin_desummarize_range($1::regclass, $2)", index, start)
            await conn.execute("SELECT brin_summarize_range($1::regclass, $2)", index, start)
        report.ranges_resummarized += len(starts)
