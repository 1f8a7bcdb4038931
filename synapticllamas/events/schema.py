"""The one decoder for what comes from outside: events (pub/sub, the journal) and the registrations
in the apps and nodes hashes. Every reader goes through it: Event.from_json, the terminal viewer,
the dashboard's hub and metrics, node discovery, `backends discover`; the page's script applies the
same rules, which it gets from /contract.js (`rules()` below).

Anyone who can write to the shared Redis can send anything, so a message is checked whole before
any reader looks at a field:

- sizes first: the payload (MAX_PAYLOAD_BYTES), the message, every string, list and object in
  `details`, how deep it nests and how many values it holds;
- the fields: numbers finite and in range (timestamp, seq, sampled), text where text is expected,
  identifiers (component, event type, level, source) short and printable;
- typed details for the event types readers compute with (DETAILS): a node event's `address` goes
  through the address parser (and comes out as a BackendId), `devices` is a list of
  {name, description, total_mib, free_mib}, `rpc_version` a short printable string, intervals
  positive, MiB figures in range... A typed field may be null or absent; other fields only obey
  the size limits.

A message that fails is an Invalid (a ValueError whose text is one line: where and what), which the
reader counts (Tally) and skips; nothing is fatal. `message` and free text in details are not
restricted to printable characters (llama.cpp's lines are data): a terminal shows them through
util/text.safe(), the page through textContent.

What our own publisher writes always decodes: Observer.emit() cuts long messages and the publisher
fits oversized details (fit()) before sending.
"""
from __future__ import annotations

import json
import math
import re
import unicodedata
from collections import Counter
from functools import lru_cache
from typing import Any

from synapticllamas.events.contract import LEVELS, MAX_MESSAGE_CHARS, Event

# ---------------------------------------------------------------- limits (exported to the page)

MAX_PAYLOAD_BYTES = 1 << 20      # one event, or one hash value, as JSON
# MAX_MESSAGE_CHARS (contract.py): an event's message; the observer cuts a longer one (a raw llama.cpp line)
MAX_STRING_CHARS = 65536         # any string inside details
MAX_KEY_CHARS = 256              # any key inside details
MAX_LIST_ITEMS = 1024            # any list inside details
MAX_OBJECT_KEYS = 1024           # any object inside details
MAX_DEPTH = 8                    # details -> placement -> [i] -> ... at most this many levels
MAX_VALUES = 20000               # values in details, all levels together
MAX_NAME_CHARS = 128             # source fields, labels (device names, host names)
MAX_TEXT_CHARS = 1024            # short free text a reader shows (a device's description, a reason)
MAX_VERSION_CHARS = 64
MAX_SEQ = 2**53 - 1              # the largest integer a browser holds exactly (Number.MAX_SAFE_INTEGER)
MAX_TIMESTAMP = 4102444800.0     # 2100-01-01 UTC: beyond it no clock, Python's or the browser's, is meant
MAX_NUMBER = 1e15                # any other typed figure
MAX_ANY_NUMBER = 1e21            # any number at all (a browser prints larger ones in exponent form)
MAX_MIB = 2**40                  # a MiB figure (an exbibyte)
IDENTIFIER = r"^[a-z][a-z0-9_]{0,63}$"          # component, event type (ours and any future one)
STATE = r"^[a-z][a-z_-]{0,31}$"                 # up, down, running, restarting, gave-up...
VERSION = r"^[!-~]{1,64}$"                      # printable ASCII, no space: 7.0.0, 0.1.0+abc

_IDENTIFIER, _STATE, _VERSION = re.compile(IDENTIFIER), re.compile(STATE), re.compile(VERSION)
# not shown as text: controls, format characters (bidi overrides), surrogates, private use,
# unassigned, line and paragraph separators
UNPRINTABLE_CATEGORIES = ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")


class Invalid(ValueError):
    """Why a message is not a valid event or registration: `where` (a field path such as
    `details.devices[0].name`, or `json`, `size`) and one line of text."""

    def __init__(self, where: str, what: str) -> None:
        super().__init__(f"{where}: {what}" if where else what)
        self.where = where


# ---------------------------------------------------------------- typed details

# Shapes: objects with typed fields (other keys are allowed and only size-checked).
SHAPES: dict[str, dict[str, str]] = {
    "device": {"name": "label", "description": "text", "total_mib": "mib", "free_mib": "mib"},
    "backend_state": {"address": "address", "state": "state", "latency_ms": "number", "failures": "count",
                      "local": "bool", "in_use": "bool"},
    "buffers": {"total_mib": "mib", "free_mib": "mib", "model_mib": "mib", "kv_mib": "mib", "compute_mib": "mib",
                "output_mib": "mib"},
    "cache": {"enabled": "bool", "dir": "text", "bytes": "count", "max_bytes": "count"},
    "publisher": {"run": "label", "generation": "count"},
    # a node's machine (util/host.py): nodes with one id share its memory and CPUs
    "host": {"id": "label", "id_source": "label", "name": "label", "cpus": "positive", "mem_total_mib": "mib",
             "mem_available_mib": "mib"},
    # its device's speed as llama-bench measured it (llama/speed.py): ns per byte of weights per type
    "speed": {"ns_per_byte": "shape:ns_per_byte", "layer_ns": "number", "threads": "count", "cpus": "positive",
              "repack": "bool", "repack_failed": "text", "seconds": "number", "measured_at": "timestamp"},
    "ns_per_byte": {"F16": "positive", "Q8_0": "positive", "Q6_K": "positive", "Q4_K": "positive"},
}

REGISTRATION: dict[str, str] = {
    "app": "label", "instance": "label", "host": "label", "pid": "count", "pid_ns": "label", "version": "version",
    "mode": "state", "started_at": "timestamp", "heartbeat_interval": "positive", "backend_heartbeat": "bool",
    "backend_heartbeat_interval": "positive", "sampling": "bool", "sample_rate": "number",
    "publisher": "shape:publisher", "seq": "count",
}
NODE_REGISTRATION: dict[str, str] = {
    "address": "address", "hostname": "label", "instance": "label", "pid": "count", "pid_ns": "label",
    "rpc_pid": "count", "version": "version", "rpc_version": "version", "devices": "list:device",
    "memory_offered_mib": "mib", "threads": "count", "state": "state", "cache": "shape:cache",
    "started": "timestamp", "heartbeat_interval": "positive", "last_heartbeat": "timestamp", "restarts": "count",
    "publisher": "shape:publisher", "host": "shape:host", "speed": "shape:speed", "speed_note": "text",
    "seq": "count", "link": "state",
}
_NODE_EVENT = {
    "address": "address", "state": "state", "interval_s": "positive", "rpc_version": "version",
    "devices": "list:device", "memory_offered_mib": "mib", "cache_bytes": "count", "rpc_pid": "count",
    "threads": "count", "restarts": "count", "tries": "count", "uptime_s": "number", "latency_ms": "number",
    "delay_s": "number", "exit_code": "number", "signal": "label", "reason": "state",
    "host": "shape:host", "speed": "shape:speed", "speed_note": "text", "link": "state", "link_refused": "count",
}
_COORDINATOR = {
    "state": "state", "from_state": "state", "pid": "count", "tries": "count", "port": "port", "restarts": "count",
    "uptime_s": "number", "load_s": "number", "interval_s": "positive", "rpc_backends": "list:address",
    "devices": "map:buffers",
}

# What readers compute with, per component and event type ("*": every type of the component).
DETAILS: dict[str, dict[str, dict[str, str]]] = {
    "node": {"*": _NODE_EVENT},
    "rpc_backend": {"*": {"address": "address", "state": "state", "from_state": "state", "latency_ms": "number",
                          "failures": "count", "local": "bool"}},
    "rpc_registry": {"heartbeat": {"interval_s": "positive", "backends": "list:backend_state",
                                   "total_configured": "count", "total_active": "count"}},
    "coordinator": {"*": _COORDINATOR,
                    "inference": dict(_COORDINATOR, prompt_tokens="count", generated_tokens="count",
                                      prompt_ms="number", generation_ms="number", total_ms="number",
                                      tokens_per_second="number", slot="count", task="count")},
    "model": {"*": {"pid": "count", "step": "count", "steps": "count", "percent": "number",
                    "rpc_backends": "list:address", "devices": "map:buffers"}},
    "gateway": {"*": {"api": "state", "kind": "state", "model": "label", "status": "state", "http_status": "count",
                      "queue_depth": "count", "in_flight": "count", "queue_s": "number", "first_token_s": "number",
                      "seconds": "number", "prompt_tokens": "count", "tokens": "count", "tokens_per_s": "number",
                      "held": "count", "resumed": "count", "messages": "count", "port": "port", "url": "text"}},
    "system": {"register": REGISTRATION,
               "events_dropped": {"dropped": "count", "total_dropped": "count", "buffer_limit": "count"}},
}


# which (component, event_type) have typed details: a raw line, the bulk of any stream, has none
TYPED_COMPONENTS = frozenset(c for c, per in DETAILS.items() if "*" in per)
TYPED_TYPES = frozenset((c, t) for c, per in DETAILS.items() for t in per if t != "*")


def details_spec(component: str, event_type: str) -> dict[str, str]:
    per = DETAILS.get(component)
    if per is None:
        return {}
    return per.get(event_type) or per.get("*") or {}


# ---------------------------------------------------------------- checks of one value

def printable(text: str) -> bool:
    """No control, format (bidi), surrogate, private, unassigned or separator characters."""
    if text.isprintable():       # fast and stricter (it also refuses non-ASCII spaces)
        return True
    return not any(unicodedata.category(ch) in UNPRINTABLE_CATEGORIES for ch in text)


def _short(value: Any) -> str:
    """A bad value quoted in a reason: repr, cut, so a reason stays one short printable line."""
    text = repr(value)
    text = text if len(text) <= 40 else text[:37] + "..."
    return text.encode("unicode_escape").decode("ascii") if not text.isascii() or not text.isprintable() else text


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _integer(value: Any, where: str, low: int, high: int) -> int:
    integral = _is_number(value) and (isinstance(value, int) or (math.isfinite(value) and value.is_integer()))
    if integral and low <= value <= high:
        return int(value)
    raise Invalid(where, f"{_short(value)} is not an integer from {low} to {high}")


def _float(value: Any, where: str, low: float, high: float, above: bool = False) -> float:
    if _is_number(value) and math.isfinite(value) and (value > low if above else value >= low) and value <= high:
        return float(value) if isinstance(value, float) else value
    bound = f"more than {_bound(low)}" if above else f"from {_bound(low)}"
    raise Invalid(where, f"{_short(value)} is not a number {bound} to {_bound(high)}")


def _bound(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e16 else f"{x:g}"


def _text(value: Any, where: str, limit: int, pattern: re.Pattern[str] | None = None, empty: bool = True) -> str:
    if not isinstance(value, str):
        raise Invalid(where, f"{_short(value)} is not a string")
    if len(value) > limit:
        raise Invalid(where, f"a string of {len(value)} characters; at most {limit}")
    if pattern is not None and not pattern.fullmatch(value):
        raise Invalid(where, f"{_short(value)} does not match {pattern.pattern}")
    if not empty and not value:
        raise Invalid(where, "an empty string")
    if not printable(value):
        raise Invalid(where, f"{_short(value)} holds characters that cannot be shown (control or format characters)")
    return value


def _address(value: Any, where: str) -> Any:
    if not isinstance(value, str) or len(value) > 300:
        raise Invalid(where, f"{_short(value)} is not a HOST:PORT address")
    try:
        return _parsed_address(value)
    except ValueError as exc:
        raise Invalid(where, str(exc)) from None


@lru_cache(maxsize=4096)    # the same few addresses come in every heartbeat; failures are not cached
def _parsed_address(value: str) -> Any:
    from synapticllamas.rpc.addresses import backend_id

    if type(value) is not str:        # a BackendId is normal already (and must not be cached as a str)
        return backend_id(value)
    if ":" not in value.strip().lstrip("[").split("]")[-1]:
        raise ValueError(f"{_short(value)} has no port; expected HOST:PORT")
    return backend_id(value)


def _kind(kind: str, value: Any, where: str, write: bool = True) -> Any:
    """`value` checked against `kind` (see SHAPES, DETAILS); returns it (an address normalised;
    with `write`, objects inside are normalised in place)."""
    if kind == "count":
        return _integer(value, where, 0, MAX_SEQ)
    if kind == "port":
        return _integer(value, where, 1, 65535)
    if kind == "number":
        return _float(value, where, -MAX_NUMBER, MAX_NUMBER)
    if kind == "positive":
        return _float(value, where, 0, MAX_NUMBER, above=True)
    if kind == "mib":
        return _float(value, where, 0, MAX_MIB)
    if kind == "timestamp":
        return _float(value, where, 0, MAX_TIMESTAMP)
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise Invalid(where, f"{_short(value)} is not true or false")
    if kind == "state":
        return _text(value, where, 32, _STATE)
    if kind == "label":
        return _text(value, where, MAX_NAME_CHARS)
    if kind == "text":
        return _text(value, where, MAX_TEXT_CHARS)
    if kind == "version":
        return _text(value, where, MAX_VERSION_CHARS, _VERSION)
    if kind == "address":
        return _address(value, where)
    how, _, inner = kind.partition(":")
    if how == "list":
        if not isinstance(value, (list, tuple)):    # a tuple: one of our own events, before its JSON
            raise Invalid(where, f"{_short(value)} is not a list")
        element = f"shape:{inner}" if inner in SHAPES else inner     # list:device, list:address
        return [_kind(element, item, f"{where}[{i}]", write) for i, item in enumerate(value)]
    if how == "map":
        if not isinstance(value, dict):
            raise Invalid(where, f"{_short(value)} is not an object")
        return {_text(k, f"{where} key", MAX_NAME_CHARS): _kind(f"shape:{inner}", v, f"{where}.{k}", write)
                for k, v in value.items()}
    if how == "shape":
        return _fields(SHAPES[inner], value, where, write)
    raise AssertionError(f"unknown kind {kind!r}")


def _fields(spec: dict[str, str], value: Any, where: str, write: bool = True) -> dict[str, Any]:
    """An object whose typed fields (in `spec`) are checked; with `write`, normalised in place (an
    address becomes its BackendId): the object is the one json.loads just made, nobody else's."""
    if not isinstance(value, dict):
        raise Invalid(where, f"{_short(value)} is not an object")
    for key, kind in spec.items():
        item = value.get(key)
        if item is not None:
            new = _kind(kind, item, f"{where}.{key}" if where else key, write)
            if write and new is not item:
                value[key] = new
    return value


def _fits(value: Any) -> bool:
    """Whether `value` is within the generic limits: the fast pass, which builds no paths."""
    stack, count = [(value, 0)], 0
    while stack:
        v, depth = stack.pop()
        count += 1
        t = type(v)
        if t is str:
            if len(v) > MAX_STRING_CHARS:
                return False
        elif t is dict:
            if depth >= MAX_DEPTH or len(v) > MAX_OBJECT_KEYS:
                return False
            for k, item in v.items():
                if len(k) > MAX_KEY_CHARS:
                    return False
                stack.append((item, depth + 1))
        elif t is list:
            if depth >= MAX_DEPTH or len(v) > MAX_LIST_ITEMS:
                return False
            stack.extend((item, depth + 1) for item in v)
        elif (t is float or t is int) and not -MAX_ANY_NUMBER <= v <= MAX_ANY_NUMBER:
            return False
    return count <= MAX_VALUES


def _sizes(value: Any, where: str) -> None:
    """The generic limits on a JSON value (details, a registration): depth, sizes, finite numbers.
    A fast pass first; the walk that says where runs only for a value that fails it."""
    if _fits(value):
        return
    budget = [MAX_VALUES]

    def walk(v: Any, path: str, depth: int) -> None:
        budget[0] -= 1
        if budget[0] < 0:
            raise Invalid(where, f"more than {MAX_VALUES} values")
        if isinstance(v, str):
            if len(v) > MAX_STRING_CHARS:
                raise Invalid(path, f"a string of {len(v)} characters; at most {MAX_STRING_CHARS}")
        elif isinstance(v, float):
            if not math.isfinite(v) or abs(v) > MAX_ANY_NUMBER:
                raise Invalid(path, f"{v!r} is not a finite number of at most {MAX_ANY_NUMBER:g}")
        elif isinstance(v, dict):
            if depth >= MAX_DEPTH:
                raise Invalid(path, f"nested deeper than {MAX_DEPTH} levels")
            if len(v) > MAX_OBJECT_KEYS:
                raise Invalid(path, f"an object of {len(v)} keys; at most {MAX_OBJECT_KEYS}")
            for k, item in v.items():
                if len(k) > MAX_KEY_CHARS:
                    raise Invalid(path, f"a key of {len(k)} characters; at most {MAX_KEY_CHARS}")
                walk(item, f"{path}.{k}" if len(k) <= 40 else f"{path}.{k[:37]}...", depth + 1)
        elif isinstance(v, list):
            if depth >= MAX_DEPTH:
                raise Invalid(path, f"nested deeper than {MAX_DEPTH} levels")
            if len(v) > MAX_LIST_ITEMS:
                raise Invalid(path, f"a list of {len(v)} items; at most {MAX_LIST_ITEMS}")
            for i, item in enumerate(v):
                walk(item, f"{path}[{i}]", depth + 1)
        elif isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_ANY_NUMBER:
            raise Invalid(path, f"{_short(v)} is too large a number (at most {MAX_ANY_NUMBER:g})")

    walk(value, where, 0)


# ---------------------------------------------------------------- JSON

def _no_constant(name: str) -> Any:
    raise Invalid("json", f"{name} is not a number JSON allows")


def load_json(payload: bytes | str | bytearray | memoryview) -> Any:
    """Bytes or text -> the JSON value; Invalid for an oversized, undecodable or non-JSON payload
    (NaN, Infinity, 1e999 and 10000-digit numbers included)."""
    if isinstance(payload, memoryview):
        payload = payload.tobytes()
    if not isinstance(payload, (bytes, bytearray, str)):
        raise Invalid("json", f"expected text, got {type(payload).__name__}")
    size = len(payload) if not isinstance(payload, str) else len(payload.encode("utf-8", "surrogatepass"))
    if size > MAX_PAYLOAD_BYTES:
        raise Invalid("size", f"{size} bytes; at most {MAX_PAYLOAD_BYTES}")
    try:
        text = payload if isinstance(payload, str) else bytes(payload).decode("utf-8")
        return _DECODER.decode(text)
    except Invalid:
        raise
    except RecursionError:
        raise Invalid("json", "nested too deeply") from None
    except ValueError as exc:   # JSONDecodeError, UnicodeDecodeError, the int digits limit
        raise Invalid("json", f"not JSON ({str(exc).splitlines()[0][:80]})") from None


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise Invalid("json", f"{text[:40]} is not a finite number")
    return value


_DECODER = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite_float)   # made once: it is not cheap


# ---------------------------------------------------------------- events

def event_from_dict(data: Any) -> Event:
    """A JSON object -> Event, every field checked; Invalid says the first thing wrong."""
    if not isinstance(data, dict):
        raise Invalid("", f"not a JSON object ({type(data).__name__})")
    if "timestamp" not in data:
        raise Invalid("timestamp", "missing")
    timestamp = float(_float(data["timestamp"], "timestamp", 0, MAX_TIMESTAMP))
    for name in ("component", "event_type"):
        if name not in data:
            raise Invalid(name, "missing")
    component = _text(data["component"], "component", 64, _IDENTIFIER)
    event_type = _text(data["event_type"], "event_type", 64, _IDENTIFIER)
    message = data.get("message")
    if message is None:
        message = ""
    elif not isinstance(message, str):
        raise Invalid("message", f"{_short(message)} is not a string")
    elif len(message) > MAX_MESSAGE_CHARS:
        raise Invalid("message", f"{len(message)} characters; at most {MAX_MESSAGE_CHARS}")
    level = data.get("level")
    level = "info" if level is None else _text(level, "level", 16).lower()
    if not level.isascii() or not level.isalpha():
        raise Invalid("level", f"{_short(level)} is not a level (one of {', '.join(LEVELS)})")
    raw_source = data.get("source")
    source: dict[str, Any] = {}
    if raw_source is not None:
        if not isinstance(raw_source, dict):
            raise Invalid("source", f"{_short(raw_source)} is not an object")
        for key in ("app", "instance", "host"):
            if raw_source.get(key) is not None:
                source[key] = _text(raw_source[key], f"source.{key}", MAX_NAME_CHARS)
    seq = data.get("seq")
    seq = 0 if seq is None else _integer(seq, "seq", 0, MAX_SEQ)
    sampled = data.get("sampled")
    sampled = None if sampled is None else _integer(sampled, "sampled", 0, MAX_SEQ)
    if sampled is not None and seq and sampled >= seq:
        raise Invalid("sampled", f"{sampled} events sampled out before seq {seq}: at most {seq - 1}")
    raw_details = data.get("details")
    if raw_details is None:
        details: dict[str, Any] = {}
    elif not isinstance(raw_details, dict):
        raise Invalid("details", f"{_short(raw_details)} is not an object")
    else:
        _sizes(raw_details, "details")
        details = _fields(details_spec(component, event_type), raw_details, "details")
    return Event(timestamp, component, event_type, message, details, level, source, seq, sampled)


def check_typed(event: Event) -> None:
    """The typed details of one of our own events (Invalid if one is wrong): what the publisher
    checks on a small event, which is within every size limit by its size alone."""
    spec = details_spec(event.component, event.event_type)
    details = event.details
    for key, kind in spec.items():
        value = details.get(key)
        if value is not None:
            _kind(kind, value, f"details.{key}", write=False)   # our own dicts are not changed


def decode_event(payload: bytes | str | bytearray | memoryview) -> Event:
    """One event as published (a pub/sub message, a journal entry's field): Event, or Invalid."""
    return event_from_dict(load_json(payload))


# ---------------------------------------------------------------- registrations (the hashes)

def decode_registration(payload: bytes | str, node: bool = False) -> dict[str, Any]:
    """A value of the apps hash (or, with `node`, the nodes hash): the registration with its typed
    fields checked (a node's address normalised), or Invalid."""
    data = load_json(payload)
    if not isinstance(data, dict):
        raise Invalid("", f"not a JSON object ({type(data).__name__})")
    _sizes(data, "registration")
    return _fields(NODE_REGISTRATION if node else REGISTRATION, data, "")


def decode_node_entry(field: bytes | str, payload: bytes | str) -> tuple[Any, dict[str, Any]]:
    """One entry of the nodes hash: (its BackendId, the registration). The field is the node's
    HOST:PORT; a registration naming another address is refused (someone wrote it by hand)."""
    try:
        text = field.decode() if isinstance(field, bytes) else field
    except UnicodeDecodeError:
        raise Invalid("field", "not UTF-8") from None
    address = _address(text, "field")
    reg = decode_registration(payload, node=True)
    if reg.get("address") is not None and reg["address"] != address:
        raise Invalid("address", f"{_short(str(reg['address']))} is not the field it is stored under ({address})")
    return address, reg


# ---------------------------------------------------------------- counting what was skipped

class Tally:
    """What a reader skipped: the total, per `where` (bounded), and the last reason (one printable line)."""

    KINDS = 32

    def __init__(self) -> None:
        self.total = 0
        self.by_where: Counter[str] = Counter()
        self.last: str | None = None

    def count(self, exc: Invalid) -> None:
        self.total += 1
        where = exc.where.split("[", 1)[0].split(".", 2)
        key = ".".join(where[:2]) or "event"
        if key in self.by_where or len(self.by_where) < self.KINDS:
            self.by_where[key] += 1
        else:
            self.by_where["other"] += 1
        text = str(exc)
        self.last = text if len(text) <= 160 and printable(text) else _short(text)

    def summary(self) -> str:
        """'3 skipped (seq 2, source 1); last: seq: 1e+999 is not ...' or '' when none."""
        if not self.total:
            return ""
        kinds = ", ".join(f"{k} {n}" for k, n in self.by_where.most_common(4))
        return f"{self.total} skipped ({kinds}); last: {self.last}"

    def status(self) -> dict[str, Any]:
        return {"invalid": self.total, "invalid_by_field": dict(self.by_where), "last_invalid": self.last}


# ---------------------------------------------------------------- the writing side

def fit(value: Any, depth: int = 0, budget: list[int] | None = None) -> Any:
    """A copy of `value` within the size limits (strings, lists and objects cut, too deep replaced by
    a note, non-finite floats -> None), for a publisher whose own details grew too big: what we
    send must decode."""
    budget = budget if budget is not None else [MAX_VALUES // 2]
    budget[0] -= 1
    if budget[0] < 0:
        return None
    if isinstance(value, str):
        return value if len(value) <= MAX_STRING_CHARS else value[:MAX_STRING_CHARS - 40] + f" ... [{len(value)} chars]"
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, bool) or value is None or isinstance(value, int):
        return value if not isinstance(value, int) or abs(value) <= MAX_NUMBER else float(value)
    if depth >= MAX_DEPTH - 1:
        return f"[{type(value).__name__} nested too deeply]"
    if isinstance(value, dict):
        items = list(value.items())[:MAX_OBJECT_KEYS]
        return {str(k)[:MAX_KEY_CHARS]: fit(v, depth + 1, budget) for k, v in items}
    if isinstance(value, (list, tuple)):
        return [fit(v, depth + 1, budget) for v in list(value)[:MAX_LIST_ITEMS]]
    return fit(str(value), depth, budget)


def cut_message(message: str) -> str:
    """A message within MAX_MESSAGE_CHARS (what the observer stores and sends)."""
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    note = f" ... [cut: {len(message)} characters]"
    return message[:MAX_MESSAGE_CHARS - len(note)] + note


# ---------------------------------------------------------------- for the page (/contract.js)

def rules() -> dict[str, Any]:
    """The limits, patterns and typed details, as data: the page's script checks the same things."""
    return {
        "max_payload_bytes": MAX_PAYLOAD_BYTES, "max_message_chars": MAX_MESSAGE_CHARS,
        "max_string_chars": MAX_STRING_CHARS, "max_key_chars": MAX_KEY_CHARS, "max_list_items": MAX_LIST_ITEMS,
        "max_object_keys": MAX_OBJECT_KEYS, "max_depth": MAX_DEPTH, "max_values": MAX_VALUES,
        "max_name_chars": MAX_NAME_CHARS, "max_text_chars": MAX_TEXT_CHARS, "max_version_chars": MAX_VERSION_CHARS,
        "max_seq": MAX_SEQ, "max_timestamp": MAX_TIMESTAMP, "max_number": MAX_NUMBER, "max_mib": MAX_MIB,
        "max_any_number": MAX_ANY_NUMBER,
        "identifier": IDENTIFIER, "state": STATE, "version": VERSION,
        "unprintable_categories": list(UNPRINTABLE_CATEGORIES),
        "shapes": SHAPES, "details": DETAILS, "registration": REGISTRATION, "node_registration": NODE_REGISTRATION,
        "jump_limit": _jump_limit(),
    }


def _jump_limit() -> int:
    from synapticllamas.events.gaps import JUMP_LIMIT

    return JUMP_LIMIT
