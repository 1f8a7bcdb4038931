"""Ticker: a fixed-rate clock for periodic rounds (heartbeats, state checks).

The caller runs one round, then awaits next(): one round at a time, on a grid of start + k*interval.
A round that overruns skips the ticks it missed, computed in one step (not counted one by one, which
costs time in proportion to overrun/interval), and the next round waits for the next tick.
"""
from __future__ import annotations

import asyncio
import math


def next_tick(tick: float, now: float, interval: float) -> float:
    """The first tick + k*interval (k >= 1) later than now."""
    if now < tick + interval:
        return tick + interval
    return tick + (math.floor((now - tick) / interval) + 1) * interval


class Ticker:
    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._loop = asyncio.get_running_loop()
        self._tick = self._loop.time()

    async def next(self) -> None:
        """Sleep until the next tick of the grid after now."""
        now = self._loop.time()
        self._tick = next_tick(self._tick, now, self.interval)
        await asyncio.sleep(max(0.0, self._tick - now))
