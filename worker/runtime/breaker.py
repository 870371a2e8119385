"""A circuit breaker for the QNN: after repeated failures, stop calling and stop consuming.

Closed: calls flow. Open: calls wait (in-flight requests keep their place and burn no retries),
the consumer is paused, and a probe asks the health endpoint until it answers. Half-open: the
consumer resumes and calls flow; the first success closes the circuit, a failure re-opens it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import structlog

log = structlog.get_logger(__name__)


class State(enum.IntEnum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


Listener = Callable[[State], Coroutine[Any, Any, None]]


class CircuitBreaker:
    def __init__(
        self,
        *,
        failure_threshold: int,
        probe_interval_s: float,
        probe: Callable[[], Awaitable[bool]],
    ) -> None:
        self._threshold = failure_threshold
        self._probe_interval_s = probe_interval_s
        self._probe = probe
        self._consecutive_failures = 0
        self._state = State.CLOSED
        self._callable = asyncio.Event()
        self._callable.set()
        self._listeners: list[Listener] = []
        self._notifying: set[asyncio.Task[None]] = set()
        self._prober: asyncio.Task[None] | None = None

    @property
    def state(self) -> State:
        return self._state

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    async def wait_callable(self) -> None:
        """Return once a call may be made (immediately unless the circuit is open)."""
        await self._callable.wait()

    def record_success(self) -> None:
        self._consecutive_failures = 0
        if self._state is not State.CLOSED:
            self._transition(State.CLOSED)

    def record_failure(self) -> None:
        self._consecutive_failures += 1
        if self._state is State.HALF_OPEN or (
            self._state is State.CLOSED and self._consecutive_failures >= self._threshold
        ):
            self._transition(State.OPEN)

    async def close(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prober
        self._callable.set()  # release waiters so shutdown is not blocked by an open circuit

    def _transition(self, state: State) -> None:
        previous, self._state = self._state, state
        log.warning(
            "qnn.circuit." + state.name.lower(),
            previous=previous.name.lower(),
            consecutive_failures=self._consecutive_failures,
        )
        if state is State.OPEN:
            self._callable.clear()
            if self._prober is None or self._prober.done():
                self._prober = asyncio.create_task(self._probe_until_healthy(), name="qnn-probe")
        else:
            self._callable.set()
        for listener in self._listeners:
            # Kept until done: the loop holds tasks only weakly.
            task = asyncio.create_task(listener(state))
            self._notifying.add(task)
            task.add_done_callback(self._notifying.discard)

    async def _probe_until_healthy(self) -> None:
        while self._state is State.OPEN:
            await asyncio.sleep(self._probe_interval_s)
            if await self._probe():
                self._consecutive_failures = 0
                self._transition(State.HALF_OPEN)
