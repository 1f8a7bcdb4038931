"""Admission: who may send to llama-server now, and the FIFO of everyone else.

llama-server decodes `slots` requests at a time (-np). The gateway sends it no more than that, so
that its own queue (which notices no client leaving and says nothing of its length) stays empty:
the rest wait here, in arrival order, until a slot is free *and* the coordinator is running. A
request cut off by a failover goes back to the head of the line (it was admitted first). The line
is bounded by count (`max_waiting`, checked on arrival) and by time (each `acquire`'s timeout); a
waiter that is cancelled (its client went away) leaves the line at once.
"""
from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable


class Full(Exception):
    """The line is at its bound: the request is refused on arrival."""


class Admission:
    def __init__(self, slots: int, max_waiting: int, ready: Callable[[], bool]) -> None:
        self.slots = slots
        self.max_waiting = max_waiting
        self.ready = ready                  # can llama-server take a request now (running)?
        self.busy = 0
        self._line: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._line)

    async def acquire(self, timeout: float, front: bool = False) -> None:
        """A slot, in turn. TimeoutError after `timeout` seconds; Full at once when the line is at
        its bound (never for `front`: a cut-off request already had its place)."""
        if not self._line and self.busy < self.slots and self.ready():
            self.busy += 1
            return
        if not front and len(self._line) >= self.max_waiting:
            raise Full()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if front:
            self._line.appendleft(waiter)
        else:
            self._line.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release()           # granted just as it timed out or was cancelled: pass it on
            else:
                self._remove(waiter)
            raise

    def release(self) -> None:
        self.busy -= 1
        self.poke()

    def poke(self) -> None:
        """Grant slots to the head of the line while there are free ones and llama-server runs
        (called on release and whenever the coordinator's state changes)."""
        while self._line and self.busy < self.slots and self.ready():
            waiter = self._line.popleft()
            if waiter.done():
                continue
            self.busy += 1
            waiter.set_result(None)

    def resize(self, slots: int) -> None:
        self.slots = max(1, slots)
        self.poke()

    def _remove(self, waiter: asyncio.Future[None]) -> None:
        try:
            self._line.remove(waiter)
        except ValueError:
            pass
