"""How many QNN calls may be in flight at once: a limit that adapts to what the QNN allows.

A throttling QNN (429) or one that slows down under load says "fewer at once". The limit:

- starts at `initial` and, until the first such signal, grows by one per answered call (doubling
  per round trip, like TCP's slow start);
- then grows by one per `1 / increase_per_window` windows of answered calls (a window: as many
  calls as the limit), so it probes for more room about every 1.2 s at a 200 ms QNN, and
  spaces the starts of calls a smoothed round trip / limit apart (pacing);
- shrinks by one slot per 429 (and per answer slower than `latency_tolerance` x the fastest
  recent one, when that is set): calls that overshot the quota each take one slot away, so a
  limit that was k too high comes down by about k;
- never goes below `floor` nor above `ceiling` (the prefetch: more could never be in flight).
  The floor is there because a 429 cannot say why: a QNN that answers 429 at random, whatever
  the load, would otherwise drive the limit to where a slot's growth balances its 429s (about 2
  at a 10 % rate), and a few slow or hung calls then hold every slot (the chaos suite's
  qnn-faults: 881 of 2,000 requests in 200 s). A quota below `floor` calls per round trip is
  overshot: its 429s delay calls by their Retry-After instead.

Waiting for a slot happens before the call, so a request waiting here holds no connection; a call
that is retried after Retry-After gives its slot back while it sleeps.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Callable


class AdaptiveLimit:
    def __init__(
        self,
        *,
        initial: float,
        ceiling: int,
        floor: int = 1,
        increase_per_window: float = 0.17,
        latency_tolerance: float = 0.0,
        on_change: Callable[[float], None] = lambda _: None,
    ) -> None:
        self.ceiling = max(1, ceiling)
        self.floor = min(max(1, floor), self.ceiling)
        self.limit = min(max(float(self.floor), initial), float(self.ceiling))
        self.in_flight = 0
        self.slow_start = True
        self._increase = increase_per_window
        self._tolerance = latency_tolerance
        self._fastest: float | None = None
        self._rtt: float | None = None  # smoothed answer time
        self._next_start = 0.0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._on_change = on_change
        on_change(self.limit)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self._acquire()
        try:
            await self._pace()
            yield
        finally:
            self._release()

    async def _pace(self) -> None:
        """Once the QNN has throttled: starts spaced a round trip / limit apart. Answers come
        back in bursts (and with them freed slots); a quota counted over short windows answers
        a burst of starts with 429s even below its rate."""
        if self.slow_start or self._rtt is None:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        start = max(now, self._next_start)
        self._next_start = start + self._rtt / self.limit
        if start > now:
            await asyncio.sleep(start - now)

    async def _acquire(self) -> None:
        if self.in_flight < int(self.limit) and not self._waiters:
            self.in_flight += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.in_flight -= 1  # granted as it was cancelled: give it on
                self._wake()
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def _release(self) -> None:
        self.in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.in_flight < int(self.limit):
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.in_flight += 1
                waiter.set_result(None)

    def answered(self, seconds: float) -> None:
        """A call was answered (not throttled) after `seconds`."""
        self._rtt = seconds if self._rtt is None else self._rtt + 0.1 * (seconds - self._rtt)
        if self._tolerance > 0:
            fastest = self._fastest
            # The fastest recent answer, forgetting slowly so a QNN that got slower for good
            # becomes the new normal.
            self._fastest = seconds if fastest is None else min(seconds, fastest * 1.001)
            if fastest is not None and seconds > self._tolerance * fastest:
                self._decrease()
                return
        if self.slow_start:
            self._set(self.limit + 1)
        else:
            self._set(self.limit + self._increase / self.limit)

    def throttled(self) -> None:
        """The QNN answered 429: one call too many."""
        self.slow_start = False
        self._decrease()

    def _decrease(self) -> None:
        self.slow_start = False
        self._set(self.limit - 1)

    def _set(self, limit: float) -> None:
        limit = min(max(float(self.floor), limit), float(self.ceiling))
        if limit != self.limit:
            self.limit = limit
            self._on_change(limit)
            self._wake()
