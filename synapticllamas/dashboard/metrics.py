"""GET /metrics: Prometheus text computed from the events the dashboard reads (the apps are never asked).

The hub hands every event it takes from Redis to `Metrics.observe()`: the journal it replays when
it opens (all of it the first time, so counters after a dashboard restart start from what the
journal holds; afterwards from where the last opening stopped), then the live feed. Counters only
grow while this process lives; a restart is a reset, which Prometheus expects (see
process_start_time_seconds). Gauges (apps live, coordinators up, backends, nodes) follow the same
rules as the page: an app is live while its heartbeats arrive (2x the shortest interval it
promised), stopped once it said goodbye.
"""
from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from synapticllamas.dashboard import frames
from synapticllamas.events.contract import (
    BackendEvent,
    Component,
    CoordinatorEvent,
    Event,
    GatewayEvent,
    ModelEvent,
    NodeEvent,
    RegistryEvent,
    SystemEvent,
)
from synapticllamas.events.dedup import SeenEvents, identity
from synapticllamas.events.gaps import Gaps

NODE_APP = "synapticllamas-node"
MIB = 1 << 20
# coordinator state by event type, for events that carry no `state` (as the page does)
COORDINATOR_STATES = {
    CoordinatorEvent.STARTING: "starting", ModelEvent.LOADING: "starting", ModelEvent.LOAD: "starting",
    CoordinatorEvent.START: "running", CoordinatorEvent.HEARTBEAT: "running", CoordinatorEvent.STOPPING: "stopping",
    CoordinatorEvent.STOP: "stopped", CoordinatorEvent.BACKOFF: "backoff", CoordinatorEvent.FATAL: "fatal",
}
BUFFERS = ("model", "kv", "compute", "output")
# Bounds of the fold: anyone who can publish can invent instances and node addresses.
FORGET_AFTER = 3600.0    # seconds without a word after which an app or node is forgotten
MAX_APPS = 500           # apps (shells and nodes) kept; beyond, the least recently heard go
MAX_NODES = 500
SWEEP_EVERY = 10.0       # seconds between sweeps (on the next event, or at a scrape)
SEEN = 50000             # (instance, seq) keys kept to drop repeats
# gateway/request label values: anything else counts as "other", so a publisher cannot grow the series
GATEWAY_APIS = ("openai", "ollama", "shell")
GATEWAY_STATUSES = ("ok", "unavailable", "refused", "failed", "cancelled")
# seconds from a request's arrival to its first text (gateway/request `first_token_s`)
FIRST_TOKEN_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def number(value: Any) -> float | None:
    """A finite number from an event (anyone can publish anything), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def positive(value: Any) -> float | None:
    n = number(value)
    return n if n is not None and n > 0 else None


@dataclass
class App:
    app: str = ""
    registration: dict[str, Any] = field(default_factory=dict)
    heard: float = 0.0
    unregistered: bool = False
    heartbeat_every: float | None = None      # the registry's (or a node's) interval_s
    coordinator: str | None = None            # its state, once it sent a coordinator event
    backends: dict[str, tuple[float, str]] = field(default_factory=dict)   # address -> (when, state)
    model_memory: dict[tuple[str, str], float] = field(default_factory=dict)   # (backend, kind) -> MiB

    def expected_interval(self) -> float | None:
        r = self.registration
        every = []
        if self.heartbeat_every:
            every.append(self.heartbeat_every)
        elif r.get("backend_heartbeat") is not False and positive(r.get("backend_heartbeat_interval")):
            every.append(float(r["backend_heartbeat_interval"]))
        if self.coordinator == "running" and positive(r.get("heartbeat_interval")):
            every.append(float(r["heartbeat_interval"]))
        return min(every) if every else None

    def state(self, now: float) -> str:
        if self.unregistered:
            return "stopped"
        every = self.expected_interval()
        if every is None:
            return "unknown"
        return "stale" if now - self.heard > 2 * every else "live"


@dataclass
class Node:
    instance: str = ""
    state: str = "unknown"
    heard: float = 0.0
    interval: float | None = None
    devices: list[dict[str, Any]] = field(default_factory=list)
    offered_mib: float | None = None
    cache_bytes: float | None = None
    host: dict[str, Any] | None = None        # its machine (`host` of node_up): nodes that share one share its memory

    def up(self, now: float) -> bool:
        overdue = self.interval is not None and now - self.heard > 2.5 * self.interval
        return self.state == "up" and not overdue


@dataclass
class Histogram:
    """One histogram series: per bucket the observations at or below its bound (not cumulative
    here; the exposition sums them), then the sum and the count."""
    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.bounds)

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                break
        self.total += value
        self.count += 1

    def write(self, out: Exposition, name: str, labels: dict[str, str]) -> None:
        running = 0
        for bound, n in zip(self.bounds, self.counts, strict=True):
            running += n
            out.sample(f"{name}_bucket", labels | {"le": repr(bound)}, running)
        out.sample(f"{name}_bucket", labels | {"le": "+Inf"}, self.count)
        out.sample(f"{name}_sum", labels, round(self.total, 6))
        out.sample(f"{name}_count", labels, self.count)


class Metrics:
    """The fold. Bounded: apps and nodes not heard of for FORGET_AFTER (or beyond MAX_APPS /
    MAX_NODES, the least recently heard first) are forgotten with their counters, and counted."""

    def __init__(self) -> None:
        self.started = time.time()
        self.last_id: frames.Key | None = None    # newest journal entry observed
        self.gaps = Gaps(max_instances=MAX_APPS * 2)
        self.seen = SeenEvents(SEEN)              # (instance, seq): a batch re-sent after a Redis crash counts once
        self.apps: dict[str, App] = {}
        self.nodes: dict[str, Node] = {}
        self.events: Counter[tuple[str, str]] = Counter()
        self.requests: Counter[str] = Counter()
        self.tokens: Counter[tuple[str, str]] = Counter()
        self.restarts: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()    # what apps said they dropped (system/events_dropped)
        self.gateway_requests: Counter[tuple[str, str, str]] = Counter()   # (instance, api, status)
        self.gateway_queue: dict[str, int] = {}   # instance -> queue_depth of its last gateway/request
        self.first_token: dict[tuple[str, str], Histogram] = {}           # (instance, api)
        self.observed = 0
        self.forgotten = Counter[str]()           # apps / nodes forgotten to keep the fold bounded
        self._next_sweep = 0.0

    def wants(self, sid: str) -> bool:
        """Whether the journal entry `sid` is newer than everything observed (catch-up overlaps)."""
        return self.last_id is None or frames.parse_id(sid) > self.last_id

    def skip(self, sid: str) -> None:
        """A journal entry that is no valid event: nothing to count, but it was read."""
        if "~" not in sid:
            key = frames.parse_id(sid)
            if self.last_id is None or key > self.last_id:
                self.last_id = key

    def observe(self, sid: str | None, event: Event, live: bool) -> None:
        """One decoded event (events/schema.py), once, in journal order. `sid`: its journal id (None:
        seen on pub/sub only). `live`: it arrived just now (else it is replayed: it was heard at its
        own timestamp)."""
        if sid is not None and "~" not in sid:
            key = frames.parse_id(sid)
            if self.last_id is not None and key <= self.last_id:
                return
            self.last_id = key
        identity_key = identity(event.source, event.seq)
        if identity_key is not None and not self.seen.add(identity_key):
            return    # a repeat (a batch re-sent after a Redis crash)
        source = event.source
        instance = str(source.get("instance") or "(unknown)")
        component, event_type, details = event.component, event.event_type, event.details
        register = component == Component.SYSTEM and event_type == SystemEvent.REGISTER
        self.gaps.note(instance, event.seq or None, event.sampled, register)
        self.observed += 1
        self.events[(component, event.level)] += 1
        now = time.time()
        heard = now if live else min(now, event.timestamp)
        app = self.apps.get(instance)
        if app is None:
            app = self.apps[instance] = App()
        app.app = str(source.get("app") or app.app)
        app.heard = max(app.heard, heard)
        if register:
            app.registration, app.unregistered = details, False
        elif component == Component.SYSTEM and event_type == SystemEvent.UNREGISTER:
            app.unregistered = True
        elif component == Component.SYSTEM and event_type == SystemEvent.EVENTS_DROPPED:
            self.dropped[instance] += int(number(details.get("dropped")) or 0)
        elif component in (Component.COORDINATOR, Component.MODEL):
            self._coordinator(app, instance, event_type, details)
        elif component == Component.RPC_BACKEND:
            self._backend(app, event_type, details, event.timestamp)
        elif component == Component.RPC_REGISTRY and event_type == RegistryEvent.HEARTBEAT:
            if positive(details.get("interval_s")):
                app.heartbeat_every = float(details["interval_s"])
            for b in details.get("backends") or ():
                if isinstance(b, dict) and isinstance(b.get("address"), str):
                    self._set_backend(app, b["address"], str(b.get("state") or "unknown"), event.timestamp)
        elif component == Component.NODE:
            self._node(app, instance, event_type, details, heard)
        elif component == Component.GATEWAY and event_type == GatewayEvent.REQUEST:
            self._gateway(instance, details)
        if now >= self._next_sweep:
            self.sweep(now)

    # ------------------------------------------------------------ staying bounded

    def sweep(self, now: float) -> None:
        """Forget apps and nodes nobody heard of for FORGET_AFTER (or 4 of their heartbeat
        intervals, if longer), then the least recently heard beyond MAX_APPS / MAX_NODES."""
        self._next_sweep = now + SWEEP_EVERY
        for instance, app in list(self.apps.items()):
            every = app.expected_interval() or 0.0
            if now - app.heard > max(FORGET_AFTER, 4 * every):
                self._forget_app(instance)
        for instance in sorted(self.apps, key=lambda i: self.apps[i].heard)[:max(0, len(self.apps) - MAX_APPS)]:
            self._forget_app(instance)
        for address, node in list(self.nodes.items()):
            if now - node.heard > max(FORGET_AFTER, 4 * (node.interval or 0.0)):
                self._forget_node(address)
        for address in sorted(self.nodes, key=lambda a: self.nodes[a].heard)[:max(0, len(self.nodes) - MAX_NODES)]:
            self._forget_node(address)

    def _forget_app(self, instance: str) -> None:
        del self.apps[instance]
        self.gaps.forget(instance)
        for counter in (self.requests, self.restarts, self.dropped):
            counter.pop(instance, None)
        self.gateway_queue.pop(instance, None)
        keyed: tuple[dict[Any, Any], ...] = (self.tokens, self.gateway_requests, self.first_token)
        for series in keyed:
            for key in [k for k in series if k[0] == instance]:
                del series[key]
        self.forgotten["app"] += 1

    def _forget_node(self, address: str) -> None:
        del self.nodes[address]
        self.forgotten["node"] += 1

    def _coordinator(self, app: App, instance: str, event_type: str, details: dict[str, Any]) -> None:
        state = details.get("state")
        app.coordinator = state if isinstance(state, str) else COORDINATOR_STATES.get(event_type, app.coordinator)
        if event_type == CoordinatorEvent.INFERENCE:
            app.coordinator = "running"
            self.requests[instance] += 1
            self.tokens[(instance, "prompt")] += int(number(details.get("prompt_tokens")) or 0)
            self.tokens[(instance, "generated")] += int(number(details.get("generated_tokens")) or 0)
        elif event_type == CoordinatorEvent.STARTING and details.get("reason") in ("restart", "failover"):
            self.restarts[instance] += 1     # after a crash, or on the survivors after losing a backend
        if event_type in (CoordinatorEvent.START, ModelEvent.LOAD) and isinstance(details.get("devices"), dict):
            app.model_memory = {}
            for backend, d in details["devices"].items():
                if isinstance(d, dict):
                    for kind in BUFFERS:
                        mib = number(d.get(f"{kind}_mib"))
                        if mib is not None:
                            app.model_memory[(str(backend), kind)] = mib
        if event_type in (CoordinatorEvent.STOP, CoordinatorEvent.FATAL):
            app.model_memory = {}

    def _gateway(self, instance: str, details: dict[str, Any]) -> None:
        """One request through an app's gateway, as it ended (typed by the schema: counts, numbers)."""
        api = details.get("api") if details.get("api") in GATEWAY_APIS else "other"
        status = details.get("status") if details.get("status") in GATEWAY_STATUSES else "other"
        self.gateway_requests[(instance, str(api), str(status))] += 1
        depth = number(details.get("queue_depth"))
        if depth is not None:
            self.gateway_queue[instance] = int(depth)
        first = number(details.get("first_token_s"))
        if first is not None and first >= 0:
            series = self.first_token.get((instance, str(api)))
            if series is None:
                series = self.first_token[(instance, str(api))] = Histogram(FIRST_TOKEN_BUCKETS)
            series.observe(first)

    def _backend(self, app: App, event_type: str, details: dict[str, Any], when: float) -> None:
        address = details.get("address")
        if not isinstance(address, str):
            return
        if event_type == BackendEvent.REMOVED:
            app.backends.pop(address, None)
            return
        state = {BackendEvent.CONNECT: "up", BackendEvent.DISCONNECT: "down", BackendEvent.ADDED: "unknown"}.get(
            event_type)
        if state is not None:
            given = details.get("state")
            self._set_backend(app, address, given if isinstance(given, str) else state, when)

    @staticmethod
    def _set_backend(app: App, address: str, state: str, when: float) -> None:
        known = app.backends.get(address)
        if known is None or known[1] != state:
            app.backends[address] = (when, state)

    def _node(self, app: App, instance: str, event_type: str, details: dict[str, Any], heard: float) -> None:
        address = details.get("address")
        if not isinstance(address, str):
            return
        node = self.nodes.get(address)
        if node is None:
            node = self.nodes[address] = Node()
        node.instance, node.heard = instance, max(node.heard, heard)
        if isinstance(details.get("state"), str):
            node.state = details["state"]
        if event_type == NodeEvent.NODE_DOWN:
            node.state = "down"
            app.unregistered = True      # a node that left is stopped, as a shell that said goodbye
        if isinstance(details.get("devices"), list):
            node.devices = [d for d in details["devices"] if isinstance(d, dict)]
        if number(details.get("memory_offered_mib")) is not None:
            node.offered_mib = number(details["memory_offered_mib"])
        if number(details.get("cache_bytes")) is not None:
            node.cache_bytes = number(details["cache_bytes"])
        if isinstance(details.get("host"), dict) and isinstance(details["host"].get("id"), str):
            node.host = details["host"]       # typed by the schema: id and name labels, MiB figures in range
        if positive(details.get("interval_s")):
            node.interval = app.heartbeat_every = float(details["interval_s"])

    # ------------------------------------------------------------ the text format

    def _hosts(self, out: Exposition) -> None:
        """The machines the nodes run on, each counted once however many nodes share it: summing
        the node_memory families over nodes on one machine would count its memory twice."""
        hosts: dict[str, list[tuple[str, Node, dict[str, Any]]]] = {}
        for address, node in self.nodes.items():
            if node.host is not None:
                hosts.setdefault(label_text(node.host["id"]), []).append((address, node, node.host))
        out.family("synapticllamas_node_host_info", "gauge", "The machine a node runs on (its host id)")
        for ident, on in sorted(hosts.items()):
            for address, _, h in sorted(on, key=lambda x: x[0]):
                out.sample("synapticllamas_node_host_info",
                           {"node": address, "host": ident, "host_name": label_text(h.get("name"))}, 1)
        out.family("synapticllamas_host_nodes", "gauge", "Nodes on one machine (they share its memory and CPUs)")
        for ident, on in sorted(hosts.items()):
            out.sample("synapticllamas_host_nodes", {"host": ident}, len(on))
        # the node heard last speaks for its machine
        newest = {ident: max(on, key=lambda x: x[1].heard)[2] for ident, on in hosts.items()}
        for name, key, what in (
                ("synapticllamas_host_memory_total_bytes", "mem_total_mib", "A machine's memory, counted once"),
                ("synapticllamas_host_memory_available_bytes", "mem_available_mib",
                 "A machine's available memory as its newest node announced it, counted once")):
            out.family(name, "gauge", what)
            for ident, h in sorted(newest.items()):
                if number(h.get(key)) is not None:
                    out.sample(name, {"host": ident}, round(float(h[key]) * MIB))
        out.family("synapticllamas_host_cpus", "gauge",
                   "A machine's CPU share: the cores its nodes may use, the cgroup quota applied")
        for ident, h in sorted(newest.items()):
            if positive(h.get("cpus")) is not None:
                out.sample("synapticllamas_host_cpus", {"host": ident}, float(h["cpus"]))

    def render(self, redis_up: bool, invalid: dict[str, int] | None = None) -> str:
        """The exposition. Every family's samples follow its HELP and TYPE (Exposition refuses
        anything else). The app's label is `app_instance`: `instance` is the label Prometheus sets
        to the scraped target, and would rename ours to exported_instance."""
        now = time.time()
        self.sweep(now)
        out = Exposition()
        shells = {i: a for i, a in self.apps.items() if a.app != NODE_APP}
        states = {i: a.state(now) for i, a in shells.items()}
        out.family("synapticllamas_apps", "gauge", "Live apps (shells whose heartbeats arrive on time)")
        out.sample("synapticllamas_apps", {}, sum(s == "live" for s in states.values()))
        out.family("synapticllamas_app_info", "gauge", "Every app the dashboard heard of, with its state")
        for instance, a in sorted(shells.items()):
            r = a.registration
            out.sample("synapticllamas_app_info", {"app_instance": instance, "app": a.app, "state": states[instance],
                                                   "mode": label_text(r.get("mode")),
                                                   "version": label_text(r.get("version"))}, 1)
        out.family("synapticllamas_coordinator_up", "gauge", "1 while the app's coordinator (llama-server) runs")
        for instance, a in sorted(shells.items()):
            if a.coordinator is not None:
                up = a.coordinator == "running" and states[instance] != "stopped"
                out.sample("synapticllamas_coordinator_up", {"app_instance": instance}, int(up))
        out.family("synapticllamas_backends", "gauge", "RPC backends of the apps not stopped, by state")
        latest: dict[str, tuple[float, str]] = {}
        for instance, a in shells.items():
            if states[instance] != "stopped":
                for address, seen in a.backends.items():
                    if address not in latest or seen[0] >= latest[address][0]:
                        latest[address] = seen
        by_state = Counter(state for _, state in latest.values())
        for state in sorted(set(by_state) | {"up", "down"}):
            out.sample("synapticllamas_backends", {"state": state}, by_state[state])
        out.family("synapticllamas_model_memory_bytes", "gauge",
                   "Memory the loaded model uses per backend or device (model, KV cache, compute, output buffers)")
        for instance, a in sorted(shells.items()):
            if a.coordinator == "running" and states[instance] != "stopped":
                for (backend, kind), mib in sorted(a.model_memory.items()):
                    out.sample("synapticllamas_model_memory_bytes",
                               {"app_instance": instance, "backend": backend, "kind": kind}, round(mib * MIB))

        out.family("synapticllamas_events_total", "counter", "Events received, by component and level")
        for (component, level), n in sorted(self.events.items()):
            out.sample("synapticllamas_events_total", {"component": component, "level": level}, n)
        gaps = sorted(self.gaps.items())
        # confirmed gaps only (events/gaps.py): a gap one forged event made is dropped, and a counter never goes back
        out.family("synapticllamas_events_lost_total", "counter",
                   "Events an app created and kept that never arrived (dropped in an outage, or trimmed from the journal)")
        for instance, t in gaps:
            out.sample("synapticllamas_events_lost_total", {"app_instance": instance}, t.confirmed_lost)
        out.family("synapticllamas_events_sampled_total", "counter",
                   "Events an app left out by sampling on purpose (SOLLOL_OBSERVER_SAMPLE_RATE): not lost")
        for instance, t in gaps:
            out.sample("synapticllamas_events_sampled_total", {"app_instance": instance}, t.confirmed_sampled)
        out.family("synapticllamas_events_dropped_total", "counter",
                   "Events apps reported dropping from their outage buffer (system/events_dropped)")
        for instance, n in sorted(self.dropped.items()):
            out.sample("synapticllamas_events_dropped_total", {"app_instance": instance}, n)
        out.family("synapticllamas_inference_requests_total", "counter",
                   "Requests llama-server finished (coordinator/inference events), whoever sent them")
        for instance, n in sorted(self.requests.items()):
            out.sample("synapticllamas_inference_requests_total", {"app_instance": instance}, n)
        out.family("synapticllamas_inference_tokens_total", "counter", "Tokens of finished requests, by kind")
        for (instance, kind), n in sorted(self.tokens.items()):
            out.sample("synapticllamas_inference_tokens_total", {"app_instance": instance, "kind": kind}, n)
        out.family("synapticllamas_coordinator_restarts_total", "counter",
                   "Automatic coordinator restarts: after a crash or a lost backend (coordinator/starting with "
                   "reason restart or failover)")
        for instance, a in sorted(shells.items()):
            if a.coordinator is not None or self.restarts[instance]:
                out.sample("synapticllamas_coordinator_restarts_total", {"app_instance": instance},
                           self.restarts[instance])

        out.family("synapticllamas_gateway_requests_total", "counter",
                   "Requests an app's gateway (its OpenAI/Ollama endpoint, ask, chat) finished, by API and status "
                   "(gateway/request events; other values count as other)")
        for (instance, api, status), n in sorted(self.gateway_requests.items()):
            out.sample("synapticllamas_gateway_requests_total",
                       {"app_instance": instance, "api": api, "status": status}, n)
        out.family("synapticllamas_gateway_queue_depth", "gauge",
                   "Requests waiting in an app's gateway when its last request ended (0 once the app stopped)")
        for instance, depth in sorted(self.gateway_queue.items()):
            stopped = instance in shells and states[instance] == "stopped"
            out.sample("synapticllamas_gateway_queue_depth", {"app_instance": instance}, 0 if stopped else depth)
        out.family("synapticllamas_gateway_first_token_seconds", "histogram",
                   "Seconds from a request's arrival at the gateway to its first text (queue and prompt included)")
        for (instance, api), series in sorted(self.first_token.items()):
            series.write(out, "synapticllamas_gateway_first_token_seconds", {"app_instance": instance, "api": api})

        out.family("synapticllamas_node_up", "gauge", "1 while the node's rpc-server is up and its heartbeats arrive")
        for address, node in sorted(self.nodes.items()):
            out.sample("synapticllamas_node_up", {"node": address}, int(node.up(now)))
        devices = [(address, d) for address, node in sorted(self.nodes.items()) for d in node.devices]
        out.family("synapticllamas_node_memory_total_bytes", "gauge", "A node device's memory, as rpc-server reports it")
        for address, d in devices:
            if number(d.get("total_mib")) is not None:
                out.sample("synapticllamas_node_memory_total_bytes", {"node": address, "device": label_text(d.get("name"))},
                           round(float(d["total_mib"]) * MIB))
        out.family("synapticllamas_node_memory_free_bytes", "gauge", "A node device's free memory when rpc-server started")
        for address, d in devices:
            if number(d.get("free_mib")) is not None:
                out.sample("synapticllamas_node_memory_free_bytes", {"node": address, "device": label_text(d.get("name"))},
                           round(float(d["free_mib"]) * MIB))
        out.family("synapticllamas_node_memory_offered_bytes", "gauge", "Memory a node offers to placements (--memory)")
        for address, node in sorted(self.nodes.items()):
            if node.offered_mib is not None:
                out.sample("synapticllamas_node_memory_offered_bytes", {"node": address}, round(node.offered_mib * MIB))
        out.family("synapticllamas_node_cache_bytes", "gauge", "Size of a node's rpc-server tensor cache")
        for address, node in sorted(self.nodes.items()):
            if node.cache_bytes is not None:
                out.sample("synapticllamas_node_cache_bytes", {"node": address}, node.cache_bytes)
        self._hosts(out)

        out.family("synapticllamas_dashboard_redis_up", "gauge", "1 while the dashboard's subscription to Redis works")
        out.sample("synapticllamas_dashboard_redis_up", {}, int(redis_up))
        out.family("synapticllamas_dashboard_events_observed_total", "counter",
                   "Events this dashboard process counted (journal and live feed, repeats dropped)")
        out.sample("synapticllamas_dashboard_events_observed_total", {}, self.observed)
        out.family("synapticllamas_dashboard_messages_invalid_total", "counter",
                   "Messages from Redis that are not valid events (the event schema refused them) and were skipped, "
                   "by where they came from")
        for where, n in sorted((invalid or {"journal": 0, "pubsub": 0}).items()):
            out.sample("synapticllamas_dashboard_messages_invalid_total", {"source": where}, n)
        out.family("synapticllamas_dashboard_forgotten_total", "counter",
                   "Apps and nodes the metrics forgot (silent for an hour, or beyond the bound), with their series")
        for kind in ("app", "node"):
            out.sample("synapticllamas_dashboard_forgotten_total", {"kind": kind}, self.forgotten[kind])
        out.family("process_start_time_seconds", "gauge",
                   "When this dashboard process started (Unix time): counters restart from the journal after it")
        out.sample("process_start_time_seconds", {}, round(self.started, 3))
        return out.text()


def label_text(value: Any) -> str:
    """A registration's free-form field as a label value: text only, short."""
    return value[:128] if isinstance(value, str) else ""


class Exposition:
    """The Prometheus text format (0.0.4): HELP and TYPE once per family, then its samples, and only
    its samples: a sample of another family here would be read as part of this one (or untyped)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.current: str | None = None
        self.names: frozenset[str] = frozenset()  # the sample names the current family may write
        self.families: set[str] = set()

    def family(self, name: str, kind: str, help_text: str) -> None:
        if name in self.families:
            raise ValueError(f"metric family {name} written twice")
        self.families.add(name)
        self.current = name
        suffixes = ("_bucket", "_sum", "_count") if kind == "histogram" else ("",)
        self.names = frozenset(name + suffix for suffix in suffixes)
        self.lines.append(f"# HELP {name} {help_text.replace(chr(92), chr(92) * 2).replace(chr(10), ' ')}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, labels: dict[str, str], value: float) -> None:
        if name not in self.names:
            raise ValueError(f"a sample of {name} under the family {self.current}: group each family's samples")
        shown = str(int(value)) if float(value).is_integer() else repr(float(value))   # exact, never 1.7e+09
        if labels:
            inner = ",".join(f'{k}="{escape(v)}"' for k, v in labels.items())
            self.lines.append(f"{name}{{{inner}}} {shown}")
        else:
            self.lines.append(f"{name} {shown}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
