"""`eglo events tail [PATTERN]`: print events from `eglo.events` as they are published.

A debugging tool, so it must never take events from anyone: it binds a queue of its own (server
named, exclusive, auto-delete), which the broker deletes when the connection closes, even after a
crash. It sees only events published after it has bound.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import TextIO

import orjson
from aio_pika.abc import AbstractIncomingMessage

from producers import topology
from producers.broker import connect_broker
from worker.runtime import connections

# Bounds the messages the broker pushes ahead of printing; a slow terminal then applies
# backpressure through the broker instead of growing this process's memory.
PREFETCH = 256


def format_event(routing_key: str, body: bytes) -> str:
    """One line: routing key, a space, the body as compact JSON (or a JSON string if not JSON)."""
    try:
        compact = orjson.dumps(orjson.loads(body)).decode()
    except orjson.JSONDecodeError:
        # Still one line: a JSON string escapes newlines and shows undecodable bytes as U+FFFD.
        compact = orjson.dumps(body.decode("utf-8", errors="replace")).decode()
    return f"{routing_key} {compact}"


@contextlib.contextmanager
def _stop_on_sigint(stop: asyncio.Event) -> Iterator[None]:
    """Ctrl-C ends the tail cleanly (exit 0, queue deleted) instead of a traceback."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    loop = asyncio.get_running_loop()
    previous = signal.getsignal(signal.SIGINT)
    try:
        loop.add_signal_handler(signal.SIGINT, stop.set)
    except (NotImplementedError, RuntimeError):  # loops without signal support
        yield
        return
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        # remove_signal_handler installs default_int_handler; put back whoever had it before.
        signal.signal(signal.SIGINT, previous)


async def tail_events(
    amqp_url: str,
    pattern: str = "#",
    *,
    limit: int | None = None,
    out: TextIO = sys.stdout,
    ready: asyncio.Event | None = None,
) -> int:
    """Print events whose routing key matches `pattern` until `limit` were printed or Ctrl-C.

    `ready` is set once the queue is bound: events published after that are guaranteed to be
    seen (tests and scripts wait for it). Returns the exit code, 0.
    """
    if limit is not None and limit <= 0:
        return 0
    stop = asyncio.Event()
    printed = 0
    connection = await connect_broker(amqp_url, name="eglo-events-tail")
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=PREFETCH)
        topo = await topology.declare(channel)
        queue = await channel.declare_queue("", exclusive=True, auto_delete=True, durable=False)
        await queue.bind(topo.events_exchange, routing_key=pattern)
        if ready is not None:
            ready.set()

        async def on_message(message: AbstractIncomingMessage) -> None:
            nonlocal printed
            # No await until the count is updated: callbacks run as tasks, and an await here
            # would let a second delivery slip past the limit.
            if stop.is_set():
                return  # unacked: deleted with the queue, nobody else would get it anyway
            try:
                out.write(format_event(message.routing_key or "", message.body) + "\n")
                out.flush()
            except BrokenPipeError:  # `eglo events tail | head`: the reader is gone
                stop.set()
                return
            printed += 1
            if limit is not None and printed >= limit:
                stop.set()
            await message.ack()

        with _stop_on_sigint(stop):
            tag = await queue.consume(on_message)
            try:
                await stop.wait()
            finally:
                with contextlib.suppress(Exception):
                    await queue.cancel(tag)
    finally:
        await connection.close()
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `eglo events tail`."""
    parser.add_argument(
        "pattern",
        nargs="?",
        default="#",
        help="topic pattern, e.g. 'run.failed.*' or 'anomaly.detected.#' (default: # = all)",
    )
    parser.add_argument("--limit", type=int, help="stop after this many events")


async def _tail_from_args(amqp_url: str, args: argparse.Namespace) -> int:
    ready = asyncio.Event()
    task = asyncio.create_task(tail_events(amqp_url, args.pattern, limit=args.limit, ready=ready))
    waiter = asyncio.create_task(ready.wait())
    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if ready.is_set():
        # On stderr so stdout stays one event per line for pipes (jq, grep).
        print(f"tailing {topology.EVENTS_EXCHANGE} with {args.pattern!r}", file=sys.stderr)
    return await task


def run(args: argparse.Namespace) -> int:
    """`eglo events tail`: the broker comes from EGLO_AMQP_URL, like every other subcommand."""
    from worker.settings import Settings

    amqp_url = connections.amqp_url(Settings())
    try:
        return asyncio.run(_tail_from_args(amqp_url, args))
    except KeyboardInterrupt:  # Ctrl-C before the queue was bound
        return 130
    except OSError as exc:  # aio-pika's connection errors are OSErrors too
        print(f"eglo events tail: cannot reach the broker: {exc}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    from worker.observability import logs

    parser = argparse.ArgumentParser(prog="eglo events tail", description=__doc__)
    add_arguments(parser)
    # Logs (e.g. which broker node it reached) on stderr: stdout is one event per line.
    logs.configure("WARNING", json=False)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
