"""The event contract: one JSON object per event, published once on its component's channel.

See docs/EVENTS.md for the field list and every event type. The first five fields are the
reference document's; `level`, `source`, `seq` and `sampled` are ours (a subscriber sees gaps in
seq, and `sampled` says how many of them sampling made: the rest were lost).
"""
from __future__ import annotations

import json
import os
import secrets
import socket
from dataclasses import dataclass, field
from typing import Any


class Component:
    COORDINATOR = "coordinator"
    RPC_BACKEND = "rpc_backend"
    RPC_REGISTRY = "rpc_registry"
    MODEL = "model"
    SYSTEM = "system"
    RAW = "raw"
    NODE = "node"
    GATEWAY = "gateway"


# Event types, per component. Emitters, the shell's notices and the dashboard page (served as
# /contract.js) all name types through these, so a renamed type cannot leave a reader behind.
class CoordinatorEvent:
    STARTING = "starting"
    START = "start"
    STOPPING = "stopping"
    STOP = "stop"
    BACKOFF = "backoff"
    FATAL = "fatal"
    HEARTBEAT = "heartbeat"
    INFERENCE = "inference"
    WAITING = "waiting"
    FAILOVER = "failover"
    REBALANCE = "rebalance"


class ModelEvent:
    LOADING = "model_loading"
    LOAD = "model_load"
    LOAD_FAILED = "model_load_failed"


class BackendEvent:
    ADDED = "added"
    REMOVED = "removed"
    CONNECT = "connect"
    DISCONNECT = "disconnect"
    LINK_OPEN = "link_open"            # an encrypted link to a node passed its check (trust/links.py)
    LINK_FAILED = "link_failed"        # it did not (wrong key, not a link, nobody there), or later refused
    LINK_CLOSED = "link_closed"        # its stunnel ended without being asked to


class RegistryEvent:
    HEARTBEAT = "heartbeat"
    DUPLICATE = "duplicate"
    FILE_ERROR = "file_error"
    ANNOUNCEMENT_IGNORED = "announcement_ignored"   # unsigned, another key, replayed (trust/announcements.py)


class SystemEvent:
    REGISTER = "register"
    UNREGISTER = "unregister"
    REDIS_ON = "redis_on"
    REDIS_OFF = "redis_off"
    REDIS_CONNECTED = "redis_connected"
    REDIS_DISCONNECTED = "redis_disconnected"
    EVENTS_DROPPED = "events_dropped"
    ERROR = "error"


class RawEvent:
    LOG = "log"


class NodeEvent:
    NODE_UP = "node_up"
    NODE_DOWN = "node_down"
    RPC_SERVER_EXIT = "rpc_server_exit"
    RPC_SERVER_RESTART = "rpc_server_restart"
    HEARTBEAT = "heartbeat"
    INSECURE = "insecure"              # started with --insecure: rpc-server open to whoever reaches it


class GatewayEvent:
    LISTENING = "listening"            # the endpoint is open (its URL), or could not be (port taken)
    REQUEST = "request"                # one per request, when it ends: api, status, waits, tokens


def _values(namespace: type) -> tuple[str, ...]:
    return tuple(v for k, v in vars(namespace).items() if k.isupper())


COMPONENTS = _values(Component)
EVENT_TYPES: dict[str, tuple[str, ...]] = {
    Component.COORDINATOR: _values(CoordinatorEvent),
    Component.MODEL: _values(ModelEvent),
    Component.RPC_BACKEND: _values(BackendEvent),
    Component.RPC_REGISTRY: _values(RegistryEvent),
    Component.SYSTEM: _values(SystemEvent),
    Component.RAW: _values(RawEvent),
    Component.NODE: _values(NodeEvent),
    Component.GATEWAY: _values(GatewayEvent),
}
LEVELS = ("debug", "info", "warning", "error", "critical")
LEVEL_RANK = {name: rank for rank, name in enumerate(LEVELS)}

CHANNEL_PREFIX = "synapticllamas:llama_cpp:"
CHANNEL_PATTERN = CHANNEL_PREFIX + "*"      # what the dashboard and `redis-cli psubscribe` use
JOURNAL_STREAM = "synapticllamas:events"    # capped stream: late subscribers replay from it
JOURNAL_FIELD = "event"                     # each journal entry holds the event JSON in this field
APPS_HASH = "synapticllamas:apps"           # instance id -> registration JSON
NODES_HASH = "synapticllamas:nodes"         # a node's HOST:PORT -> its registration JSON
MAX_MESSAGE_CHARS = 65536                   # an event's message; longer ones are cut (events/schema.py)


def channel_for(component: str) -> str:
    return CHANNEL_PREFIX + component


def instance_id(host: str | None = None, pid: int | None = None) -> str:
    """`HOST:PID:RANDOM`, e.g. `worker1:4242:3fa9c1e0`: host and pid for people, and 32 random bits,
    because `HOST:PID` alone is not unique: two containers named after their host both run as PID 1,
    and would share one apps entry and one last_seq key (one then drops its own unsent batch as
    "already sent"). One value per process and publisher source; readers never parse it."""
    host = socket.gethostname() if host is None else host
    return f"{host}:{os.getpid() if pid is None else pid}:{secrets.token_hex(4)}"


def default_source(app: str = "synapticllamas") -> dict[str, str]:
    host = socket.gethostname()
    return {"app": app, "instance": instance_id(host), "host": host}


@dataclass(slots=True)
class Event:
    timestamp: float
    component: str
    event_type: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)
    level: str = "info"
    source: dict[str, str] = field(default_factory=dict)
    seq: int = 0
    # events this instance sampled out before this one, a running total (None: the publisher did
    # not say). seq - sampled counts kept events only, so a reader tells sampling from loss.
    sampled: int | None = 0

    @property
    def channel(self) -> str:
        return CHANNEL_PREFIX + self.component

    def to_dict(self) -> dict[str, Any]:
        return {
            "timestamp": self.timestamp,
            "component": self.component,
            "event_type": self.event_type,
            "message": self.message,
            "details": self.details,
            "level": self.level,
            "source": self.source,
            "seq": self.seq,
            "sampled": self.sampled,
        }

    def to_json(self) -> str:
        # default=str: a stray Path or exception in details must not lose the event; no NaN or
        # Infinity (not JSON: readers refuse them), ValueError instead (the publisher fits those)
        return json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=False, default=str, allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Event:
        """Every field checked by the schema (events/schema.py); raises schema.Invalid (a ValueError)."""
        from synapticllamas.events.schema import event_from_dict

        return event_from_dict(data)

    @classmethod
    def from_json(cls, text: str | bytes) -> Event:
        """One published event, decoded and checked by the schema; raises schema.Invalid (a ValueError)."""
        from synapticllamas.events.schema import decode_event

        return decode_event(text)
