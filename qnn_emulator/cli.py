"""Command line for the emulator: `add_arguments` + `run`, shared by `eglo emulator` and -m."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import signal
import sys
from collections.abc import Callable

from pydantic import ValidationError

from qnn_emulator.settings import EmulatorSettings

BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")

# argparse dest -> settings field; unset options fall back to EGLO_EMULATOR_* and the defaults.
_OPTIONS: dict[str, tuple[type, str]] = {
    "host": (str, "address to bind (default 127.0.0.1)"),
    "port": (int, "port to bind, 0 for any free port (default 8099)"),
    "latency_ms": (float, "latency added to every predict call, ms (default 0)"),
    "error_rate": (float, "share of predict calls answered 500/503 (default 0)"),
    "throttle_rate": (float, "share of predict calls answered 429 (default 0)"),
    "hang_rate": (float, "share of predict calls that hang for --hang-s (default 0)"),
    "garbage_rate": (float, "share of predict calls with a malformed body (default 0)"),
    "retry_after_s": (int, "Retry-After seconds sent with 429 (default 1)"),
    "hang_s": (float, "how long a hung call hangs, s (default 600)"),
    "rate_limit_per_s": (float, "quota: predict calls/s beyond it answered 429 (default 0: none)"),
    "rate_limit_burst": (float, "calls the quota lets through at once (default: 0.1 s worth)"),
    "seed": (int, "seed for reproducible fault draws (default: random)"),
    "api_key": (str, "require this key as Bearer token or X-API-Key (default: none)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the emulator's options (--host, --port and the fault knobs) to `parser`."""
    for dest, (kind, help_text) in _OPTIONS.items():
        parser.add_argument(
            "--" + dest.replace("_", "-"), dest=dest, type=kind, default=None, help=help_text
        )


def settings_from_args(args: argparse.Namespace) -> EmulatorSettings:
    """Settings from the environment, overridden by the options that were given."""
    given = {d: getattr(args, d) for d in _OPTIONS if getattr(args, d, None) is not None}
    return EmulatorSettings(**given)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def limit_blas_threads() -> None:
    """Keep BLAS single-threaded in the serving process.

    Every solve here is small; BLAS worker threads only contend with the event loop, and on a
    shared 2-core machine they made fits 5-20x slower. Set before numpy loads when possible
    (the numeric modules are imported lazily for that), else via threadpoolctl if installed.
    """
    for name in BLAS_THREAD_VARIABLES:
        os.environ.setdefault(name, "1")
    if "numpy" in sys.modules:
        try:
            threadpoolctl = importlib.import_module("threadpoolctl")
        except ImportError:
            return
        threadpoolctl.threadpool_limits(limits=1, user_api="blas")


async def _serve(settings: EmulatorSettings) -> None:
    from qnn_emulator.server import running_emulator

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with running_emulator(settings, host=settings.host, port=settings.port):
            await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or SIGINT; 0 on a clean stop, 2 on bad options, 1 if it cannot bind."""
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        print(f"qnn emulator: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    limit_blas_threads()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("qnn_emulator").setLevel(logging.INFO)
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(_serve(settings))
    except OSError as exc:
        print(
            f"qnn emulator: cannot serve on {settings.host}:{settings.port}: {exc}", file=sys.stderr
        )
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m qnn_emulator`."""
    parser = argparse.ArgumentParser(
        prog="python -m qnn_emulator",
        description="Serve a computed stand-in for the QNN prediction API, with fault knobs.",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))
