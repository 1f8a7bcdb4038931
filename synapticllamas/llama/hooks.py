"""What the coordinator tells the rest of the app: subscriber lists, and the observer's subscription.

The supervisor and the attach watcher know nothing of Redis or the shell: whoever wants their news
subscribes to `Hooks`; `observe()` turns it into observer events (that is where coordinator,
model and raw events are made). A failing subscriber is counted, never allowed to break supervision.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from synapticllamas.events.contract import Component, RawEvent

if TYPE_CHECKING:
    from synapticllamas.events.observer import Observer


@dataclass(slots=True)
class Notice:
    """A non-lifecycle happening: model progress, heartbeat, request/response, an internal error."""
    event_type: str
    message: str
    details: dict[str, Any]
    level: str = "info"


class Hooks:
    def __init__(self) -> None:
        # what a subscriber returns is ignored
        self.on_state_change: list[Callable[..., object]] = []      # (StateChange)
        self.on_log: list[Callable[..., object]] = []               # (LogLine, context dict)
        self.on_model_progress: list[Callable[[Notice], object]] = []
        self.on_load_progress: list[Callable[[Notice], object]] = []   # every upload sample (a UI's line)
        self.on_heartbeat: list[Callable[[Notice], object]] = []
        self.on_inference: list[Callable[[Notice], object]] = []
        self.on_recovery: list[Callable[[Notice], object]] = []     # failover and rebalance
        self.on_error: list[Callable[[Notice], object]] = []
        self.errors = 0

    def call(self, name: str, *args: Any) -> None:
        for fn in list(getattr(self, name)):
            try:
                fn(*args)
            except Exception:
                self.errors += 1

    def subscribe(self, name: str, fn: Callable[..., object]) -> Callable[[], None]:
        subscribers = getattr(self, name)
        subscribers.append(fn)

        def unsubscribe() -> None:
            if fn in subscribers:
                subscribers.remove(fn)

        return unsubscribe


def observe(hooks: Hooks, observer: Observer) -> None:
    """Subscribe an Observer to the hooks: this is where coordinator events are made."""
    def emit(component: str, sample: bool = False) -> Callable[[Notice], object]:
        return lambda n: observer.emit(component, n.event_type, n.message, n.details, n.level, sample=sample)

    hooks.subscribe("on_state_change", lambda c: observer.emit(Component.COORDINATOR, c.event_type, c.message,
                                                               c.details, c.level))
    hooks.subscribe("on_log", lambda rec, ctx: observer.emit(
        Component.RAW, RawEvent.LOG, rec.text, {"source": "llama-server", "kind": rec.kind, **ctx}, rec.level,
        sample=True))
    hooks.subscribe("on_model_progress", emit(Component.MODEL))
    hooks.subscribe("on_heartbeat", emit(Component.COORDINATOR))
    hooks.subscribe("on_recovery", emit(Component.COORDINATOR))
    # one per request, whoever sent it: never sampled (a dashboard counts them)
    hooks.subscribe("on_inference", emit(Component.COORDINATOR))
    hooks.subscribe("on_error", emit(Component.SYSTEM))
