"""The one reconnection backoff: doubling, the cap, the jitter's bounds, reset."""
import random

import pytest

from synapticllamas.util.backoff import Backoff


def test_each_wait_doubles_up_to_the_cap():
    longest = Backoff(0.2, 5.0, rand=lambda: 0.0)        # no jitter drawn: the upper bound itself
    assert [longest.next() for _ in range(8)] == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0]


def test_jitter_takes_at_most_half_off():
    shortest = Backoff(0.2, 5.0, rand=lambda: 1.0)       # the most jitter can take (rand < 1 really)
    assert [shortest.next() for _ in range(7)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 2.5, 2.5])


def test_real_jitter_stays_within_bounds_and_varies():
    backoff = Backoff(0.05, 2.0, rand=random.Random(7).random)
    waits = [backoff.next() for _ in range(200)]
    ceilings = [min(0.05 * 2 ** i, 2.0) for i in range(200)]
    assert all(c / 2 <= w <= c for w, c in zip(waits, ceilings, strict=True))
    assert len(set(waits[10:])) > 100                     # capped waits still differ: clients spread out


def test_reset_starts_a_new_series():
    backoff = Backoff(0.5, 5.0, rand=lambda: 0.0)
    for _ in range(4):
        backoff.next()
    assert backoff.current == 5.0
    backoff.reset()
    assert [backoff.next(), backoff.next()] == [0.5, 1.0]


@pytest.mark.parametrize("args, message", [
    ((0, 1), "0 < first <= cap"), ((2, 1), "0 < first <= cap"), ((-1, 1), "0 < first <= cap"),
])
def test_nonsense_is_refused(args, message):
    with pytest.raises(ValueError, match=message):
        Backoff(*args)
    with pytest.raises(ValueError, match="jitter"):
        Backoff(1, 2, jitter=1.0)
    with pytest.raises(ValueError, match="factor"):
        Backoff(1, 2, factor=0.5)
