"""One viewer's live feed: an ASGI response that streams the hub's frames as server-sent events.

The viewer holds its place in the hub while the HTTP response is open; it leaves when the client
disconnects (watched on `receive`, so a quiet feed notices too) or the server shuts down.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

from synapticllamas.dashboard.hub import Hub

# At most one write per viewer per 20 ms (about one browser frame). Writes, not events, are what a
# feed costs: at 50 viewers and 1,000 events/s, ~35 % of a core at 20 ms, ~55 % at 5 ms, for ~10 ms
# more median latency (bench/dashboard.py).
MIN_GAP = 0.02
RETRY_MS = 1000      # how soon a browser reconnects after the feed broke

HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"x-accel-buffering", b"no"),
]


async def _until_disconnect(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class EventStream:
    """ASGI app for GET /events, made per request once the request has been validated."""

    def __init__(self, hub: Hub, last_event_id: str | None, replay: int | None) -> None:
        self.hub = hub
        self.last_event_id = last_event_id
        self.replay = replay

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        gone = asyncio.ensure_future(_until_disconnect(receive))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
            await send({"type": "http.response.body", "body": f"retry: {RETRY_MS}\n\n".encode(),
                        "more_body": True})
            async with self.hub.viewer(self.last_event_id, self.replay) as view:
                gone.add_done_callback(lambda _: view.wake.set())
                last_write = 0.0
                while not gone.done():
                    chunk = view.take()
                    if chunk:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                        last_write = time.monotonic()
                    await view.wake.wait()
                    view.wake.clear()
                    pause = MIN_GAP - (time.monotonic() - last_write)
                    if pause > 0 and not gone.done():
                        await asyncio.sleep(pause)
        except OSError:   # the client went away mid-write
            pass
        finally:
            gone.cancel()
