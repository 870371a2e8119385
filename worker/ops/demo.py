"""`eglo demo`: the whole pipeline on this machine, from a sample batch to a summary table."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import FrameType

import asyncpg

from db.migrate import migrate
from producers.publisher import Publisher
from producers.reader import parse_request
from producers.sample import generate_requests
from worker.analytics.report import format_summary, summary
from worker.analytics.similarity import format_similar, similar_runs
from worker.api.auth import TokenFileError, TokenTable
from worker.ops.processes import free_port, spawn, stop, wait_http_ok
from worker.runtime.connections import amqp_url, connect_database, database_url, open_pool
from worker.settings import Settings


async def _publish_and_wait(
    settings: Settings, db_url: str, prefix: str, count: int, within_s: float
) -> str:
    requests = [parse_request(r) for r in generate_requests(count, seed=7, id_prefix=prefix)]
    async with Publisher.connect(amqp_url(settings)) as publisher:
        report = await publisher.publish_many(requests)
    print(f"published {len(report.confirmed)} requests (confirmed by the broker)")
    conn = await open_pool(db_url, size=2)
    try:
        deadline = time.monotonic() + within_s
        done = 0
        while time.monotonic() < deadline:
            done = await conn.fetchval(
                "SELECT count(*) FROM optimization_runs WHERE request_id LIKE $1", prefix + "-%"
            )
            if done >= len(report.confirmed):
                break
            await asyncio.sleep(0.5)
        print(f"{done} of {len(report.confirmed)} requests stored\n")
        table = format_summary(await summary(conn, prefix + "-"))
        if done < len(report.confirmed):
            raise SystemExit(f"timed out: only {done} of {len(report.confirmed)} stored\n{table}")
        similar = await _similar_example(conn, prefix, deadline)
        try:
            from worker.analytics.plots import save_demo_plots
        except ImportError:  # an install without eglo's dependencies
            drawn = "pictures: skipped (matplotlib not installed: reinstall eglo)"
        else:
            plots = await save_demo_plots(conn, settings.data_dir / "plots")
            drawn = "pictures: " + ", ".join(str(p) for p in plots)
        return f"{table}\n\n{similar}\n\n{drawn}"
    finally:
        await conn.close()


async def _migrate(db_url: str) -> None:
    conn = await connect_database(db_url)
    try:
        await migrate(conn)
    finally:
        await conn.close()


async def _similar_example(conn: asyncpg.Pool, prefix: str, deadline: float) -> str:
    """`eglo similar` for one demo forecast, once the embedder has embedded the batch."""
    completed = await conn.fetchval(
        "SELECT count(*) FROM optimization_runs WHERE request_id LIKE $1 AND status = 'completed'",
        prefix + "-%",
    )
    while time.monotonic() < deadline:
        embedded = await conn.fetchval(
            "SELECT count(*) FROM optimization_embeddings e JOIN optimization_runs r "
            "ON r.id = e.optimization_run_id WHERE r.request_id LIKE $1",
            prefix + "-%",
        )
        if embedded >= completed:
            break
        await asyncio.sleep(0.5)
    run_id = await conn.fetchval(
        "SELECT id FROM optimization_runs WHERE request_id LIKE $1 AND request_type = 'forecast' "
        "AND status = 'completed' ORDER BY request_id LIMIT 1",
        prefix + "-%",
    )
    results = await similar_runs(conn, run_id, k=5)
    return f"$ eglo similar {run_id} --k 5\n" + format_similar(results, run_id=run_id)


# The tokens docker compose uses on one machine, which the demo's `eglo api` takes too when
# EGLO_API_TOKENS_FILE is unset. Looked for above this file: a checkout has them, a wheel not.
LOCAL_TOKENS = Path("deploy") / "api" / "tokens.local"


def local_tokens_file() -> Path | None:
    for folder in Path(__file__).resolve().parents:
        if (folder / LOCAL_TOKENS).is_file():
            return folder / LOCAL_TOKENS
    return None


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _api_intro(url: str, tokens_file: Path) -> str:
    """The console's URL and how to sign in: the repository's local operator token is printed
    (it is public); a token file of the user's own is only named, never printed."""
    token = None
    if tokens_file == local_tokens_file():
        try:
            table = TokenTable.load(tokens_file)
        except TokenFileError:
            table = TokenTable([])
        for candidate in table.tokens:
            principal = table.lookup(candidate)
            if principal is not None and principal.role == "operator":
                token = candidate
    sign_in = f"the token {token}" if token else f"a token from {tokens_file}"
    return (
        f"console: {url}/console/  (sign in with {sign_in})\n"
        f"API: {url}/docs, OpenAPI at {url}/openapi.json (the same token, as a bearer token)"
    )


def _serve_until_interrupted(processes: dict[str, subprocess.Popen[bytes]]) -> None:
    """Keep the demo's processes up for the console until Ctrl-C or SIGTERM (or one exits)."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    print("\nserving the console until Ctrl-C", flush=True)
    try:
        while True:
            exited = [name for name, p in processes.items() if p.poll() is not None]
            if exited:
                print(f"{', '.join(exited)} exited: stopping the demo")
                return
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\nstopping")
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_demo(settings: Settings, *, count: int, serve: bool = False) -> int:
    db_url = database_url(settings)
    asyncio.run(_migrate(db_url))
    logs = settings.data_dir / "logs"
    qnn_port, metrics_port, embedder_port = free_port(), free_port(), free_port()
    api_port = settings.api_port if _port_free(settings.api_port) else free_port()
    tokens_file = settings.api_tokens_file or local_tokens_file()
    env = {
        "EGLO_DATABASE_URL": db_url,
        "EGLO_QNN_URL": f"http://127.0.0.1:{qnn_port}",
        "EGLO_METRICS_PORT": str(metrics_port),
    }
    emulator = spawn(
        ["emulator", "--port", str(qnn_port), "--latency-ms", "20"], env, logs / "emulator.log"
    )
    worker = embedder = api = None
    try:
        wait_http_ok(f"http://127.0.0.1:{qnn_port}/api/v1/health/simple", process=emulator)
        worker = spawn(["worker"], env, logs / "worker.log")
        wait_http_ok(f"http://127.0.0.1:{metrics_port}/readyz", process=worker)
        embedder = spawn(
            ["embedder"],
            {**env, "EGLO_EMBEDDER_METRICS_PORT": str(embedder_port)},
            logs / "embedder.log",
        )
        wait_http_ok(f"http://127.0.0.1:{embedder_port}/readyz", process=embedder)
        print(f"emulator on :{qnn_port}, worker metrics on :{metrics_port}, logs in {logs}/")
        if tokens_file is None:
            print("eglo api: not started (no tokens: set EGLO_API_TOKENS_FILE)")
        else:
            # Loopback only: the demo's tokens are published in the repository.
            api = spawn(
                ["api", "--host", "127.0.0.1", "--port", str(api_port)],
                {**env, "EGLO_API_TOKENS_FILE": str(tokens_file)},
                logs / "api.log",
            )
            url = f"http://127.0.0.1:{api_port}"
            wait_http_ok(f"{url}/readyz", process=api)
            print(_api_intro(url, tokens_file), flush=True)
        prefix = f"demo-{int(time.time())}"
        table = asyncio.run(_publish_and_wait(settings, db_url, prefix, count, within_s=120))
        print(table)
        if serve:
            running = {"emulator": emulator, "worker": worker, "embedder": embedder}
            if api is not None:
                running["api"] = api
                print(_api_intro(f"http://127.0.0.1:{api_port}", tokens_file or Path()))
            _serve_until_interrupted(running)
        elif api is not None:
            print("\nthe console stops with the demo: `eglo demo --serve` (make demo) keeps it up")
    finally:
        if api is not None:
            stop(api)
        if worker is not None:
            print(f"\nworker exited with {stop(worker)} after SIGTERM")
        if embedder is not None:
            stop(embedder)
        stop(emulator)
    return 0
