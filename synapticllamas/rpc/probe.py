"""The backend probe: one TCP connect with a timeout, closed at once.

rpc-server speaks no HTTP and serves one client at a time, so the lightest thing that tells
"something listens there" is a connect. The kernel completes the handshake even while the server
is busy with the coordinator, so a busy backend still counts as up.
"""
from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from dataclasses import dataclass


class ProbeFailure(Exception):
    """The probe failed. `definitive` is True when the answer is certain (nothing listens, the name
    does not exist), False when it may be a slow or lossy network (timeouts, unreachable)."""

    def __init__(self, reason: str, definitive: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.definitive = definitive


@dataclass(frozen=True)
class ProbeResult:
    latency_ms: float
    resolved: str        # "ip:port" actually connected to ([v6]:port for IPv6)


_lookups: dict[tuple[int, str, int], asyncio.Future] = {}


def _key(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


async def resolve(host: str, port: int) -> tuple[int, str]:
    """(family, ip) of a host name, through the loop's resolver thread (never blocks the loop).
    Raises ProbeFailure: definitive when the name does not exist."""
    if is_ip(host):
        return (socket.AF_INET6 if ":" in host else socket.AF_INET), host
    loop = asyncio.get_running_loop()
    # A probe that times out cancels only its wait: the resolver thread runs on. Later probes join
    # that lookup instead of starting another, so a slow DNS cannot pile up threads round after round.
    key = (id(loop), host, port)
    lookup = _lookups.get(key)
    if lookup is None:
        lookup = _lookups[key] = asyncio.ensure_future(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        lookup.add_done_callback(lambda _: _lookups.pop(key, None))
    try:
        infos = await asyncio.shield(lookup)
    except socket.gaierror as exc:
        definitive = exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME))
        raise ProbeFailure(f"name {host!r} does not resolve ({exc.strerror})", definitive) from None
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr[0]


async def probe(host: str, port: int, timeout: float) -> ProbeResult:
    """Connect to host:port and close. Raises ProbeFailure with a short reason."""
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            family, ip = await resolve(host, port)
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, (ip, port))
            finally:
                sock.close()
    except TimeoutError:
        raise ProbeFailure(f"no answer within {timeout:g}s", definitive=False) from None
    except ConnectionRefusedError:
        raise ProbeFailure("connection refused", definitive=True) from None
    except OSError as exc:
        raise ProbeFailure(exc.strerror or type(exc).__name__, definitive=False) from None
    return ProbeResult(round((time.perf_counter() - started) * 1000, 3), _key(ip, port))
