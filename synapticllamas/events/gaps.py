"""Sampled or lost: what a jump in an app's seq means, for every reader (terminal viewer, dashboard).

Each event carries `seq` (+1 for every event the app created) and `sampled` (how many it sampled out
before this one, a running total). Between two events of one app that a reader received,
`seq` moved by the events created in between, `sampled` by the ones sampling left out on purpose;
the rest never arrived: dropped in a Redis outage (system/events_dropped says so too) or trimmed
from the journal before this reader got there. The page's script (static/app.js, `noteSeq`) does
the same sum.

An event without `sampled` (a publisher that predates it) cannot tell the two apart: its whole
gap counts as lost, the loud side, as a monitor should err.

Anyone on the Redis can publish an event with a real app's instance and any seq, so one event must
not be able to freeze or poison that app's accounting:
- An instance may have a few *runs* (sequences): an event continues the run whose last seq is the
  closest below its own. A seq that goes back (a restart, a repeat, a forged low seq) starts a run
  of its own instead of resetting the real one, and the real events carry on in theirs.
- A jump of more than JUMP_LIMIT is no loss (no app loses a million events between two that a
  reader sees: its outage buffer holds SOLLOL_OBSERVER_MAX_EVENTS); that event starts a run.
- A gap is *pending* until the next event of its run continues from it; only then is it part of the
  confirmed totals (what /metrics exports: a counter must never go back). An event that lands
  between the run's last two (the last one was out of sequence: forged, or delivered out of order)
  replaces it, and that last gap is dropped. So one forged event costs nothing; a forger who sends
  a plausible sequence of its own is for authentication to stop, not for this sum.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

JUMP_LIMIT = 1_000_000      # a larger seq jump is another sequence, never a loss
MAX_RUNS = 4                # sequences kept per instance (the real one, restarts, strays)
MAX_INSTANCES = 10000       # instances remembered by one reader; the least recently heard go first


@dataclass(frozen=True, slots=True)
class Gap:
    sampled: int      # left out by the app's sampling: expected, not an error
    lost: int         # created, kept by the app, never arrived here
    first: int        # seqs first..last never arrived (both kinds together)
    last: int


@dataclass(slots=True)
class Totals:
    """One instance's sums. `sampled` and `lost` include the newest gaps not confirmed yet (what a
    reader shows); `confirmed_*` only those the next event confirmed (what a counter exports)."""
    sampled: int = 0
    lost: int = 0
    confirmed_sampled: int = 0
    confirmed_lost: int = 0
    out_of_sequence: int = 0      # events dropped from the sum: a later event landed before them


@dataclass(slots=True)
class _Run:
    seq: int
    sampled: int | None
    prev_seq: int | None = None
    prev_sampled: int | None = None
    pending: Gap | None = None


@dataclass(slots=True)
class _Instance:
    runs: list[_Run] = field(default_factory=list)    # least recently continued first
    sampled: int = 0                                  # confirmed
    lost: int = 0
    out_of_sequence: int = 0

    def confirm(self, gap: Gap | None) -> None:
        if gap is not None:
            self.sampled += gap.sampled
            self.lost += gap.lost


def _gap(last_seq: int, last_sampled: int | None, seq: int, sampled: int | None) -> Gap | None:
    if seq <= last_seq + 1:
        return None
    missing = seq - last_seq - 1
    by_sampling = 0
    if sampled is not None and last_sampled is not None:
        by_sampling = min(missing, max(0, sampled - last_sampled))
    return Gap(by_sampling, missing - by_sampling, last_seq + 1, seq - 1)


class Gaps:
    """Per app instance: its runs of seq, and the totals of both kinds of gap."""

    def __init__(self, max_instances: int = MAX_INSTANCES) -> None:
        self._apps: OrderedDict[str, _Instance] = OrderedDict()
        self.max_instances = max_instances
        self.forgotten = 0          # instances dropped to stay within max_instances

    def note(self, instance: str, seq: int | None, sampled: int | None, new_run: bool = False) -> Gap | None:
        """Account for one received event (in the app's order); the gap before it, if any (shown at
        once; counted in the confirmed totals when the next event of the run continues from it).

        `new_run`: the event starts a new run of the instance (system/register), which restarts seq."""
        if seq is None or seq <= 0:
            return None
        app = self._apps.get(instance)
        if app is None:
            app = self._apps[instance] = _Instance()
            while len(self._apps) > self.max_instances:
                self._apps.popitem(last=False)
                self.forgotten += 1
        else:
            self._apps.move_to_end(instance)
        runs = app.runs
        if new_run:                       # the old process is over: its last gaps were real
            for run in runs:
                app.confirm(run.pending)
            runs.clear()
        below = [r for r in runs if r.seq < seq]
        best = max(below, key=lambda r: r.seq) if below else None
        if best is not None and seq - best.seq - 1 <= JUMP_LIMIT:
            app.confirm(best.pending)
            gap = _gap(best.seq, best.sampled, seq, sampled)
            best.prev_seq, best.prev_sampled = best.seq, best.sampled
            best.seq, best.sampled, best.pending = seq, sampled, gap
            runs.remove(best)
            runs.append(best)
            return gap
        for run in runs:
            if run.prev_seq is not None and run.prev_seq < seq < run.seq:
                # the run's last event came out of sequence (forged, or out of order): this one replaces it
                app.out_of_sequence += 1
                gap = _gap(run.prev_seq, run.prev_sampled, seq, sampled)
                run.seq, run.sampled, run.pending = seq, sampled, gap
                return gap
        if any(seq in (r.seq, r.prev_seq) for r in runs):
            return None                   # a repeat
        runs.append(_Run(seq, sampled))   # a restart, a stray, or a jump too large to be a loss
        if len(runs) > MAX_RUNS:
            runs.pop(0)
        return None

    def totals(self, instance: str) -> Totals:
        app = self._apps.get(instance)
        if app is None:
            return Totals()
        pending = [r.pending for r in app.runs if r.pending is not None]
        return Totals(app.sampled + sum(g.sampled for g in pending), app.lost + sum(g.lost for g in pending),
                      app.sampled, app.lost, app.out_of_sequence)

    def items(self) -> Iterator[tuple[str, Totals]]:
        for instance in list(self._apps):
            yield instance, self.totals(instance)

    def __contains__(self, instance: str) -> bool:
        return instance in self._apps

    def __len__(self) -> int:
        return len(self._apps)

    def forget(self, instance: str) -> None:
        self._apps.pop(instance, None)


def describe(instance: str, gap: Gap) -> str:
    """One line about a loss, in the words the page uses ("+5 lost")."""
    span = f"seq {gap.first}-{gap.last}" if gap.last > gap.first else f"seq {gap.first}"
    sampled = f"; {gap.sampled} more sampled out by the app" if gap.sampled else ""
    return (f"{gap.lost} event{'s' if gap.lost != 1 else ''} from {instance} lost ({span} never arrived: "
            f"dropped in a Redis outage or trimmed from the journal{sampled})")
