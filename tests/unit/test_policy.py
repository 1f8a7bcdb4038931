"""The supervisor's policy (llama/policy.py): pure functions, every case in milliseconds, no llama.cpp."""
import pytest

from synapticllamas.llama.lifecycle import State
from synapticllamas.llama.policy import (
    Action,
    Limits,
    after_exit,
    after_failed_launch,
    backoff_delay,
    on_backend_change,
)

LIMITS = Limits(max_restarts=3, backoff=0.5)


@pytest.mark.parametrize("reason", ["user", "exit"])
def test_a_stop_we_asked_for_needs_nothing(reason):
    assert after_exit(reason, auto=False, tries=2, limits=LIMITS).action == Action.NONE


@pytest.mark.parametrize("reason", ["failover", "rebalance"])
def test_a_failover_or_rebalance_starts_again_at_once_without_counting_a_try(reason):
    decision = after_exit(reason, auto=True, tries=1, limits=LIMITS)
    assert decision.action == Action.RECOVER and decision.tries == 1 and decision.delay == 0


@pytest.mark.parametrize("reason", ["crash", "health"])
def test_a_crash_backs_off_doubling_then_gives_up(reason):
    decisions = [after_exit(reason, auto=True, tries=n, limits=LIMITS) for n in range(4)]
    assert [d.action for d in decisions] == [Action.RESTART] * 3 + [Action.FATAL]
    assert [d.delay for d in decisions[:3]] == [0.5, 1.0, 2.0]
    assert [d.tries for d in decisions] == [1, 2, 3, 3]


def test_a_users_start_that_fails_is_not_retried_an_automatic_one_is():
    assert after_exit("startup_failed", auto=False, tries=0, limits=LIMITS).action == Action.FAIL
    assert after_exit("startup_failed", auto=True, tries=0, limits=LIMITS).action == Action.RESTART


def test_no_restarts_allowed_means_fatal_at_the_first_crash():
    assert after_exit("crash", auto=False, tries=0, limits=Limits(0, 1.0)).action == Action.FATAL


def test_a_launch_that_cannot_fit_waits_anything_else_backs_off_or_gives_up():
    assert after_failed_launch(no_fit=True, tries=3, limits=LIMITS).action == Action.WAIT
    failed = after_failed_launch(no_fit=False, tries=0, limits=LIMITS)
    assert failed.action == Action.RESTART and failed.tries == 1
    assert after_failed_launch(no_fit=False, tries=3, limits=LIMITS).action == Action.FATAL


@pytest.mark.parametrize("state", [State.STARTING, State.RUNNING])
def test_a_held_backend_lost_while_starting_or_running_is_a_failover(state):
    assert on_backend_change(state, "down", held=True, busy=2, unused=False, limits=LIMITS).action == Action.FAILOVER


@pytest.mark.parametrize("state", [s for s in State if s not in (State.STARTING, State.RUNNING)])
def test_a_held_backend_lost_in_any_other_state_changes_nothing(state):
    assert on_backend_change(state, "down", held=True, busy=0, unused=False, limits=LIMITS).action == Action.NONE


def test_a_backend_not_held_going_down_changes_nothing():
    assert on_backend_change(State.RUNNING, "down", held=False, busy=0, unused=False, limits=LIMITS).action == \
        Action.NONE


def test_a_backend_back_while_waiting_recovers():
    assert on_backend_change(State.WAITING, "up", held=False, busy=0, unused=False, limits=LIMITS).action == \
        Action.RECOVER


def test_automatic_rebalance_only_when_asked_for_idle_and_something_to_gain():
    auto = Limits(3, 0.5, rebalance="auto")
    assert on_backend_change(State.RUNNING, "up", False, busy=0, unused=True, limits=auto).action == Action.REBALANCE
    assert on_backend_change(State.RUNNING, "up", False, busy=1, unused=True, limits=auto).action == Action.NONE
    assert on_backend_change(State.RUNNING, "up", False, busy=0, unused=False, limits=auto).action == Action.NONE
    assert on_backend_change(State.RUNNING, "up", False, busy=0, unused=True, limits=LIMITS).action == Action.NONE


def test_backoff_doubles_and_is_capped():
    assert [backoff_delay(0.5, n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 4.0, 8.0]
    assert backoff_delay(1, 7) == 60.0 and backoff_delay(1, 40) == 60.0
