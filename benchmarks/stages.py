"""`python -m benchmarks.stages`: where a request's time goes at a fixed offered load.

One `eglo worker` (and the QNN emulator, `--latency-ms 20` unless told otherwise) on a fresh
vhost and database; requests are offered at each `--rate` for `--seconds` with
`Publisher.publish_many(rate=...)` and timed, as in `python -m benchmarks`, from the publish call
to the arrival of their `run.completed.<type>` event. The worker's own
`eglo_request_stage_duration_seconds{stage}` histogram is scraped before and after each load, and
the difference gives the stage breakdown: count, mean and (from the buckets, interpolated as
Prometheus' histogram_quantile does) p50 / p99 per stage. Each rate is run `--repeat` times, each
time in a fresh worker, so the spread between runs shows how much the shared machine moved them.

    python -m benchmarks.stages --rate 200 --rate 90 --seconds 20 --repeat 3
    python -m benchmarks.stages --worker-env EGLO_OUTBOX_POLL_S=0.05 --rate 200
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.harness import (
    Bench,
    Latency,
    Probes,
    declare_events_queue,
    measure_latency,
    open_bench,
    publish_backlog,
    wait_quiet,
)
from worker.observability.metrics import STAGES
from worker.ops.processes import free_port, spawn, stop, wait_http_ok

STAGE_METRIC = "eglo_request_stage_duration_seconds"
QNN_METRIC = "eglo_qnn_request_duration_seconds"

# {(sample name, frozenset(labels))}: value
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5.0).text
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


@dataclass
class Stage:
    count: float
    mean_ms: float
    p50_ms: float
    p99_ms: float


def bucket_quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """histogram_quantile over cumulative (upper bound, count) pairs, in the bounds' unit."""
    if not buckets or buckets[-1][1] <= 0:
        return math.nan
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, cumulative in buckets:
        if cumulative >= rank:
            if math.isinf(upper):
                return lower
            inside = cumulative - below
            return lower + (upper - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = upper, cumulative
    return lower


def stage_breakdown(
    before: Samples, after: Samples, metric: str = STAGE_METRIC, label: str = "stage"
) -> dict[str, Stage]:
    """Per label value: what was observed between the two scrapes."""
    out: dict[str, Stage] = {}
    values = sorted(
        {dict(ls)[label] for (n, ls) in after if n == f"{metric}_count" and label in dict(ls)}
    )
    for value in values:
        key = frozenset({(label, value)})
        count = after.get((f"{metric}_count", key), 0.0) - before.get((f"{metric}_count", key), 0)
        total = after.get((f"{metric}_sum", key), 0.0) - before.get((f"{metric}_sum", key), 0.0)
        buckets = sorted(
            (float(dict(ls)["le"]), v - before.get((n, ls), 0.0))
            for (n, ls), v in after.items()
            if n == f"{metric}_bucket" and dict(ls).get(label) == value
        )
        out[value] = Stage(
            count=count,
            mean_ms=total / count * 1000 if count else math.nan,
            p50_ms=bucket_quantile(buckets, 0.5) * 1000,
            p99_ms=bucket_quantile(buckets, 0.99) * 1000,
        )
    return out


@dataclass
class Run:
    rate: float
    latency: Latency
    stages: dict[str, Stage]
    qnn_calls: dict[str, Stage]  # by HTTP status
    worker_cpu_per_1000: float
    busy_cores_before: float
    extra: dict[str, float] = field(default_factory=dict)


@contextlib.contextmanager
def worker_process(bench: Bench, world_env: dict[str, str], log: Path) -> Iterator[tuple[int, int]]:
    port = free_port()
    env = {**world_env, "EGLO_METRICS_PORT": str(port), "EGLO_METRICS_HOST": "127.0.0.1"}
    process = spawn(["worker"], env, log)
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/readyz", process=process, within_s=60)
        yield port, process.pid
    finally:
        stop(process, grace_s=30)


async def one_run(bench: Bench, rate: float, seconds: float, index: int) -> Run:
    _, busy = await wait_quiet(max_wait_s=30)
    async with bench.world(f"stages-{index}") as world:
        await declare_events_queue(world.amqp_url)
        env = bench.eglo_env(world, 0)
        with worker_process(bench, env, world.log_dir / "worker.log") as (port, pid):
            # Warm-up (connections, JIT-free but caches and pools): not counted.
            await measure_latency(
                world, bench.workload.requests(max(50, int(rate * 2)), f"warm{index}"), rate
            )
            before = scrape(port)
            worker = psutil.Process(pid)
            probes = Probes(bench, {"worker": worker})
            latency = await measure_latency(
                world,
                bench.workload.requests(max(100, int(rate * seconds)), f"s{index}"),
                rate,
                probes=probes,
            )
            await asyncio.sleep(1.0)  # the last confirms' observations
            after = scrape(port)
    return Run(
        rate=rate,
        latency=latency,
        stages=stage_breakdown(before, after),
        qnn_calls=stage_breakdown(before, after, QNN_METRIC, "status"),
        worker_cpu_per_1000=latency.cpu_per_1000.get("worker", math.nan),
        busy_cores_before=busy,
    )


@dataclass
class QuotaRun:
    backlog: int
    seconds: float
    answered_per_s: float  # QNN calls answered 200 per second, between 10 % and 90 % of the backlog
    throttled_share: float  # of all QNN calls in that window, answered 429
    throttled_share_all: float  # the same over the whole run (start-up included)
    limit_median: float
    limit_range: tuple[float, float]
    busy_cores_before: float


def _qnn(samples: Samples, status: str) -> float:
    return samples.get((f"{QNN_METRIC}_count", frozenset({("status", status)})), 0.0)


async def quota_run(bench: Bench, backlog: int, index: int, within_s: float = 600) -> QuotaRun:
    """One worker started on `backlog` waiting requests; its QNN calls counted every second."""
    _, busy = await wait_quiet(max_wait_s=30)
    async with bench.world(f"quota-{index}") as world:
        await declare_events_queue(world.amqp_url)
        await publish_backlog(world.amqp_url, bench.workload.requests(backlog, f"q{index}"))
        env = bench.eglo_env(world, 0)
        points: list[tuple[float, float, float, float]] = []  # t, 200s, 429s, limit
        with worker_process(bench, env, world.log_dir / "worker.log") as (port, _):
            started = time.perf_counter()
            while True:
                got = scrape(port)
                limit = got.get(("eglo_qnn_concurrency_limit", frozenset()), math.nan)
                points.append(
                    (time.perf_counter() - started, _qnn(got, "200"), _qnn(got, "429"), limit)
                )
                if points[-1][1] >= backlog or points[-1][0] > within_s:
                    break
                await asyncio.sleep(1.0)
    lo = next(p for p in points if p[1] >= 0.1 * backlog)
    hi = next((p for p in points if p[1] >= 0.9 * backlog), points[-1])
    ok, throttled = hi[1] - lo[1], hi[2] - lo[2]
    limits = [p[3] for p in points if lo[0] <= p[0] <= hi[0] and p[3] == p[3]] or [math.nan]
    last = points[-1]
    return QuotaRun(
        backlog=backlog,
        seconds=last[0],
        answered_per_s=ok / (hi[0] - lo[0]) if hi[0] > lo[0] else math.nan,
        throttled_share=throttled / (ok + throttled) if ok + throttled else math.nan,
        throttled_share_all=last[2] / (last[1] + last[2]) if last[1] + last[2] else math.nan,
        limit_median=statistics.median(limits),
        limit_range=(min(limits), max(limits)),
        busy_cores_before=busy,
    )


def format_quota(runs: list[QuotaRun], quota: float, command: str) -> str:
    lines = [
        f"`{command}` - {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "",
        "| run | backlog | took s | answered/s (10-90 %) | of the quota | 429 share (10-90 %) | "
        "429 share (whole run) | concurrency limit median (min-max) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(runs, 1):
        lines.append(
            f"| {i} | {r.backlog:,} | {r.seconds:.0f} | {_fmt(r.answered_per_s)} | "
            f"{_fmt(r.answered_per_s / quota * 100 if quota else math.nan)} % | "
            f"{_fmt(r.throttled_share * 100, 2)} % | {_fmt(r.throttled_share_all * 100, 2)} % | "
            f"{_fmt(r.limit_median)} ({_fmt(r.limit_range[0])}-{_fmt(r.limit_range[1])}) |"
        )
    return "\n".join(lines) + "\n"


def _fmt(value: float, digits: int = 1) -> str:
    return "n/a" if value != value else f"{value:,.{digits}f}"


def _spread(values: list[float], digits: int = 1) -> str:
    """median, with min-max of the repeats."""
    good = [v for v in values if v == v]
    if not good:
        return "n/a"
    if len(good) == 1:
        return _fmt(good[0], digits)
    return (
        f"{_fmt(statistics.median(good), digits)} ({_fmt(min(good), digits)}-"
        f"{_fmt(max(good), digits)})"
    )


def format_runs(runs: list[Run], command: str) -> str:
    lines = [
        f"`{command}` — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; median of {len(runs)} run(s) "
        "per rate, (min-max) across runs",
        "",
    ]
    for rate in sorted({r.rate for r in runs}, reverse=True):
        group = [r for r in runs if r.rate == rate]
        lat = [r.latency for r in group]
        lines += [
            f"**{rate:g} req/s offered** (achieved "
            f"{_spread([x.achieved_rate for x in lat])}/s; received "
            f"{sum(x.received for x in lat)}/{sum(x.sent for x in lat)}): publish → outcome event "
            f"p50 {_spread([x.p50_ms for x in lat], 0)} · p95 {_spread([x.p95_ms for x in lat], 0)}"
            f" · p99 {_spread([x.p99_ms for x in lat], 0)} ms; worker CPU "
            f"{_spread([r.worker_cpu_per_1000 for r in group], 2)} s / 1,000 runs",
            "",
            "| stage | per request | mean ms | p50 ms | p99 ms |",
            "|---|---|---|---|---|",
        ]
        for stage in STAGES:
            rows = [r.stages.get(stage) for r in group]
            got = [s for s in rows if s is not None]
            if not got:
                continue
            sent = sum(x.received for x in lat) or 1
            lines.append(
                f"| {stage} | {sum(s.count for s in got) / sent:.2f} | "
                f"{_spread([s.mean_ms for s in got])} | {_spread([s.p50_ms for s in got])} | "
                f"{_spread([s.p99_ms for s in got])} |"
            )
        statuses = sorted({k for r in group for k in r.qnn_calls})
        if statuses:
            calls = {
                k: sum(r.qnn_calls[k].count for r in group if k in r.qnn_calls) for k in statuses
            }
            lines += [
                "",
                "QNN calls by status: " + ", ".join(f"{k}: {int(v)}" for k, v in calls.items()),
            ]
        lines.append("")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.stages", description=__doc__)
    p.add_argument("--rate", type=float, action="append", help="offered req/s (repeatable)")
    p.add_argument("--seconds", type=float, default=20.0, help="seconds of load per run")
    p.add_argument("--repeat", type=int, default=2, help="runs per rate, each a fresh worker")
    p.add_argument("--worker-env", action="append", default=[], metavar="EGLO_X=V")
    p.add_argument(
        "--backlog",
        type=int,
        help="instead of offered loads: start the worker on this many waiting requests and "
        "count its QNN calls (200 vs 429) every second (with a quota: --emulator-arg)",
    )
    p.add_argument(
        "--emulator-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra `eglo emulator` argument (repeatable), e.g. --emulator-arg=--latency-ms=200",
    )
    return p.parse_args(argv)


async def main_async(args: argparse.Namespace) -> list[Run]:
    out_dir = Path(".eglo/bench") / f"stages-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    worker_env = dict(item.split("=", 1) for item in args.worker_env)
    emulator_args = ["--latency-ms", "20"]
    for arg in args.emulator_arg:
        emulator_args += arg.split("=", 1) if arg.startswith("--") and "=" in arg else [arg]
    runs: list[Run] = []
    async with open_bench(
        distinct=400, log_dir=out_dir, worker_env=worker_env, emulator_args=emulator_args
    ) as bench:
        index = 0
        if args.backlog:
            quota_runs = []
            for index in range(1, args.repeat + 1):
                quota_runs.append(await quota_run(bench, args.backlog, index))
                print(quota_runs[-1], file=sys.stderr, flush=True)
            args.quota_runs = quota_runs
            return runs
        for _ in range(args.repeat):
            for rate in args.rate or [200.0]:
                index += 1
                started = time.perf_counter()
                run = await one_run(bench, rate, args.seconds, index)
                runs.append(run)
                print(
                    f"run {index}: {rate:g}/s p50/p95/p99 {run.latency.p50_ms:.0f}/"
                    f"{run.latency.p95_ms:.0f}/{run.latency.p99_ms:.0f} ms "
                    f"({time.perf_counter() - started:.0f} s; busy before "
                    f"{run.busy_cores_before:.2f})",
                    file=sys.stderr,
                    flush=True,
                )
    return runs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs = asyncio.run(main_async(args))
    command = "python -m benchmarks.stages " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.backlog:
        quota = 0.0
        for arg in args.emulator_arg:
            if arg.startswith("--rate-limit-per-s="):
                quota = float(arg.split("=", 1)[1])
        print(format_quota(args.quota_runs, quota, command.strip()))
        return 0
    print(format_runs(runs, command.strip()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
