"""NodeAgent: `main.py node` on a worker: runs ggml-rpc-server, supervises it, announces it.

One asyncio loop, like the shell. The rpc-server is an RpcServerProcess (its exit is awaited); an
unexpected exit is an `rpc_server_exit` event, then a restart after a growing delay
(`rpc_server_restart`), and the node gives up after `max_restarts` failures in a row
(`node_down`, reason gave-up, exit status 1). Redis is only ever told: events go through the same
Observer and RedisPublisher as the shell's, registration in the hash `synapticllamas:nodes` (field
HOST:PORT), refreshed by each heartbeat, which is the node's only periodic work. Redis being away
never stops rpc-server: the publisher buffers, retries, and registers when Redis answers.
"""
from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from synapticllamas import __version__
from synapticllamas.events.contract import Component, NodeEvent, RawEvent, SystemEvent, default_source
from synapticllamas.events.observer import Observer
from synapticllamas.llama.policy import backoff_delay
from synapticllamas.node import cache
from synapticllamas.rpc import launch
from synapticllamas.rpc.addresses import Address, BackendId
from synapticllamas.rpc.server_process import RpcServerFailed, RpcServerProcess
from synapticllamas.util.ticker import Ticker

if TYPE_CHECKING:
    from synapticllamas.config import Settings
    from synapticllamas.events.contract import Event
    from synapticllamas.llama.log import LogLine

APP = "synapticllamas-node"
START_TIMEOUT = 30.0        # rpc-server to accept connections (a GPU backend initialises first)
STOP_TIMEOUT = 5.0
PRUNE_AFTER = 2.0           # a load writes its cache files in a burst: prune once it is quiet
RESTART_BACKOFF = 1.0       # first restart delay; doubles, at most 60 s


class NodeError(RuntimeError):
    """The node cannot serve; one line for the user, and the exit status to leave with."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class NodeOptions:
    binary: str
    host: str
    port: int
    redis_url: str
    threads: int
    devices: str | None
    cache: bool
    cache_dir: Path             # LLAMA_CACHE; rpc-server writes its files to cache_dir / "rpc"
    cache_max_bytes: int | None
    memory_mib: int | None
    max_restarts: int
    link_psk: bytes | None = None       # serve through the encrypted link (trust/link_server.py)
    announce_key: bytes | None = None   # sign every event and the registration
    rpc_port: int | None = None         # behind the link: rpc-server's own port, on 127.0.0.1
    insecure: bool = False              # --insecure: rpc-server open on `host`, said at start

    @property
    def address(self) -> BackendId:
        """What the node announces, in the address parser's spelling: the registry key shells use."""
        return Address(self.host, self.port).key

    @property
    def link(self) -> str:
        return "tls-psk" if self.link_psk else "plain"

    @property
    def rpc_bind(self) -> tuple[str, int]:
        """Where rpc-server itself listens: loopback behind a link, else the announced address."""
        if self.link_psk and self.rpc_port is not None:
            return "127.0.0.1", self.rpc_port
        return self.host, self.port

    @property
    def cache_files(self) -> Path:
        return self.cache_dir / "rpc"


def node_source() -> dict[str, str]:
    return default_source(APP)


class NodeAgent:
    def __init__(self, options: NodeOptions, settings: Settings, say: Callable[[str], None],
                 warn: Callable[[str], None]) -> None:
        self.options = options
        self.settings = settings
        self.say = say
        self.warn = warn
        self.interval = settings.rpc_backend_heartbeat_interval
        self.observer = Observer(settings.observer_max_events, settings.observer_sampling,
                                 settings.observer_sample_rate, source=node_source())
        self.observer.add_sink(self._print_notices)
        self.publisher: Any = None
        self.server: RpcServerProcess | None = None
        self.state = "starting"           # starting | up | restarting | stopping | down
        self.started = time.time()
        self.up_since: float | None = None
        self.tries = 0                    # restarts since rpc-server last came up
        self.restarts = 0
        self.cache_bytes = 0
        self.memory_offered: int | None = None
        from synapticllamas.node.speed import NodeSpeed

        # its host and its device's speed, measured at start (node/speed.py)
        self.speed = NodeSpeed(options.binary, options.threads, options.devices, settings.host_id)
        self._stop = asyncio.Event()
        self._stop_reason = "exit"
        self._prune: asyncio.TimerHandle | None = None
        self.link_server: Any = None      # trust.link_server.LinkServer, behind a link
        self.link_refused = 0             # connections earlier link servers refused
        self._cache_error: str | None = None      # said once; None while the cache can be read
        self._beat_error: str | None = None

    # ------------------------------------------------------------ what we say about ourselves

    def registration(self) -> dict[str, Any]:
        o, banner = self.options, self.server.banner if self.server else None
        source = self.observer.source
        return {
            "address": o.address, "hostname": source["host"], "instance": source["instance"],
            "pid": os.getpid(), "rpc_pid": self.server.pid if self.server else None, "version": __version__,
            "rpc_version": banner.version if banner else None,
            "devices": list(banner.devices) if banner else [],
            "memory_offered_mib": self.memory_offered, "threads": o.threads, "state": self.state,
            "cache": {"enabled": o.cache, "dir": str(o.cache_files) if o.cache else None,
                      "bytes": self.cache_bytes, "max_bytes": o.cache_max_bytes},
            "started": self.started, "heartbeat_interval": self.interval, "last_heartbeat": time.time(),
            "restarts": self.restarts, "link": o.link, **self.speed.summary(),
        }

    def _emit(self, event_type: str, message: str, level: str = "info", **details: Any) -> None:
        # the registration first: the batch that carries this event then carries it too, so a
        # reader who sees the event finds the hash entry saying the same
        if self.publisher is not None:
            self.publisher.update_registration(self.registration())
        self.observer.emit(Component.NODE, event_type, message,
                           {"address": self.options.address, "state": self.state, **details}, level)

    def _print_notices(self, event: Event) -> None:
        # Redis comes and goes by itself: say so, once per change (the publisher's own notices)
        if event.component == Component.SYSTEM and event.event_type in (
                SystemEvent.REDIS_CONNECTED, SystemEvent.REDIS_DISCONNECTED, SystemEvent.EVENTS_DROPPED):
            (self.say if event.level == "info" else self.warn)(f"node: {event.message}")

    # ------------------------------------------------------------ run

    async def run(self) -> int:
        """Serve until a signal (exit status 0) or until rpc-server gives up (1)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self._signalled, sig)
        self._start_publisher()
        if self.options.insecure:
            self._emit(NodeEvent.INSECURE, f"node {self.options.address} serves rpc-server without authentication "
                       f"(--insecure): anyone who reaches port {self.options.port} can use it", "warning",
                       link=self.options.link)
        self._prune_cache()
        # the device's speed before rpc-server starts: nothing else computes on it meanwhile
        seconds, fresh = await self.speed.measure()
        if self.speed.speed is not None:
            self.say(f"node: device speed {'measured in ' + format(seconds, '.1f') + 's' if fresh else 'from the cache'} "
                     f"(f16 {1 / self.speed.speed.per_byte('F16'):.1f} GB/s, {self.speed.host.cpus if self.speed.host else '?'}"
                     " CPUs)")
        elif self.speed.note:
            self.warn(f"node: {self.speed.note}")
        heartbeat = loop.create_task(self._heartbeat(), name="node-heartbeat")
        try:
            status = await self._supervise()
        finally:
            heartbeat.cancel()
            if self._prune is not None:
                self._prune.cancel()
            await self._stop_link()                # the announced port first: no one dials a node that leaves
            if self.server is not None and self.server.running:
                await self.server.stop(STOP_TIMEOUT)
            await self._close_publisher()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        return status

    def _signalled(self, sig: int) -> None:
        self._stop_reason = "signal"
        self.say(f"node: {signal.Signals(sig).name}: stopping rpc-server and leaving")
        self._stop.set()

    def _start_publisher(self) -> None:
        from synapticllamas.events.contract import NODES_HASH
        from synapticllamas.events.publisher import RedisPublisher

        signer = None
        if self.options.announce_key is not None:
            from synapticllamas.trust.signing import Signer

            signer = Signer(self.options.announce_key)
        self.publisher = RedisPublisher(self.settings.replace(redis_url=self.options.redis_url), self.observer,
                                        self.registration(), hash_key=NODES_HASH, field=self.options.address,
                                        signer=signer)
        self.publisher.start()

    async def _close_publisher(self) -> None:
        if self.publisher is None:
            return
        outcome = await self.publisher.close(timeout=2.0)
        if outcome["unsent"]:
            self.warn(f"node: {outcome['unsent']} events were not sent to Redis "
                      f"({self.publisher.last_error or 'no answer within 2 s'})")

    async def _supervise(self) -> int:
        while True:
            code = await self._serve_once()
            if code is None:                   # asked to stop
                # rpc-server (and the link's port) first: a shell that hears node_down may probe it,
                # and must find it gone
                await self._stop_link()
                if self.server is not None and self.server.running:
                    await self.server.stop(STOP_TIMEOUT)
                self.state = "down"
                self._emit(NodeEvent.NODE_DOWN, f"node {self.options.address} down ({self._stop_reason})",
                           reason=self._stop_reason)
                self.say("node: stopped")
                return 0
            if self.tries >= self.options.max_restarts:
                self.state = "down"
                message = (f"node {self.options.address} gave up: rpc-server exited {self.tries + 1} times in a row "
                           f"(last: {code})")
                self._emit(NodeEvent.NODE_DOWN, message, "critical", reason="gave-up", restarts=self.tries)
                self.warn(f"node: {message}")
                return 1
            self.tries += 1
            delay = backoff_delay(RESTART_BACKOFF, self.tries)
            self.state = "restarting"
            self.say(f"node: restarting rpc-server in {delay:g}s (try {self.tries} of {self.options.max_restarts})")
            try:
                await asyncio.wait_for(self._stop.wait(), delay)
                continue                          # stopped while waiting: _serve_once sees it
            except TimeoutError:
                pass
            self.restarts += 1
            self._emit(NodeEvent.RPC_SERVER_RESTART, f"restarting rpc-server on {self.options.address} "
                       f"(try {self.tries} of {self.options.max_restarts})", "warning",
                       tries=self.tries, delay_s=delay, restarts=self.restarts)

    async def _serve_once(self) -> str | None:
        """Start rpc-server and serve until it exits (returns how) or we are asked to stop (None)."""
        if self._stop.is_set():
            return None
        o = self.options
        host, port = o.rpc_bind
        argv = launch.argv(o.binary, host, port, o.threads, o.devices, o.cache)
        first = self.server is None
        try:
            self.server = server = await RpcServerProcess.start(
                argv, launch.environment(o.cache_dir if o.cache else None), host, port, self._on_line)
        except RpcServerFailed as exc:
            raise NodeError(str(exc)) from None
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            ready = asyncio.ensure_future(server.ready(START_TIMEOUT))
            await asyncio.wait({ready, stop}, return_when=asyncio.FIRST_COMPLETED)
            if stop.done():
                ready.cancel()
                return None
            try:
                latency = ready.result()
            except RpcServerFailed as exc:
                if first:                          # never served: a bad option or a taken port
                    raise NodeError(str(exc)) from None
                return self._exited(server)
            if first:
                self._check_memory(server)
            if not await self._start_link(first):
                await server.stop(STOP_TIMEOUT)
                return self._exited(server)
            self._came_up(server, latency)
            ends: set[asyncio.Future[Any]] = {server.exited, stop}
            if self.link_server is not None:
                ends.add(self.link_server.exited)
            await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
            if stop.done():
                return None
            # the announced port closes with rpc-server: a probe of it then says down, as without a link
            link = self.link_server
            await self._stop_link()
            if server.running:                     # the link ended: both start again
                self.warn(f"node: the encrypted link (stunnel) stopped: {link.process.last_error()}")
                await server.stop(STOP_TIMEOUT)
            return self._exited(server)
        finally:
            stop.cancel()

    async def _start_link(self, first: bool) -> bool:
        """Behind a link: its server end in front of rpc-server, started once rpc-server serves (so
        the announced port is open only while something real is behind it). One that cannot start
        the first time (the port is taken) ends the node; later, it is a failed start like rpc-server's."""
        o = self.options
        if o.link_psk is None or o.rpc_port is None:
            return True
        from synapticllamas.trust.link_server import LinkServer
        from synapticllamas.trust.stunnel import LinkError

        self.link_server = LinkServer(o.link_psk, o.host, o.port, o.rpc_port)
        try:
            await self.link_server.start()
        except LinkError as exc:
            if first:
                raise NodeError(f"the encrypted link on {o.address} cannot start: {exc}") from None
            self.warn(f"node: the encrypted link on {o.address} cannot start: {exc}")
            return False
        return True

    async def _stop_link(self) -> None:
        link, self.link_server = self.link_server, None
        if link is not None:
            self.link_refused += link.refused
            await link.stop()

    def _check_memory(self, server: RpcServerProcess) -> None:
        o, free = self.options, server.banner.free_mib
        if o.memory_mib is not None and free is not None and o.memory_mib > free:
            raise NodeError(f"--memory {o.memory_mib} MiB is more than the devices report free ({free} MiB: "
                            + ", ".join(f"{d['name']} {d['free_mib']} MiB" for d in server.banner.devices)
                            + "); offer at most that", status=2)
        self.memory_offered = o.memory_mib if o.memory_mib is not None else free

    def _came_up(self, server: RpcServerProcess, latency_ms: float) -> None:
        self.state = "up"
        self.up_since = time.monotonic()
        self.tries = 0
        banner = server.banner
        devices = ", ".join(f"{d['name']} {d['description']} ({d['free_mib']} of {d['total_mib']} MiB free)"
                            for d in banner.devices) or "devices not reported"
        cache_note = f"cache {self.options.cache_files} ({self.cache_bytes / 2**20:.0f} MiB)" if self.options.cache \
            else "no cache"
        version = f"rpc-server v{banner.version}" if banner.version else "rpc-server"
        link_note = f"encrypted link in front of rpc-server on 127.0.0.1:{self.options.rpc_port}; " \
            if self.options.link_psk else ""
        self.say(f"node: {version} serving on {self.options.address} ({link_note}pid {server.pid}; {devices}; "
                 f"{self.options.threads} threads; {cache_note})")
        self._emit(NodeEvent.NODE_UP, f"node {self.options.address} up: {version}, {devices}",
                   rpc_pid=server.pid, rpc_version=banner.version, devices=list(banner.devices),
                   memory_offered_mib=self.memory_offered, threads=self.options.threads,
                   latency_ms=round(latency_ms, 2), restarts=self.restarts, link=self.options.link,
                   **self.speed.summary())

    def _exited(self, server: RpcServerProcess) -> str:
        how = server.how_it_ended()
        code = server.returncode if server.returncode is not None and server.returncode >= 0 else None
        sig = signal.Signals(-server.returncode).name if server.returncode is not None and server.returncode < 0 \
            else None
        self.state = "restarting"
        self.up_since = None
        self.warn(f"node: rpc-server exited ({how}): {server.last_line()}")
        self._emit(NodeEvent.RPC_SERVER_EXIT, f"rpc-server on {self.options.address} exited ({how})", "error",
                   exit_code=code, signal=sig, rpc_pid=server.pid, last_lines=list(server.tail)[-12:])
        return how

    def _on_line(self, rec: LogLine) -> None:
        server = self.server
        self.observer.emit(Component.RAW, RawEvent.LOG, rec.text,
                           {"source": "ggml-rpc-server", "backend": self.options.address,
                            "pid": server.pid if server else None, "kind": rec.kind}, rec.level, sample=True)
        if rec.kind == "rpc_cache_saved" and self.options.cache_max_bytes is not None:
            if self._prune is not None:
                self._prune.cancel()
            self._prune = asyncio.get_running_loop().call_later(PRUNE_AFTER, self._prune_cache)

    # ------------------------------------------------------------ cache and heartbeat

    def _prune_cache(self) -> None:
        self._prune = None
        o = self.options
        if not o.cache:
            return
        try:
            if o.cache_max_bytes is not None:
                pruned = cache.prune(o.cache_files, o.cache_max_bytes)
                if pruned.files:
                    self.say(f"node: cache over {o.cache_max_bytes / 2**30:g} GB: removed the {pruned.files} least "
                             f"recently used files ({pruned.bytes / 2**20:.0f} MiB)")
            self._cache_read(cache.size(o.cache_files))
        except OSError as exc:
            self._cache_failed(exc)

    def _cache_read(self, size: int) -> None:
        self.cache_bytes = size
        if self._cache_error is not None:
            self._cache_error = None
            self.say(f"node: the cache directory {self.options.cache_files} can be read again")

    def _cache_failed(self, exc: OSError) -> None:
        """The cache directory cannot be read (its permissions changed, the disk went away): said
        once, the size is the last one read, and the node goes on serving and heartbeating."""
        reason = (exc.strerror or str(exc)).lower()
        if reason != self._cache_error:
            self._cache_error = reason
            self.warn(f"node: cannot read the cache directory {self.options.cache_files} ({reason}); its size is not "
                      "updated until it can be; rpc-server and the heartbeats go on")

    async def _heartbeat(self) -> None:
        """Every SOLLOL_RPC_BACKEND_HEARTBEAT_INTERVAL: one event, and the registration refreshed
        (last_heartbeat, cache size). The only periodic work of a node, and nothing ends it: a
        shell takes a node that stops beating for dead and fails over."""
        ticker = Ticker(self.interval)
        while True:
            await ticker.next()
            try:
                await self._beat()
            except Exception as exc:   # a bug: say it once per kind, and beat again next time
                if type(exc).__name__ != self._beat_error:
                    self._beat_error = type(exc).__name__
                    self.warn(f"node: a heartbeat failed ({exc!r}); the next ones are tried as usual")

    async def _beat(self) -> None:
        if self.options.cache:
            try:
                self._cache_read(await asyncio.to_thread(cache.size, self.options.cache_files))
            except OSError as exc:
                self._cache_failed(exc)
        server = self.server
        extra: dict[str, Any] = {}
        if self.options.link_psk:       # connections that did not prove the key: probes, strangers
            extra["link_refused"] = self.link_refused + (self.link_server.refused if self.link_server else 0)
        # the quota or the binary changed: measure again, but never under a client's load
        if server is not None and server.clients == 0 and self.speed.changed():
            await self.speed.measure()
            extra.update(self.speed.summary())
        self._emit(NodeEvent.HEARTBEAT, f"rpc_backend_connect on {self.options.address}",
                   rpc_pid=server.pid if server and server.running else None,
                   uptime_s=round(time.monotonic() - self.up_since, 1) if self.up_since else None,
                   cache_bytes=self.cache_bytes, memory_offered_mib=self.memory_offered,
                   interval_s=self.interval, restarts=self.restarts, link=self.options.link, **extra)
