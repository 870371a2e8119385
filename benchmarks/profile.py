"""Profile the eglo worker under load with py-spy and print its top functions by own time.

    python -m benchmarks.profile [--requests 10000] [--top 15] [--rate R] [--no-docs]

Starts the QNN emulator (`--latency-ms 20`), a fresh vhost and database, publishes `--requests`
sample requests (a backlog, or at `--rate`/s while the worker runs), starts `eglo worker` in its
own process and samples it with `py-spy record --format raw` (100 Hz, wall-clock samples of
on-CPU stacks: idle waits in the event loop are not counted) until every completion event is out.
Prints the top entries by own time ("self": the function was the innermost Python frame; time in
C extensions such as orjson, asyncpg's protocol or uvloop counts to the Python function that
called them) and by total time, and writes them into docs/performance.md (section `profile`).
The raw collapsed stacks stay in .eglo/bench/profile-<stamp>/ (open them in speedscope or
`flamegraph.pl`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shlex
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psutil
import structlog

from benchmarks.e2e import spawn_worker
from benchmarks.harness import (
    LOG_ROOT,
    Probes,
    TimedPublisher,
    declare_events_queue,
    measure_drain,
    open_bench,
    publish_backlog,
    stop_all,
)
from benchmarks.report import num, write_section


@dataclass
class Profile:
    samples: int
    own: Counter[str]
    total: Counter[str]
    roots: list[str]  # the stack prefix (nearly) every sample shares: CLI, event loop


def _frame_name(frame: str) -> str:
    """`func (path/to/module.py)` → `func (module.py)` with the package path kept short."""
    if " (" not in frame:
        return frame
    func, where = frame.rsplit(" (", 1)
    where = where.rstrip(")")
    for marker in ("site-packages/", "/lib/python3.11/", "/work/main/"):
        if marker in where:
            where = where.split(marker, 1)[1]
    return f"{func} ({where})"


def parse_collapsed(path: Path) -> Profile:
    """py-spy `--format raw` (collapsed stacks: `root;...;leaf count` per line)."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    at_depth: list[Counter[str]] = []
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";") if f]
        if not frames:
            continue
        samples += count
        own[frames[-1]] += count
        for name in set(frames):
            total[name] += count
        for depth, name in enumerate(frames[:12]):
            if len(at_depth) <= depth:
                at_depth.append(Counter())
            at_depth[depth][name] += count
    roots = []
    for counter in at_depth:
        name, count = counter.most_common(1)[0]
        if count < 0.9 * samples:
            break
        roots.append(name)
    return Profile(samples, own, total, roots)


PROJECT_PACKAGES = ("worker/", "contracts/", "producers/", "db/", "qnn_emulator/")


def own_by_area(profile: Profile) -> Counter[str]:
    """Own time by eglo module, or by third-party package / stdlib module."""
    areas: Counter[str] = Counter()
    for name, count in profile.own.items():
        where = name.rsplit(" (", 1)[-1].rstrip(")") if " (" in name else name
        key = where if where.startswith(PROJECT_PACKAGES) else where.split("/", 1)[0]
        areas[key] += count
    return areas


def format_profile(profile: Profile, top: int, context: str) -> str:
    lines = [
        context,
        "",
        f"Top {top} by own time ({num(profile.samples)} samples):",
        "",
        "| # | function (file) | own % | total % |",
        "|---|---|---|---|",
    ]
    for i, (name, count) in enumerate(profile.own.most_common(top), 1):
        lines.append(
            f"| {i} | `{name}` | {count / profile.samples * 100:.1f} "
            f"| {profile.total[name] / profile.samples * 100:.1f} |"
        )
    lines += [
        "",
        f"Top {top} by total time (own + callees), below the frames (nearly) every sample "
        f"shares ({' → '.join(f'`{r}`' for r in profile.roots)}):",
        "",
        "| # | function (file) | total % |",
        "|---|---|---|",
    ]
    interesting = [(n, c) for n, c in profile.total.most_common() if n not in profile.roots]
    for i, (name, count) in enumerate(interesting[:top], 1):
        lines.append(f"| {i} | `{name}` | {count / profile.samples * 100:.1f} |")
    lines += [
        "",
        "Own time by area (eglo module, else library or stdlib module):",
        "",
        "| area | own % |",
        "|---|---|",
    ]
    for area, count in own_by_area(profile).most_common(top):
        lines.append(f"| `{area}` | {count / profile.samples * 100:.1f} |")
    return "\n".join(lines)


def start_py_spy(py_spy: str, pid: int, rate: int, raw_path: Path) -> subprocess.Popen[bytes]:
    log = open(raw_path.with_name("py-spy.log"), "wb")  # noqa: SIM115 - the child owns it
    return subprocess.Popen(
        [py_spy, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw",
         "--nolineno", "--output", str(raw_path)],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )


async def run(args: argparse.Namespace, out_dir: Path) -> tuple[Profile, str]:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    raw_path = out_dir / "worker.collapsed.txt"
    async with (
        open_bench(distinct=400, log_dir=out_dir, worker_env={}) as bench,
        bench.world("profile") as world,
    ):
        await declare_events_queue(world.amqp_url)
        requests = bench.workload.requests(args.requests, "prof")
        if args.rate is None:
            await publish_backlog(world.amqp_url, requests)
        worker = spawn_worker(bench, world, 1)
        recorder = start_py_spy(py_spy, worker.pid, args.sample_rate, raw_path)
        publishing = None
        try:
            if args.rate is not None:
                await asyncio.sleep(2.0)  # the worker connects before the load starts

                async def offer() -> None:
                    async with TimedPublisher.connect(world.amqp_url) as publisher:
                        await publisher.publish_many(requests, rate=args.rate)

                publishing = asyncio.create_task(offer())
            probes = Probes(bench, {"worker": psutil.Process(worker.pid)})
            started = time.perf_counter()
            drain, _ = await measure_drain(world, probes, args.requests, processes=[worker])
            seconds = time.perf_counter() - started
            if publishing is not None:
                await publishing
        finally:
            if recorder.poll() is None:
                recorder.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
                try:
                    recorder.wait(30)
                except subprocess.TimeoutExpired:
                    recorder.kill()
            stop_all([worker], grace_s=40)
    if not raw_path.exists():
        raise RuntimeError(f"py-spy wrote nothing; see {out_dir / 'py-spy.log'}")
    load = "a backlog" if args.rate is None else f"{num(args.rate)} requests/s offered"
    context = (
        f"`{shlex.join(['python', '-m', 'benchmarks.profile', *sys.argv[1:]])}`"
        f", {datetime.now(UTC):%Y-%m-%d %H:%M} UTC: one `eglo worker` (defaults) working "
        f"through {num(args.requests)} sample requests ({load}), emulator at 20 ms, sampled by "
        f"py-spy at {args.sample_rate} Hz (on-CPU samples only) for {num(seconds)} s; worker "
        f"throughput under the profiler {num(drain.runs_per_s)} runs/s, worker CPU "
        f"{num(drain.cpu_per_1000.get('worker'), 2)} s per 1,000 runs."
    )
    return parse_collapsed(raw_path), context


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile")
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--rate", type=float, help="offer requests at this rate, not a backlog")
    parser.add_argument("--sample-rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--no-docs", dest="docs", action="store_false")
    args = parser.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    warnings.filterwarnings("ignore", module="platformdirs")  # XDG_RUNTIME_DIR on servers
    out_dir = (LOG_ROOT / f"profile-{datetime.now(UTC):%Y%m%dT%H%M%SZ}").resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    import uvloop

    profile, context = uvloop.run(run(args, out_dir))
    text = format_profile(profile, args.top, context)
    print(text)
    if args.docs:
        write_section("profile", text)
        print("\nwritten to docs/performance.md", file=sys.stderr)
    print(f"raw stacks: {out_dir / 'worker.collapsed.txt'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
