"""One event as one line of text: what `events --follow` and the terminal viewer print.

Messages can hold raw llama.cpp output; control characters are escaped so that a log line can
never move the cursor or recolour the terminal.
"""
from __future__ import annotations

import time
import unicodedata

from .events import Event


def safe(text: str) -> str:
    """Control characters (escape sequences, newlines) shown escaped, everything else as is."""
    if text.isprintable():
        return text
    return "".join(ch if unicodedata.category(ch)[0] != "C" else ch.encode("unicode_escape").decode()
                   for ch in text)


def shown(text: str, limit: int = 60) -> str:
    """User input quoted back in an error message: escaped like safe(), and cut when long."""
    text = safe(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
