"""`events [N] [--component C] [--level L] [--follow]`: the in-memory event buffer, or a live tail."""
from __future__ import annotations

import argparse
import asyncio
from typing import TYPE_CHECKING, Any

from synapticllamas.commands.registry import Result, UsageError, command, parse_args, parser
from synapticllamas.events.contract import COMPONENTS, LEVEL_RANK, LEVELS

if TYPE_CHECKING:
    from synapticllamas.app import App

DEFAULT_COUNT = 20
FOLLOW_QUEUE = 10000   # events waiting to be printed by --follow before the oldest are skipped


def _count(text: str) -> int:
    if not (text.isascii() and text.lstrip("-").isdecimal()):
        raise argparse.ArgumentTypeError(f"N must be a whole number of events, got {text!r}")
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"N must be 1 or more, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = parser("events")
    p.add_argument("count", nargs="?", type=_count, default=DEFAULT_COUNT, metavar="N")
    p.add_argument("--component")
    p.add_argument("--level")
    p.add_argument("--follow", action="store_true")
    return p


@command("events", "Recent events from the in-memory buffer; --follow prints new ones live",
         "events [N] [--component C] [--level L] [--follow]", options=("--component", "--level", "--follow"),
         details=(f"N defaults to {DEFAULT_COUNT}. --level L shows L and more severe. "
                  f"Components: {', '.join(COMPONENTS)}. Levels: {', '.join(LEVELS)}. "
                  "--follow prints the last N, then every new event until Ctrl-C."))
async def events_command(app: App, args: list[str]) -> Result | None:
    ns = parse_args(_parser(), args)
    if ns.component is not None and ns.component not in COMPONENTS:
        raise UsageError(f"unknown component '{ns.component}'; accepted: {', '.join(COMPONENTS)}")
    if ns.level is not None and ns.level not in LEVELS:
        raise UsageError(f"unknown level '{ns.level}'; accepted: {', '.join(LEVELS)}")
    recent = app.observer.recent(ns.count, ns.component, ns.level)
    if ns.follow:
        await _follow(app, recent, ns.component, ns.level)
        return None
    return _table(app, recent, ns)


def _table(app: App, recent: list, ns: argparse.Namespace) -> Result:
    from synapticllamas.events.lines import clock
    from synapticllamas.util.text import safe

    stats = app.observer.stats()
    filters = "".join(f" {name}={value}" for name, value in (("component", ns.component), ("level", ns.level))
                      if value)
    if not recent:
        return Result.text(f"No events{' match' + filters if filters else ' yet'}"
                           f" ({stats['buffered']} in the buffer).")
    rows = [(clock(e.timestamp), e.level, e.component, e.event_type, safe(e.message)) for e in recent]
    # the same words as the terminal viewer and the dashboard: sampled out is on purpose, lost is not
    publisher = app.publisher.status() if app.publisher is not None else None
    lost = f"; {publisher['dropped']} lost (dropped in a Redis outage)" if publisher else ""
    footer = (f"{len(recent)} shown{' (' + filters.strip() + ')' if filters else ''}; "
              f"{stats['buffered']} in the buffer of {app.settings.observer_max_events};"
              f" {stats['sampled_out']} sampled out (not lost{sampling_note(app.settings)})"
              f" of {stats['emitted']} emitted{lost}")
    return Result.table("Events", ("time", "level", "component", "event", "message"), rows, footer=footer)


def sampling_note(settings: Any) -> str:
    """", 1 in 10 kept": how sampling reads on the dashboard too."""
    rate = settings.observer_sample_rate
    if not settings.observer_sampling or rate >= 1:
        return ""
    return f"; 1 in {round(1 / rate):g} kept" if rate > 0 and abs(1 / rate - round(1 / rate)) < 1e-6 \
        else f"; {rate:g} kept"


async def _follow(app: App, recent: list, component: str | None, level: str | None) -> None:
    from synapticllamas.events.lines import format_line

    floor = LEVEL_RANK[level] if level else 0
    queue: asyncio.Queue = asyncio.Queue(FOLLOW_QUEUE)
    skipped = 0

    def sink(event: Any) -> None:  # observer sink: on the loop, O(1)
        nonlocal skipped
        if (component and event.component != component) or LEVEL_RANK.get(event.level, 1) < floor:
            return
        try:
            queue.put_nowait(event)
        except asyncio.QueueFull:
            skipped += 1

    remove = app.observer.add_sink(sink)
    try:
        for event in recent:
            app.ui.write(format_line(event))
        app.ui.write("-- following new events (Ctrl-C to stop) --")
        while True:
            event = await queue.get()
            if skipped:
                app.ui.write(f"-- {skipped} events not shown: they came faster than the terminal took them --")
                skipped = 0
            app.ui.write(format_line(event))
    finally:
        remove()
