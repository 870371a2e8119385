"""Runs one chaos scenario end to end and counts what became of every request."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from producers import topology
from producers.broker import connect_broker
from producers.publisher import Publisher
from producers.reader import parse_request
from producers.sample import generate_requests
from tests.chaos.environment import ChaosDatabase
from tests.support import infra
from worker.ops.processes import free_port, spawn, stop, wait_http_ok

LOG_DIR = Path(".eglo/chaos")
EVENTS_QUEUE = "chaos.events"


@dataclass
class Scenario:
    name: str
    requests: int
    fault: Callable[[ChaosRun], Awaitable[None]] | None = None
    emulator_args: list[str] = field(default_factory=list)
    poison_rate: float = 0.0
    duplicate_rate: float = 0.0
    worker_env: dict[str, str] = field(default_factory=dict)
    deadline_s: float = 180.0
    # Runs once the topology is declared, before the worker starts (e.g. find a queue's leader).
    prepare: Callable[[ChaosRun], Awaitable[None]] | None = None
    publish_rate: float | None = None  # requests per second; None: as fast as confirms come
    # Published as `eglo publish` does (Publisher.publish_many, which resends on its own) instead
    # of one publish at a time retried by the runner; valid requests only.
    batch_publish: bool = False
    haproxy: bool = False  # cluster scenarios: the clients reach the nodes through HAProxy


@dataclass
class Row:
    scenario: str
    published: int
    completed: int
    failed: int
    expired: int
    dead_lettered: int
    poison: int
    duplicate_runs: int
    duplicate_events: int
    lost: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    events: int = 0  # distinct events seen by the test's subscriber
    recover_s: float | None = None

    @property
    def passed(self) -> bool:
        return (
            self.lost == 0
            and self.duplicate_runs == 0
            and self.completed + self.failed + self.expired == self.published
            and self.dead_lettered == self.poison
            and not any(n.startswith("FAIL") for n in self.notes)
        )


class ChaosRun:
    """One scenario's world: a vhost, a database, an emulator, worker processes."""

    def __init__(
        self,
        scenario: Scenario,
        amqp_url: str,
        vhost: str,
        db: ChaosDatabase,
        database_url: str,
        cluster: Any = None,
    ) -> None:
        self.scenario = scenario
        self.cluster = cluster  # tests.support.cluster.RabbitCluster, for the cluster scenarios
        self.events_queue = EVENTS_QUEUE if cluster is None else f"{EVENTS_QUEUE}.{scenario.name}"
        self.recover_s: float | None = None
        self.target: Any = None  # what `prepare` picked for the fault
        self.confirmed = 0  # publishes the broker confirmed (duplicates and poison included)
        self.amqp_url = amqp_url
        self.vhost = vhost
        self.db = db
        self.database_url = database_url
        self.workers: list[tuple[subprocess.Popen[bytes], int]] = []
        self.notes: list[str] = []
        self.qnn_port = free_port()
        self.pool: asyncpg.Pool | None = None
        self.publisher: Publisher | None = None  # the scenario's, once connected
        self._spawned = 0

    @property
    def env(self) -> dict[str, str]:
        return {
            "EGLO_AMQP_URL": self.amqp_url,
            "EGLO_DATABASE_URL": self.database_url,
            "EGLO_QNN_URL": f"http://127.0.0.1:{self.qnn_port}",
            "EGLO_QNN_TIMEOUT_S": "2",
            "EGLO_QNN_BACKOFF_INITIAL_S": "0.05",
            "EGLO_QNN_BACKOFF_MAX_S": "0.5",
            "EGLO_RETRY_DELAYS_S": "[1, 3, 5]",
            "EGLO_SHUTDOWN_GRACE_S": "10",
            "EGLO_PREFETCH": "64",
            "EGLO_LOG_LEVEL": "INFO",
            **self.scenario.worker_env,
        }

    def log_path(self, name: str) -> Path:
        return LOG_DIR / self.scenario.name / f"{name}.log"

    def worker_node(self) -> str:
        """host:port of the broker node the latest worker is connected to (from its log)."""
        node = None
        for line in self.log_path(f"worker-{self._spawned}").read_text().splitlines():
            if '"broker.connected"' in line:
                node = orjson.loads(line).get("node")
        if node is None:
            raise RuntimeError("no broker.connected line in the worker's log")
        return str(node)

    def publisher_node(self) -> str:
        """host:port the scenario's Publisher is connected to (HAProxy's, behind HAProxy)."""
        assert self.publisher is not None
        return str(self.publisher._channel._connection.node)  # type: ignore[attr-defined]

    def _restores(self) -> int:
        text = self.log_path(f"worker-{self._spawned}").read_text()
        return text.count('"broker.connection.restored"')

    def mark(self) -> tuple[float, int]:
        """Taken just before a fault: its time, and the worker's reconnects so far."""
        return time.monotonic(), self._restores()

    async def until_recovered(
        self, mark: tuple[float, int], *, reconnect: bool = True, within_s: float = 120.0
    ) -> None:
        """Seconds to recover: from the fault (`mark`) until the worker has its broker
        connection back (`broker.connection.restored` in its log; unless `reconnect` is False,
        its connection not being hit) and has stored a run since."""
        started, restored_before = mark
        stored_at = None if reconnect else await self.stored()
        while True:
            if time.monotonic() - started > within_s:
                self.notes.append(
                    f"FAIL not recovered within {within_s:g} s of the fault ({self.confirmed} "
                    f"publishes confirmed, {await self.stored()} stored, reconnected: "
                    f"{self._restores() > restored_before})"
                )
                return
            if stored_at is None:
                if self._restores() > restored_before:
                    stored_at = await self.stored()
                    if stored_at >= self.scenario.requests:
                        break  # nothing left to store: reconnected is recovered
            elif stored_at >= self.scenario.requests or await self.stored() > stored_at:
                break
            await asyncio.sleep(0.05)
        self.recover_s = round(time.monotonic() - started, 1)

    def start_worker(self) -> subprocess.Popen[bytes]:
        port = free_port()
        self._spawned += 1
        process = spawn(
            ["worker"],
            {**self.env, "EGLO_METRICS_PORT": str(port)},
            self.log_path(f"worker-{self._spawned}"),
        )
        wait_http_ok(f"http://127.0.0.1:{port}/readyz", process=process, within_s=60)
        self.workers.append((process, port))
        return process

    def kill_worker(self, sig: int = signal.SIGKILL) -> subprocess.Popen[bytes]:
        process, _ = self.workers.pop(0)
        process.send_signal(sig)
        return process

    async def stored(self) -> int:
        assert self.pool is not None
        try:
            return int(await self.pool.fetchval("SELECT count(*) FROM optimization_runs"))
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            return -1  # the database is down on purpose in one scenario

    async def until_stored(self, fraction: float, *, within_s: float = 60.0) -> None:
        """Wait for progress; a stall is a finding, noted, and the scenario goes on."""
        target = int(self.scenario.requests * fraction)
        deadline = time.monotonic() + within_s
        while await self.stored() < target:
            if time.monotonic() > deadline:
                self.notes.append(f"FAIL stalled at {await self.stored()} stored "
                                  f"(waited {within_s:g} s for {target})")
                return
            await asyncio.sleep(0.1)


def _poison(doc: dict[str, Any], i: int) -> tuple[bytes, str | None]:
    kind = i % 6
    if kind == 0:
        return b'{"request_id": "cut-off', "application/json"
    if kind == 1:
        return orjson.dumps(doc).replace(b'"payload":{', b'"bad":NaN,"payload":{', 1), None
    if kind == 2:
        return orjson.dumps({**doc, "schema_version": 99}), "application/json"
    if kind == 3:
        return orjson.dumps({**doc, "request_type": "teleport"}), "application/json"
    if kind == 4:
        return orjson.dumps(doc), "application/xml"
    return b"\x00\x01 not even text", "application/json"


async def _publish(
    run: ChaosRun,
    valid: list[dict[str, Any]],
    poison: list[dict[str, Any]],
    duplicates: list[dict[str, Any]],
) -> None:
    rng = random.Random(5)
    sends: list[tuple[str, Any]] = [("valid", d) for d in valid]
    sends += [("poison", d) for d in poison] + [("dup", d) for d in duplicates]
    rng.shuffle(sends)
    async with Publisher.connect(run.amqp_url) as publisher:
        run.publisher = publisher
        try:
            if run.scenario.batch_publish:
                await _publish_batch(run, publisher, valid)
            else:
                await _publish_each(run, publisher, sends)
        finally:
            if publisher.resent:
                run.notes.append(f"the publisher sent {publisher.resent} publishes again")


async def _publish_batch(run: ChaosRun, publisher: Publisher, valid: list[dict[str, Any]]) -> None:
    """As `eglo publish` does: one publish_many, which resends what was not confirmed."""

    def done() -> None:
        run.confirmed += 1

    report = await publisher.publish_many(
        [parse_request(d) for d in valid], rate=run.scenario.publish_rate, on_done=done
    )
    run.confirmed -= len(report.failed)
    for request_id, error in report.failed[:10]:
        run.notes.append(f"FAIL not confirmed: {request_id}: {error}")


async def _publish_each(run: ChaosRun, publisher: Publisher, sends: list[tuple[str, Any]]) -> None:
    # Steady, not all at once, so faults land while work is flowing; confirms are awaited,
    # and a publish the broker did not confirm (it was restarting) is sent again.
    window = asyncio.Semaphore(128)
    rate = run.scenario.publish_rate
    started = time.monotonic()

    async def send(kind: str, doc: dict[str, Any], i: int) -> None:
        if rate:
            await asyncio.sleep(max(0.0, started + i / rate - time.monotonic()))
        async with window:
            for _ in range(3):  # the Publisher itself resends for up to 60 s each time
                try:
                    if kind == "poison":
                        body, ctype = _poison(doc, i)
                        await publisher.publish_raw(
                            body,
                            "request.forecast",
                            content_type=ctype,
                            message_id=f"poison-{i}",
                        )
                    else:
                        await publisher.publish(parse_request(doc))
                    run.confirmed += 1
                    return
                except Exception:  # noqa: BLE001 - broker restarting: try again
                    await asyncio.sleep(1.0)
            run.notes.append(f"FAIL could not publish {kind} {i}")

    await asyncio.gather(*(send(k, d, i) for i, (k, d) in enumerate(sends)))


async def _quiet(run: ChaosRun, valid_ids: set[str], poison: int) -> bool:
    assert run.pool is not None
    try:
        stored = await run.pool.fetchval(
            "SELECT count(*) FROM optimization_runs WHERE status IN "
            "('completed','failed','expired')"
        )
        unsent = await run.pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL")
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return False
    if stored < len(valid_ids) or unsent:
        return False
    try:
        connection = await connect_broker(run.amqp_url, name="chaos-quiet")
    except Exception:  # noqa: BLE001 - broker restarting
        return False
    async with connection:
        channel = await connection.channel()
        dlq = await channel.declare_queue(topology.DEAD_LETTER_QUEUE, passive=True)
        requests = await channel.declare_queue(topology.REQUESTS_QUEUE, passive=True)
        return bool(
            requests.declaration_result.message_count == 0
            and (dlq.declaration_result.message_count or 0) >= poison
        )


async def run_scenario(scenario: Scenario, db: ChaosDatabase, cluster: Any = None) -> Row:
    """One scenario on a fresh vhost of the local broker, or on `cluster`'s default vhost."""
    started = time.monotonic()
    valid = generate_requests(
        scenario.requests, seed=hash(scenario.name) % 10_000, id_prefix=f"chaos-{scenario.name}"
    )
    rng = random.Random(scenario.name)
    poison = [rng.choice(valid) for _ in range(int(scenario.requests * scenario.poison_rate))]
    duplicates = rng.sample(valid, int(scenario.requests * scenario.duplicate_rate))
    if cluster is not None and scenario.haproxy:
        from tests.support.cluster import haproxy_front

        broker: contextlib.AbstractContextManager[Any] = haproxy_front(cluster)
    else:
        broker = infra.fresh_vhost() if cluster is None else contextlib.nullcontext(cluster)
    with broker as front:
        amqp_url = front if isinstance(front, str) else front.url
        cluster = cluster if isinstance(front, str) else front
        vhost = amqp_url.rsplit("/", 1)[1]
        run = ChaosRun(scenario, amqp_url, vhost, db, await db.fresh_database(), cluster)
        emulator = spawn(
            [
                "emulator",
                "--port",
                str(run.qnn_port),
                "--latency-ms",
                "20",
                "--seed",
                "3",
                *scenario.emulator_args,
            ],
            run.env,
            run.log_path("emulator"),
        )
        run.pool = await asyncpg.create_pool(run.database_url, min_size=1, max_size=2)
        events_connection = await connect_broker(amqp_url, name="chaos-events")
        try:
            wait_http_ok(f"http://127.0.0.1:{run.qnn_port}/api/v1/health/simple", process=emulator)
            channel = await events_connection.channel()
            await topology.declare(channel)
            # On a cluster, quorum: the subscriber's queue must outlive the node loss too.
            queue_args = None if cluster is None else {"x-queue-type": "quorum"}
            events_q = await channel.declare_queue(
                run.events_queue, durable=True, arguments=queue_args
            )
            await events_q.bind(topology.EVENTS_EXCHANGE, routing_key="run.#")
            if scenario.prepare is not None:
                await scenario.prepare(run)
            run.start_worker()
            publishing = asyncio.create_task(_publish(run, valid, poison, duplicates))
            if scenario.fault is not None:
                await scenario.fault(run)
            await publishing
            valid_ids = {d["request_id"] for d in valid}
            deadline = time.monotonic() + scenario.deadline_s
            while not await _quiet(run, valid_ids, len(poison)):
                if time.monotonic() > deadline:
                    run.notes.append(
                        f"FAIL timed out waiting for every request to settle "
                        f"({run.confirmed} publishes confirmed, {await run.stored()} stored)"
                    )
                    break
                if not run.workers:
                    run.start_worker()
                await asyncio.sleep(0.5)
            for process, _ in run.workers:
                code = stop(process, grace_s=30)
                if code != 0:
                    run.notes.append(f"FAIL worker exited {code} on SIGTERM")
            row = await _count(run, valid_ids, len(poison))
        finally:
            for process, _ in run.workers:
                process.kill()
            stop(emulator, grace_s=5)
            await run.pool.close()
            await events_connection.close()
    row.seconds = round(time.monotonic() - started, 1)
    row.notes = run.notes
    row.recover_s = run.recover_s
    return row


async def _count(run: ChaosRun, valid_ids: set[str], poison: int) -> Row:
    assert run.pool is not None
    by_status = {
        r["status"]: r["n"]
        for r in await run.pool.fetch(
            "SELECT status, count(*) AS n FROM optimization_runs GROUP BY status"
        )
    }
    stored_ids = {
        r["request_id"] for r in await run.pool.fetch("SELECT request_id FROM optimization_runs")
    }
    total_rows = await run.pool.fetchval("SELECT count(*) FROM optimization_runs")
    outcomes: dict[str, int] = {}
    event_ids: set[str] = set()
    duplicate_events = 0
    # A fresh connection: the scenario's own may have been among those the faults closed.
    connection = await connect_broker(run.amqp_url, name="chaos-count")
    async with connection:
        channel = await connection.channel()
        events_q = await channel.declare_queue(run.events_queue, passive=True)
        while (message := await events_q.get(no_ack=True, fail=False)) is not None:
            event = orjson.loads(message.body)
            if event["event_id"] in event_ids:
                duplicate_events += 1  # a relay re-send; consumers drop it by event_id
            event_ids.add(event["event_id"])
            outcomes[event["run_id"]] = outcomes.get(event["run_id"], 0) + 1
        dlq = await channel.declare_queue(topology.DEAD_LETTER_QUEUE, passive=True)
        dead = dlq.declaration_result.message_count or 0
    if len(outcomes) != len(stored_ids):
        run.notes.append(f"FAIL {len(stored_ids) - len(outcomes)} runs without an outcome event")
    return Row(
        scenario=run.scenario.name,
        published=len(valid_ids),
        completed=by_status.get("completed", 0),
        failed=by_status.get("failed", 0),
        expired=by_status.get("expired", 0),
        dead_lettered=dead,
        poison=poison,
        duplicate_runs=total_rows - len(stored_ids),
        duplicate_events=duplicate_events,
        lost=len(valid_ids - stored_ids),
        seconds=0.0,
        events=len(event_ids),
    )


def format_table(rows: list[Row]) -> str:
    header = (
        "| scenario | published | completed | failed | expired | dead-lettered | poison "
        "| duplicate runs | duplicate events | lost | seconds | result |"
    )
    lines = [header, "|" + "---|" * 12]
    for r in rows:
        lines.append(
            f"| {r.scenario} | {r.published} | {r.completed} | {r.failed} | {r.expired} "
            f"| {r.dead_lettered} | {r.poison} | {r.duplicate_runs} | {r.duplicate_events} "
            f"| {r.lost} | {r.seconds} | {'pass' if r.passed else 'FAIL'} |"
        )
    notes = [f"- {r.scenario}: {n}" for r in rows for n in r.notes]
    return "\n".join(lines + (["", *notes] if notes else []))


def format_cluster_table(rows: list[Row]) -> str:
    """The cluster scenarios' rows, as docs/reliability.md shows them."""
    lines = [
        "| scenario | published | stored | duplicate runs | duplicate events | lost "
        "| seconds to recover | result |",
        "|" + "---|" * 8,
    ]
    for r in rows:
        stored = r.completed + r.failed + r.expired
        ratio = 100.0 * r.duplicate_events / r.events if r.events else 0.0
        recover = "-" if r.recover_s is None else f"{r.recover_s:g}"
        lines.append(
            f"| {r.scenario} | {r.published} | {stored} | {r.duplicate_runs} "
            f"| {r.duplicate_events} of {r.events} ({ratio:.1f} %) | {r.lost} | {recover} "
            f"| {'pass' if r.passed else 'FAIL'} |"
        )
    notes = [f"- {r.scenario}: {n}" for r in rows for n in r.notes]
    return "\n".join(lines + (["", *notes] if notes else []))
