"""Which address a node's rpc-server binds to by default: the one this machine uses to reach Redis.

A worker usually has several addresses (loopback, LAN, a VPN, docker bridges). The one the
coordinator can reach is, in practice, the one on the route to the shared Redis. A connected UDP
socket asks the kernel for that route without sending anything.
"""
from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

WILDCARDS = ("0.0.0.0", "::", "[::]")


def redis_host(url: str) -> str | None:
    """The Redis URL's host, or None for a unix socket (Redis is on this machine)."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return None
    return parts.hostname or "localhost"


def route_to(host: str, port: int) -> str:
    """The local address of the route to host:port (no packet is sent); raises OSError."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.connect(addr)
        return str(sock.getsockname()[0])


class NoRoute(ValueError):
    """No route to a Redis beyond this machine: the address to announce cannot be chosen."""


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def default_host(redis_url: str) -> str:
    """The address to bind to when --host is not given: the one on the route to Redis. Loopback
    only when Redis is on this machine (a unix socket or a loopback address): anywhere else, a node
    announcing 127.0.0.1 would make every remote shell dial its own loopback, so NoRoute instead."""
    host = redis_host(redis_url)
    if host is None:
        return "127.0.0.1"
    port = urlsplit(redis_url).port or 6379
    try:
        return route_to(host, port)
    except OSError as exc:
        if is_loopback(host):
            return "127.0.0.1"
        shown_host = f"[{host}]" if ":" in host else host
        raise NoRoute(f"no route to Redis at {shown_host}:{port} ({(exc.strerror or str(exc)).lower()}) to choose "
                      "the address rpc-server announces; pass --host ADDR, this machine's address on the network "
                      "the coordinators reach") from None


def bind_address(host: str) -> str:
    """--host as rpc-server needs it and shells will dial it: an IP address in its normal spelling
    (`localhost` -> 127.0.0.1; rpc-server binds numeric addresses only, so a name is resolved
    here). ValueError says why it cannot be used."""
    from synapticllamas.rpc.addresses import normal_host

    normal = normal_host(host.strip("[]"))
    if normal is None:
        raise ValueError("expected an IP address or host name of this machine")
    try:
        return str(ipaddress.ip_address(normal))
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(normal, None, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ValueError(f"the name does not resolve here ({(exc.strerror or str(exc)).lower()}); "
                         "give an address of this machine") from None
    return str(infos[0][4][0])


def is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False


def local_addresses() -> list[str]:
    """This machine's non-loopback addresses, for the --listen-all warning."""
    found: set[str] = set()
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None):
            found.add(str(info[4][0]))
    except OSError:
        pass
    return sorted(a for a in found if not ipaddress.ip_address(a.split("%")[0]).is_loopback)
