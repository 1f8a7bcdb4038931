"""App: owns the observer, the Redis publisher, the backend registry and the coordinator.

Everything runs on one asyncio loop (see docs/ARCHITECTURE.md); state is touched only from it.
`start()` registers the app and starts the periodic work the settings ask for; `close()` stops
every child process this app started and flushes queued events, within bounded time.
"""
from __future__ import annotations

import asyncio
import os
import time
from typing import TYPE_CHECKING, Any

from synapticllamas import __version__
from synapticllamas.config import Settings, redact_url
from synapticllamas.events.observer import Observer
from synapticllamas.llama.conversation import Conversation
from synapticllamas.rpc.registry import RpcRegistry
from synapticllamas.ui import PlainUI

NODES_LOAD_WAIT = 10.0      # `redis on`: for the first read of the nodes announced, once Redis answered

if TYPE_CHECKING:
    from synapticllamas.gateway.core import Gateway
    from synapticllamas.gateway.server import Listener
    from synapticllamas.llama.coordinator import CoordinatorManager
    from synapticllamas.llama.devices import PlacementInputs
    from synapticllamas.llama.placement import Offer
    from synapticllamas.rpc.discovery import NodeDirectory, NodeInfo
    from synapticllamas.rpc.local import LocalBackend, LocalBackends
    from synapticllamas.trust.links import LinkManager


class App:
    def __init__(self, settings: Settings, ui: Any | None = None) -> None:
        self.settings = settings
        self.ui = ui or PlainUI()
        self.observer = Observer.from_settings(settings)
        from synapticllamas.trust.key import from_settings

        self.cluster_key = from_settings(settings)   # None: an insecure cluster (cli.py refused a bad file)
        self.started_at = time.time()
        self.closed = False
        # Components. Each is created here or on first use, and each offers
        # start()/close() and status() -> dict for `status` and the toolbar.
        self.publisher: Any = None       # publisher.RedisPublisher, created by `redis on`
        self._handed_seq = 0             # events up to this seq were handed to a publisher
        self.backlog_sent = 0            # events the last `redis on` sent from before it
        self.registry = RpcRegistry(settings, self.observer)
        # made on first use (the properties below): the prompt does not wait for their imports
        self._coordinator: CoordinatorManager | None = None
        self._local_backends: LocalBackends | None = None
        self._nodes: NodeDirectory | None = None
        self._links: LinkManager | None = None
        self._gateway: Gateway | None = None
        self.listener: Listener | None = None      # the gateway's HTTP endpoint, once opened
        self.gateway_url: str | None = None
        self.gateway_problem: str | None = None    # why there is no endpoint (port taken, ...)
        self.conversation = Conversation()     # `chat`'s turns, kept from one `chat` to the next
        self._placement_inputs: PlacementInputs | None = None

    @property
    def coordinator(self) -> CoordinatorManager:
        if self._coordinator is None:
            from synapticllamas.llama.coordinator import CoordinatorManager

            self._coordinator = CoordinatorManager(self.settings, self.observer, self.registry)
            self._coordinator.offers_for = self.offers
            self._coordinator.dial_for = self.dial_for
            self._coordinator.planner.inputs = self.placement_inputs
        return self._coordinator

    @coordinator.setter
    def coordinator(self, value: CoordinatorManager) -> None:
        self._coordinator = value

    @property
    def gateway(self) -> Gateway:
        """The request core: every request to the model (the HTTP endpoint's, `ask`'s and `chat`'s)."""
        if self._gateway is None:
            from synapticllamas.gateway.core import Gateway

            self._gateway = Gateway(self.settings, self.observer, self.coordinator)
        return self._gateway

    def open_gateway(self) -> str | None:
        """Open the HTTP endpoint if it is not open (first `coordinator start` or `attach`), on
        the port it keeps while the shell runs. Returns one line for the user when it could not
        be opened (port taken, keys file): the coordinator goes on without it."""
        port = self.settings.gateway_port
        if self.listener is not None or port == 0 or self.gateway_problem is not None:
            return None
        from synapticllamas.events.contract import Component, GatewayEvent
        from synapticllamas.gateway.keys import ApiKeys, KeysError
        from synapticllamas.gateway.server import GatewayHttp, Listener, PortTaken, bind, missing_parts

        missing = missing_parts()
        if missing:
            self.gateway_problem = (f"the gateway needs {' and '.join(missing)}: pip install 'synapticllamas[gateway]' "
                                    "(scripts/run installs it); going on without the gateway")
            return self.gateway_problem

        host = self.settings.gateway_host
        try:
            keys = ApiKeys.from_settings(self.settings)
            sock = bind(host, port)
        except (PortTaken, KeysError) as exc:
            if isinstance(exc, PortTaken):
                self.gateway_problem = (f"gateway port {port} on {host} is taken ({exc.strerror}); set "
                                        "SYNAPTICLLAMAS_GATEWAY_PORT (or --gateway-port) to another, 0 for none; "
                                        "going on without the gateway")
            else:
                self.gateway_problem = f"{exc}; going on without the gateway"
            self.observer.emit(Component.GATEWAY, GatewayEvent.LISTENING, self.gateway_problem,
                               {"port": port, "status": "unavailable"}, level="warning")
            return self.gateway_problem
        http = GatewayHttp(self.gateway, keys)
        self.listener = Listener(http.asgi(), sock)
        shown_host = f"[{host}]" if ":" in host else host
        self.gateway_url = f"http://{shown_host}:{sock.getsockname()[1]}"
        self.observer.emit(Component.GATEWAY, GatewayEvent.LISTENING, f"gateway listening: {self.api_line()}",
                           {"port": sock.getsockname()[1], "url": self.gateway_url, "status": "ok",
                            "keys": len(keys)})
        return None

    def api_line(self) -> str | None:
        """`OpenAI-compatible API: http://127.0.0.1:11434/v1 (Ollama API at /api)`, or why not."""
        if self.gateway_url:
            return f"OpenAI-compatible API: {self.gateway_url}/v1 (Ollama API at /api)"
        if self.gateway_problem:
            return f"No gateway: {self.gateway_problem}"
        return None

    @property
    def local_backends(self) -> LocalBackends:
        if self._local_backends is None:
            from synapticllamas.rpc.local import LocalBackends

            self._local_backends = LocalBackends(self.settings, self.observer, self.registry)
        return self._local_backends

    @property
    def nodes(self) -> NodeDirectory:
        """The nodes announced on Redis; it follows them while publishing is on."""
        if self._nodes is None:
            from synapticllamas.events.redis_options import redis_options
            from synapticllamas.rpc.discovery import NodeDirectory
            from synapticllamas.trust.announcements import AnnouncementCheck

            key = self.cluster_key
            check = AnnouncementCheck(key.derive("announce") if key else None, self.observer)
            self._nodes = NodeDirectory(self.observer, self.registry, check,
                                        redis_options(self.settings.redis_url, self.settings.redis_ca_file))
        return self._nodes

    @property
    def links(self) -> LinkManager | None:
        """The client ends of the encrypted links to nodes (None without a cluster key)."""
        if self._links is None and self.cluster_key is not None:
            from synapticllamas.trust.links import LinkManager

            self._links = LinkManager(self.cluster_key, self.observer)
        return self._links

    async def dial_for(self, backends: list[str]) -> dict[str, str]:
        """What llama-server dials for each backend: a node behind an encrypted link through its
        link's local end (opened and checked now if it is not yet), anything else as it is.
        Raises trust.stunnel.LinkError (one line, `.backend` set) for a link that cannot be used."""
        dialled = {b: b for b in backends}
        linked = [b for b in backends if (node := self.announced_node(b)) is not None and node.link == "tls-psk"]
        if linked:
            links = self.links
            if links is None:
                from synapticllamas.trust.stunnel import LinkError

                raise LinkError(f"{linked[0]} serves only through an encrypted link and this shell has no cluster "
                                "key", linked[0])
            dialled.update(await links.dial(linked))
        return dialled

    @property
    def placement_inputs(self) -> PlacementInputs:
        """What placement knows of each device (hosts, speeds, links); made on first use."""
        if self._placement_inputs is None:
            from synapticllamas.llama.devices import PlacementInputs
            from synapticllamas.rpc.links import LinkTable

            def latency(address: str) -> float | None:
                backend = self.registry.get(address)
                return backend.latency_ms if backend is not None else None

            self._placement_inputs = PlacementInputs(self.settings, LinkTable(), self.local_backend,
                                                     self.announced_node, self.offers, latency)
        return self._placement_inputs

    def local_backend(self, address: str) -> LocalBackend | None:
        """The local backend at `address`, if this shell started one (never makes the component)."""
        return self._local_backends.get(address) if self._local_backends is not None else None

    def announced_node(self, address: str) -> NodeInfo | None:
        """What the node at `address` announced, if discovery has heard of it (never makes the component)."""
        return self._nodes.get(address) if self._nodes is not None else None

    def offers(self, backends: list[str]) -> dict[str, Offer]:
        """What each backend offers to placements, where we know it: a local backend's `--memory`
        or its banner's free memory; a node's `--memory` or free memory, as it announced."""
        from synapticllamas.llama.placement import Offer

        out: dict[str, Offer] = {}
        for address in backends:
            local = self.local_backend(address)
            node = self.announced_node(address)
            if local is not None and local.memory_mib:
                out[address] = Offer(local.memory_mib, "local --memory")
            elif local is not None and local.server.banner.free_mib:
                out[address] = Offer(local.server.banner.free_mib, "local rpc-server free memory")
            elif node is not None and node.memory_offered_mib:
                out[address] = Offer(node.memory_offered_mib, "node")
        return out

    @property
    def mode(self) -> str:
        return "distributed" if self.settings.distributed else "standard"

    @property
    def instance(self) -> str:
        return self.observer.source["instance"]

    def registration(self) -> dict[str, Any]:
        """What the app says about itself on register (and in the apps hash)."""
        s = self.settings
        return {
            "app": self.observer.source["app"],
            "instance": self.instance,
            "host": self.observer.source["host"],
            "pid": os.getpid(),
            "version": __version__,
            "mode": self.mode,
            "started_at": self.started_at,
            "heartbeat_interval": s.rpc_heartbeat_interval,
            "backend_heartbeat": s.rpc_backend_heartbeat,
            "backend_heartbeat_interval": s.rpc_backend_heartbeat_interval,
            "redis_url": redact_url(s.redis_url),
            # lets a subscriber tell seq gaps from sampling apart from lost events
            "sampling": s.observer_sampling,
            "sample_rate": s.observer_sample_rate,
        }

    async def start(self) -> None:
        from synapticllamas.util.internal_errors import install

        # a bug in a background task: its traceback to the log file, one system/error event for the user
        install(self.settings.log_file, lambda line: self.observer.emit("system", "error", line,
                                                                        {"error": line}, level="error"),
                asyncio.get_running_loop())
        if self.settings.redis_enabled:
            self._start_publisher()   # before `register`, so Redis sees it; notices tell the outcome
        self.observer.emit("system", "register", f"SynapticLlamas {__version__} started ({self.mode} mode)",
                           self.registration())
        if self.publisher is not None:
            self._announce_redis_on()
        if self.registry is not None:
            await self.registry.start()
        if self.publisher is not None:
            self._start_discovery()

    async def close(self, reason: str = "exit") -> None:
        """Stop what we started (coordinator first: it uses the backends), say goodbye, flush.

        Safe to call twice. A component that fails to close does not stop the others."""
        if self.closed:
            return
        self.closed = True
        if self.listener is not None:        # first: no new requests while the rest closes
            await self.listener.close()
        for component in (self._gateway, self._coordinator, self._links, self._local_backends, self._nodes, self.registry):
            if component is not None:
                try:
                    await component.close()
                except Exception as exc:  # keep closing the rest; the event says what failed
                    self.observer.emit("system", "error", f"closing {type(component).__name__} failed: {exc}",
                                       {"error": repr(exc)}, level="error")
        self.observer.emit("system", "unregister", f"SynapticLlamas stopped ({reason})",
                           {"instance": self.instance, "reason": reason,
                            "uptime_s": round(time.time() - self.started_at, 3)})
        if self.publisher is not None and self.publisher.enabled:
            outcome = await self.publisher.close(timeout=2.0)   # flush what is queued, bounded
            if outcome["unsent"]:
                self.ui.notice(f"{outcome['unsent']} events were not sent to Redis ({self.publisher.shown_url}:"
                               f" {self.publisher.last_error or 'no answer within 2 s'})", "warning")

    # ------------------------------------------------------------ Redis publishing (`redis on|off`)

    def _start_publisher(self) -> int:
        """Start a publisher; events emitted while publishing was off go first. Returns their count."""
        from synapticllamas.events.publisher import RedisPublisher

        backlog = [e for e in self.observer.buffer if e.seq > self._handed_seq]
        self.publisher = RedisPublisher(self.settings, self.observer, self.registration())
        self.publisher.start(backlog)
        return len(backlog)

    def _announce_redis_on(self) -> None:
        from synapticllamas.events.contract import CHANNEL_PATTERN, JOURNAL_STREAM

        url = self.publisher.shown_url
        self.observer.emit("system", "redis_on", f"Redis publishing on -> {url}",
                           {"url": url, "channels": CHANNEL_PATTERN, "journal": JOURNAL_STREAM,
                            "registration": self.registration()})

    async def redis_on(self, wait: float = 2.0) -> tuple[bool, tuple[bool, str | None] | None]:
        """Start publishing. Returns (started now, outcome of the first connection attempt:
        (connected, error), or None when Redis has not answered within `wait` seconds).

        The events emitted while publishing was off (still in the ring buffer) are sent first, so
        a dashboard sees this app's `register` and everything since, not only what follows."""
        if self.publisher is not None and self.publisher.enabled:
            return False, (self.publisher.connected, self.publisher.last_error)
        self.backlog_sent = self._start_publisher()
        self._announce_redis_on()
        self._start_discovery()
        outcome = await self.publisher.wait_first_attempt(wait)
        if outcome is not None and outcome[0] and self.settings.discovery == "redis":
            # the nodes already announced are backends when `redis on` returns (a script's next
            # line may be `coordinator start`). Redis has answered, so this is one read: bounded
            # apart from `wait`, which on a busy machine it outlasted (a CI run's start without nodes)
            await self.nodes.wait_loaded(NODES_LOAD_WAIT)
        return True, outcome

    def _start_discovery(self) -> None:
        if self.settings.discovery == "redis":
            self.nodes.start(self.settings.redis_url)

    async def redis_off(self) -> dict[str, Any] | None:
        """Stop publishing: say so, flush within 2 s, unregister. None if it was not on."""
        if self.publisher is None or not self.publisher.enabled:
            return None
        self.observer.emit("system", "redis_off", f"Redis publishing off ({self.publisher.shown_url})",
                           {"url": self.publisher.shown_url, "published": self.publisher.published})
        self._handed_seq = self.observer.seq
        if self._nodes is not None:
            await self._nodes.close()
        return await self.publisher.close(timeout=2.0)

    def status(self) -> dict[str, Any]:
        """One summary for the `status` command and the toolbar."""
        return {
            "mode": self.mode,
            "redis": self.publisher.status() if self.publisher else {"enabled": False},
            "coordinator": self._coordinator.status() if self._coordinator else {"state": "stopped"},
            "gateway": {"url": self.gateway_url, "problem": self.gateway_problem,
                        **(self._gateway.status() if self._gateway is not None else {})},
            "backends": self.registry.status() if self.registry else {"configured": 0, "up": 0},
            "discovery": self._nodes.status() if self._nodes is not None else {"enabled": False},
            "events": self.observer.stats(),
        }
