"""The supervisor's policy: what to do next, as pure functions of what it knows.

supervisord's `transition()` per tick is the model: no I/O, no clock, no state of its own. The
supervisor (supervisor.py) passes the current state, why the last run ended, the count of
restarts in a row and the settings that bound them, and carries out the Decision it gets back.
tests/unit/test_policy.py drives every case in milliseconds.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from synapticllamas.llama.lifecycle import State

BACKOFF_CAP = 60.0


class Action(StrEnum):
    NONE = "none"            # nothing to do (a stop we asked for; a change that concerns no run)
    RESTART = "restart"      # back off `delay` seconds, then start again (a crash, a failed /health)
    RECOVER = "recover"      # start again now on what is healthy (a failover, a rebalance, memory back)
    WAIT = "wait"            # the backends there are cannot hold the model: wait until one comes back
    FATAL = "fatal"          # the restarts in a row ran out
    FAIL = "fail"            # a start the user typed failed: say so, do not retry
    FAILOVER = "failover"    # a backend the coordinator holds is lost: stop it now, then recover
    REBALANCE = "rebalance"  # backends it does not use are up: restart over all of them


@dataclass(frozen=True)
class Decision:
    action: Action
    delay: float = 0.0       # for RESTART: seconds of backoff
    tries: int = 0           # restarts in a row once this decision is carried out


@dataclass(frozen=True)
class Limits:
    """The settings the policy reads."""
    max_restarts: int
    backoff: float           # seconds before the first restart; doubles with each try
    rebalance: str = "manual"

    @classmethod
    def of(cls, settings: Any) -> Limits:
        return cls(settings.coordinator_max_restarts, settings.coordinator_backoff,
                   getattr(settings, "coordinator_rebalance", "manual"))


def backoff_delay(first: float, tries: int) -> float:
    """Seconds before restart number `tries` (1, 2, ...): first, doubling each time, at most 60 s."""
    return float(min(first * 2 ** (tries - 1), BACKOFF_CAP))


def _retry(tries: int, limits: Limits) -> Decision:
    if tries >= limits.max_restarts:
        return Decision(Action.FATAL, tries=tries)
    return Decision(Action.RESTART, backoff_delay(limits.backoff, tries + 1), tries + 1)


def after_exit(reason: str, auto: bool, tries: int, limits: Limits) -> Decision:
    """llama-server has exited (and the exit is announced): reason is the `stop` event's."""
    if reason in ("user", "exit"):
        return Decision(Action.NONE, tries=tries)
    if reason in ("failover", "rebalance"):
        return Decision(Action.RECOVER, tries=tries)
    if reason == "startup_failed" and not auto:
        return Decision(Action.FAIL, tries=tries)
    return _retry(tries, limits)             # a crash, a failed /health, an automatic start that failed


def after_failed_launch(no_fit: bool, tries: int, limits: Limits) -> Decision:
    """An automatic start could not even launch. `no_fit`: the backends that are up cannot hold the
    model, or none is up; waiting for one costs nothing, and giving up would need the user back.
    Anything else (the binary gone, the port taken, the model unreadable) backs off like a crash."""
    if no_fit:
        return Decision(Action.WAIT, tries=tries)
    return _retry(tries, limits)


def on_backend_change(state: State, new: str, held: bool, busy: int, unused: bool, limits: Limits) -> Decision:
    """A backend changed state. `held`: the running llama-server uses it; `busy`: requests in flight
    (every client's); `unused`: healthy backends the running coordinator does not use."""
    if new == "down" and held and state in (State.STARTING, State.RUNNING):
        return Decision(Action.FAILOVER)
    if new == "up" and state == State.WAITING:
        return Decision(Action.RECOVER)
    if new == "up" and state == State.RUNNING and limits.rebalance == "auto" and busy == 0 and unused:
        return Decision(Action.REBALANCE)
    return Decision(Action.NONE)
