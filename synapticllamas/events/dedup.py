"""Drop an event seen before, by (source.instance, seq): the pair the contract makes unique.

Readers meet the same event twice in two ways: they read the journal after subscribing, so an
event published in between arrives on both (docs/EVENTS.md, "How to read without missing
anything"); and a publisher may re-send a batch to a Redis restarted without persistence. The
dashboard hub and the terminal viewer both drop such repeats here.

Memory is bounded: the oldest keys are forgotten first, so only a repeat more than `capacity`
events late gets through again.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from typing import Any

Key = tuple[str, int]


def identity(source: Any, seq: Any) -> Key | None:
    """(instance, seq) when the event carries both, else None: such an event cannot be told apart
    from another one with the same text, and the caller decides what to do with it."""
    if not isinstance(source, dict) or isinstance(seq, bool) or not isinstance(seq, int) or seq <= 0:
        return None   # an Event without a seq has 0; a bool is no count
    instance = source.get("instance")
    if not instance:
        return None
    return str(instance), seq


class SeenEvents:
    """The last `capacity` keys seen, in a set for the lookups and a deque for the order."""

    __slots__ = ("_keys", "_order", "capacity")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1; got {capacity!r}")
        self.capacity = capacity
        self._keys: set[Hashable] = set()
        self._order: deque[Hashable] = deque()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, key: Hashable) -> bool:
        """Remember `key`. True the first time, False for a repeat (which is then not counted again)."""
        if key in self._keys:
            return False
        self._keys.add(key)
        self._order.append(key)
        if len(self._order) > self.capacity:
            self._keys.discard(self._order.popleft())
        return True

    def clear(self) -> None:
        self._keys.clear()
        self._order.clear()
