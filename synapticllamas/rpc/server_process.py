"""RpcServerProcess: one ggml-rpc-server child, for local backends and nodes alike.

Started in its own process group and line-buffered (util/processes.py), its output read line by
line (parsed, kept in a short tail, its banner collected), its exit awaited by a task (`exited`):
nothing polls it. Ready means it accepts a TCP connection: rpc-server says nothing when it starts
listening, so a connect is tried after each output line and at least every 50 ms.

Ready also means its banner has been read. rpc-server prints the banner (version, cache, the
`Devices:` lines with their memory) before it listens, but the connect can succeed before our
reader has got to those lines (two busy cores: 1 start in 4 here), and a node would then announce
`devices: []` and no memory offer. The connect itself makes rpc-server print `Accepted client
connection`, after the banner in the same pipe: once that line is read, so is the banner.
`clients` counts the connections rpc-server says are open (a node measures its speed only when
none is).
"""
from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from synapticllamas.rpc.banner import RpcBanner
from synapticllamas.rpc.probe import ProbeFailure, probe
from synapticllamas.util.processes import describe_exit, spawn, terminate

if TYPE_CHECKING:
    from synapticllamas.llama.log import LogLine

TAIL_LINES = 20
READY_POLL = 0.05
BANNER_WAIT = 2.0          # after the first connect: for the line that says the banner is all read


class RpcServerFailed(RuntimeError):
    """It could not be started, or stopped before it accepted connections; one line."""


class RpcServerProcess:
    def __init__(self, proc: asyncio.subprocess.Process, host: str, port: int,
                 on_line: Callable[[LogLine], object] | None = None) -> None:
        from synapticllamas.llama.log import parse

        self._parse = parse
        self.proc = proc
        self.host = host
        self.port = port
        self.on_line = on_line
        self.banner = RpcBanner()
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.stopping = False
        self.clients = 0                       # connections open, as rpc-server says
        self._output = asyncio.Event()         # set on each line: wakes the ready wait
        self._accepted = asyncio.Event()       # rpc-server printed a connection line: its banner was before it
        self._reader = asyncio.get_running_loop().create_task(self._read(), name=f"rpc-server-output-{port}")
        self.exited: asyncio.Task[int] = asyncio.get_running_loop().create_task(
            self._wait(), name=f"rpc-server-exit-{port}")

    @classmethod
    async def start(cls, argv: list[str], env: Mapping[str, str] | None, host: str, port: int,
                    on_line: Callable[[LogLine], object] | None = None) -> RpcServerProcess:
        try:
            # restore_signals=False: it keeps Python's SIG_IGN for SIGPIPE. rpc-server writes to its
            # client without MSG_NOSIGNAL, so a llama-server killed mid-reply killed it too (SIGPIPE),
            # and a failover then lost a second backend; ignored, the write fails and it serves the next
            proc = await spawn(argv, lines=True, env=dict(env) if env is not None else None,
                               stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                               stderr=asyncio.subprocess.STDOUT, restore_signals=False)
        except OSError as exc:
            raise RpcServerFailed(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
        return cls(proc, host, port, on_line)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc.returncode is None

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def last_line(self) -> str:
        return self.tail[-1].strip() if self.tail else "no output"

    def how_it_ended(self) -> str:
        return describe_exit(self.proc.returncode)

    async def _read(self) -> None:
        stream = self.proc.stdout
        assert stream is not None
        while True:
            try:
                raw = await stream.readline()
            except ValueError:          # a line beyond the stream limit: asyncio dropped it
                continue
            if not raw:
                return
            text = raw.decode("utf-8", "replace").rstrip()
            if not text:
                continue
            rec = self._parse(text)
            self.banner.feed(rec)
            if rec.kind == "rpc_client_connected":
                self.clients += 1
                self._accepted.set()
            elif rec.kind == "rpc_client_closed":
                self.clients = max(0, self.clients - 1)
                self._accepted.set()
            self.tail.append(text)
            self._output.set()
            if self.on_line is not None:
                self.on_line(rec)

    async def _wait(self) -> int:
        code = await self.proc.wait()
        await asyncio.wait({self._reader}, timeout=1.0)    # its last words first
        return code

    async def ready(self, timeout: float) -> float:
        """Wait until it accepts a connection and its banner is read; returns the connect latency
        (ms). Raises RpcServerFailed if it exits first or does not accept within `timeout` seconds."""
        latency = await self._accepts(timeout)
        seen = asyncio.ensure_future(self._accepted.wait())
        # a build that says nothing on a connection costs BANNER_WAIT, nothing more
        await asyncio.wait({seen, self.exited}, timeout=BANNER_WAIT, return_when=asyncio.FIRST_COMPLETED)
        seen.cancel()
        return latency

    async def _accepts(self, timeout: float) -> float:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        where = f"{self.host}:{self.port}"
        while True:
            if not self.running:
                await asyncio.wait({self.exited}, timeout=1.0)
                raise RpcServerFailed(f"ggml-rpc-server on {where} stopped ({self.how_it_ended()}) "
                                      f"before accepting connections: {self.last_line()}")
            try:
                return (await probe(self.host, self.port, 1.0)).latency_ms
            except ProbeFailure:
                pass
            if loop.time() > deadline:
                raise RpcServerFailed(f"ggml-rpc-server on {where} did not accept connections within "
                                      f"{timeout:g}s: {self.last_line()}")
            self._output.clear()
            line: asyncio.Future[Any] = asyncio.ensure_future(self._output.wait())
            await asyncio.wait({line, self.exited}, timeout=READY_POLL, return_when=asyncio.FIRST_COMPLETED)
            line.cancel()

    async def stop(self, timeout: float) -> None:
        """SIGTERM to its group, SIGKILL after `timeout`; returns once it has exited."""
        self.stopping = True
        await terminate(self.pid, self.exited, timeout, kill_wait=timeout)
