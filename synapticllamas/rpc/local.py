"""LocalBackends: start and stop ggml-rpc-server processes on 127.0.0.1 (the single-machine default).

Each server runs in its own process group (so a stop reaches anything it forks), its output is read
line by line into `raw/log` events, and its exit is awaited: an unexpected death reaches the
registry at once as a disconnect, without waiting for the next probe round. Local backends join the
registry but never the backends file: they live as long as this shell.
"""
from __future__ import annotations

import asyncio
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from synapticllamas.rpc.probe import ProbeFailure, probe
from synapticllamas.util.processes import describe_exit, spawn, terminate

HOST = "127.0.0.1"
START_TIMEOUT = 20.0     # seconds for a server to accept connections (2 busy cores can be slow)
STOP_TIMEOUT = 5.0       # seconds between SIGTERM and SIGKILL
START_ATTEMPTS = 3       # with free ports picked for us: another process may take one first
TAIL_LINES = 20


class LocalBackendError(RuntimeError):
    """A local backend could not be started; the message is one line."""


@dataclass(eq=False)
class LocalBackend:
    key: str
    port: int
    proc: asyncio.subprocess.Process
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    output: asyncio.Event = field(default_factory=asyncio.Event)   # set on each line, wakes the start wait
    reader: asyncio.Task[None] | None = None
    watcher: asyncio.Task[None] | None = None
    stopping: bool = False
    ready_ms: float | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc.returncode is None

    def last_line(self) -> str:
        return self.tail[-1].strip() if self.tail else "no output"


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

    def entries(self) -> list[LocalBackend]:
        return list(self._backends.values())

    # ------------------------------------------------------------ spawn

    async def spawn(self, n: int, port_base: int | None = None,
                    starting: Callable[[list[int]], None] | None = None) -> list[str]:
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
        if starting is not None:
            starting(ports)
        mine: list[LocalBackend] = []      # every process this call started, ready or not
        try:
            started = await asyncio.gather(
                *(self._start_ready(str(binary), port, port_base is None, mine) for port in ports))
            for backend in started:
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

    async def _start_ready(self, binary: str, port: int, retry: bool, mine: list[LocalBackend]) -> LocalBackend:
        for attempt in range(1, START_ATTEMPTS + 1):
            backend = await self._start(binary, port)
            mine.append(backend)
            try:
                await self._wait_ready(backend)
                return backend
            except LocalBackendError:
                exited_early = not backend.running     # e.g. "Failed to create server socket"
                await self._stop(backend)
                if not (retry and exited_early) or attempt == START_ATTEMPTS:
                    raise
                port = _free_ports(1, {port})[0]    # another process took the port first: pick another
        raise AssertionError("unreachable")

    async def _start(self, binary: str, port: int) -> LocalBackend:
        key = f"{HOST}:{port}"
        try:
            proc = await spawn(
                [binary, "--host", HOST, "--port", str(port)],
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT)
        except OSError as exc:
            raise LocalBackendError(f"cannot run {binary}: {exc.strerror or exc}") from None
        backend = LocalBackend(key, port, proc)
        self._backends[key] = backend       # from here on, close() stops it whatever happens
        backend.reader = asyncio.create_task(self._read(backend), name=f"rpc-server-output-{port}")
        backend.watcher = asyncio.create_task(self._watch(backend), name=f"rpc-server-exit-{port}")
        return backend

    async def _wait_ready(self, backend: LocalBackend) -> None:
        """Connect until the server accepts; a connect is tried after each output line, and at
        least every 50 ms (rpc-server says nothing when it starts listening)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT
        while True:
            if not backend.running:
                raise LocalBackendError(
                    f"ggml-rpc-server on port {backend.port} stopped ({describe_exit(backend.proc.returncode)}) "
                    f"before accepting connections: {backend.last_line()}")
            try:
                result = await probe(HOST, backend.port, 1.0)
                backend.ready_ms = result.latency_ms
                return
            except ProbeFailure:
                pass
            if loop.time() > deadline:
                raise LocalBackendError(f"ggml-rpc-server on port {backend.port} did not accept connections "
                                        f"within {START_TIMEOUT:g}s: {backend.last_line()}")
            backend.output.clear()
            line: asyncio.Future[Any] = asyncio.ensure_future(backend.output.wait())
            assert backend.watcher is not None
            await asyncio.wait({line, backend.watcher}, timeout=0.05, return_when=asyncio.FIRST_COMPLETED)
            line.cancel()

    async def _read(self, backend: LocalBackend) -> None:
        stream = backend.proc.stdout
        assert stream is not None
        details = {"source": "ggml-rpc-server", "backend": backend.key, "pid": backend.pid}
        while True:
            try:
                raw = await stream.readline()
            except ValueError:          # a line beyond the stream limit: asyncio dropped it
                continue
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip()
            if not line:
                continue
            backend.tail.append(line)
            backend.output.set()
            self.observer.emit("raw", "log", line, details, sample=True)

    async def _watch(self, backend: LocalBackend) -> None:
        code = await backend.proc.wait()
        if backend.reader is not None:
            await asyncio.wait({backend.reader}, timeout=1.0)    # its last words first
        if not backend.stopping:
            self.registry.report(backend.key, up=False,
                                 reason=f"local ggml-rpc-server exited ({describe_exit(code)})")

    # ------------------------------------------------------------ stop

    async def _stop(self, backend: LocalBackend) -> None:
        """SIGTERM to the process group, SIGKILL after STOP_TIMEOUT; waits for the exit."""
        backend.stopping = True
        assert backend.watcher is not None
        await terminate(backend.pid, backend.watcher, STOP_TIMEOUT, kill_wait=STOP_TIMEOUT)
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
