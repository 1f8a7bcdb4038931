"""Journal entries and pub/sub messages -> SSE frames, and the ordering of SSE event ids.

An SSE id is the journal's stream id (`1704067200123-0`), so a browser that reconnects with
Last-Event-ID can be resumed from the journal even after the dashboard closed its subscription.
An event seen only on pub/sub (a publisher that does not journal) gets `<stream id before it>~k`,
which sorts after that stream id and before the next one.
"""
from __future__ import annotations

import json
import re
from collections.abc import Hashable
from typing import Any

from synapticllamas.events.contract import JOURNAL_FIELD as _FIELD
from synapticllamas.events.contract import Event
from synapticllamas.events.dedup import identity
from synapticllamas.events.schema import Invalid, Tally, decode_event

JOURNAL_FIELD = _FIELD.encode()   # the journal entry's field holding the event JSON, as Redis returns it

ID_PATTERN = re.compile(r"^(\d{1,20})(?:-(\d{1,20}))?(?:~(\d{1,20}))?$", re.ASCII)   # \d: not '٣'
ID_ACCEPTED = "a journal id such as 1704067200123-0 (as sent in the SSE id: field)"
ID_MAX = 2**64 - 1   # each part of a Redis stream id is an unsigned 64-bit number

Key = tuple[int, int, int]


def parse_id(text: str) -> Key:
    """'ms-seq' or 'ms-seq~k' -> a sortable tuple. Raises ValueError naming what is accepted."""
    match = ID_PATTERN.match(text.strip())
    if not match:
        raise ValueError(f"expected {ID_ACCEPTED}")
    ms, seq, k = (int(part or 0) for part in match.groups())
    if ms > ID_MAX or seq > ID_MAX:
        raise ValueError(f"expected {ID_ACCEPTED}, each number at most {ID_MAX}")
    return ms, seq, k


def stream_part(text: str) -> str:
    """The journal id inside an SSE id ('5-1~2' -> '5-1'), for XRANGE."""
    ms, seq, _ = parse_id(text)
    return f"{ms}-{seq}"


def decode(payload: bytes, tally: Tally | None = None) -> Event | None:
    """The event, checked by the schema (events/schema.py), or None: it is then not shown, and
    counted in `tally`."""
    try:
        return decode_event(payload)
    except Invalid as exc:
        if tally is not None:
            tally.count(exc)
        return None


def event_key(event: Event, payload: bytes) -> Hashable:
    """What makes an event unique: its app instance and seq (per the contract), else its text."""
    return identity(event.source, event.seq) or payload


def frame(sse_id: str, event: Event, payload: bytes) -> bytes:
    """One SSE message. The payload is sent as published unless it spans lines (SSE data is one line)."""
    if b"\n" in payload or b"\r" in payload:
        payload = event.to_json().encode()
    return b"id: " + sse_id.encode() + b"\ndata: " + payload + b"\n\n"


def control(name: str, data: dict[str, Any]) -> bytes:
    """A named SSE event without an id (status, live, lagged): it does not move Last-Event-ID."""
    return b"event: " + name.encode() + b"\ndata: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def entry_payload(fields: dict[bytes, bytes]) -> bytes | None:
    """The event JSON of one journal entry."""
    if JOURNAL_FIELD in fields:
        return fields[JOURNAL_FIELD]
    return next(iter(fields.values()), None)
