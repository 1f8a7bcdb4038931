"""NetworkObserver: the one place events are created.

`emit()` is synchronous, O(1) and never does I/O: it stamps the event, applies sampling, appends it
to the ring buffer and hands it to the sinks (the Redis publisher's queue, the shell's notifier).
Sinks must be just as cheap; anything slow belongs on the sink's own task or thread.
"""
from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from typing import Any

from synapticllamas.events.contract import LEVEL_RANK, MAX_MESSAGE_CHARS, Event, default_source

Sink = Callable[[Event], None]


class Sampler:
    """Deterministic sampling: keeps exactly floor(n * rate) of n events, evenly spread.

    Random sampling would make "1000 lines -> 100 kept" only true on average, and would let a
    dashboard see long gaps by chance.
    """

    __slots__ = ("kept", "rate", "seen")

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.seen = 0
        self.kept = 0

    def keep(self) -> bool:
        self.seen += 1
        # keep when the running quota floor(seen * rate) grows past what we already kept
        if int(self.seen * self.rate + 1e-9) > self.kept:
            self.kept += 1
            return True
        return False


class Observer:
    def __init__(self, max_events: int = 10000, sampling: bool = True, sample_rate: float = 0.1,
                 source: dict[str, str] | None = None, clock: Callable[[], float] = time.time) -> None:
        self.buffer: deque[Event] = deque(maxlen=max_events)
        self.sampling = sampling
        self.sampler = Sampler(sample_rate)
        self.source = source or default_source()
        self.clock = clock
        self.seq = 0
        self.sinks: list[Sink] = []
        self.emitted = 0
        self.sampled_out = 0
        self.sink_errors = 0
        self.by_component: Counter[str] = Counter()
        self.by_level: Counter[str] = Counter()

    @classmethod
    def from_settings(cls, settings: Any) -> Observer:
        return cls(settings.observer_max_events, settings.observer_sampling, settings.observer_sample_rate)

    # ------------------------------------------------------------ sinks

    def add_sink(self, sink: Sink) -> Callable[[], None]:
        """Register a sink; returns a function that removes it."""
        self.sinks.append(sink)

        def remove() -> None:
            if sink in self.sinks:
                self.sinks.remove(sink)

        return remove

    # ------------------------------------------------------------ emit

    def emit(self, component: str, event_type: str, message: str, details: dict[str, Any] | None = None,
             level: str = "info", sample: bool = False) -> Event | None:
        """Create an event. `sample=True` marks a high-volume info event (raw log line, per-request
        event) that sampling may drop; warnings and errors are kept whatever `sample` says.
        Returns the event, or None when it was sampled out."""
        self.seq += 1
        self.emitted += 1
        if sample and self.sampling and LEVEL_RANK.get(level, 1) <= 1 and not self.sampler.keep():
            self.sampled_out += 1
            return None
        if len(message) > MAX_MESSAGE_CHARS:    # readers refuse longer ones (events/schema.py)
            from synapticllamas.events.schema import cut_message

            message = cut_message(message)
        event = Event(self.clock(), component, event_type, message, details or {}, level, self.source, self.seq,
                      self.sampled_out)
        self.buffer.append(event)
        self.by_component[component] += 1
        self.by_level[level] += 1
        for sink in self.sinks:
            try:
                sink(event)
            except Exception:  # a broken sink must not take emit() or the other sinks down
                self.sink_errors += 1
        return event

    # ------------------------------------------------------------ queries

    @property
    def kept(self) -> int:
        return self.emitted - self.sampled_out

    def recent(self, n: int | None = None, component: str | None = None,
               level: str | None = None) -> list[Event]:
        """The last n kept events, oldest first; `level` means that level or more severe."""
        events: Iterable[Event] = self.buffer
        if component:
            events = (e for e in events if e.component == component)
        if level:
            floor = LEVEL_RANK[level]
            events = (e for e in events if LEVEL_RANK.get(e.level, 1) >= floor)
        selected = list(events)
        return selected[-n:] if n else selected

    def stats(self) -> dict[str, Any]:
        return {
            "emitted": self.emitted,
            "kept": self.kept,
            "sampled_out": self.sampled_out,
            "buffered": len(self.buffer),
            "by_component": dict(self.by_component),
            "by_level": dict(self.by_level),
        }
