"""Sampling: deterministic, exact, never touching lifecycle events, warnings or errors."""
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import PYTHON, ROOT, shell_env

from synapticllamas.events.observer import Observer


def raw_lines(observer, n, level="info"):
    for i in range(n):
        observer.emit("raw", "log", f"line {i}", {"line": i}, level=level, sample=True)


def test_rate_0_1_keeps_exactly_100_of_1000_raw_lines_evenly_spread():
    obs = Observer(max_events=5000, sampling=True, sample_rate=0.1)
    raw_lines(obs, 1000)
    kept = list(obs.buffer)
    assert len(kept) == 100
    assert [e.details["line"] for e in kept] == list(range(9, 1000, 10))   # every 10th, not random
    stats = obs.stats()
    assert (stats["emitted"], stats["kept"], stats["sampled_out"]) == (1000, 100, 900)
    # seq counts every event created, so a subscriber sees the gaps sampling left
    assert [e.seq for e in kept[:3]] == [10, 20, 30]


def test_a_coordinator_start_among_raw_lines_is_never_sampled_out():
    obs = Observer(max_events=5000, sampling=True, sample_rate=0.0)   # the harshest rate
    for i in range(100):
        raw_lines(obs, 10)
        obs.emit("coordinator", "start", "llama.cpp coordinator started", {"port": 18080, "try": i})
        obs.emit("rpc_registry", "heartbeat", "rpc_backend_connect on rpc_registry")
    starts = [e for e in obs.buffer if (e.component, e.event_type) == ("coordinator", "start")]
    assert [e.details["try"] for e in starts] == list(range(100))
    assert sum(e.component == "rpc_registry" for e in obs.buffer) == 100
    assert not any(e.component == "raw" for e in obs.buffer)


@pytest.mark.parametrize("level", ["warning", "error", "critical"])
def test_warnings_and_errors_are_all_kept_even_when_marked_sampleable(level):
    obs = Observer(max_events=5000, sampling=True, sample_rate=0.1)
    raw_lines(obs, 500, level=level)
    assert len(obs.buffer) == 500 and obs.sampled_out == 0


def test_sampling_off_keeps_everything():
    obs = Observer(max_events=5000, sampling=False, sample_rate=0.1)
    raw_lines(obs, 1000)
    assert len(obs.buffer) == 1000


@pytest.mark.parametrize("rate,kept", [(0.0, 0), (0.05, 50), (0.1, 100), (0.25, 250), (0.5, 500), (1.0, 1000)])
def test_kept_count_is_exact_for_common_rates(rate, kept):
    obs = Observer(max_events=5000, sampling=True, sample_rate=rate)
    raw_lines(obs, 1000)
    assert len(obs.buffer) == kept


@settings(max_examples=200, deadline=None)
@given(rate=st.integers(0, 1000).map(lambda k: k / 1000), n=st.integers(0, 3000))
def test_every_prefix_keeps_its_share_within_one_event(rate, n):
    """Not just the total: at any point the kept count is within one of n * rate (no bursts, no droughts)."""
    obs = Observer(max_events=5000, sampling=True, sample_rate=rate)
    kept = 0
    for i in range(1, n + 1):
        kept += obs.emit("raw", "log", "x", sample=True) is not None
        assert i * rate - 1 < kept <= i * rate + 1e-6


@pytest.mark.parametrize("bad", ["abc", "1.5", "-0.1"])
def test_invalid_sample_rate_is_refused_at_start_up(tmp_path, bad):
    proc = subprocess.run([PYTHON, str(ROOT / "main.py"), "-c", "status"], capture_output=True, text=True,
                          env=shell_env(tmp_path, SOLLOL_OBSERVER_SAMPLE_RATE=bad), timeout=30)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip() == (f"Error: SOLLOL_OBSERVER_SAMPLE_RATE='{bad}' is not valid:"
                                   " expected a number from 0 to 1")
