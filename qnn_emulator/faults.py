"""Seeded fault draws for predict calls: errors, throttling, hangs and malformed bodies.

Each call draws one uniform number and the rates partition [0, 1), so each rate is exactly the
probability of its outcome and a seed makes a sequence of calls reproducible.
"""

from __future__ import annotations

import random
from enum import StrEnum

from qnn_emulator.settings import FaultKnobs

HTML_ERROR_PAGE = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    b"</body>\r\n</html>\r\n"
)


class Fault(StrEnum):
    HANG = "hang"
    ERROR = "error"
    THROTTLE = "throttle"
    GARBAGE = "garbage"
    RATE_LIMIT = "rate_limit"  # over the quota (rate_limit_per_s), not a random draw


class FaultInjector:
    """Holds the current knobs (changeable at run time) and the seeded generator."""

    def __init__(self, knobs: FaultKnobs, seed: int | None = None) -> None:
        self.knobs = knobs
        self._rng = random.Random(seed)
        self._tokens: float | None = None
        self._refilled = 0.0

    def admit(self, now: float) -> bool:
        """The rate limit (`rate_limit_per_s`, 0: none) as a token bucket holding
        `rate_limit_burst` calls (0: a tenth of a second's worth, at least 1); False: answer 429."""
        rate = self.knobs.rate_limit_per_s
        if rate <= 0:
            self._tokens = None
            return True
        burst = self.knobs.rate_limit_burst or max(1.0, rate / 10)
        if self._tokens is None:
            self._tokens, self._refilled = burst, now
        self._tokens = min(burst, self._tokens + (now - self._refilled) * rate)
        self._refilled = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def draw(self) -> Fault | None:
        """The fault for this call, or None for a normal answer."""
        k = self.knobs
        u = self._rng.random()
        for fault, rate in (
            (Fault.HANG, k.hang_rate),
            (Fault.ERROR, k.error_rate),
            (Fault.THROTTLE, k.throttle_rate),
            (Fault.GARBAGE, k.garbage_rate),
        ):
            if u < rate:
                return fault
            u -= rate
        return None

    def error_status(self) -> int:
        """500 or 503, evenly: clients must treat both as transient server errors."""
        return self._rng.choice((500, 503))

    def garble(self, good_body: bytes) -> tuple[bytes, str]:
        """A malformed stand-in for `good_body`, and the content type it is served with.

        Every variant is served with status 200, so a client has to inspect the body.
        """
        variant = self._rng.randrange(6)
        if variant == 0:  # connection cut mid-body
            return good_body[: max(1, len(good_body) // 2)], "application/json"
        if variant == 1:  # a proxy's error page
            return HTML_ERROR_PAGE, "text/html"
        if variant == 2:  # valid JSON, wrong top-level type
            return b'[{"success": true}]', "application/json"
        if variant == 3:  # the right envelope with nothing in it
            return b'{"success": true, "data": {"prediction": null}}', "application/json"
        if variant == 4:
            return b"", "application/json"
        return b"\xff\xfe\x00garbage\x00", "application/octet-stream"
