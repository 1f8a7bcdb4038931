"""The coordinator's lifecycle as a table: which state may follow which (supervisord's states).

`Lifecycle.enter()` is the guard every state change goes through. A change the table does not
allow is a bug of ours: it is reported (logged with a traceback and handed to `on_refused`, which
emits a system/error event) and refused with IllegalTransition, so the state never silently
becomes something the rest of the code does not expect.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from synapticllamas.events.contract import CoordinatorEvent


class State(StrEnum):
    STOPPED = "stopped"      # nothing runs; a user's start may begin
    STARTING = "starting"    # llama-server launched, /health not yet ok
    RUNNING = "running"      # /health answered 200 {"status": "ok"}
    BACKOFF = "backoff"      # it ended unexpectedly; a restart is scheduled
    STOPPING = "stopping"    # SIGTERM (or SIGKILL) sent by us; waiting for the exit
    EXITED = "exited"        # it ended unexpectedly, or a user's start failed
    FATAL = "fatal"          # the automatic restarts ran out
    WAITING = "waiting"      # its backends were lost and the survivors cannot hold the model:
                             # it starts again as soon as enough memory is back


S = State

# What our own llama-server may do. Every SIGTERM we send (user stop, start timeout, failed
# /health, the shell leaving) goes through STOPPING; an exit nobody asked for goes to EXITED.
SUPERVISED: Mapping[State, frozenset[State]] = {
    S.STOPPED: frozenset({S.STARTING}),
    S.STARTING: frozenset({S.RUNNING, S.STOPPING, S.EXITED}),
    S.RUNNING: frozenset({S.STOPPING, S.EXITED}),
    S.STOPPING: frozenset({S.STOPPED, S.EXITED}),
    S.EXITED: frozenset({S.STARTING, S.BACKOFF, S.FATAL, S.WAITING}),
    # a restart whose pre-flight fails (no healthy backend yet) backs off again, or gives up; one
    # whose backends cannot hold the model waits for memory
    S.BACKOFF: frozenset({S.STARTING, S.BACKOFF, S.STOPPED, S.FATAL, S.WAITING}),
    S.FATAL: frozenset({S.STARTING}),
    # waiting for memory; a relaunch that fails for another reason (the binary gone) backs off
    S.WAITING: frozenset({S.STARTING, S.STOPPED, S.BACKOFF, S.FATAL}),
}

# An external llama-server we only watch (`coordinator attach`): up, down, and detached.
ATTACHED: Mapping[State, frozenset[State]] = {
    S.STOPPED: frozenset({S.RUNNING}),
    S.RUNNING: frozenset({S.EXITED, S.STOPPED}),
    S.EXITED: frozenset({S.RUNNING, S.STOPPED}),
}

ACTIVE = frozenset({S.STARTING, S.RUNNING, S.BACKOFF, S.STOPPING, S.WAITING})   # a user's start is refused

# The coordinator event a state change is announced as.
EVENT_TYPE: Mapping[State, str] = {
    S.STARTING: CoordinatorEvent.STARTING, S.RUNNING: CoordinatorEvent.START,
    S.STOPPING: CoordinatorEvent.STOPPING, S.STOPPED: CoordinatorEvent.STOP, S.EXITED: CoordinatorEvent.STOP,
    S.BACKOFF: CoordinatorEvent.BACKOFF, S.FATAL: CoordinatorEvent.FATAL, S.WAITING: CoordinatorEvent.WAITING,
}

log = logging.getLogger("synapticllamas")


class IllegalTransition(RuntimeError):
    """A state change the lifecycle table does not allow: a bug, reported where it happened."""


class Lifecycle:
    def __init__(self, table: Mapping[State, frozenset[State]], name: str,
                 on_refused: Callable[[str], None] | None = None) -> None:
        self.table = table
        self.name = name
        self.state = State.STOPPED
        self.on_refused = on_refused

    def allows(self, to: State) -> bool:
        return to in self.table.get(self.state, frozenset())

    def enter(self, to: State) -> State:
        """Change to `to`; returns the state it left. Raises IllegalTransition if not allowed."""
        if not self.allows(to):
            message = f"internal error: the {self.name} cannot go from {self.state} to {to}"
            # the one line for the user is on_refused's event; the stack goes to the log file
            log.error(message, stack_info=True, extra={"reported": self.on_refused is not None})
            if self.on_refused is not None:
                self.on_refused(message)
            raise IllegalTransition(message)
        from_state, self.state = self.state, to
        return from_state


@dataclass(slots=True)
class StateChange:
    """A state change as the hooks see it (the observer makes a coordinator event of it)."""
    state: State
    from_state: State
    event_type: str
    message: str
    level: str
    details: dict[str, Any]


def default_level(to: State, reason: str | None) -> str:
    if to == S.FATAL:
        return "critical"
    if to in (S.BACKOFF, S.WAITING):
        return "warning"
    if to == S.EXITED and reason in ("crash", "startup_failed", "health"):
        return "error"
    if to == S.EXITED and reason == "failover":
        return "warning"
    return "info"
