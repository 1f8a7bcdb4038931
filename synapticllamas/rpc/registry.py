"""RpcRegistry: the RPC backends this shell knows, their health, and the events about them.

Backends come from --rpc-backend / SYNAPTICLLAMAS_RPC_BACKENDS, the backends file, `backends add`
and local backends (local_backends.py). Each has a state: unknown (never probed), up or down.

Health is a TCP connect (rpc_probe.py), all backends at once, so a round with dead or black-holed
backends takes about one probe timeout. Hysteresis, so that one slow probe does not flap a backend:
- a success makes it up at once;
- an up backend goes down after `probe_failures` failures in a row, or at once when the failure is
  certain (connection refused, name does not exist, the local process exited);
- a backend never seen up (unknown) goes down at its first failure: there is no good state to keep.
Every change of state emits rpc_backend/connect or rpc_backend/disconnect. With the heartbeat on,
one round of probes and one aggregated rpc_registry/heartbeat every interval; with it off, no
probe at all until check() is called (`backends check`).

Backends the coordinator is connected to are not probed: rpc-server serves one client at a time
with a listen backlog of 1, so while llama-server holds it a probe's connection waits in the
backlog and the next probes time out; probing would mark a busy backend down. The coordinator
tells the registry which backends it holds (hold() when it launches llama-server, hold(()) the
moment llama-server has exited). A held backend that dies is still reported: a local one by its
exit, a remote one by the coordinator, which fails on it and probes it once it has let go
(check(addresses)).
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from synapticllamas.rpc import backends_file
from synapticllamas.rpc.addresses import BackendId, backend_id, backend_id_or_none, parse_address
from synapticllamas.rpc.probe import ProbeFailure, ProbeResult, is_ip, probe, resolve
from synapticllamas.util.tasks import cancel
from synapticllamas.util.text import shown
from synapticllamas.util.ticker import Ticker

RESOLVE_TIMEOUT = 5.0      # seconds `backends add` waits for a name to resolve
MAX_FILE_ERROR_EVENTS = 10
HEARTBEAT_MESSAGE = "rpc_backend_connect on rpc_registry"   # the reference document's string

Probe = Callable[[str, int, float], Awaitable[ProbeResult]]


@dataclass(eq=False)
class Backend:
    key: BackendId            # normalised HOST:PORT, as configured (names stay names)
    host: str
    port: int
    source: str               # flag, env, config, file, added, runtime, local
    persisted: bool           # has a line in the backends file
    state: str = "unknown"    # unknown | up | down
    failures: int = 0         # consecutive failed probes
    latency_ms: float | None = None
    last_check: float | None = None   # time.monotonic() of the last probe
    reason: str | None = None         # why the last probe failed
    resolved: str | None = None       # IP:PORT it resolved to (duplicates are found on this)
    duplicate_of: str | None = None

    @property
    def local(self) -> bool:
        return self.source == "local"


def _source_label(origin: str) -> str:
    # Settings.source() says "flag --rpc-backend", "env SYNAPTICLLAMAS_RPC_BACKENDS", "config PATH"
    return origin.split(" ", 1)[0] if origin != "default" else "flag"


class RpcRegistry:
    def __init__(self, settings: Any, observer: Any, probe_fn: Probe = probe) -> None:
        self.settings = settings
        self.observer = observer
        self._probe = probe_fn
        # keyed by BackendId only (rpc/addresses.py): every public method normalises what it is given
        self._backends: dict[BackendId, Backend] = {}     # insertion order = configured order
        self._round_lock = asyncio.Lock()
        self._task: asyncio.Task | None = None
        self._held: frozenset[BackendId] = frozenset()     # in use by the coordinator: not probed
        self.file_errors: list[str] = []
        # called with (address, old state, new state, reason) after each change: the coordinator
        # follows the backends it holds this way (a failover), not through event strings
        self.on_change: list[Callable[[str, str, str, str], object]] = []

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Load the flag/env backends and the backends file; start the heartbeat if it is on.

        Nothing here touches the network: names are resolved by the first probe round."""
        source = _source_label(self.settings.source("rpc_backends"))
        for key in self.settings.rpc_backends:
            if key not in self._backends:
                self._insert(key, source, persisted=False)
        self._load_file()
        if self.settings.rpc_backend_heartbeat and self._task is None:
            self._task = asyncio.create_task(self._heartbeat_loop(), name="rpc-registry-heartbeat")

    async def close(self) -> None:
        task, self._task = self._task, None
        await cancel(task)

    def _insert(self, key: str, source: str, persisted: bool) -> Backend:
        address = parse_address(key)
        ident = address.key
        backend = Backend(ident, address.host, address.port, source, persisted,
                          resolved=ident if is_ip(address.host) else None)
        self._backends[ident] = backend
        return backend

    def _load_file(self) -> None:
        path = self.settings.backends_file
        entries, errors = backends_file.read(path)
        first_line: dict[str, int] = {}
        for entry in entries:
            existing = self._backends.get(entry.key)
            if existing is None:
                self._insert(entry.key, "file", persisted=True)
            elif entry.key in first_line:
                errors.append(f"backends file {path} line {entry.line}: {entry.key} repeats line "
                              f"{first_line[entry.key]}; counted once")
            else:
                existing.persisted = True          # given as a flag and in the file
            first_line.setdefault(entry.key, entry.line)
        self.file_errors = errors
        for error in errors[:MAX_FILE_ERROR_EVENTS]:
            self.observer.emit("rpc_registry", "file_error", error, {"path": path}, level="error")
        if len(errors) > MAX_FILE_ERROR_EVENTS:
            self.observer.emit("rpc_registry", "file_error",
                               f"backends file {path}: {len(errors) - MAX_FILE_ERROR_EVENTS} more bad lines",
                               {"path": path}, level="error")

    # ------------------------------------------------------------ queries

    def addresses(self) -> list[BackendId]:
        return list(self._backends)

    def backends(self) -> list[Backend]:
        return list(self._backends.values())

    def get(self, address: str) -> Backend | None:
        ident = backend_id_or_none(address)
        return self._backends.get(ident) if ident is not None else None

    def healthy(self) -> list[BackendId]:
        """Up backends in configured order, each real backend once (two names for one IP:PORT
        would make the coordinator use it twice)."""
        seen: set[str] = set()
        out = []
        for backend in self._backends.values():
            ident = backend.resolved or backend.key
            if backend.state == "up" and ident not in seen:
                seen.add(ident)
                out.append(backend.key)
        return out

    def held(self, address: str) -> bool:
        """True while the coordinator is connected to this backend (it is not probed then)."""
        return backend_id_or_none(address) in self._held

    def hold(self, addresses: Iterable[str]) -> None:
        """Called by the coordinator: the backends llama-server is connected to (empty: none).
        Round-wide checks skip them."""
        self._held = frozenset(ident for a in addresses if (ident := backend_id_or_none(a)) is not None)

    def summary(self, backend: Backend) -> dict[str, Any]:
        return {"address": backend.key, "state": backend.state, "latency_ms": backend.latency_ms,
                "failures": backend.failures, "local": backend.local, "in_use": backend.key in self._held}

    def status(self) -> dict[str, Any]:
        counts = {"up": 0, "down": 0, "unknown": 0}
        for backend in self._backends.values():
            counts[backend.state] += 1
        return {"configured": len(self._backends), **counts}

    # ------------------------------------------------------------ editing

    async def add(self, address: str, persist: bool = True, source: str | None = None) -> BackendId:
        """Add a backend; returns its key. Raises ValueError (one line) for a bad, unresolvable or
        duplicate address, or a backends file that cannot be written."""
        parsed = parse_address(address)
        key = parsed.key
        quoted = f"'{shown(address.strip())}'"     # it parsed, but may be long
        known = self._backends.get(key)
        if known is not None and persist and known.source == "node" and not known.persisted:
            # a discovered node the user now wants to keep: it gets its line in the file
            backends_file.append(self.settings.backends_file, key)
            known.persisted = True
            return key
        if key in self._backends:
            spelled = "" if address.strip() == key else f" as {key}"
            raise ValueError(f"backend {quoted} is already configured{spelled}")
        resolved: str = key
        if not is_ip(parsed.host):
            try:
                _, ip = await asyncio.wait_for(resolve(parsed.host, parsed.port), RESOLVE_TIMEOUT)
            except ProbeFailure as exc:
                raise ValueError(f"backend address {quoted}: {exc.reason}; "
                                 "use a name this machine resolves, or an IP address") from None
            except TimeoutError:
                raise ValueError(f"backend address {quoted}: name '{shown(parsed.host)}' did not resolve "
                                 f"within {RESOLVE_TIMEOUT:g}s") from None
            resolved = f"[{ip}]:{parsed.port}" if ":" in ip else f"{ip}:{parsed.port}"
            if key in self._backends:      # added by someone else while we were resolving
                raise ValueError(f"backend {key} is already configured")
        for other in self._backends.values():
            if (other.resolved or other.key) == resolved:
                raise ValueError(f"backend {quoted} is {resolved}, already configured as {other.key}")
        if persist:
            backends_file.append(self.settings.backends_file, key)
        backend = self._insert(key, source or ("added" if persist else "runtime"), persisted=persist)
        backend.resolved = resolved
        self.observer.emit("rpc_backend", "added", f"RPC backend {key} added",
                           {"address": key, "source": backend.source, "persisted": persist,
                            "local": backend.local, "resolved": resolved})
        return key

    async def remove(self, address: str) -> BackendId:
        """Remove a backend (and its line in the backends file); returns its key."""
        key = backend_id(address)
        backend = self._backends.get(key)
        if backend is None:
            known = ", ".join(list(self._backends)[:5]) + (", ..." if len(self._backends) > 5 else "")
            raise ValueError(f"backend {key} is not configured; "
                             + (f"configured: {known}" if known else "no backends are configured"))
        if backend.persisted:
            backends_file.remove(self.settings.backends_file, key)
        del self._backends[key]
        self.observer.emit("rpc_backend", "removed", f"RPC backend {key} removed",
                           {"address": key, "source": backend.source, "state": backend.state,
                            "local": backend.local})
        return key

    # ------------------------------------------------------------ health

    async def check(self, addresses: list[str] | None = None) -> None:
        """One probe round now, all at once; emits the transitions. Without `addresses`: every
        backend the coordinator does not hold; with them: exactly those (held or not)."""
        async with self._round_lock:
            if addresses is None:
                targets = [b for b in self._backends.values() if b.key not in self._held]
            else:
                wanted = {ident for a in addresses if (ident := backend_id_or_none(a)) is not None}
                targets = [b for b in self._backends.values() if b.key in wanted]
            await asyncio.gather(*(self._probe_one(b) for b in targets))

    async def _probe_one(self, backend: Backend) -> None:
        try:
            result = await self._probe(backend.host, backend.port, self.settings.probe_timeout)
        except ProbeFailure as exc:
            if self._backends.get(backend.key) is backend:     # not removed meanwhile
                self._failed(backend, exc.reason, exc.definitive)
            return
        if self._backends.get(backend.key) is backend:
            self._succeeded(backend, result.latency_ms, result.resolved, "probe connected")

    def report(self, address: str, up: bool, reason: str, latency_ms: float | None = None) -> None:
        """Something other than a probe knows a backend's state for certain (a local backend's
        process accepted a connection, or exited, or a node announced it). Any spelling of the
        address does: `localhost:50052` reports 127.0.0.1:50052."""
        backend = self.get(address)
        if backend is None:
            return
        if up:
            self._succeeded(backend, latency_ms, backend.resolved or backend.key, reason)
        else:
            self._failed(backend, reason, definitive=True)

    def _succeeded(self, backend: Backend, latency_ms: float | None, resolved: str, reason: str) -> None:
        backend.last_check = time.monotonic()
        backend.latency_ms = latency_ms
        backend.failures = 0
        backend.reason = None
        if backend.resolved != resolved:
            backend.resolved = resolved
            self._note_duplicate(backend)
        if backend.state != "up":
            self._transition(backend, "up", reason)

    def _failed(self, backend: Backend, reason: str, definitive: bool) -> None:
        backend.last_check = time.monotonic()
        backend.latency_ms = None
        backend.failures += 1
        backend.reason = reason
        if backend.state == "unknown" or (backend.state == "up" and (
                definitive or backend.failures >= self.settings.probe_failures)):
            self._transition(backend, "down", reason)

    def _transition(self, backend: Backend, state: str, reason: str) -> None:
        old, backend.state = backend.state, state
        details = {"address": backend.key, "state": state, "from_state": old,
                   "latency_ms": backend.latency_ms, "failures": backend.failures, "reason": reason,
                   "local": backend.local, "resolved": backend.resolved}
        if state == "up":
            latency = f" ({backend.latency_ms:.1f} ms)" if backend.latency_ms is not None else ""
            self.observer.emit("rpc_backend", "connect", f"RPC backend {backend.key} connected{latency}",
                               details)
        else:
            verb = "disconnected" if old == "up" else "unreachable"
            self.observer.emit("rpc_backend", "disconnect", f"RPC backend {backend.key} {verb}: {reason}",
                               details, level="warning")
        for fn in list(self.on_change):
            try:
                fn(backend.key, old, state, reason)
            except Exception as exc:   # a watcher's bug must not stop the registry; it is reported
                self.observer.emit("system", "error", f"a backend watcher failed: {exc!r}", {"error": repr(exc)},
                                   level="error")

    def _note_duplicate(self, backend: Backend) -> None:
        for other in self._backends.values():
            if other is not backend and (other.resolved or other.key) == backend.resolved:
                if backend.duplicate_of != other.key:
                    backend.duplicate_of = other.key
                    self.observer.emit(
                        "rpc_registry", "duplicate",
                        f"{backend.key} and {other.key} are the same backend ({backend.resolved}); "
                        f"the coordinator uses it once", {"address": backend.key, "same_as": other.key,
                                                           "resolved": backend.resolved}, level="warning")
                return
        backend.duplicate_of = None

    # ------------------------------------------------------------ heartbeat

    def heartbeat_details(self) -> dict[str, Any]:
        return {"backends": [self.summary(b) for b in self._backends.values()],
                "total_configured": len(self._backends),
                "total_active": len(self.healthy()),
                "interval_s": self.settings.rpc_backend_heartbeat_interval}

    async def _heartbeat_loop(self) -> None:
        """Every interval: one probe round, then one aggregated heartbeat. Fixed rate: a slow round
        does not push the next ones later, and the ticks it overran are skipped."""
        ticker = Ticker(self.settings.rpc_backend_heartbeat_interval)
        while True:
            try:
                await self.check()
            except Exception as exc:  # a bug must not end the heartbeat; the event says what broke
                self.observer.emit("system", "error", f"backend health round failed: {exc!r}",
                                   {"error": repr(exc)}, level="error")
            self.observer.emit("rpc_registry", "heartbeat", HEARTBEAT_MESSAGE, self.heartbeat_details())
            await ticker.next()
