"""App: owns the observer, the Redis publisher, the backend registry and the coordinator.

Everything runs on one asyncio loop (see docs/ARCHITECTURE.md); state is touched only from it.
`start()` registers the app and starts the periodic work the settings ask for; `close()` stops
every child process this app started and flushes queued events, within bounded time.
"""
from __future__ import annotations

import time
from typing import Any

from . import __version__
from .config import Settings, redact_url
from .coordinator import CoordinatorManager
from .local_backends import LocalBackends
from .observer import Observer
from .rpc_registry import RpcRegistry
from .ui import PlainUI


class App:
    def __init__(self, settings: Settings, ui: Any | None = None) -> None:
        self.settings = settings
        self.ui = ui or PlainUI()
        self.observer = Observer.from_settings(settings)
        self.started_at = time.time()
        self.closed = False
        # Components. Each is created here or on first use, and each offers
        # start()/close() and status() -> dict for `status` and the toolbar.
        self.publisher: Any = None       # publisher.RedisPublisher, created by `redis on`
        self.registry = RpcRegistry(settings, self.observer)
        self.local_backends = LocalBackends(settings, self.observer, self.registry)
        self.coordinator = CoordinatorManager(settings, self.observer, self.registry)

    @property
    def mode(self) -> str:
        return "distributed" if self.settings.distributed else "standard"

    @property
    def instance(self) -> str:
        return self.observer.source["instance"]

    def registration(self) -> dict[str, Any]:
        """What the app says about itself on register (and in the apps hash)."""
        s = self.settings
        return {
            "app": self.observer.source["app"],
            "instance": self.instance,
            "host": self.observer.source["host"],
            "pid": __import__("os").getpid(),
            "version": __version__,
            "mode": self.mode,
            "started_at": self.started_at,
            "heartbeat_interval": s.rpc_heartbeat_interval,
            "backend_heartbeat": s.rpc_backend_heartbeat,
            "backend_heartbeat_interval": s.rpc_backend_heartbeat_interval,
            "redis_url": redact_url(s.redis_url),
        }

    async def start(self) -> None:
        # (issue 3) with --redis the publisher starts here, before `register`, so Redis sees it
        self.observer.emit("system", "register", f"SynapticLlamas {__version__} started ({self.mode} mode)",
                           self.registration())
        if self.registry is not None:
            await self.registry.start()

    async def close(self, reason: str = "exit") -> None:
        """Stop what we started (coordinator first: it uses the backends), say goodbye, flush.

        Safe to call twice. A component that fails to close does not stop the others."""
        if self.closed:
            return
        self.closed = True
        for component in (self.coordinator, self.local_backends, self.registry):
            if component is not None:
                try:
                    await component.close()
                except Exception as exc:  # keep closing the rest; the event says what failed
                    self.observer.emit("system", "error", f"closing {type(component).__name__} failed: {exc}",
                                       {"error": repr(exc)}, level="error")
        self.observer.emit("system", "unregister", f"SynapticLlamas stopped ({reason})",
                           {"instance": self.instance, "reason": reason,
                            "uptime_s": round(time.time() - self.started_at, 3)})
        if self.publisher is not None:
            await self.publisher.close(timeout=2.0)   # flush what is queued, bounded

    def status(self) -> dict[str, Any]:
        """One summary for the `status` command and the toolbar."""
        return {
            "mode": self.mode,
            "redis": self.publisher.status() if self.publisher else {"enabled": False},
            "coordinator": self.coordinator.status() if self.coordinator else {"state": "stopped"},
            "backends": self.registry.status() if self.registry else {"configured": 0, "up": 0},
            "events": self.observer.stats(),
        }
