"""Throughput benchmark: `python -m qnn_emulator.bench` starts the emulator in a subprocess and
drives it with concurrent forecast requests from an asyncio client, then prints requests/s.

The server runs in its own process so client and server each get a core, as they would in use.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import sys
import time

import aiohttp

from contracts.qnn import HEALTH_PATH, PREDICT_PATH
from qnn_emulator.samples import forecast_request, predict_body


async def drive(url: str, body: bytes, total: int, concurrency: int) -> tuple[float, int]:
    """Send `total` requests over `concurrency` connections; (seconds, failures)."""
    failures = 0
    remaining = total
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal remaining, failures
            while remaining > 0:
                remaining -= 1
                async with session.post(url + PREDICT_PATH, data=body, headers=headers) as resp:
                    await resp.read()
                    failures += resp.status != 200

        # Warm-up: connections, caches and the first model fit are not what we measure.
        await asyncio.gather(*(session.get(url + HEALTH_PATH) for _ in range(concurrency)))
        async with session.post(url + PREDICT_PATH, data=body, headers=headers) as resp:
            await resp.read()
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started, failures


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m qnn_emulator.bench")
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--history-hours", type=int, default=168)
    parser.add_argument("--horizon", type=int, default=24)
    args = parser.parse_args()

    server = subprocess.Popen(
        [sys.executable, "-m", "qnn_emulator", "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stderr is not None
        line = server.stderr.readline()
        match = re.search(r"http://\S+", line)
        if match is None:
            print(f"emulator did not start: {line!r}", file=sys.stderr)
            return 1
        body = predict_body(forecast_request(steps=args.history_hours, horizon=args.horizon))
        try:
            import uvloop

            runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
        except ImportError:
            runner = asyncio.Runner()
        with runner:
            seconds, failures = runner.run(
                drive(match.group(0), body, args.requests, args.concurrency)
            )
        rate = args.requests / seconds
        print(
            f"{args.requests} forecast requests ({args.history_hours} h history, "
            f"{args.horizon} steps) over {args.concurrency} connections in {seconds:.2f} s: "
            f"{rate:.0f} req/s, {failures} non-200"
        )
        return 0 if failures == 0 else 1
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    sys.exit(main())
