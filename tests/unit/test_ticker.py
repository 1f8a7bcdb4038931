"""ticker.next_tick: the next tick of a fixed grid, missed ticks skipped in one step."""
import time

import pytest

from synapticllamas.util.ticker import next_tick


def test_on_time_the_next_tick_is_one_interval_on():
    assert next_tick(10.0, 10.5, 1.0) == 11.0
    assert next_tick(10.0, 10.0, 1.0) == 11.0


def test_an_overrun_skips_to_the_first_tick_after_now():
    assert next_tick(10.0, 13.2, 1.0) == pytest.approx(14.0)
    assert next_tick(10.0, 11.0, 1.0) == pytest.approx(12.0)     # a tick exactly now is missed too


def test_a_huge_overrun_costs_no_more_than_a_small_one():
    now = 1e6 + 5.0
    started = time.perf_counter()
    tick = next_tick(1e6, now, 1e-9)          # 5e9 missed ticks: counting them would take minutes
    assert time.perf_counter() - started < 0.1
    assert now - 1e-6 < tick <= now + 1e-6
