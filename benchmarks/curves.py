"""Latency curves (issue 15): publish → outcome event p50/p95/p99 at several shares of a
pipeline's own measured maximum, for eglo and the FastStream baseline, in one run.

Per pipeline: a fresh vhost and database and a fresh consumer process; its maximum is the drain
rate measured earlier in the same `python -m benchmarks` run (its own phase), or, when that phase
was not run, a backlog drained here first. Then, with the process still running, requests are
offered at each share of that maximum (lowest first, `Publisher.publish_many(rate=...)`) for a
fixed time each and timed as in the other latency figures (harness.measure_latency). eglo also
gets one point at the baseline's half load, when the baseline's maximum is known, so the two can
be compared at the same absolute load. eglo's stage histograms are read per point.

A single 15 s point on this shared machine can move a tail by tens of ms, so each point may be
run `repeat` times back to back (fresh requests each time): the point then reports the run with
the median p99, and the p99 of every run beside it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from benchmarks import stages
from benchmarks.e2e import spawn_worker
from benchmarks.harness import (
    Bench,
    Latency,
    Probes,
    World,
    check_alive,
    declare_events_queue,
    measure_drain,
    measure_latency,
    publish_backlog,
    spawn_module,
    stop_all,
    wait_for_consumers,
)
from benchmarks.report import num
from producers import topology
from worker.ops.processes import free_port

SHARES = (0.10, 0.25, 0.50, 0.75, 0.90)
DISTURBED_CORES = 0.3  # as run.py flags a phase


@dataclass
class CurvePoint:
    share: float  # of the pipeline's own maximum
    label: str  # "50 %" or e.g. "baseline's half load"
    latency: Latency
    consumer_cpu_per_1000: float
    foreign_cores: float = 0.0  # other work on the machine meanwhile (the harness' unaccounted)
    stages: dict[str, dict[str, float]] = field(default_factory=dict)  # eglo only
    p99_runs: list[float] = field(default_factory=list)  # every run's p99, when repeated


@dataclass
class Curve:
    name: str  # "eglo" | "baseline"
    title: str
    maximum: float  # runs/s taken as 100 %
    maximum_basis: str
    seconds: float  # of offered load per point (per run)
    points: list[CurvePoint] = field(default_factory=list)
    repeat: int = 1  # runs per point
    exit_codes: list[int] = field(default_factory=list)


async def measure_curve(
    bench: Bench,
    name: str,
    title: str,
    start: Callable[[World], subprocess.Popen[bytes]],
    *,
    maximum: float | None,
    maximum_basis: str,
    drain_requests: int,
    seconds: float,
    shares: Sequence[float] = SHARES,
    extra: Sequence[tuple[str, float]] = (),
    metrics_port: int | None = None,
    repeat: int = 1,
) -> Curve:
    """One pipeline's curve; `extra` = (label, absolute rate) points beside the shares."""
    async with bench.world(f"curve-{name}") as world:
        await declare_events_queue(world.amqp_url)
        if maximum is None:
            backlog = bench.workload.requests(drain_requests, f"{name}-cmax")
            await publish_backlog(world.amqp_url, backlog)
        process = start(world)
        try:
            probes = Probes(bench, {"consumer": psutil.Process(process.pid)})
            if maximum is None:
                drain, _ = await measure_drain(world, probes, drain_requests, processes=[process])
                maximum = drain.sustained_per_s
                if drain.stalled or maximum is None:
                    raise RuntimeError(f"{name}: no maximum (drain stalled)")
                maximum_basis = f"a {drain_requests:,}-request backlog drained in this phase"
            else:
                await wait_for_consumers(world, topology.REQUESTS_QUEUE, 1)
            # Warm-up, not counted: pools, connections, caches (the drain did it otherwise).
            warm = shares[0] * maximum
            await measure_latency(
                world, bench.workload.requests(max(20, int(warm * 2)), f"{name}-warm"), warm
            )
            curve = Curve(name, title, maximum, maximum_basis, seconds, repeat=repeat)
            wanted = [(f"{share * 100:g} %", share * maximum) for share in shares]
            wanted += [(label, rate) for label, rate in extra if rate > 0]
            for index, (label, rate) in enumerate(sorted(wanted, key=lambda lr: lr[1])):
                check_alive([process])
                count = max(50, int(rate * seconds))
                before = stages.scrape(metrics_port) if metrics_port else {}
                cpu0 = probes.cpu()["consumer"]
                t0 = time.perf_counter()
                runs = [
                    await measure_latency(
                        world,
                        bench.workload.requests(count, f"{name}-c{index}r{run}"),
                        rate,
                        probes=probes,
                    )
                    for run in range(repeat)
                ]
                cpu = probes.cpu()["consumer"] - cpu0
                elapsed = time.perf_counter() - t0
                latency = _median_run(runs)
                received = sum(r.received for r in runs)
                unaccounted = sum(
                    r.cpu_per_1000.get("unaccounted", 0.0) * r.received / 1000 for r in runs
                )
                breakdown: dict[str, dict[str, float]] = {}
                if metrics_port:
                    await asyncio.sleep(0.5)  # the last confirms' observations
                    after = stages.scrape(metrics_port)
                    breakdown = {
                        k: dataclasses.asdict(v)
                        for k, v in stages.stage_breakdown(before, after).items()
                    }
                curve.points.append(
                    CurvePoint(
                        share=rate / maximum,
                        label=label,
                        latency=latency,
                        consumer_cpu_per_1000=cpu / max(received, 1) * 1000,
                        foreign_cores=max(unaccounted / elapsed, 0.0),
                        stages=breakdown,
                        p99_runs=[r.p99_ms for r in runs] if repeat > 1 else [],
                    )
                )
            check_alive([process])
        finally:
            codes = stop_all([process], grace_s=40)
        curve.exit_codes = codes
        return curve


def _median_run(runs: Sequence[Latency]) -> Latency:
    """The run whose p99 is the median (the lower middle of an even count); NaN sorts last."""
    ranked = sorted(runs, key=lambda r: (math.isnan(r.p99_ms), r.p99_ms))
    return ranked[(len(ranked) - 1) // 2]


async def eglo_curve(
    bench: Bench,
    *,
    maximum: float | None,
    drain_requests: int,
    seconds: float,
    baseline_maximum: float | None,
    repeat: int = 1,
) -> Curve:
    port = free_port()

    def start(world: World) -> subprocess.Popen[bytes]:
        return spawn_worker(bench, world, 1, port)

    extra = [("baseline's half load", baseline_maximum / 2)] if baseline_maximum else []
    return await measure_curve(
        bench,
        "eglo",
        "eglo (1 worker)",
        start,
        maximum=maximum,
        maximum_basis="the eglo phase of this run",
        drain_requests=drain_requests,
        seconds=seconds,
        extra=extra,
        metrics_port=port,
        repeat=repeat,
    )


async def baseline_curve(
    bench: Bench, *, maximum: float | None, drain_requests: int, seconds: float, repeat: int = 1
) -> Curve:
    def start(world: World) -> subprocess.Popen[bytes]:
        env = {
            "EGLO_AMQP_URL": world.amqp_url,
            "EGLO_DATABASE_URL": world.db_url,
            "EGLO_QNN_URL": bench.qnn_url,
            "EGLO_PREFETCH": "64",
        }
        return spawn_module(
            "benchmarks.faststream_baseline", [], env, world.log_dir / "faststream.log"
        )

    return await measure_curve(
        bench,
        "baseline",
        "FastStream baseline",
        start,
        maximum=maximum,
        maximum_basis="the baseline phase of this run",
        drain_requests=drain_requests,
        seconds=seconds,
        repeat=repeat,
    )


# --------------------------------------------------------------------------- table and picture


def format_curves(curves: Sequence[Curve]) -> list[str]:
    if not curves:
        return []
    lines = [
        "| pipeline | load (share of its maximum) | offered req/s | received | latency p50 / p95 "
        "/ p99 ms | max ms | consumer CPU s / 1,000 runs |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in curves:
        for p in c.points:
            lat = p.latency
            missing = f" ({lat.sent - lat.received} missing)" if lat.received < lat.sent else ""
            label = p.label if p.label.endswith("%") else f"{p.label} ({p.share * 100:.0f} %)"
            if p.foreign_cores > DISTURBED_CORES:
                missing += f" ⚠ other work used {p.foreign_cores:.2f} cores"
            spread = (
                f" (runs: {', '.join(num(v) for v in p.p99_runs)})" if len(p.p99_runs) > 1 else ""
            )
            lines.append(
                f"| {c.title} | {label} | {num(lat.offered_rate)} | {num(lat.received)}{missing} "
                f"| {num(lat.p50_ms)} / {num(lat.p95_ms)} / {num(lat.p99_ms)}{spread} "
                f"| {num(lat.max_ms)} | {num(p.consumer_cpu_per_1000, 2)} |"
            )
    lines.append("")
    lines.append(
        "Maximum (100 %) per pipeline: "
        + "; ".join(f"{c.title} {num(c.maximum)} runs/s ({c.maximum_basis})" for c in curves)
        + f"; {num(curves[0].seconds)} s of load per point"
        + (
            f", run {curves[0].repeat} times: each point is the run with the median p99, the "
            "p99 of every run in brackets."
            if curves[0].repeat > 1
            else "."
        )
    )
    return lines


def plot(curves: Sequence[Curve], path: Path, subtitle: str = "") -> None:
    """p50/p95/p99 against load: by share of each pipeline's maximum, and in req/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"eglo": "tab:blue", "baseline": "tab:orange"}
    styles = (("p50_ms", "p50", "-", "o"), ("p95_ms", "p95", "--", "s"),
              ("p99_ms", "p99", ":", "^"))
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    for c in curves:
        points = [p for p in c.points if not math.isnan(p.latency.p50_ms)]
        shares = [p for p in points if p.label.endswith("%")]  # not the extra points
        for attr, label, style, marker in styles:
            for ax, xs, ys in (
                (axes[0], [p.share * 100 for p in shares],
                 [getattr(p.latency, attr) for p in shares]),
                (axes[1], [p.latency.offered_rate for p in points],
                 [getattr(p.latency, attr) for p in points]),
            ):
                ax.plot(xs, ys, linestyle=style, marker=marker, color=colours.get(c.name),
                        label=f"{c.title} {label}")
    for ax in axes:
        ax.set_yscale("log")
        ax.axhline(100, color="grey", linewidth=0.8, alpha=0.6)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].text(0.99, 104, "100 ms: eglo's p99 target at 50 %", color="grey", fontsize=8,
                 ha="right", va="bottom", transform=axes[0].get_yaxis_transform())
    axes[0].set_xlabel("offered load, % of the pipeline's own maximum")
    axes[1].set_xlabel("offered load, requests/s")
    axes[0].set_ylabel("publish → outcome event latency, ms (log)")
    axes[0].set_xticks([int(s * 100) for s in SHARES])
    axes[0].set_title("by share of each pipeline's maximum")
    axes[1].set_title("by absolute load")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle("eglo vs FastStream baseline: latency under load" +
                 (f"\n{subtitle}" if subtitle else ""), fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
