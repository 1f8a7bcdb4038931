"""NodeDirectory: the nodes announced on Redis, turned into registry backends. Nodes push; we listen.

With publishing on and SYNAPTICLLAMAS_DISCOVERY=redis, the shell subscribes to
`synapticllamas:llama_cpp:node`, then reads the hash `synapticllamas:nodes` once (subscribe first,
so a node that announces itself in between is not missed), and from then on only listens: no
scan, no periodic Redis read. An announced node becomes a backend (source `node`, not written to
the backends file) as soon as its `node_up` arrives; `node_down` or `rpc_server_exit` marks it
down at once, and so does a heartbeat overdue by 2.5 intervals (a timer per node, reset by each
heartbeat). That timer is the one liveness signal that works while the coordinator holds the
backend: rpc-server serves one client, so a held backend is never probed.

Every message and hash entry goes through the event schema (events/schema.py) first: what fails is
counted (status(): `invalid`, `last_invalid`) and skipped, and nothing a node sends can end the
task. Nodes are keyed by BackendId, the address parser's normal form, like the registry, so a
node announced as `localhost:50052` is the backend 127.0.0.1:50052 on every path.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from synapticllamas.events.contract import NODES_HASH, Component, NodeEvent, SystemEvent, channel_for
from synapticllamas.events.schema import Invalid, Tally
from synapticllamas.rpc.addresses import BackendId
from synapticllamas.trust.signing import WINDOW
from synapticllamas.util.tasks import cancel
from synapticllamas.util.text import shown

if TYPE_CHECKING:
    from synapticllamas.events.observer import Observer
    from synapticllamas.rpc.registry import RpcRegistry
    from synapticllamas.trust.announcements import AnnouncementCheck

OVERDUE_INTERVALS = 2.5      # heartbeats a node may miss before it counts as down
CONNECT_TIMEOUT = 2.0
PING_EVERY = 15.0            # a subscription on a hung Redis sees nothing: ask it now and then
CLOSE_WAIT = 1.0             # seconds close() waits for the task to take its cancellation

log = logging.getLogger("synapticllamas.discovery")


@dataclass
class NodeInfo:
    """What a node announced; `registration`'s typed fields were checked by the schema."""
    address: BackendId
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
    def link(self) -> str:
        """How to reach it: `tls-psk` (an encrypted link on its address) or `plain` (rpc-server itself)."""
        return "tls-psk" if self.registration.get("link") == "tls-psk" else "plain"

    @property
    def memory_offered_mib(self) -> int | None:
        value = self.registration.get("memory_offered_mib")   # a checked "mib" (events/schema.py)
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class NodeDirectory:
    def __init__(self, observer: Observer, registry: RpcRegistry, check: AnnouncementCheck | None = None,
                 redis_options: dict[str, Any] | None = None) -> None:
        """`check`: which announcements to believe (trust/announcements.py; by default, without a
        key: all but those of nodes behind a link). `redis_options`: TLS settings for the client."""
        from synapticllamas.trust.announcements import AnnouncementCheck

        self.observer = observer
        self.registry = registry
        self.check = check or AnnouncementCheck(None, observer)
        self.redis_options = redis_options or {}
        self.nodes: dict[BackendId, NodeInfo] = {}
        self.url: str | None = None
        self.connected = False
        self.last_error: str | None = None
        self.skipped = Tally()              # messages and hash entries that are not valid (events/schema.py)
        self.failures = 0                   # messages whose handling failed (a bug): logged, skipped
        self._task: asyncio.Task[None] | None = None
        self._timers: dict[BackendId, asyncio.TimerHandle] = {}
        self._pending: set[asyncio.Task[Any]] = set()
        self._loaded = asyncio.Event()      # the hash was read once and its nodes are backends
        self._client: Any = None            # the current connection's client (close() may cut it)
        self._closing = False

    # ------------------------------------------------------------ lifecycle

    def start(self, url: str) -> None:
        if self._task is not None:
            return
        self.url = url
        self._task = asyncio.get_running_loop().create_task(self._follow(url), name="node-discovery")

    async def close(self) -> None:
        self._loaded.clear()
        task, self._task = self._task, None
        if task is not None:
            self._closing = True
            task.cancel()
            await asyncio.wait({task}, timeout=CLOSE_WAIT)
            if not task.done():
                # redis-py (8.1) can swallow a cancellation that lands in a pub/sub read, and the
                # task reads on: cut its connection under it, and it ends on the next turn
                client = self._client
                if client is not None:
                    await client.connection_pool.disconnect(inuse_connections=True)
                task.cancel()
            await cancel(task)
            self._closing = False
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
        while not self._closing:
            client = self._client = aioredis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT,
                                                      health_check_interval=0, client_name="synapticllamas-discovery",
                                                      **self.redis_options)
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
            except Exception as exc:   # our bug: say so in status, and follow again
                log.exception("node discovery failed")
                self.connected = False
                self.last_error = f"internal error: {exc!r}"[:200]
            finally:
                try:
                    await client.aclose()
                except (RedisError, OSError):
                    pass
            if not self._closing:
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
                self._handle(message.get("data"))

    def _handle(self, data: Any) -> None:
        """One message: never fatal. Not a valid event: counted; a failure of ours: logged, counted."""
        try:
            self._on_message(data)
        except Invalid as exc:
            self.skipped.count(exc)
        except Exception:
            self.failures += 1
            log.exception("a node message could not be handled")

    # ------------------------------------------------------------ what nodes say

    def _from_registration(self, field_: Any, text: Any) -> None:
        """One entry of the nodes hash, read when the shell connects; an invalid one is counted, one
        the cluster key does not vouch for is ignored (trust/announcements.py)."""
        from synapticllamas.events.schema import decode_node_entry

        try:
            key, reg = decode_node_entry(field_, text)
        except Invalid as exc:
            self.skipped.count(exc)
            return
        # then its signature, over the registration as decoded (`auth` is kept in it)
        interval = reg.get("heartbeat_interval") or 0.0
        if not self.check.registration(reg, key, window=max(WINDOW, OVERDUE_INTERVALS * interval)):
            return
        info = self.nodes.setdefault(key, NodeInfo(key))
        info.registration = reg
        info.state = reg.get("state") or "unknown"
        info.interval = reg.get("heartbeat_interval")
        info.last_heard = reg.get("last_heartbeat")
        overdue = self._overdue_by(info)
        if overdue is not None and overdue > 0:
            self._ensure_backend(key, up=False, reason=f"node {key} silent for {self._silence(info)}")
            return
        self._ensure_backend(key, up=info.state == "up", reason=f"node {key} announced ({info.state})")
        self._arm(info)

    def _on_message(self, data: Any) -> None:
        """One message on the node channel, decoded by the schema (raises Invalid), then checked
        against the cluster key before anything changes (unsigned, another key, a replay: ignored).
        One parse: the signature is checked on the object the schema decoded (its `auth` field is
        not part of the Event), so what is verified is what is acted on."""
        from synapticllamas.events.schema import event_from_dict, load_json

        raw = load_json(data)
        event = event_from_dict(raw)
        if event.component != Component.NODE:
            return
        details = event.details
        address = details.get("address")
        if address is None:
            raise Invalid("details.address", "missing: a node event names its HOST:PORT")
        if not self.check.event(raw, address):
            return
        kind = event.event_type
        info = self.nodes.setdefault(address, NodeInfo(address))
        info.last_heard = time.time()
        info.state = details.get("state") or info.state
        info.interval = details.get("interval_s") or info.interval
        if kind == NodeEvent.NODE_UP:
            info.registration.update({k: details[k] for k in ("rpc_version", "devices", "memory_offered_mib",
                                                              "threads", "rpc_pid", "host", "speed", "link")
                                    if k in details})
            info.registration.setdefault("hostname", event.source.get("host"))
            self._ensure_backend(address, up=True, reason=f"node {address} up")
        elif kind in (NodeEvent.NODE_DOWN, NodeEvent.RPC_SERVER_EXIT):
            # the node's own words end up in `backends list`: escaped and cut
            said = shown(event.message, 160) if event.message else f"node {address} down"
            self._ensure_backend(address, up=False, reason=said)
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

    def _ensure_backend(self, address: BackendId, up: bool, reason: str) -> None:
        if self.registry.get(address) is not None:
            self.registry.report(address, up=up, reason=reason)
            return
        task = asyncio.get_running_loop().create_task(self._add(address, up, reason))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _add(self, address: BackendId, up: bool, reason: str) -> None:
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

    def _disarm(self, address: BackendId) -> None:
        timer = self._timers.pop(address, None)
        if timer is not None:
            timer.cancel()

    def _overdue(self, address: BackendId) -> None:
        self._timers.pop(address, None)
        info = self.nodes.get(address)
        if info is None:
            return
        self.registry.report(address, up=False, reason=f"node {address} heartbeat overdue: nothing heard for "
                             f"{self._silence(info)}")

    # ------------------------------------------------------------ queries

    def get(self, address: str) -> NodeInfo | None:
        """What the node at `address` (any spelling of it) announced, if anything."""
        from synapticllamas.rpc.addresses import backend_id_or_none

        ident = backend_id_or_none(address)
        return self.nodes.get(ident) if ident is not None else None

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
                "last_error": self.last_error, "invalid": self.skipped.total, "last_invalid": self.skipped.last,
                "failures": self.failures, "ignored": dict(self.check.ignored), "keyed": self.check.keyed}


def _seconds(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        return None
    return float(value)
