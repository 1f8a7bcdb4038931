"""Signed announcements: what a node says about itself carries an HMAC that only key holders can make.

A signed object (a node's event, its registration in synapticllamas:nodes) gets one more field,

    "auth": {"v": 1, "ts": <signing time, Unix seconds>, "mac": "<64 hex>"}

with mac = HMAC-SHA256(announce key, canonical(v, ts, the object without "auth")). Canonical is
JSON with sorted keys, no spaces, ASCII only: a reader re-encodes the object it parsed and gets the
same bytes the signer hashed, whatever order or spacing the JSON travelled in.

Replays. A message is refused when its `ts` is more than WINDOW seconds old (or ahead: the clocks of
the cluster's machines must agree to within that, as NTP keeps them). Within the window, the order
decides: ReplayGuard keeps, per stream (a node's instance for its events, its address for its
registration), the last accepted position (the event's seq, the registration's ts), and a message
that does not move it forward is a replay. A copy of a real node_down sent again 10 s later, which
the window alone would let through, is refused that way. A shell that connects late takes the
position from the node's registration, which carries the seq of the node's last event.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

VERSION = 1
WINDOW = 30.0            # seconds a signed message stays valid (either side of the reader's clock)
FIELD = "auth"
STREAMS_KEPT = 4096      # positions remembered (one per node instance and per address)

# why a message was refused; the shell says which, once per address
UNSIGNED = "unsigned"
BAD_SIGNATURE = "bad_signature"
STALE = "stale"
AHEAD = "ahead"
REPLAYED = "replayed"


def canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str).encode()


def _mac(key: bytes, ts: float, body: dict[str, Any]) -> str:
    return hmac.new(key, canonical([VERSION, ts, body]), hashlib.sha256).hexdigest()


class Signer:
    def __init__(self, key: bytes, clock: Callable[[], float] = time.time) -> None:
        self._key = key
        self._clock = clock

    def sign(self, obj: dict[str, Any]) -> dict[str, Any]:
        """A copy of `obj` as JSON will carry it (a Path as its string, an int key as a string) with
        a fresh `auth` field: the reader re-encodes exactly what was signed."""
        body = json.loads(json.dumps({k: v for k, v in obj.items() if k != FIELD}, default=str))
        ts = round(self._clock(), 6)
        return {**body, FIELD: {"v": VERSION, "ts": ts, "mac": _mac(self._key, ts, body)}}


class Verifier:
    def __init__(self, key: bytes, window: float = WINDOW, clock: Callable[[], float] = time.time) -> None:
        self._key = key
        self.window = window
        self._clock = clock

    def check(self, obj: dict[str, Any], window: float | None = None) -> str | None:
        """None when `obj` is signed with our key within the window; else why not (UNSIGNED...)."""
        auth = obj.get(FIELD)
        if not isinstance(auth, dict) or "mac" not in auth:
            return UNSIGNED
        ts, mac = auth.get("ts"), auth.get("mac")
        if auth.get("v") != VERSION or not isinstance(mac, str) or isinstance(ts, bool) \
                or not isinstance(ts, (int, float)) or not math.isfinite(ts):
            return BAD_SIGNATURE
        body = {k: v for k, v in obj.items() if k != FIELD}
        try:
            expected = _mac(self._key, ts, body)
        except (TypeError, ValueError, RecursionError):
            return BAD_SIGNATURE
        if not hmac.compare_digest(expected, mac):
            return BAD_SIGNATURE
        age = self._clock() - ts
        limit = self.window if window is None else window
        if age > limit:
            return STALE
        if age < -limit:
            return AHEAD
        return None

    def age(self, obj: dict[str, Any]) -> float | None:
        """Seconds since `obj` was signed, by our clock (for the message that refuses it)."""
        auth = obj.get(FIELD)
        ts = auth.get("ts") if isinstance(auth, dict) else None
        if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts):
            return None
        return self._clock() - ts


def vouched(verifier: Verifier, obj: Any) -> str:
    """What a reader that only shows (the dashboard, the viewer) says of a node's message: `signed`
    (with our key), `unsigned` or `other key`. Only the MAC: its verifier has no window (history)."""
    reason = verifier.check(obj) if isinstance(obj, dict) else UNSIGNED
    return "signed" if reason is None else "unsigned" if reason == UNSIGNED else "other key"


def signed_at(obj: dict[str, Any]) -> float | None:
    auth = obj.get(FIELD)
    ts = auth.get("ts") if isinstance(auth, dict) else None
    return float(ts) if isinstance(ts, (int, float)) and not isinstance(ts, bool) and math.isfinite(ts) else None


class ReplayGuard:
    """Per stream, the last accepted position; only a message that moves it forward is new."""

    def __init__(self, kept: int = STREAMS_KEPT) -> None:
        self._last: OrderedDict[str, float] = OrderedDict()
        self._kept = kept

    def accept(self, stream: str, position: float) -> bool:
        last = self._last.get(stream)
        if last is not None and position <= last:
            return False
        self.advance(stream, position)
        return True

    def advance(self, stream: str, position: float) -> None:
        """Move the position forward without a message (a registration says how far the node got)."""
        last = self._last.get(stream)
        if last is None or position > last:
            self._last[stream] = position
        self._last.move_to_end(stream)
        while len(self._last) > self._kept:
            self._last.popitem(last=False)

    def position(self, stream: str) -> float | None:
        return self._last.get(stream)


def describe(reason: str, age: float | None = None, window: float = WINDOW) -> str:
    """The words for a refused announcement: 'an unsigned announcement', ..."""
    if reason == UNSIGNED:
        return "an unsigned announcement"
    if reason == BAD_SIGNATURE:
        return "an announcement signed with another key (wrong cluster key?)"
    if reason == STALE:
        return f"an announcement signed {age:.0f} s ago (a replay? valid for {window:g} s)" if age is not None \
            else "a stale announcement"
    if reason == AHEAD:
        return (f"an announcement signed {-age:.0f} s in the future (is that machine's clock off? valid for "
                f"{window:g} s either way)") if age is not None else "an announcement from the future"
    if reason == REPLAYED:
        return "a replayed announcement"
    return "an announcement it could not check"
