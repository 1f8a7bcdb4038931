"""Sampled is not lost: the seq gaps a reader sees, split by the `sampled` count events carry."""
import asyncio
import io

from synapticllamas.app import App
from synapticllamas.commands.events import events_command
from synapticllamas.config import load_settings
from synapticllamas.events.gaps import Gaps, describe
from synapticllamas.events.observer import Observer
from synapticllamas.shell.render import render_plain
from synapticllamas.ui import PlainUI


def test_an_observer_stamps_the_running_count_of_sampled_out_events():
    obs = Observer(max_events=100, sampling=True, sample_rate=0.1)
    for _ in range(25):
        obs.emit("raw", "log", "x", sample=True)
    obs.emit("coordinator", "heartbeat", "beat")
    kept = list(obs.buffer)
    assert [(e.seq, e.sampled) for e in kept] == [(10, 9), (20, 18), (26, 23)]
    # seq - sampled counts the kept events only: 1, 2, 3
    assert [e.seq - e.sampled for e in kept] == [1, 2, 3]
    assert kept[0].to_dict()["sampled"] == 9 and list(kept[0].to_dict())[-2:] == ["seq", "sampled"]


def test_every_gap_made_by_sampling_is_sampled_and_none_is_lost():
    obs = Observer(max_events=10000, sampling=True, sample_rate=0.1)
    for i in range(1000):
        obs.emit("raw", "log", "x", sample=True)
        if i % 37 == 0:
            obs.emit("rpc_registry", "heartbeat", "beat")
    gaps = Gaps()
    for e in obs.buffer:
        gaps.note("h:1", e.seq, e.sampled)
    t = gaps.totals("h:1")
    first = obs.buffer[0]
    assert (t.sampled, t.lost) == (obs.sampled_out - first.sampled, 0)


def test_events_missing_between_kept_ones_are_lost_even_next_to_sampling():
    obs = Observer(max_events=10000, sampling=True, sample_rate=0.1)
    for _ in range(100):
        obs.emit("raw", "log", "x", sample=True)
    kept = list(obs.buffer)                      # seq 10, 20, ... 100; sampled 9, 18, ... 90
    received = kept[:3] + kept[6:]               # seq 40, 50, 60 dropped in an outage
    gaps = Gaps()
    found = [g for e in received if (g := gaps.note("h:1", e.seq, e.sampled))]
    outage = found[2]                            # the gap before seq 70: 39 events never arrived
    assert (outage.first, outage.last, outage.sampled, outage.lost) == (31, 69, 36, 3)
    t = gaps.totals("h:1")
    assert (t.sampled, t.lost) == (81, 3)
    assert describe("h:1", outage) == ("3 events from h:1 lost (seq 31-69 never arrived: dropped in a Redis"
                                       " outage or trimmed from the journal; 36 more sampled out by the app)")


def test_without_a_sampled_count_a_gap_is_lost_and_a_new_run_starts_afresh():
    gaps = Gaps()
    gaps.note("h:1", 1, None)
    assert gaps.note("h:1", 4, None).lost == 2
    assert gaps.note("h:1", 1, 0, new_run=True) is None      # register of a new process with the same pid
    assert gaps.note("h:1", 2, 0) is None
    assert gaps.note("h:1", 2, 0) is None                     # seq went back (a repeat): no gap
    assert (gaps.totals("h:1").sampled, gaps.totals("h:1").lost) == (0, 2)


def test_the_events_command_says_sampled_out_is_not_lost(tmp_path):
    settings = load_settings(env={"XDG_CONFIG_HOME": str(tmp_path), "XDG_STATE_HOME": str(tmp_path)})
    app = App(settings, ui=PlainUI(out=io.StringIO()))
    for _ in range(100):
        app.observer.emit("raw", "log", "x", sample=True)
    text = render_plain(asyncio.run(events_command(app, ["5"])))
    assert "90 sampled out (not lost; 1 in 10 kept) of 100 emitted" in text
