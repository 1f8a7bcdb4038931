"""NodeDirectory: the nodes announced on Redis, turned into registry backends. Nodes push; we listen.

With publishing on and SYNAPTICLLAMAS_DISCOVERY=redis, the shell subscribes to
`synapticllamas:llama_cpp:node`, then reads the hash `synapticllamas:nodes` once (subscribe first,
so a node that announces itself in between is not missed), and from then on only listens: no
scan, no periodic Redis read. An announced node becomes a backend (source `node`, not written to
the backends file) as soon as its `node_up` arrives; `node_down` or `rpc_server_exit` marks it
down at once, and so does a heartbeat overdue by 2.5 intervals (a timer per node, reset by each
heartbeat). That timer is the one liveness signal that works while the coordinator holds the
backend: rpc-server serves one client, so a held backend is never probed.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from synapticllamas.events.contract import NODES_HASH, Component, NodeEvent, SystemEvent, channel_for
from synapticllamas.util.tasks import cancel

if TYPE_CHECKING:
    from synapticllamas.events.observer import Observer
    from synapticllamas.rpc.registry import RpcRegistry

OVERDUE_INTERVALS = 2.5      # heartbeats a node may miss before it counts as down
CONNECT_TIMEOUT = 2.0
PING_EVERY = 15.0            # a subscription on a hung Redis sees nothing: ask it now and then


@dataclass
class NodeInfo:
    address: str
    registration: dict[str, Any] = field(default_factory=dict)
    state: str = "unknown"            # what the node last said: up, restarting, down, ...
    last_heard: float | None = None   # time.time() of its last event (or the hash's last_heartbeat)
    interval: float | None = None

    @property
    def rpc_version(self) -> str | None:
        value = self.registration.get("rpc_version")
        return str(value) if value else None

    @property
    def free_mib(self) -> int | None:
        devices = self.registration.get("devices")
        if not isinstance(devices, list) or not devices:
            return None
        try:
            return sum(int(d.get("free_mib", 0)) for d in devices if isinstance(d, dict))
        except (TypeError, ValueError):
            return None

    @property
    def memory_offered_mib(self) -> int | None:
        value = self.registration.get("memory_offered_mib")
        return value if isinstance(value, int) and not isinstance(value, bool) else None


class NodeDirectory:
    def __init__(self, observer: Observer, registry: RpcRegistry) -> None:
        self.observer = observer
        self.registry = registry
        self.nodes: dict[str, NodeInfo] = {}
        self.url: str | None = None
        self.connected = False
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._pending: set[asyncio.Task[Any]] = set()
        self._loaded = asyncio.Event()      # the hash was read once and its nodes are backends

    # ------------------------------------------------------------ lifecycle

    def start(self, url: str) -> None:
        if self._task is not None:
            return
        self.url = url
        self._task = asyncio.get_running_loop().create_task(self._follow(url), name="node-discovery")

    async def close(self) -> None:
        self._loaded.clear()
        task, self._task = self._task, None
        await cancel(task)
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for pending in list(self._pending):
            pending.cancel()
        self.connected = False

    # ------------------------------------------------------------ following Redis

    async def _follow(self, url: str) -> None:
        import redis.asyncio as aioredis
        from redis.exceptions import RedisError

        from synapticllamas.events.redis_errors import describe
        from synapticllamas.util.backoff import Backoff

        backoff = Backoff(0.2, 5.0)
        while True:
            client = aioredis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT, health_check_interval=0,
                                       client_name="synapticllamas-discovery")
            try:
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                await pubsub.subscribe(channel_for(Component.NODE))
                # confirmed once the first message (the subscribe reply) is read
                await pubsub.get_message(timeout=CONNECT_TIMEOUT)
                entries = await client.hgetall(NODES_HASH)
                for field_, value in entries.items():
                    self._from_registration(field_, value)
                if self._pending:
                    await asyncio.wait(set(self._pending))
                self.connected, self.last_error = True, None
                self._loaded.set()
                backoff.reset()
                await self._listen(pubsub)
            except (RedisError, OSError) as exc:
                self.connected = False
                self.last_error = describe(exc, connect_timeout=CONNECT_TIMEOUT, reply_timeout=PING_EVERY)
            finally:
                try:
                    await client.aclose()
                except (RedisError, OSError):
                    pass
            await asyncio.sleep(backoff.next())

    async def _listen(self, pubsub: Any) -> None:
        """Messages until the connection breaks. A hung Redis closes nothing: after a quiet
        PING_EVERY, a PING whose answer does not come within the next one ends the connection."""
        pinged = False
        while True:
            message = await pubsub.get_message(timeout=PING_EVERY)
            if message is None:
                if pinged:
                    raise ConnectionError(f"no answer to PING within {PING_EVERY:g} s")
                await pubsub.ping()
                pinged = True
                continue
            pinged = False
            if message.get("type") == "message":
                self._on_message(message.get("data"))

    # ------------------------------------------------------------ what nodes say

    def _from_registration(self, address: Any, text: Any) -> None:
        """One entry of the nodes hash, read when the shell connects."""
        try:
            reg = json.loads(text)
            key = address.decode() if isinstance(address, bytes) else str(address)
        except (ValueError, UnicodeDecodeError):
            return
        if not isinstance(reg, dict):
            return
        info = self.nodes.setdefault(key, NodeInfo(key))
        info.registration = reg
        info.state = str(reg.get("state") or "unknown")
        info.interval = _seconds(reg.get("heartbeat_interval"))
        info.last_heard = _seconds(reg.get("last_heartbeat"))
        overdue = self._overdue_by(info)
        if overdue is not None and overdue > 0:
            self._ensure_backend(key, up=False, reason=f"node {key} silent for {self._silence(info)}")
            return
        self._ensure_backend(key, up=info.state == "up", reason=f"node {key} announced ({info.state})")
        self._arm(info)

    def _on_message(self, data: Any) -> None:
        try:
            event = json.loads(data)
        except (TypeError, ValueError):
            return
        if not isinstance(event, dict) or event.get("component") != Component.NODE:
            return
        raw_details = event.get("details")
        details: dict[str, Any] = raw_details if isinstance(raw_details, dict) else {}
        address = details.get("address")
        if not isinstance(address, str) or not address:
            return
        kind = event.get("event_type")
        info = self.nodes.setdefault(address, NodeInfo(address))
        info.last_heard = time.time()
        info.state = str(details.get("state") or info.state)
        info.interval = _seconds(details.get("interval_s")) or info.interval
        if kind == NodeEvent.NODE_UP:
            info.registration.update({k: details[k] for k in ("rpc_version", "devices", "memory_offered_mib",
                                                              "threads", "rpc_pid", "host", "speed") if k in details})
            info.registration.setdefault("hostname", (event.get("source") or {}).get("host"))
            self._ensure_backend(address, up=True, reason=f"node {address} up")
        elif kind in (NodeEvent.NODE_DOWN, NodeEvent.RPC_SERVER_EXIT):
            self._ensure_backend(address, up=False, reason=str(event.get("message") or f"node {address} down"))
        elif kind == NodeEvent.HEARTBEAT:
            for key in ("cache_bytes", "memory_offered_mib", "host", "speed"):
                if key in details:
                    info.registration[key] = details[key]
            backend = self.registry.get(address)
            if info.state == "up" and (backend is None or backend.state != "up"):
                self._ensure_backend(address, up=True, reason=f"node {address} heartbeat")
        if kind == NodeEvent.NODE_DOWN:
            self._disarm(address)
        else:
            self._arm(info)

    # ------------------------------------------------------------ the registry side

    def _ensure_backend(self, address: str, up: bool, reason: str) -> None:
        if self.registry.get(address) is not None:
            self.registry.report(address, up=up, reason=reason)
            return
        task = asyncio.get_running_loop().create_task(self._add(address, up, reason))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _add(self, address: str, up: bool, reason: str) -> None:
        try:
            await self.registry.add(address, persist=False, source="node")
        except ValueError as exc:     # a name that does not resolve here, or already configured
            if self.registry.get(address) is None:
                self.observer.emit(Component.SYSTEM, SystemEvent.ERROR,
                                   f"announced node {address} cannot be used: {exc}", {"address": address},
                                   level="warning")
                return
        self.registry.report(address, up=up, reason=reason)

    # ------------------------------------------------------------ heartbeat deadlines

    def _overdue_by(self, info: NodeInfo) -> float | None:
        if info.interval is None or info.last_heard is None:
            return None
        return time.time() - info.last_heard - OVERDUE_INTERVALS * info.interval

    def _silence(self, info: NodeInfo) -> str:
        age = time.time() - info.last_heard if info.last_heard else 0.0
        return f"{age:.0f}s (heartbeat every {info.interval:g}s)" if info.interval else f"{age:.0f}s"

    def _arm(self, info: NodeInfo) -> None:
        self._disarm(info.address)
        if info.interval is None:
            return
        self._timers[info.address] = asyncio.get_running_loop().call_later(
            OVERDUE_INTERVALS * info.interval, self._overdue, info.address)

    def _disarm(self, address: str) -> None:
        timer = self._timers.pop(address, None)
        if timer is not None:
            timer.cancel()

    def _overdue(self, address: str) -> None:
        self._timers.pop(address, None)
        info = self.nodes.get(address)
        if info is None:
            return
        self.registry.report(address, up=False, reason=f"node {address} heartbeat overdue: nothing heard for "
                             f"{self._silence(info)}")

    # ------------------------------------------------------------ queries

    async def wait_loaded(self, timeout: float) -> bool:
        """Until the announced nodes are backends (the first read done), at most `timeout` s:
        `redis on` in a script is followed at once by commands that expect them."""
        try:
            await asyncio.wait_for(self._loaded.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def status(self) -> dict[str, Any]:
        return {"enabled": self._task is not None, "connected": self.connected, "nodes": len(self.nodes),
                "last_error": self.last_error}


def _seconds(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        return None
    return float(value)
