"""One llama-server child: spawned in its own session, its output read line by line, its exit awaited.

Nothing here decides anything. The supervisor is told through the callbacks it passes: every
output line (`on_line`), and the exit (`exited`, a task that is done the moment the process has
been reaped, with its return code). After an exit, `drain()` waits a bounded moment for the last
lines still in the pipes (the reason it died), and `kill_group()` clears whatever it left in its
process group (ggml's abort handler may have started gdb).
"""
from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from synapticllamas.llama import http as llama_http
from synapticllamas.llama.preflight import CoordinatorError
from synapticllamas.util.processes import signal_group, spawn

LINE_LIMIT = 1 << 20       # longest output line read whole


@dataclass
class ChildOps:
    """How the supervisor starts, signals and asks llama-server: the real things by default; the
    lifecycle unit tests pass fakes (tests/unit/test_lifecycle.py) and run in milliseconds."""
    spawn: Callable[..., Awaitable[Any]] = spawn
    signal: Callable[[int, int], bool] = signal_group
    health: Callable[[llama_http.Endpoint, float], Awaitable[tuple[bool, str]]] = llama_http.health


class LlamaProcess:
    def __init__(self, proc: Any, ops: ChildOps) -> None:
        self.proc = proc
        self.ops = ops
        # set by the supervisor before the readers first run (no await between start() and that)
        self.on_line: Callable[[str, str], object] = lambda stream, text: None
        loop = asyncio.get_running_loop()
        self._readers = [loop.create_task(self._read(proc.stdout, "stdout"), name=f"llama-stdout-{proc.pid}"),
                         loop.create_task(self._read(proc.stderr, "stderr"), name=f"llama-stderr-{proc.pid}")]
        self.exited: asyncio.Task[int] = loop.create_task(proc.wait(), name=f"llama-exit-{proc.pid}")

    @classmethod
    async def start(cls, ops: ChildOps, argv: list[str], env: dict[str, str] | None = None) -> LlamaProcess:
        """`env`: variables added to ours (none: ours as it is)."""
        extra: dict[str, Any] = {"env": {**os.environ, **env}} if env else {}
        try:
            proc = await ops.spawn(argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                                   stderr=asyncio.subprocess.PIPE, limit=LINE_LIMIT, **extra)
        except OSError as exc:
            raise CoordinatorError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
        return cls(proc, ops)

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    async def _read(self, stream: asyncio.StreamReader, name: str) -> None:
        while True:
            try:
                raw = await stream.readline()
            except ValueError:        # one line over LINE_LIMIT: asyncio dropped it
                raw = b"[synapticllamas: an output line longer than 1 MiB was dropped]\n"
            if not raw:
                return
            self.on_line(name, raw.decode("utf-8", "replace").rstrip("\r\n"))

    def signal(self, sig: int) -> bool:
        return self.ops.signal(self.pid, sig)

    async def drain(self, timeout: float) -> None:
        """After the exit: the last lines, for at most `timeout` s (a grandchild may hold the pipes)."""
        await asyncio.wait(self._readers, timeout=timeout)
        for task in self._readers:
            task.cancel()

    def kill_group(self) -> None:
        self.ops.signal(self.pid, signal.SIGKILL)

    async def stop_within(self, timeout: float) -> None:
        """SIGKILL if it has not exited `timeout` s after the SIGTERM the caller sent."""
        done, _ = await asyncio.wait({self.exited}, timeout=timeout)
        if not done:
            self.signal(signal.SIGKILL)
