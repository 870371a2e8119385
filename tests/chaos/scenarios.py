"""The six chaos scenarios of issue 3, at full size (`make chaos`) or shortened (`make test`)."""

from __future__ import annotations

import asyncio
import signal
import time

from tests.chaos.environment import close_broker_connections, refuse_broker
from tests.chaos.runner import ChaosRun, Scenario


async def kill_three_times(run: ChaosRun) -> None:
    for fraction in (0.2, 0.45, 0.7):
        await run.until_stored(fraction)
        run.kill_worker(signal.SIGKILL).wait()
        run.notes.append(f"SIGKILL at {await run.stored()} stored")
        await asyncio.sleep(0.5)
        run.start_worker()


async def broker_outages(run: ChaosRun) -> None:
    await run.until_stored(0.25)
    close_broker_connections(run.vhost)
    run.notes.append(f"closed all connections at {await run.stored()} stored")
    await run.until_stored(0.6)
    await refuse_broker(run.vhost, down_s=5)
    run.notes.append(f"broker refused 5 s at {await run.stored()} stored")


def database_outage(down_s: float):  # type: ignore[no-untyped-def]
    async def fault(run: ChaosRun) -> None:
        await run.until_stored(0.3)
        at = await run.stored()
        run.db.stop()
        await asyncio.sleep(down_s)
        run.db.start()
        run.notes.append(f"database stopped {down_s:g} s at {at} stored")

    return fault


async def sigterm_mid_run(run: ChaosRun) -> None:
    await run.until_stored(0.4)
    started = time.monotonic()
    process = run.kill_worker(signal.SIGTERM)
    code = process.wait(60)
    took = time.monotonic() - started
    grace = float(run.env["EGLO_SHUTDOWN_GRACE_S"])
    verdict = "ok" if code == 0 and took <= grace + 5 else "FAIL"
    run.notes.append(
        f"{verdict if verdict == 'FAIL' else 'SIGTERM'}: exit {code} after "
        f"{took:.1f} s (grace {grace:g} s)"
    )
    run.start_worker()


def scenarios(requests: int, *, db_down_s: float) -> list[Scenario]:
    return [
        Scenario("sigkill-x3", requests, kill_three_times),
        Scenario("broker-outages", requests, broker_outages),
        Scenario("database-outage", requests, database_outage(db_down_s)),
        Scenario(
            "qnn-faults",
            requests,
            emulator_args=[
                "--error-rate",
                "0.3",
                "--throttle-rate",
                "0.1",
                "--hang-rate",
                "0.05",
                "--garbage-rate",
                "0.05",
                "--hang-s",
                "30",
            ],
        ),
        Scenario("poison-duplicates", requests, poison_rate=0.05, duplicate_rate=0.1),
        Scenario("sigterm", requests, sigterm_mid_run),
    ]
