"""Parse and normalise RPC backend addresses (`host`, `host:port`, `[::1]:50052`).

Syntax only, no DNS: the registry decides whether a name resolves. `localhost` is folded into
127.0.0.1 so the two spellings of one backend are one key (upstream counted them twice).

A backend's identity is a BackendId: the normalised `HOST:PORT` text, a str subclass made only
here (parse_address().key, backend_id()). The registry takes nothing else as a key, so every path
that names a backend (a flag, the backends file, a node's announcement, llama.cpp's log) meets
the same spelling; a plain str compares and hashes like the BackendId of the same text.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from synapticllamas.util.text import shown

DEFAULT_RPC_PORT = 50052
PORTS = "a number from 1 to 65535"
ACCEPTED = "HOST, HOST:PORT or [IPv6]:PORT with a port from 1 to 65535"
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_MADE_HERE = object()


class BackendId(str):
    """The normalised HOST:PORT of one backend. Only this module makes one (`BackendId(text)`
    raises TypeError): holding a BackendId means the text went through the parser."""

    __slots__ = ()

    def __new__(cls, text: str, _token: object = None) -> BackendId:
        if _token is not _MADE_HERE:
            raise TypeError("a BackendId is made by rpc.addresses.backend_id() or parse_address().key")
        return super().__new__(cls, text)

    def __reduce__(self) -> tuple[object, tuple[str]]:   # copy and pickle go through the parser again
        return backend_id, (str(self),)


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    @property
    def key(self) -> BackendId:
        text = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        return BackendId(text, _MADE_HERE)

    def __str__(self) -> str:
        return self.key


def parse_port(text: str) -> int:
    """A TCP port from ASCII digits only (int() also takes ' 80', '+80', '1_0' and other scripts'
    digits, and str.isdigit() says yes to '\u00b2', which int() refuses); ValueError says why."""
    if text.isascii() and text.isdecimal() and len(text) <= 5 and 1 <= int(text) <= 65535:
        return int(text)
    raise ValueError(f"port '{shown(text)}' is not valid; expected {PORTS}")


def normal_host(host: str) -> str | None:
    """An IP address or DNS name in its normal spelling (localhost -> 127.0.0.1), or None."""
    if host.lower() == "localhost":
        return "127.0.0.1"
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    if host and len(host) <= 253 and all(_LABEL.match(lbl) for lbl in labels):
        return host.rstrip(".").lower()
    return None


def parse_address(text: str, default_port: int = DEFAULT_RPC_PORT) -> Address:
    """Return the normalised Address, or raise ValueError with a one-line reason."""
    raw = text.strip()
    if not raw:
        raise ValueError(f"empty backend address; expected {ACCEPTED}")
    if raw.startswith("["):
        m = re.fullmatch(r"\[([^\]]+)\](?::(.*))?", raw)
        if not m:
            raise ValueError(f"backend address '{shown(text)}' is not valid; expected {ACCEPTED}")
        host, port_text = m.group(1), m.group(2)
    elif raw.count(":") > 1:  # bare IPv6 without a port
        host, port_text = raw, None
    else:
        host, _, port_text = raw.partition(":")
        if ":" not in raw:
            port_text = None
    normal = normal_host(host)
    if normal is None:
        raise ValueError(f"backend address '{shown(text)}' has no valid host; expected {ACCEPTED}")
    if port_text is None:
        return Address(normal, default_port)
    try:
        return Address(normal, parse_port(port_text))
    except ValueError:
        raise ValueError(f"backend address '{shown(text)}' has port '{shown(port_text)}'; "
                         f"expected {ACCEPTED}") from None


def backend_id(text: str, default_port: int = DEFAULT_RPC_PORT) -> BackendId:
    """The identity of the backend `text` names; ValueError (one line) when it names none.
    A BackendId is returned as it is: it is already normal."""
    if type(text) is BackendId:
        return text
    if not isinstance(text, str):
        raise ValueError(f"backend address {text!r} is not text; expected {ACCEPTED}")
    return parse_address(text, default_port).key


def backend_id_or_none(text: object) -> BackendId | None:
    """backend_id() for text from outside that may be anything: None instead of an error."""
    try:
        return backend_id(text)   # type: ignore[arg-type]
    except ValueError:
        return None
