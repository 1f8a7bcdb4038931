"""One event as one line of text: what `events --follow` and the terminal viewer print.

Messages can hold raw llama.cpp output: every field goes through util.text.safe().
"""
from __future__ import annotations

import time

from synapticllamas.events.contract import Event
from synapticllamas.util.text import safe


def clock(timestamp: float, with_date: bool = False) -> str:
    local = time.localtime(timestamp)
    millis = int((timestamp % 1) * 1000)
    return time.strftime("%Y-%m-%d %H:%M:%S" if with_date else "%H:%M:%S", local) + f".{millis:03d}"


def format_line(event: Event, with_source: bool = False) -> str:
    """`12:00:01.250 WARNING  rpc_backend/disconnect  127.0.0.1:50052 is down` (+ the app instance)."""
    parts = [clock(event.timestamp, with_date=with_source)]
    if with_source:
        parts.append(safe(str(event.source.get("instance", "?"))))
    parts.append(f"{event.level.upper():<8}")
    parts.append(safe(f"{event.component}/{event.event_type}"))
    parts.append(safe(event.message))
    return " ".join(parts)
