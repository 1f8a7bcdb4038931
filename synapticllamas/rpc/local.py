"""LocalBackends: start and stop ggml-rpc-server processes on 127.0.0.1 (the single-machine default).

Each server is an RpcServerProcess (its own process group, output read line by line into `raw/log`
events, exit awaited): an unexpected death reaches the registry at once as a disconnect, without
waiting for the next probe round. Servers run with the cache on (a restarted coordinator reloads
from it) and each with the host's CPU share (rpc/launch.py says why). Local backends join the
registry but never the backends file: they live as long as this shell.
"""
from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from synapticllamas.rpc import launch
from synapticllamas.rpc.server_process import RpcServerFailed, RpcServerProcess

if TYPE_CHECKING:
    from synapticllamas.llama.log import LogLine

HOST = "127.0.0.1"
START_TIMEOUT = 20.0     # seconds for a server to accept connections (2 busy cores can be slow)
STOP_TIMEOUT = 5.0       # seconds between SIGTERM and SIGKILL
START_ATTEMPTS = 3       # with free ports picked for us: another process may take one first


class LocalBackendError(RuntimeError):
    """A local backend could not be started; the message is one line."""


@dataclass(eq=False)
class LocalBackend:
    key: str
    port: int
    server: RpcServerProcess
    watcher: asyncio.Task[None] | None = None      # tells the registry when it dies
    ready_ms: float | None = None
    memory_mib: int | None = None                  # what it offers to placements (`spawn --memory`)
    threads: int = 1

    @property
    def pid(self) -> int:
        return self.server.pid

    @property
    def running(self) -> bool:
        return self.server.running


def _free_ports(n: int, taken: set[int]) -> list[int]:
    """n distinct free loopback ports (all sockets held open together, so no port repeats)."""
    socks: list[socket.socket] = []
    try:
        while len(socks) < n:
            s = socket.socket()
            s.bind((HOST, 0))
            if s.getsockname()[1] in taken:
                s.close()
                continue
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
            return True
        except OSError:
            return False


class LocalBackends:
    def __init__(self, settings: Any, observer: Any, registry: Any) -> None:
        self.settings = settings
        self.observer = observer
        self.registry = registry
        self._backends: dict[str, LocalBackend] = {}

    # ------------------------------------------------------------ queries

    def owns(self, address: str) -> bool:
        return address in self._backends

    def get(self, address: str) -> LocalBackend | None:
        return self._backends.get(address)

    def entries(self) -> list[LocalBackend]:
        return list(self._backends.values())

    # ------------------------------------------------------------ spawn

    async def spawn(self, n: int, port_base: int | None = None,
                    starting: Callable[[list[int]], None] | None = None,
                    memory: list[int] | None = None) -> list[str]:
        """Start n servers, wait until each accepts TCP connections, add them to the registry (not
        persisted). All or nothing: if one fails, the others of this call are stopped again.
        `starting(ports)` is called once every check has passed, just before the first start."""
        if n < 1:
            raise LocalBackendError(f"the number of backends must be 1 or more, not {n}")
        from synapticllamas.llama import binaries  # on first use: start-up does not need it

        try:
            binary = binaries.rpc_server(self.settings.rpc_server)
        except binaries.NotFound as exc:
            raise LocalBackendError(str(exc)) from None
        ports = self._choose_ports(n, port_base)
        cache_dir = launch.default_cache_dir()
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LocalBackendError(f"cannot create the rpc-server cache directory {cache_dir}: "
                                    f"{exc.strerror or exc}") from None
        # the host's whole CPU share for each: they compute one after another (launch.py's rule)
        threads = launch.host_threads()
        if starting is not None:
            starting(ports)
        mine: list[LocalBackend] = []      # every process this call started, ready or not
        try:
            started = await asyncio.gather(
                *(self._start_ready(str(binary), port, port_base is None, mine, threads, cache_dir)
                  for port in ports))
            for i, backend in enumerate(started):
                if memory is not None:                   # one value for all, or one each
                    backend.memory_mib = memory[i] if len(memory) > 1 else memory[0]
                await self.registry.add(backend.key, persist=False, source="local")
                self.registry.report(backend.key, up=True, latency_ms=backend.ready_ms,
                                     reason=f"local ggml-rpc-server started (pid {backend.pid})")
        except BaseException as exc:
            # gather does not cancel the other starts when one fails: stop all of this call's
            await asyncio.gather(*(self._stop(b) for b in mine))
            for backend in mine:
                if backend.key in self.registry.addresses():
                    await self.registry.remove(backend.key)
            if isinstance(exc, ValueError):      # the registry refused one
                raise LocalBackendError(str(exc)) from None
            raise
        return [b.key for b in started]

    def _choose_ports(self, n: int, port_base: int | None) -> list[int]:
        configured = set(self.registry.addresses())
        if port_base is None:
            taken = {int(a.rsplit(":", 1)[1]) for a in configured if a.startswith(HOST + ":")}
            return _free_ports(n, taken)
        if not 1 <= port_base <= 65535 or port_base + n - 1 > 65535:
            raise LocalBackendError(f"--port-base {port_base} with {n} backends needs ports up to "
                                    f"{port_base + n - 1}; ports go from 1 to 65535")
        ports = list(range(port_base, port_base + n))
        for port in ports:
            if f"{HOST}:{port}" in configured:
                raise LocalBackendError(f"{HOST}:{port} is already a configured backend; choose another --port-base")
            if not _port_free(port):
                raise LocalBackendError(f"port {port} on {HOST} is in use; choose another --port-base")
        return ports

    async def _start_ready(self, binary: str, port: int, retry: bool, mine: list[LocalBackend], threads: int,
                           cache_dir: Path) -> LocalBackend:
        for attempt in range(1, START_ATTEMPTS + 1):
            backend = await self._start(binary, port, threads, cache_dir)
            mine.append(backend)
            try:
                backend.ready_ms = await backend.server.ready(START_TIMEOUT)
                return backend
            except RpcServerFailed as exc:
                exited_early = not backend.running     # e.g. "Failed to create server socket"
                await self._stop(backend)
                if not (retry and exited_early) or attempt == START_ATTEMPTS:
                    raise LocalBackendError(str(exc)) from None
                port = _free_ports(1, {port})[0]    # another process took the port first: pick another
        raise AssertionError("unreachable")

    async def _start(self, binary: str, port: int, threads: int, cache_dir: Path) -> LocalBackend:
        key = f"{HOST}:{port}"
        details = {"source": "ggml-rpc-server", "backend": key}

        def on_line(rec: LogLine) -> None:
            self.observer.emit("raw", "log", rec.text, {**details, "pid": server.pid}, sample=True)

        try:
            server = await RpcServerProcess.start(launch.argv(binary, HOST, port, threads, cache=True),
                                                  launch.environment(cache_dir), HOST, port, on_line)
        except RpcServerFailed as exc:
            raise LocalBackendError(str(exc)) from None
        backend = LocalBackend(key, port, server, threads=threads)
        self._backends[key] = backend       # from here on, close() stops it whatever happens
        backend.watcher = asyncio.create_task(self._watch(backend), name=f"rpc-server-watch-{port}")
        return backend

    async def _watch(self, backend: LocalBackend) -> None:
        await backend.server.exited
        if not backend.server.stopping:
            self.registry.report(backend.key, up=False,
                                 reason=f"local ggml-rpc-server exited ({backend.server.how_it_ended()})")

    # ------------------------------------------------------------ stop

    async def _stop(self, backend: LocalBackend) -> None:
        """SIGTERM to the process group, SIGKILL after STOP_TIMEOUT; waits for the exit."""
        await backend.server.stop(STOP_TIMEOUT)
        if self._backends.get(backend.key) is backend:   # forgotten only once it is gone
            del self._backends[backend.key]

    async def stop_all(self) -> int:
        """Stop every local backend and take it out of the registry; returns how many there were."""
        backends = list(self._backends.values())
        await asyncio.gather(*(self._stop(b) for b in backends))
        for backend in backends:
            if backend.key in self.registry.addresses():
                await self.registry.remove(backend.key)
        return len(backends)

    async def close(self) -> None:
        await self.stop_all()
