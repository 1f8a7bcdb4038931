"""Sampled or lost: what a jump in an app's seq means, for every reader (terminal viewer, dashboard).

Each event carries `seq` (+1 for every event the app created) and `sampled` (how many it sampled out
before this one, a running total). Between two events of one app that a reader received,
`seq` moved by the events created in between, `sampled` by the ones sampling left out on purpose;
the rest never arrived: dropped in a Redis outage (system/events_dropped says so too) or trimmed
from the journal before this reader got there. The page's script (static/app.js, `noteSeq`) does
the same sum.

An event without `sampled` (a publisher that predates it) cannot tell the two apart: its whole
gap counts as lost, the loud side, as a monitor should err.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Gap:
    sampled: int      # left out by the app's sampling: expected, not an error
    lost: int         # created, kept by the app, never arrived here
    first: int        # seqs first..last never arrived (both kinds together)
    last: int


@dataclass(slots=True)
class Totals:
    sampled: int = 0
    lost: int = 0
    last_seq: int | None = None
    last_sampled: int | None = None


class Gaps:
    """Per app instance: the last seq and sampled count seen, and the totals of both kinds of gap."""

    def __init__(self) -> None:
        self.apps: dict[str, Totals] = {}

    def note(self, instance: str, seq: int | None, sampled: int | None, new_run: bool = False) -> Gap | None:
        """Account for one received event (in the app's order); the gap before it, if any.

        `new_run`: the event starts a new run of the instance (system/register), which restarts seq."""
        if seq is None or seq <= 0:
            return None
        t = self.apps.get(instance)
        if t is None:
            t = self.apps[instance] = Totals()
        if new_run or (t.last_seq is not None and seq <= t.last_seq):
            # a register, or seq went back: another process with the same host:pid; nothing to compare
            t.last_seq = t.last_sampled = None
        gap = None
        if t.last_seq is not None and seq > t.last_seq + 1:
            missing = seq - t.last_seq - 1
            by_sampling = 0
            if sampled is not None and t.last_sampled is not None:
                by_sampling = min(missing, max(0, sampled - t.last_sampled))
            gap = Gap(by_sampling, missing - by_sampling, t.last_seq + 1, seq - 1)
            t.sampled += gap.sampled
            t.lost += gap.lost
        t.last_seq, t.last_sampled = seq, sampled
        return gap

    def totals(self, instance: str) -> Totals:
        return self.apps.get(instance) or Totals()


def describe(instance: str, gap: Gap) -> str:
    """One line about a loss, in the words the page uses ("+5 lost")."""
    span = f"seq {gap.first}-{gap.last}" if gap.last > gap.first else f"seq {gap.first}"
    sampled = f"; {gap.sampled} more sampled out by the app" if gap.sampled else ""
    return (f"{gap.lost} event{'s' if gap.lost != 1 else ''} from {instance} lost ({span} never arrived: "
            f"dropped in a Redis outage or trimmed from the journal{sampled})")
