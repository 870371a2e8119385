"""Retention layouts for optimization_runs, measured (not a test).

    python -m benchmarks.retention_layout [--rows 1200000] [--months 12] [--writers 2]

Two scratch databases on the configured (or embedded) Postgres, dropped afterwards:

* brin: the real schema (every db/migrations/*.sql) — one table, UNIQUE (request_id), a BRIN
  index on created_at; old months are deleted by
  `worker.ops.maintenance.run_maintenance` (batches of
  physical blocks) and the tables vacuumed.
* partitioned: optimization_runs and qnn_execution_metrics partitioned by month of the run's
  created_at. A partitioned table's unique constraints must include the partition key, so
  idempotency moves to a `run_request_ids (request_id PRIMARY KEY, run_id, created_at)` table
  that the insert claims first (a CTE: claim ON CONFLICT DO NOTHING, insert only what was
  claimed). A month goes by DETACH + DROP of its partitions, plus a batched DELETE of its
  request ids (that table cannot be partitioned by month either, for the same reason).

Rows: real sample requests of all four types (`producers.sample`) with the emulator's results,
spread evenly over `--months` months of created_at, written like the worker writes them: batches
of `--batch` runs (+ one metrics row each) per transaction, `--writers` connections at once.

Measured: insert throughput (whole load, and its last 10 % at full size), a one-week and a
one-day range query (median of 7, warm), 100 idempotency lookups by request_id, dropping the
oldest month (time, longest transaction, WAL written, VACUUM), archiving the next month, then one
more month of inserts into the space the deletes freed and the week query on it (does the BRIN
index stay selective?).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from pydantic import TypeAdapter

from contracts.requests import AnyRequest, OptimizationRequest, request_fingerprint
from db.migrate import migrate
from db.pool import connect, create_pool
from producers.sample import generate_requests
from qnn_emulator.predictors import predict
from worker.core.result_checks import check_result
from worker.ops.maintenance import run_maintenance
from worker.runtime.connections import database_url
from worker.settings import Settings

ADAPTER: TypeAdapter[AnyRequest] = TypeAdapter(OptimizationRequest)
SAMPLES = 400
QUERY_REPEATS = 7

_RUN_COLUMNS = """id, request_id, request_type, region, forecast_date, input_payload,
    request_fingerprint, result_payload, status, qnn_model_id, qnn_execution_time, attempts,
    created_at, updated_at"""
_UNNEST = """unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::date[], $6::text[],
    $7::text[], $8::text[], $9::text[], $10::text[], $11::float8[], $12::int[], $13::timestamptz[])
    AS t(id, request_id, request_type, region, forecast_date, input_payload, fingerprint,
         result_payload, status, model_id, execution_s, attempts, created_at)"""
_SELECT_T = """t.id, t.request_id, t.request_type, t.region, t.forecast_date,
    t.input_payload::jsonb, t.fingerprint, t.result_payload::jsonb, t.status, t.model_id,
    t.execution_s, t.attempts, t.created_at, t.created_at"""

# The worker's statement (worker/runtime/store.py) with created_at given, so rows span months.
INSERT_BRIN = f"""
INSERT INTO optimization_runs ({_RUN_COLUMNS})
SELECT {_SELECT_T} FROM {_UNNEST}
ON CONFLICT (request_id) DO NOTHING
RETURNING id, created_at
"""

INSERT_PARTITIONED = f"""
WITH t AS (SELECT * FROM {_UNNEST}),
claimed AS (
    INSERT INTO run_request_ids (request_id, run_id, created_at)
    SELECT request_id, id, created_at FROM t
    ON CONFLICT (request_id) DO NOTHING
    RETURNING run_id
)
INSERT INTO optimization_runs ({_RUN_COLUMNS})
SELECT {_SELECT_T} FROM t JOIN claimed ON claimed.run_id = t.id
RETURNING id, created_at
"""

INSERT_METRICS_BRIN = """
INSERT INTO qnn_execution_metrics (optimization_run_id, model_id, device_used, circuit_depth,
    n_qubits, execution_time_ms, quantum_cost_usd, call_attempts, round_trip_ms, created_at)
SELECT id, 'PRETRAINED_QNN_GRID_MODEL', 'emulator', 40, 16, 12.5, 0.002, 1, 15.0, created_at
FROM unnest($1::uuid[], $2::timestamptz[]) AS t(id, created_at)
"""

INSERT_METRICS_PARTITIONED = """
INSERT INTO qnn_execution_metrics (optimization_run_id, run_created_at, model_id, device_used,
    circuit_depth, n_qubits, execution_time_ms, quantum_cost_usd, call_attempts, round_trip_ms,
    created_at)
SELECT id, created_at, 'PRETRAINED_QNN_GRID_MODEL', 'emulator', 40, 16, 12.5, 0.002, 1, 15.0,
       created_at
FROM unnest($1::uuid[], $2::timestamptz[]) AS t(id, created_at)
"""

PARTITIONED_DDL = """
CREATE TABLE run_request_ids (
    request_id TEXT PRIMARY KEY,
    run_id     UUID NOT NULL,
    created_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX run_request_ids_created_at_brin ON run_request_ids USING brin (created_at);

CREATE TABLE optimization_runs (
    id                 UUID NOT NULL DEFAULT gen_random_uuid(),
    request_id         TEXT NOT NULL,
    request_type       TEXT NOT NULL,
    region             TEXT NOT NULL,
    forecast_date      DATE NOT NULL,
    input_payload      JSONB NOT NULL,
    request_fingerprint TEXT NOT NULL,
    result_payload     JSONB,
    status             TEXT NOT NULL DEFAULT 'completed',
    error_code         TEXT,
    error_message      TEXT,
    qnn_model_id       TEXT,
    qnn_execution_time DOUBLE PRECISION,
    attempts           INT NOT NULL DEFAULT 1,
    published_at       TIMESTAMPTZ,
    created_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (id, created_at)
) PARTITION BY RANGE (created_at);
CREATE INDEX ON optimization_runs USING brin (created_at);
CREATE INDEX ON optimization_runs (request_type, region, forecast_date);
CREATE INDEX ON optimization_runs (status, created_at) WHERE status <> 'completed';

CREATE TABLE qnn_execution_metrics (
    id                  UUID NOT NULL DEFAULT gen_random_uuid(),
    optimization_run_id UUID NOT NULL,
    run_created_at      TIMESTAMPTZ NOT NULL,
    model_id            TEXT,
    device_used         TEXT,
    circuit_depth       INT,
    n_qubits            INT,
    execution_time_ms   DOUBLE PRECISION,
    quantum_cost_usd    DOUBLE PRECISION,
    call_attempts       INT NOT NULL DEFAULT 1,
    round_trip_ms       DOUBLE PRECISION,
    created_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (id, run_created_at),
    FOREIGN KEY (optimization_run_id, run_created_at)
        REFERENCES optimization_runs (id, created_at) ON DELETE CASCADE
) PARTITION BY RANGE (run_created_at);
CREATE INDEX ON qnn_execution_metrics (optimization_run_id);
"""

WEEK_QUERY = """
SELECT request_type, status, count(*), avg(qnn_execution_time)
FROM optimization_runs WHERE created_at >= $1 AND created_at < $2
GROUP BY 1, 2
"""
DAY_QUERY = """
SELECT id, request_id, status, qnn_model_id FROM optimization_runs
WHERE created_at >= $1 AND created_at < $2
"""
FIND_BRIN = """
SELECT request_id, id::text, request_fingerprint, status
FROM optimization_runs WHERE request_id = ANY($1::text[])
"""
FIND_PARTITIONED = """
SELECT k.request_id, r.id::text, r.request_fingerprint, r.status
FROM run_request_ids k
JOIN optimization_runs r ON r.id = k.run_id AND r.created_at = k.created_at
WHERE k.request_id = ANY($1::text[])
"""


def month_start(base: datetime, offset: int) -> datetime:
    index = base.year * 12 + base.month - 1 + offset
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


@dataclass
class Sample:
    request_type: str
    region: str
    forecast_date: Any
    input_json: str
    result_json: str
    fingerprint: str


def make_samples(count: int) -> list[Sample]:
    out = []
    for doc in generate_requests(count, seed=20240601):
        request = ADAPTER.validate_python(doc)
        result, _ = check_result(request, predict(request.payload).result, {})
        out.append(
            Sample(
                request.request_type,
                request.region,
                request.forecast_date,
                orjson.dumps(request.model_dump(mode="json")).decode(),
                orjson.dumps(result).decode(),
                request_fingerprint(request),
            )
        )
    return out


def batches(
    samples: list[Sample], start: datetime, end: datetime, rows: int, batch: int
) -> Iterator[list[list[Any]]]:
    """Column lists for `rows` runs with created_at evenly from start to end, in time order."""
    step = (end - start) / rows
    cycle = itertools.cycle(samples)
    for first in range(0, rows, batch):
        n = min(batch, rows - first)
        chosen = [next(cycle) for _ in range(n)]
        yield [
            [uuid.uuid4() for _ in range(n)],
            [f"bench-{uuid.uuid4().hex}" for _ in range(n)],
            [s.request_type for s in chosen],
            [s.region for s in chosen],
            [s.forecast_date for s in chosen],
            [s.input_json for s in chosen],
            [s.fingerprint for s in chosen],
            [s.result_json for s in chosen],
            ["completed"] * n,
            ["PRETRAINED_QNN_GRID_MODEL"] * n,
            [0.0125] * n,
            [1] * n,
            [start + (first + i) * step for i in range(n)],
        ]


@dataclass
class Layout:
    name: str
    url: str
    insert_runs: str
    insert_metrics: str
    find: str
    figures: dict[str, Any] = field(default_factory=dict)


async def load(
    layout: Layout, samples: list[Sample], start: datetime, end: datetime, rows: int, args: Any
) -> tuple[float, float]:
    """Insert rows; returns (rows/s overall, rows/s over the last 10 %)."""
    source = batches(samples, start, end, rows, args.batch)
    lock = asyncio.Lock()
    done = 0
    tail_from = rows - rows // 10
    tail_started: float | None = None

    async def writer() -> None:
        nonlocal done, tail_started
        conn = await asyncpg.connect(layout.url)
        try:
            while True:
                async with lock:
                    cols = next(source, None)
                if cols is None:
                    return
                async with conn.transaction():
                    got = await conn.fetch(layout.insert_runs, *cols)
                    await conn.execute(
                        layout.insert_metrics,
                        [r["id"] for r in got],
                        [r["created_at"] for r in got],
                    )
                done += len(cols[0])
                if tail_started is None and done >= tail_from:
                    tail_started = time.perf_counter()
        finally:
            await conn.close()

    started = time.perf_counter()
    await asyncio.gather(*(writer() for _ in range(args.writers)))
    finished = time.perf_counter()
    tail = (rows - tail_from) / (finished - (tail_started or started))
    return rows / (finished - started), tail


async def timed_query(conn: asyncpg.Connection, sql: str, *params: Any) -> tuple[float, int]:
    """(median ms over QUERY_REPEATS warm runs, shared buffers touched by one run)."""
    await conn.fetch(sql, *params)  # warm
    times = []
    for _ in range(QUERY_REPEATS):
        t0 = time.perf_counter()
        await conn.fetch(sql, *params)
        times.append((time.perf_counter() - t0) * 1000)
    plan = await conn.fetchval(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}", *params)
    top = orjson.loads(plan)[0]["Plan"]
    blocks = int(top.get("Shared Hit Blocks", 0) + top.get("Shared Read Blocks", 0))
    return statistics.median(times), blocks


async def wal_bytes(conn: asyncpg.Connection, since: str) -> int:
    sql = "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)"
    return int(await conn.fetchval(sql, since))


async def lsn(conn: asyncpg.Connection) -> str:
    return str(await conn.fetchval("SELECT pg_current_wal_lsn()::text"))


async def timed(op: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    value = await op()
    return time.perf_counter() - t0, value


async def relation_mb(conn: asyncpg.Connection, names: list[str]) -> float:
    total = 0
    for name in names:
        total += await conn.fetchval(
            """SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)
               FROM pg_class c
               WHERE c.oid = $1::regclass
                  OR c.oid IN (SELECT inhrelid FROM pg_inherits WHERE inhparent = $1::regclass)""",
            name,
        )
    return total / 2**20


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir())


async def drop_month_brin(
    layout: Layout, now: datetime, retention: int, archive: Path | None
) -> dict[str, Any]:
    pool = await create_pool(layout.url, size=2)
    try:
        async with pool.acquire() as conn:
            before = await lsn(conn)
        report = await run_maintenance(
            pool, retention_months=retention, archive_dir=archive, now=now
        )
        async with pool.acquire() as conn:
            wal = await wal_bytes(conn, before)
    finally:
        await pool.close()
    size = await asyncio.to_thread(_dir_bytes, archive) if archive else 0
    seconds = report.seconds - report.tidy_seconds
    return {
        "seconds": seconds,
        "rows": report.runs_deleted,
        "batches": report.batches,
        "rows_per_s": report.runs_deleted / seconds if seconds else 0,
        "wal_mb": wal / 2**20,
        "vacuum_s": report.tidy_seconds,
        "ranges": report.ranges_resummarized,
        "archive_mb": size / 2**20,
    }


async def drop_month_partitioned(layout: Layout, month: datetime) -> dict[str, Any]:
    suffix = f"{month:%Y_%m}"
    conn = await asyncpg.connect(layout.url)
    try:
        before = await lsn(conn)
        rows = await conn.fetchval(f"SELECT count(*) FROM optimization_runs_{suffix}")
        t0 = time.perf_counter()
        for table in ("qnn_execution_metrics", "optimization_runs"):
            await conn.execute(f"ALTER TABLE {table} DETACH PARTITION {table}_{suffix}")
            await conn.execute(f"DROP TABLE {table}_{suffix}")
        drop_s = time.perf_counter() - t0
        longest = 0.0
        deleted = 0
        t1 = time.perf_counter()
        cutoff = month_start(month, 1)
        while True:
            b0 = time.perf_counter()
            n = await conn.fetchval(
                """WITH gone AS (
                       DELETE FROM run_request_ids WHERE ctid = ANY(ARRAY(
                           SELECT ctid FROM run_request_ids WHERE created_at < $1 LIMIT 10000))
                       RETURNING 1)
                   SELECT count(*) FROM gone""",
                cutoff,
            )
            longest = max(longest, time.perf_counter() - b0)
            deleted += n
            if n == 0:
                break
        ids_s = time.perf_counter() - t1
        vacuum_s, _ = await timed(lambda: conn.execute("VACUUM (ANALYZE) run_request_ids"))
        wal = await wal_bytes(conn, before)
    finally:
        await conn.close()
    return {
        "seconds": drop_s + ids_s,
        "drop_s": drop_s,
        "ids_s": ids_s,
        "rows": rows,
        "ids_deleted": deleted,
        "longest_batch_s": longest,
        "wal_mb": wal / 2**20,
        "vacuum_s": vacuum_s,
    }


async def create_partitions(url: str, first: datetime, months: int) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(PARTITIONED_DDL)
        for i in range(months):
            lo, hi = month_start(first, i), month_start(first, i + 1)
            for table in ("optimization_runs", "qnn_execution_metrics"):
                await conn.execute(
                    f"CREATE TABLE {table}_{lo:%Y_%m} PARTITION OF {table} "
                    f"FOR VALUES FROM ('{lo.isoformat()}') TO ('{hi.isoformat()}')"
                )
    finally:
        await conn.close()


async def measure(layout: Layout, samples: list[Sample], args: Any, first: datetime) -> None:
    fig = layout.figures
    months = args.months
    end = month_start(first, months)
    print(f"[{layout.name}] loading {args.rows:,} runs over {months} months ...", flush=True)
    fig["insert_rps"], fig["insert_tail_rps"] = await load(
        layout, samples, first, end, args.rows, args
    )
    conn = await asyncpg.connect(layout.url)
    try:
        # Steady state: autovacuum would have summarised the BRIN ranges and analysed by now.
        await conn.execute("VACUUM (ANALYZE)")
        fig["size_mb"] = await relation_mb(conn, ["optimization_runs", "qnn_execution_metrics"])
        if layout.name == "partitioned":
            fig["size_mb"] += await relation_mb(conn, ["run_request_ids"])
        week = month_start(first, months // 2) + timedelta(days=7)
        fig["week_ms"], fig["week_blocks"] = await timed_query(
            conn, WEEK_QUERY, week, week + timedelta(days=7)
        )
        fig["day_ms"], fig["day_blocks"] = await timed_query(
            conn, DAY_QUERY, week, week + timedelta(days=1)
        )
        ids = [
            r["request_id"]
            for r in await conn.fetch(
                "SELECT request_id FROM optimization_runs TABLESAMPLE SYSTEM (1) LIMIT 100"
            )
        ]
        fig["find_ms"], _ = await timed_query(conn, layout.find, ids)
    finally:
        await conn.close()

    now = month_start(first, months) + timedelta(days=14)
    print(f"[{layout.name}] dropping the oldest month ...", flush=True)
    if layout.name == "brin":
        fig["drop"] = await drop_month_brin(layout, now, months - 1, None)
        with tempfile.TemporaryDirectory() as tmp:
            fig["archive"] = await drop_month_brin(layout, now, months - 2, Path(tmp))
    else:
        fig["drop"] = await drop_month_partitioned(layout, first)

    print(f"[{layout.name}] one more month of inserts into the freed space ...", flush=True)
    extra_args = argparse.Namespace(**{**vars(args), "rows": args.rows // months})
    fig["refill_rps"], _ = await load(
        layout, samples, end, month_start(first, months + 1), extra_args.rows, extra_args
    )
    conn = await asyncpg.connect(layout.url)
    try:
        await conn.execute("VACUUM (ANALYZE) optimization_runs")
        week = end + timedelta(days=7)
        fig["new_week_ms"], fig["new_week_blocks"] = await timed_query(
            conn, WEEK_QUERY, week, week + timedelta(days=7)
        )
        fig["new_week_rows"] = await conn.fetchval(
            "SELECT count(*) FROM optimization_runs WHERE created_at >= $1 AND created_at < $2",
            week,
            week + timedelta(days=7),
        )
    finally:
        await conn.close()


def report(brin: Layout, part: Layout, args: Any) -> str:
    b, p = brin.figures, part.figures
    rows = [
        ("insert, whole load (runs/s)", f"{b['insert_rps']:,.0f}", f"{p['insert_rps']:,.0f}"),
        (
            "insert, last 10 % (runs/s)",
            f"{b['insert_tail_rps']:,.0f}",
            f"{p['insert_tail_rps']:,.0f}",
        ),
        ("size, runs + metrics (+ ids) (MB)", f"{b['size_mb']:,.0f}", f"{p['size_mb']:,.0f}"),
        (
            "one-week range query (ms, blocks)",
            f"{b['week_ms']:.1f} ({b['week_blocks']:,})",
            f"{p['week_ms']:.1f} ({p['week_blocks']:,})",
        ),
        (
            "one-day range query (ms, blocks)",
            f"{b['day_ms']:.1f} ({b['day_blocks']:,})",
            f"{p['day_ms']:.1f} ({p['day_blocks']:,})",
        ),
        ("100 request_id lookups (ms)", f"{b['find_ms']:.1f}", f"{p['find_ms']:.1f}"),
        ("drop oldest month: runs", f"{b['drop']['rows']:,}", f"{p['drop']['rows']:,}"),
        (
            "drop oldest month: time (s)",
            f"{b['drop']['seconds']:.1f} ({b['drop']['batches']} batches)",
            f"{p['drop']['seconds']:.2f} (DROP {p['drop']['drop_s']:.2f} + ids "
            f"{p['drop']['ids_s']:.2f})",
        ),
        (
            "drop oldest month: WAL incl. tidy-up (MB)",
            f"{b['drop']['wal_mb']:,.0f}",
            f"{p['drop']['wal_mb']:,.0f}",
        ),
        (
            "tidy-up: VACUUM (+ BRIN re-summarising) (s)",
            f"{b['drop']['vacuum_s']:.1f} ({b['drop']['ranges']} ranges)",
            f"{p['drop']['vacuum_s']:.1f} (ids table only)",
        ),
        (
            "archive + delete next month (s, MB gz)",
            f"{b['archive']['seconds']:.1f} ({b['archive']['archive_mb']:.0f} MB)",
            "n/a",
        ),
        ("refill one month (runs/s)", f"{b['refill_rps']:,.0f}", f"{p['refill_rps']:,.0f}"),
        (
            "week query on the refilled month (ms, blocks)",
            f"{b['new_week_ms']:.1f} ({b['new_week_blocks']:,})",
            f"{p['new_week_ms']:.1f} ({p['new_week_blocks']:,})",
        ),
    ]
    width = max(len(r[0]) for r in rows)
    out = [
        f"{args.rows:,} runs over {args.months} months, batches of {args.batch}, "
        f"{args.writers} writers; week query covers ~{b['new_week_rows']:,} runs",
        "",
        f"| {'measure':<{width}} | brin (current) | partitioned |",
        f"|{'-' * (width + 2)}|---|---|",
    ]
    out += [f"| {name:<{width}} | {x} | {y} |" for name, x, y in rows]
    return "\n".join(out)


async def main(args: argparse.Namespace) -> None:
    server = database_url(Settings())
    tag = uuid.uuid4().hex[:6]
    names = {"brin": f"eglo_retention_brin_{tag}", "partitioned": f"eglo_retention_part_{tag}"}
    admin = await asyncpg.connect(server)
    try:
        for name in names.values():
            await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()

    def url_of(name: str) -> str:
        from urllib.parse import urlsplit, urlunsplit

        return urlunsplit(urlsplit(server)._replace(path=f"/{name}"))

    try:
        conn = await connect(url_of(names["brin"]))
        try:
            await migrate(conn)
        finally:
            await conn.close()
        first = month_start(datetime.now(UTC), -args.months)
        await create_partitions(url_of(names["partitioned"]), first, args.months + 2)
        print(f"preparing {SAMPLES} sample requests with emulator results ...", flush=True)
        samples = make_samples(SAMPLES)
        brin = Layout("brin", url_of(names["brin"]), INSERT_BRIN, INSERT_METRICS_BRIN, FIND_BRIN)
        part = Layout(
            "partitioned",
            url_of(names["partitioned"]),
            INSERT_PARTITIONED,
            INSERT_METRICS_PARTITIONED,
            FIND_PARTITIONED,
        )
        for layout in (brin, part):
            await measure(layout, samples, args, first)
        print()
        print(report(brin, part, args))
    finally:
        if not args.keep:
            admin = await asyncpg.connect(server)
            try:
                for name in names.values():
                    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            finally:
                await admin.close()


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_200_000)
    parser.add_argument("--months", type=int, default=12)
    parser.add_argument("--batch", type=int, default=100, help="runs per transaction")
    parser.add_argument("--writers", type=int, default=2, help="concurrent transactions")
    parser.add_argument("--keep", action="store_true", help="keep the scratch databases")
    asyncio.run(main(parser.parse_args()))


if __name__ == "__main__":
    cli()
