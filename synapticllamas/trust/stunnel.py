"""One stunnel process: a TLS 1.3 pre-shared-key link end, supervised like our other children.

Why stunnel (docs/ARCHITECTURE.md, "RPC links", and bench/links.py): of the links measured it has
the highest throughput and the lowest CPU per byte; its server end finishes the handshake before it
connects to rpc-server, so a peer without the key never reaches it (spiped's does connect first);
TLS 1.3 PSK with (EC)DHE gives forward secrecy; and it logs each connection's outcome, so a link
that fails to authenticate is seen as it happens, not guessed from a timeout.

Both ends read the same PSK, made from the cluster key (`derive("link")`), from a file in a private
directory (0700) that is removed when the process ends. stunnel runs in the foreground (debug 6:
the per-connection lines we read), in its own session, with the parent-death signal.
"""
from __future__ import annotations

import asyncio
import os
import re
import shutil
import tempfile
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from synapticllamas.util.processes import describe_exit, spawn, terminate

IDENTITY = "synapticllamas"
SERVICE = "rpc"
TAIL_LINES = 30
# an RPC connection may sit idle for hours between requests: stunnel must never close it for that
IDLE_TIMEOUT = 10 * 365 * 86400

_LINE = re.compile(r"LOG(?P<level>\d)\[(?P<conn>[^\]]+)\]: (?P<text>.*)$")
_ACCEPTED = re.compile(r"Service \[[^\]]+\] accepted connection from (?P<peer>\S+)$")


class LinkError(RuntimeError):
    """A link cannot be used; one line for the user, naming the backend where there is one."""

    def __init__(self, message: str, backend: str | None = None) -> None:
        super().__init__(message)
        self.backend = backend


def binary() -> str:
    """stunnel's path (Debian names it stunnel4), or LinkError naming the package."""
    for name in ("stunnel4", "stunnel"):
        found = shutil.which(name)
        if found:
            return found
    raise LinkError("stunnel is not installed (the encrypted RPC links need it): apt-get install stunnel4")


@dataclass
class Outcome:
    """How one connection through the link went, from stunnel's own lines."""
    ok: bool
    reason: str = ""          # for a failure: "key", "not-a-link", "unreachable", "closed"
    line: str = ""


def classify(text: str, client: bool) -> Outcome | None:
    """The outcome a per-connection line tells, or None for a line that decides nothing."""
    if text.startswith("TLS connected") or text.startswith("TLS accepted"):
        return Outcome(True, line=text)
    if text.startswith("SSL_connect:") or text.startswith("SSL_accept:"):
        # a TLS peer with another key answers with an alert (its binder or Finished did not verify);
        # anything else (a reset, garbage, plain text) is not our link at all
        lowered = text.lower()
        if any(word in lowered for word in ("alert", "binder", "decrypt", "bad record mac", "psk")):
            return Outcome(False, "key", text)
        return Outcome(False, "not-a-link", text)
    if client and (text.startswith("No more addresses to connect") or
                   (text.startswith("s_connect: connect ") and "(" in text)):
        return Outcome(False, "unreachable", text)
    if text.startswith("Connection reset") or text.startswith("Connection closed"):
        return Outcome(False, "closed", text)
    return None


def private_dir() -> Path:
    """A fresh directory only we may read (mkdtemp makes it 0700), in XDG_RUNTIME_DIR when set."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    return Path(tempfile.mkdtemp(prefix="synapticllamas-link-", dir=base if base and os.path.isdir(base) else None))


def write_config(where: Path, psk: bytes, accept: str, connect: str, client: bool) -> Path:
    secrets = where / "psk"
    fd = os.open(secrets, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(f"{IDENTITY}:{psk.hex()}\n")
    lines = [
        "foreground = yes", "pid =", "syslog = no", "debug = 6",
        "sslVersionMin = TLSv1.3",                   # PSK with (EC)DHE: forward secrecy
        "socket = l:TCP_NODELAY=1", "socket = r:TCP_NODELAY=1",   # one small exchange per token
        "socket = r:SO_KEEPALIVE=1",
        f"TIMEOUTidle = {IDLE_TIMEOUT}", "TIMEOUTclose = 0",
        f"PSKsecrets = {secrets}",
        f"[{SERVICE}]",
        f"accept = {accept}", f"connect = {connect}",
    ]
    if client:
        lines += ["client = yes", f"PSKidentity = {IDENTITY}"]
    conf = where / ("client.conf" if client else "server.conf")
    conf.write_text("\n".join(lines) + "\n")
    return conf


class StunnelProcess:
    """stunnel with one service; `ready` once it accepts connections, `exited` when it is gone.

    `on_outcome(peer, outcome)`: each connection's result (peer = the accepted client's HOST:PORT);
    `expect(peer)`: a future for one connection's result (the link's own check)."""

    def __init__(self, proc: asyncio.subprocess.Process, workdir: Path, client: bool,
                 on_outcome: Callable[[str, Outcome], object] | None = None) -> None:
        self.proc = proc
        self.workdir = workdir
        self.client = client
        self.on_outcome = on_outcome
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._peers: dict[str, str] = {}                       # stunnel's connection id -> peer
        self._decided: set[str] = set()
        self._waiting: dict[str, asyncio.Future[Outcome]] = {}
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = loop.create_future()
        self._reader = loop.create_task(self._read(), name=f"stunnel-output-{proc.pid}")
        self.exited: asyncio.Task[int] = loop.create_task(self._wait(), name=f"stunnel-exit-{proc.pid}")

    @classmethod
    async def start(cls, psk: bytes, accept: str, connect: str, client: bool,
                    on_outcome: Callable[[str, Outcome], object] | None = None) -> StunnelProcess:
        program = binary()
        workdir = private_dir()
        conf = write_config(workdir, psk, accept, connect, client)
        try:
            proc = await spawn([program, str(conf)], stdin=asyncio.subprocess.DEVNULL,
                               stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        except OSError as exc:
            shutil.rmtree(workdir, ignore_errors=True)
            raise LinkError(f"cannot run {program}: {exc.strerror or exc}") from None
        return cls(proc, workdir, client, on_outcome)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc.returncode is None

    def last_error(self) -> str:
        for text in reversed(self.tail):
            if text.startswith(("Error", "Binding", "SSL_", "s_connect")) or "error" in text.lower():
                return text
        return self.tail[-1] if self.tail else "no output"

    async def wait_ready(self, timeout: float) -> None:
        """Until it accepts connections; LinkError when it exits first (a taken port...) or is slow."""
        waiting: set[asyncio.Future[Any]] = {self.ready, self.exited}
        done, _ = await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if self.ready.done():
            return
        if self.exited in done:
            raise LinkError(f"stunnel stopped ({describe_exit(self.proc.returncode)}): {self.last_error()}")
        raise LinkError(f"stunnel did not start listening within {timeout:g} s: {self.last_error()}")

    def expect(self, peer: str) -> asyncio.Future[Outcome]:
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._waiting[peer] = future
        return future

    async def _read(self) -> None:
        stream = self.proc.stdout
        assert stream is not None
        while True:
            try:
                raw = await stream.readline()
            except ValueError:
                continue
            if not raw:
                break
            self._line(raw.decode("utf-8", "replace").rstrip())
        for future in self._waiting.values():
            if not future.done():
                future.set_result(Outcome(False, "closed", "stunnel exited"))

    def _line(self, line: str) -> None:
        match = _LINE.search(line)
        if match is None:
            return
        conn, text = match["conn"], match["text"]
        if conn in ("ui", "cron"):
            if int(match["level"]) <= 3 and not text.startswith("No trusted certificates"):
                self.tail.append(text)
            if text == "Accepting new connections" and not self.ready.done():
                self.ready.set_result(None)
            return
        accepted = _ACCEPTED.match(text)
        if accepted:
            self._peers[conn] = accepted["peer"]
            self._decided.discard(conn)
            return
        if int(match["level"]) <= 3:
            self.tail.append(text)
        closing = text.startswith(("Connection reset", "Connection closed"))
        if conn in self._decided:
            if closing:                       # its last line: forget it
                self._decided.discard(conn)
            return
        outcome = classify(text, self.client)
        if outcome is None:
            return
        if not closing:
            self._decided.add(conn)
        peer = self._peers.pop(conn, "?")
        waiting = self._waiting.pop(peer, None)
        if waiting is not None and not waiting.done():
            waiting.set_result(outcome)
        if self.on_outcome is not None:
            self.on_outcome(peer, outcome)

    async def _wait(self) -> int:
        code = await self.proc.wait()
        await asyncio.wait({self._reader}, timeout=1.0)
        shutil.rmtree(self.workdir, ignore_errors=True)
        return code

    async def stop(self, timeout: float = 3.0) -> None:
        await terminate(self.pid, self.exited, timeout, kill_wait=timeout)
