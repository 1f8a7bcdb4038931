"""Capped exponential backoff with jitter: how long to wait before the next reconnection attempt.

One helper for everything that reconnects to Redis (the publisher's sender thread, the dashboard
hub, the terminal viewer). Each delay doubles up to a cap; each wait is drawn at random from the
upper half of the current delay ("equal jitter"), so many clients that lost the same server do not
all come back in the same millisecond, and none waits longer than the cap.
"""
from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    """`next()` is the wait before the next attempt; `reset()` after an attempt that worked.

    With first=0.2, cap=5 the waits are drawn from [0.1, 0.2], [0.2, 0.4], [0.4, 0.8] ... [2.5, 5]."""

    __slots__ = ("_current", "cap", "factor", "first", "jitter", "rand")

    def __init__(self, first: float, cap: float, factor: float = 2.0, jitter: float = 0.5,
                 rand: Callable[[], float] = random.random) -> None:
        if not 0 < first <= cap:
            raise ValueError(f"backoff needs 0 < first <= cap; got first={first!r}, cap={cap!r}")
        if factor < 1:
            raise ValueError(f"backoff factor must be at least 1; got {factor!r}")
        if not 0 <= jitter < 1:
            raise ValueError(f"backoff jitter must be from 0 to below 1; got {jitter!r}")
        self.first, self.cap, self.factor, self.jitter = first, cap, factor, jitter
        self.rand = rand        # a number in [0, 1); a test passes its own
        self._current = first

    @property
    def current(self) -> float:
        """The delay the next wait is drawn from (before jitter)."""
        return self._current

    def next(self) -> float:
        """Seconds to wait now, from (1 - jitter) * delay to delay; the delay then grows towards the cap."""
        delay = self._current
        self._current = min(delay * self.factor, self.cap)
        return delay * (1.0 - self.jitter * self.rand())

    def reset(self) -> None:
        """Back to the first delay: the connection worked, a new failure starts a new series."""
        self._current = self.first
