"""ExternalWatcher: `coordinator attach URL` watches a llama-server this shell did not start.

The reference document's one remaining poll: one /health now and one every
`attach_check_interval` (60 s). A change between up and down is a coordinator `start` (reason
attached) or `stop` (reason health) event; `detach` ends with `stop` (reason detached). No
heartbeat, no restarts: it is not ours.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from synapticllamas.llama import http as llama_http
from synapticllamas.llama.lifecycle import ATTACHED, EVENT_TYPE, Lifecycle, State, StateChange, default_level
from synapticllamas.llama.preflight import CoordinatorError
from synapticllamas.util.ticker import Ticker

HEALTH_TIMEOUT = 5.0


class ExternalWatcher:
    def __init__(self, endpoint: llama_http.Endpoint, interval: float,
                 announce: Callable[[StateChange], None], on_refused: Callable[[str], None] | None = None) -> None:
        self.endpoint = endpoint
        self.interval = interval
        self._announce = announce
        self.lifecycle = Lifecycle(ATTACHED, "attached coordinator", on_refused)
        self.up_since: float | None = None
        self.last_check: tuple[bool, str] | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def state(self) -> State:
        return self.lifecycle.state

    @property
    def url(self) -> str:
        return self.endpoint.url

    async def start(self) -> tuple[bool, str]:
        """The first check now, then one every interval; returns the first check's (ok, detail)."""
        outcome = await self.check()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="attach-check")
        return outcome

    async def _loop(self) -> None:
        ticker = Ticker(self.interval)
        while True:
            await ticker.next()
            await self.check()

    async def check(self) -> tuple[bool, str]:
        """One /health request; an up/down change is a start/stop event."""
        ok, detail = await llama_http.health(self.endpoint, timeout=HEALTH_TIMEOUT)
        self.last_check = (ok, detail)
        if ok and self.state != State.RUNNING:
            self._change(State.RUNNING, "llama.cpp coordinator started", "attached")
        elif not ok and self.state == State.RUNNING:
            self._change(State.EXITED, f"llama.cpp coordinator at {self.url} stopped answering: {detail}",
                         "health", error=detail)
        return ok, detail

    def close(self) -> None:
        """Stop watching (detach, or the shell leaving)."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self.state != State.STOPPED:
            self._change(State.STOPPED, f"stopped watching llama.cpp coordinator {self.url}", "detached")

    def _change(self, to: State, message: str, reason: str, **details: Any) -> None:
        from_state = self.lifecycle.enter(to)
        self.up_since = time.monotonic() if to == State.RUNNING else None
        base = {"state": str(to), "from_state": str(from_state), "pid": None, "tries": 0, "reason": reason,
                "url": self.url, "host": self.endpoint.host, "port": self.endpoint.port, "attached": True}
        self._announce(StateChange(to, from_state, EVENT_TYPE[to], message, default_level(to, reason),
                                   {**base, **details}))

    def status(self) -> dict[str, Any]:
        return {"state": str(self.state), "pid": None, "url": self.url, "model": None, "backends": [],
                "uptime_s": round(time.monotonic() - self.up_since, 1) if self.up_since else None,
                "restarts": 0, "tries": 0, "attached": True, "last_exit": None}

    # ------------------------------------------------------------ what requests need (coordinator.Coordinator)

    @property
    def recovering(self) -> bool:
        return False               # not ours: nothing of ours restarts it

    def recovery_reason(self) -> str:
        return f"watching the external coordinator {self.url}"

    async def wait_running(self, timeout: float) -> None:
        if self.state != State.RUNNING:
            raise CoordinatorError(f"the external coordinator {self.url} is not up (state: {self.state})")

    def serving_endpoint(self) -> tuple[llama_http.Endpoint, None]:
        # between two checks it may be up again: requests are sent and answer for themselves
        return self.endpoint, None
