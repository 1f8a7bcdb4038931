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


def default_host(redis_url: str) -> str:
    """The address to bind to when --host is not given: the route to Redis, or loopback."""
    host = redis_host(redis_url)
    if host is None:
        return "127.0.0.1"
    port = urlsplit(redis_url).port or 6379
    try:
        return route_to(host, port)
    except OSError:
        return "127.0.0.1"


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
