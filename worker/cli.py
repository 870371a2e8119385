"""`eglo`: one console script, one subcommand per job."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import orjson

from worker.settings import Settings

T = TypeVar("T")


def _run(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def _serve(coro: Coroutine[Any, Any, int]) -> int:
    """A long-running service (worker, embedder, API) on a heap settled for it."""
    from worker.runtime.service import settle_heap

    settle_heap()
    return _run(coro)


def _setup(args: argparse.Namespace, **flags: Any) -> Settings:
    """The settings (environment, then the command's own flags, when given) and logging."""
    from worker.observability import logs, tracing

    settings = Settings(**{name: value for name, value in flags.items() if value is not None})
    secrets = tuple(
        s.get_secret_value()
        for s in (settings.qnn_api_key, settings.embedder_api_key)
        if s is not None
    )
    logs.configure(settings.log_level, json=settings.log_json, secrets=secrets)
    tracing.configure(
        settings.tracing_enabled,
        service_name=f"eglo-{args.command}",
        otlp_endpoint=settings.otlp_endpoint,
    )
    return settings


async def _migrate(settings: Settings) -> int:
    from db.migrate import migrate
    from worker.runtime.connections import connect_database, database_url

    conn = await connect_database(database_url(settings))
    try:
        applied = await migrate(conn)
    finally:
        await conn.close()
    print(f"migrations applied: {', '.join(applied) if applied else 'none (up to date)'}")
    return 0


async def _migrate_check(settings: Settings, wait_s: float) -> int:
    """0 when the schema is current, 1 while migrations are pending (after waiting up to wait_s
    for them: an init container's gate), 2 when the database cannot be asked (unreachable, or
    the role may not read schema_migrations: see db/worker_role.sql)."""
    from db.migrate import schema_status
    from worker.runtime.connections import connect_database, database_url

    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    said = ""
    while True:
        try:
            conn = await asyncio.wait_for(connect_database(database_url(settings)), timeout=10)
            try:
                status = await schema_status(conn)
            finally:
                await conn.close()
            line, code = status.describe(), 0 if status.current else 1
            if not status.current:
                line += f" (pending: {', '.join(status.pending)})"
        except asyncpg.PostgresError as exc:  # e.g. no SELECT on schema_migrations
            line, code = f"cannot read the schema version: {type(exc).__name__}: {exc}", 2
        except (OSError, TimeoutError, asyncpg.InterfaceError) as exc:
            line, code = f"database unreachable: {type(exc).__name__}: {exc}", 2
        if line != said:
            print(line, file=sys.stdout if code == 0 else sys.stderr, flush=True)
            said = line
        if code == 0 or loop.time() >= deadline:
            return code
        await asyncio.sleep(min(2.0, max(0.0, deadline - loop.time())))


def cmd_migrate(args: argparse.Namespace) -> int:
    settings = _setup(args)
    if args.check:
        return _run(_migrate_check(settings, args.wait))
    return _run(_migrate(settings))


def cmd_worker(args: argparse.Namespace) -> int:
    from worker.runtime.app import run_worker

    settings = _setup(args, prefetch=args.prefetch or None)
    return _serve(run_worker(settings, burst=args.burst))


async def _publish(settings: Settings, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from producers.publisher import Publisher
    from producers.reader import read_requests
    from worker.runtime.connections import amqp_url

    stream = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")  # noqa: SIM115, ASYNC230 - read lazily, a line at a time
    bad = 0
    with stream, tqdm(unit="req", desc="published", disable=args.quiet, file=sys.stderr) as bar:

        def good_requests() -> Any:
            nonlocal bad
            for item in read_requests(stream):
                if item.request is not None:
                    yield item.request
                else:
                    bad += 1
                    bar.write(f"skipped {item.error}", file=sys.stderr)

        async with Publisher.connect(amqp_url(settings)) as publisher:
            report = await publisher.publish_many(
                good_requests(), rate=args.rate, on_done=lambda: bar.update()
            )
    for request_id, error in report.failed[:20]:
        print(f"not confirmed: {request_id}: {error}", file=sys.stderr)
    print(
        f"confirmed {len(report.confirmed)}, not confirmed {len(report.failed)}, "
        f"bad lines skipped {bad}",
        file=sys.stderr,
    )
    if report.failed:
        return 1
    return 3 if bad else 0


def cmd_publish(args: argparse.Namespace) -> int:
    return _run(_publish(_setup(args), args))


def cmd_sample(args: argparse.Namespace) -> int:
    import orjson

    from producers.sample import generate_requests

    out = sys.stdout.buffer
    for request in generate_requests(args.count, args.seed, id_prefix=args.id_prefix):
        out.write(orjson.dumps(request) + b"\n")
    return 0


def cmd_schemas(args: argparse.Namespace) -> int:
    from contracts.schemas import write_schemas

    for path in write_schemas(Path(args.out)):
        print(path)
    return 0


def cmd_emulator(args: argparse.Namespace) -> int:
    from qnn_emulator.cli import run

    return run(args)


async def _summary(settings: Settings, prefix: str) -> int:
    from worker.analytics.report import format_summary, summary
    from worker.runtime.connections import connect_database, database_url

    conn = await connect_database(database_url(settings))
    try:
        print(format_summary(await summary(conn, prefix)))
    finally:
        await conn.close()
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    return _run(_summary(_setup(args), args.prefix))


def cmd_db_url(args: argparse.Namespace) -> int:
    from worker.runtime.connections import database_url

    print(database_url(Settings()))
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    from worker.api.auth import TokenFileError
    from worker.api.server import load_tokens, main_error, run_api
    from worker.observability import logs

    settings = _setup(args, api_host=args.host or None, api_port=args.port)
    try:
        tokens = load_tokens(settings)
    except TokenFileError as exc:
        return main_error(str(exc))
    keys = (settings.qnn_api_key, settings.embedder_api_key)
    secrets = tuple(s.get_secret_value() for s in keys if s is not None) + tokens.tokens
    logs.configure(settings.log_level, json=settings.log_json, secrets=secrets)
    return _serve(run_api(settings, tokens))


def cmd_demo(args: argparse.Namespace) -> int:
    from worker.ops.demo import run_demo

    return run_demo(_setup(args), count=args.count, serve=args.serve)


def cmd_dlq(args: argparse.Namespace) -> int:
    from worker.ops import dlq
    from worker.runtime.connections import amqp_url

    settings = _setup(args)
    url = amqp_url(settings)
    if args.dlq_command == "list":
        print(dlq.format_dead_letters(_run_value(dlq.list_dead_letters(url, limit=args.limit))))
    else:
        replayed, kept = _run_value(
            dlq.replay_dead_letters(url, reason=args.reason, limit=args.limit)
        )
        print(f"replayed {replayed} dead letter(s) to eglo.requests; {kept} left in the DLQ")
    return 0


def _run_value(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def cmd_embedder(args: argparse.Namespace) -> int:
    from worker.embedder.service import run_embedder

    settings = _setup(args, embedder_prefetch=args.prefetch or None)
    return _serve(run_embedder(settings, burst=args.burst))


def cmd_similar(args: argparse.Namespace) -> int:
    from worker.analytics.similarity import run_similar

    settings = _setup(args)
    return _run(
        run_similar(settings, args.run_id, k=args.k, model=args.model, same_type=not args.any_type)
    )


async def _anomalies(settings: Settings, args: argparse.Namespace) -> int:
    from worker.ops import monitoring
    from worker.runtime.connections import database_url, open_pool
    from worker.runtime.qnn import call_limits, make_http_client

    limits = call_limits(settings)
    pool = await open_pool(database_url(settings), size=2)
    try:
        async with make_http_client(settings) as qnn:
            if args.anomalies_command == "sync":
                new, known = await monitoring.sync_anomalies(pool, qnn, limits=limits)
                print(f"synced QNN anomalies: {new} new, {known} already known")
            elif args.anomalies_command == "list":
                rows = await monitoring.list_anomalies(
                    pool, unresolved=args.unresolved, limit=args.limit
                )
                print(monitoring.format_anomalies(rows))
            else:
                try:
                    source = await monitoring.resolve_anomaly(
                        pool, qnn, args.anomaly_id, limits=limits
                    )
                except monitoring.AnomalyNotFound as exc:
                    print(f"eglo anomalies resolve: {exc}", file=sys.stderr)
                    return 1
                print(
                    f"resolved {args.anomaly_id}" + (" (and on the QNN)" if source == "qnn" else "")
                )
    finally:
        await pool.close()
    return 0


def cmd_anomalies(args: argparse.Namespace) -> int:
    return _run(_anomalies(_setup(args), args))


async def _qnn_logs(settings: Settings, model_id: str, limit: int) -> int:
    from worker.ops.monitoring import model_logs
    from worker.runtime.qnn import call_limits, make_http_client

    async with make_http_client(settings) as qnn:
        for entry in (await model_logs(qnn, model_id, limits=call_limits(settings)))[-limit:]:
            print(orjson.dumps(entry).decode())
    return 0


def cmd_qnn_logs(args: argparse.Namespace) -> int:
    return _run(_qnn_logs(_setup(args), args.model_id, args.limit))


@contextlib.asynccontextmanager
async def _pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    from worker.runtime.connections import database_url, open_pool

    pool = await open_pool(database_url(settings), size=2)
    try:
        yield pool
    finally:
        await pool.close()


async def _datasets(settings: Settings, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from worker.analytics.accuracy import score_pending
    from worker.ops import datasets

    async with _pool(settings) as pool:
        if args.datasets_command == "list":
            print(datasets.format_datasets(await datasets.list_datasets(pool, args.region)))
            return 0
        source = sys.stdin if args.file == "-" else args.file
        try:
            with tqdm(unit="day", file=sys.stderr, disable=args.quiet) as bar:
                report = await datasets.import_datasets(
                    pool, source, fmt=args.format, progress=bar.update
                )
        except datasets.DatasetFormatError as exc:
            print(f"eglo datasets import: {exc}", file=sys.stderr)
            return 2
        datasets.print_errors(report, sys.stderr)
        print(report, file=sys.stderr)
        # New actuals: score the forecasts they cover ("whichever arrives later").
        scored = 0
        for region, days in report.regions().items():
            scored += await score_pending(pool, region=region, dates=days)
        print(f"scored {scored} forecast(s) against the imported actuals", file=sys.stderr)
        return 3 if report.rejected else 0


def cmd_datasets(args: argparse.Namespace) -> int:
    return _run(_datasets(_setup(args), args))


async def _report_accuracy(settings: Settings, args: argparse.Namespace) -> int:
    from worker.analytics.accuracy import accuracy_report, format_accuracy, score_pending

    async with _pool(settings) as pool:
        if args.score:
            await score_pending(pool, region=args.region)
        print(format_accuracy(await accuracy_report(pool, args.region, args.model)))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    return _run(_report_accuracy(_setup(args), args))


async def _plot(settings: Settings, args: argparse.Namespace) -> int:
    try:
        from worker.analytics.plots import RunNotPlottable, plot_run
    except ImportError as exc:  # an install without eglo's dependencies
        print(f"eglo plot: {exc.name} is not installed (reinstall eglo)", file=sys.stderr)
        return 2

    async with _pool(settings) as pool:
        try:
            print(await plot_run(pool, args.run_id, Path(args.out)))
        except RunNotPlottable as exc:
            print(f"eglo plot: {exc}", file=sys.stderr)
            return 2
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    return _run(_plot(_setup(args), args))


async def _maintenance(settings: Settings, args: argparse.Namespace) -> int:
    from worker.ops.maintenance import run_maintenance

    archive = args.archive_dir or settings.archive_dir
    async with _pool(settings) as pool:
        report = await run_maintenance(
            pool,
            retention_months=args.retention_months or settings.retention_months,
            archive_dir=Path(archive) if archive else None,
        )
    print(report)
    return 0


def cmd_maintenance(args: argparse.Namespace) -> int:
    return _run(_maintenance(_setup(args), args))


def cmd_asyncapi(args: argparse.Namespace) -> int:
    from contracts.asyncapi import write_asyncapi

    write_asyncapi(Path(args.out))
    print(args.out)
    return 0


def cmd_events_tail(args: argparse.Namespace) -> int:
    from worker.ops.events_tail import run

    _setup(args)
    return run(args)


def build_parser() -> argparse.ArgumentParser:
    from qnn_emulator.cli import add_arguments as add_emulator_arguments
    from worker.ops.events_tail import add_arguments as add_tail_arguments

    parser = argparse.ArgumentParser(prog="eglo", description="Energy Grid Load Optimizer")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("migrate", help="apply database migrations (one-shot)")
    p.add_argument(
        "--check",
        action="store_true",
        help="apply nothing; exit 0 if the schema is current, 1 while migrations are pending, "
        "2 if the database cannot be reached",
    )
    p.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="with --check: wait up to this long for the schema to become current "
        "(an init container's gate)",
    )
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("worker", help="consume eglo.requests until stopped")
    p.add_argument(
        "--burst",
        action="store_true",
        help="exit once the queue is empty and all in-flight work is committed",
    )
    p.add_argument("--prefetch", type=int, help="override EGLO_PREFETCH")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("publish", help="publish requests from an NDJSON file or JSON array")
    p.add_argument("file", help="path, or - for standard input")
    p.add_argument("--rate", type=float, help="at most this many requests per second")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("sample", help="print realistic requests of all four types as NDJSON")
    p.add_argument("--count", type=int, default=20)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--id-prefix", default="sample")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("schemas", help="write the JSON Schemas of every message")
    p.add_argument("--out", default="docs/schemas")
    p.set_defaults(func=cmd_schemas)

    p = sub.add_parser("emulator", help="run the QNN API emulator")
    add_emulator_arguments(p)
    p.set_defaults(func=cmd_emulator)

    p = sub.add_parser("summary", help="runs per type and status, latency and QNN cost")
    p.add_argument("--prefix", default="", help="only request_ids starting with this")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("db-url", help="print the database URL (starting the embedded one)")
    p.set_defaults(func=cmd_db_url)

    p = sub.add_parser("dlq", help="inspect or replay dead-lettered requests")
    dlq_sub = p.add_subparsers(dest="dlq_command", required=True)
    q = dlq_sub.add_parser("list", help="show dead letters with their reasons (they stay)")
    q.add_argument("--limit", type=int, default=100)
    q.set_defaults(func=cmd_dlq)
    q = dlq_sub.add_parser("replay", help="re-publish dead letters to eglo.requests")
    q.add_argument("--reason", help="only dead letters with this reason")
    q.add_argument("--limit", type=int, help="at most this many")
    q.set_defaults(func=cmd_dlq)

    p = sub.add_parser("embedder", help="embed completed runs' scenarios (embedding.requested)")
    p.add_argument("--burst", action="store_true", help="exit once its queue is empty")
    p.add_argument("--prefetch", type=int, help="override EGLO_EMBEDDER_PREFETCH")
    p.set_defaults(func=cmd_embedder)

    p = sub.add_parser("similar", help="nearest past runs of the same type (pgvector HNSW)")
    p.add_argument("run_id")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--model", default="features-v1", help="embedding model to search")
    p.add_argument("--any-type", action="store_true", help="search runs of every type")
    p.set_defaults(func=cmd_similar)

    p = sub.add_parser("anomalies", help="anomalies found by eglo and by the QNN")
    anomalies_sub = p.add_subparsers(dest="anomalies_command", required=True)
    q = anomalies_sub.add_parser("sync", help="pull /api/v1/monitoring/anomalies/ (no duplicates)")
    q.set_defaults(func=cmd_anomalies)
    q = anomalies_sub.add_parser("list", help="newest first")
    q.add_argument("--unresolved", action="store_true")
    q.add_argument("--limit", type=int, default=50)
    q.set_defaults(func=cmd_anomalies)
    q = anomalies_sub.add_parser("resolve", help="mark resolved (on the QNN too, if it is its)")
    q.add_argument("anomaly_id")
    q.set_defaults(func=cmd_anomalies)

    p = sub.add_parser("qnn", help="the QNN's monitoring API")
    qnn_sub = p.add_subparsers(dest="qnn_command", required=True)
    q = qnn_sub.add_parser("logs", help="/api/v1/monitoring/models/{model_id}/logs")
    q.add_argument("model_id")
    q.add_argument("--limit", type=int, default=50)
    q.set_defaults(func=cmd_qnn_logs)

    p = sub.add_parser("datasets", help="energy datasets: history and actual loads")
    datasets_sub = p.add_subparsers(dest="datasets_command", required=True)
    q = datasets_sub.add_parser("import", help="CSV or NDJSON; bad rows reported and skipped")
    q.add_argument("file", help="path (.gz too), or - for standard input")
    q.add_argument("--format", choices=["auto", "csv", "ndjson"], default="auto")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=cmd_datasets)
    q = datasets_sub.add_parser("list", help="stored periods per region")
    q.add_argument("--region")
    q.set_defaults(func=cmd_datasets)

    p = sub.add_parser("report", help="reports")
    report_sub = p.add_subparsers(dest="report_command", required=True)
    q = report_sub.add_parser("accuracy", help="forecast accuracy per model and region")
    q.add_argument("--region")
    q.add_argument("--model")
    q.add_argument("--score", action="store_true", help="score pending forecasts first")
    q.set_defaults(func=cmd_report)

    p = sub.add_parser("plot", help="draw a run (forecast, storage, grid switch, simulation)")
    p.add_argument("run_id")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("maintenance", help="retention: archive and delete runs past it")
    p.add_argument("--retention-months", type=int, help="override EGLO_RETENTION_MONTHS")
    p.add_argument("--archive-dir", help="override EGLO_ARCHIVE_DIR")
    p.set_defaults(func=cmd_maintenance)

    p = sub.add_parser("asyncapi", help="write the AsyncAPI 3.0 document of eglo's messages")
    p.add_argument("--out", default="docs/asyncapi.yaml")
    p.set_defaults(func=cmd_asyncapi)

    p = sub.add_parser("events", help="downstream view of eglo.events")
    events_sub = p.add_subparsers(dest="events_command", required=True)
    q = events_sub.add_parser("tail", help="follow eglo.events live through a temporary queue")
    add_tail_arguments(q)
    q.set_defaults(func=cmd_events_tail)

    p = sub.add_parser("api", help="the HTTP API (OpenAPI 3.1 at /openapi.json)")
    p.add_argument("--host", help="override EGLO_API_HOST")
    p.add_argument("--port", type=int, help="override EGLO_API_PORT")
    p.set_defaults(func=cmd_api)

    p = sub.add_parser(
        "demo", help="emulator + worker + api + a sample batch, then a summary and the console URL"
    )
    p.add_argument("--count", type=int, default=200)
    p.add_argument(
        "--serve",
        action="store_true",
        help="after the summary keep every process and the console up until Ctrl-C",
    )
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from producers.tls import TlsError

    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except TlsError as exc:  # a configuration problem: its message says what to fix
        import structlog

        structlog.get_logger("eglo").error("tls.refused", command=args.command, error=str(exc))
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
