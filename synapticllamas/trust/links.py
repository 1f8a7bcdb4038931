"""LinkManager: the client ends of the encrypted RPC links, on the coordinator's host.

A node behind a link announces HOST:PORT (its stunnel, not rpc-server). For each such backend the
shell runs one stunnel client on 127.0.0.1:P that connects there, and llama-server is given
127.0.0.1:P instead of HOST:PORT (`dial()` returns that map; CoordinatorManager.dial_for is how the
pre-flight asks for it). A link is checked once when it is opened: one connection through it, whose
outcome stunnel logs (handshake done, refused by the other end's key, nobody there), so a wrong key is
one line naming the node before llama-server ever tries. The link stays up across coordinator
restarts and failovers (a node that restarts keeps its address) and is closed when the shell closes.

    links = LinkManager(cluster_key, observer)
    dialled = await links.dial(["10.0.0.5:50052", "10.0.0.6:50052"])    # {identity: "127.0.0.1:P"}
    links.backend_of("127.0.0.1:P")                                      # "10.0.0.5:50052"
    await links.close_link("10.0.0.5:50052"); await links.close()

Events (component rpc_backend): `link_open` when a link passed its check, `link_failed` (warning)
when it did not or a later connection was refused, `link_closed` when its stunnel ended.
"""
from __future__ import annotations

import asyncio
import errno
import functools
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from synapticllamas.trust.stunnel import LinkError, Outcome, StunnelProcess

if TYPE_CHECKING:
    from synapticllamas.events.observer import Observer
    from synapticllamas.trust.key import ClusterKey

START_TIMEOUT = 5.0
CHECK_TIMEOUT = 5.0
KIND = "tls-psk"          # what a node behind a link announces in its registration's `link`


@dataclass
class Link:
    backend: str
    port: int
    process: StunnelProcess
    checked: bool = False
    refused: int = 0                     # connections the other end refused since it was opened
    failing: bool = False                # the last connection failed (said once, until one works)
    closing: bool = False
    watcher: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _split(backend: str) -> tuple[str, int]:
    host, _, port = backend.rpartition(":")
    return host.strip("[]"), int(port)


class LinkManager:
    def __init__(self, key: ClusterKey, observer: Observer | None = None) -> None:
        self._psk = key.derive("link")
        self.observer = observer
        self._links: dict[str, Link] = {}
        self._opening: dict[str, asyncio.Task[Link]] = {}

    # ------------------------------------------------------------ the interface

    async def dial(self, backends: Iterable[str]) -> dict[str, str]:
        """Open (or reuse) a checked link per backend: {backend: "127.0.0.1:P"}. Raises LinkError
        (with .backend) for the first one that fails; the others stay open for the next try."""
        wanted = list(dict.fromkeys(backends))
        results = await asyncio.gather(*(self._ensure(b) for b in wanted), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return {link.backend: link.address for link in results if isinstance(link, Link)}

    def backend_of(self, address: str) -> str | None:
        """The backend whose link listens on `address` (llama-server's log names the dialled one)."""
        return next((b for b, link in self._links.items() if link.address == address), None)

    def address_of(self, backend: str) -> str | None:
        link = self._links.get(backend)
        return link.address if link is not None and link.process.running else None

    async def close_link(self, backend: str) -> None:
        link = self._links.pop(backend, None)
        if link is not None:
            link.closing = True
            await link.process.stop()

    async def close(self) -> None:
        """Every link (App.close(), once the coordinator is stopped)."""
        for task in list(self._opening.values()):
            task.cancel()
        await asyncio.gather(*(self.close_link(b) for b in list(self._links)), return_exceptions=True)

    def status(self) -> dict[str, dict[str, Any]]:
        return {b: {"address": link.address, "pid": link.process.pid, "checked": link.checked,
                    "refused": link.refused, "running": link.process.running}
                for b, link in self._links.items()}

    # ------------------------------------------------------------ opening and checking

    async def _ensure(self, backend: str) -> Link:
        link = self._links.get(backend)
        if link is not None and link.process.running and link.checked:
            return link
        task = self._opening.get(backend)
        if task is None:          # one opening per backend, however many callers wait for it
            task = asyncio.get_running_loop().create_task(self._open(backend), name=f"link-{backend}")
            self._opening[backend] = task
            task.add_done_callback(functools.partial(self._opened, backend))
        return await asyncio.shield(task)

    def _opened(self, backend: str, _task: asyncio.Task[Link]) -> None:
        self._opening.pop(backend, None)

    async def _open(self, backend: str) -> Link:
        link = self._links.get(backend)
        if link is None or not link.process.running:
            if link is not None:
                self._links.pop(backend, None)
            link = await self._start(backend)
        await self._check(link)
        return link

    async def _start(self, backend: str) -> Link:
        try:
            host, port = _split(backend)
        except ValueError:
            raise LinkError(f"link to {backend}: not a HOST:PORT", backend) from None
        last: LinkError | None = None
        for _ in range(2):        # the free port may be taken between our look and stunnel's bind
            local = _free_port()
            process = await StunnelProcess.start(self._psk, f"127.0.0.1:{local}", f"{host}:{port}", client=True,
                                                 on_outcome=functools.partial(self._seen, backend))
            try:
                await process.wait_ready(START_TIMEOUT)
            except LinkError as exc:
                await process.stop()
                last = LinkError(f"link to {backend}: {exc}", backend)
                continue
            link = Link(backend, local, process)
            link.watcher = asyncio.get_running_loop().create_task(self._watch(link), name=f"link-watch-{backend}")
            self._links[backend] = link
            return link
        assert last is not None
        raise last

    async def _check(self, link: Link) -> None:
        """One connection through the link, closed as soon as stunnel says how its handshake went."""
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setblocking(False)
        try:
            sock.bind(("127.0.0.1", 0))
            outcome_of = link.process.expect(f"127.0.0.1:{sock.getsockname()[1]}")   # before it can happen
            try:
                await loop.sock_connect(sock, ("127.0.0.1", link.port))
            except OSError as exc:
                # refused: stunnel never took it (no outcome will come). Anything else (a reset): it
                # took it and closed it at once, e.g. after a refused handshake, which its log says
                if exc.errno == errno.ECONNREFUSED and not outcome_of.done():
                    raise LinkError(f"link to {link.backend}: its local end on {link.address} refused "
                                    f"({exc.strerror})", link.backend) from None
            try:
                outcome = await asyncio.wait_for(outcome_of, CHECK_TIMEOUT)
            except TimeoutError:
                raise LinkError(f"link to {link.backend}: no handshake within {CHECK_TIMEOUT:g} s (is the node "
                                "reachable?)", link.backend) from None
        except OSError as exc:
            raise LinkError(f"link to {link.backend}: its local end on {link.address} failed ({exc.strerror})",
                            link.backend) from None
        finally:
            sock.close()
        if not outcome.ok:
            link.failing = True
            self._emit("link_failed", self._why(link.backend, outcome), "warning", link, reason=outcome.reason)
            raise LinkError(self._why(link.backend, outcome), link.backend)
        link.checked, link.failing = True, False
        self._emit("link_open", f"encrypted link to {link.backend} open on {link.address}", "info", link)

    @staticmethod
    def _why(backend: str, outcome: Outcome) -> str:
        if outcome.reason == "key":
            return f"link to {backend} failed to authenticate (wrong cluster key?)"
        if outcome.reason == "not-a-link":
            return (f"{backend} did not answer as an encrypted link (a node started with --insecure, or not a "
                    "node at all?)")
        if outcome.reason == "unreachable":
            return f"link to {backend}: the node does not answer ({outcome.line.rsplit(': ', 1)[-1]})"
        return f"link to {backend} was closed before its handshake ended"

    # ------------------------------------------------------------ while it runs

    def _seen(self, backend: str, peer: str, outcome: Outcome) -> None:
        """Every connection's outcome (llama-server's too): a refusal after the check is said once."""
        link = self._links.get(backend)
        if link is None or not link.checked:
            return                                   # the check reports for itself
        if outcome.ok:
            link.failing = False
            return
        if outcome.reason in ("key", "not-a-link"):
            link.refused += 1
        if not link.failing:
            link.failing = True
            self._emit("link_failed", self._why(backend, outcome), "warning", link, reason=outcome.reason)

    async def _watch(self, link: Link) -> None:
        code = await link.process.exited
        if self._links.get(link.backend) is link:
            self._links.pop(link.backend, None)
        if not link.closing:
            from synapticllamas.util.processes import describe_exit

            self._emit("link_closed", f"encrypted link to {link.backend} ended ({describe_exit(code)}): "
                       f"{link.process.last_error()}", "warning", link)

    def _emit(self, event_type: str, message: str, level: str, link: Link, **details: Any) -> None:
        if self.observer is None:
            return
        from synapticllamas.events.contract import Component

        self.observer.emit(Component.RPC_BACKEND, event_type, message,  # BackendEvent.LINK_*
                           {"backend": link.backend, "address": link.address, "link": KIND,
                            "stunnel_pid": link.process.pid, **details}, level)
