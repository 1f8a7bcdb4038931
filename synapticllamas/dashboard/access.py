"""Who may use the dashboard: the token (when set) on every route, and loopback Host names.

The token comes as `Authorization: Bearer T` or `?token=T` (EventSource cannot send headers).
When bound to a loopback address (any of 127.0.0.0/8, ::1), requests must name a loopback host
(localhost or a loopback address), so a web page on another site cannot reach the dashboard by DNS
rebinding. Every response gets a strict Content-Security-Policy: the page
loads only its own script and style, and a log line that somehow became markup could not run.
"""
from __future__ import annotations

import hmac
import ipaddress
import json
from typing import Any
from urllib.parse import parse_qs

SECURITY_HEADERS = [
    (b"content-security-policy",
     b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
     b"base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),     # the token may be in the page's URL
    (b"x-frame-options", b"DENY"),
]


def request_token(scope: dict[str, Any]) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, credentials = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer":
                return credentials.strip()
    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token")
    return values[0] if values else None


def host_name(scope: dict[str, Any]) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"host":
            host = value.decode("latin-1").strip().lower()
            if host.startswith("["):
                return host.split("]")[0] + "]"
            return host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return ""


def is_loopback_name(name: str) -> bool:
    """localhost, or a loopback address literal (127.0.0.0/8, ::1; IPv6 with or without brackets)."""
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name.removeprefix("[").removesuffix("]")).is_loopback
    except ValueError:
        return False


class Guard:
    """ASGI middleware in front of every route."""

    def __init__(self, app: Any, token: str | None, loopback_only: bool) -> None:
        self.app = app
        self.token = token.encode() if token else None
        self.loopback_only = loopback_only

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.loopback_only and not is_loopback_name(host_name(scope)):
            await self.refuse(send, 421, f"host {host_name(scope)!r} is not served here; open the address the "
                                         "dashboard printed (a loopback address, or localhost)")
            return
        if self.token is not None:
            given = request_token(scope)
            if given is None or not hmac.compare_digest(given.encode(), self.token):
                await self.refuse(send, 401, "this dashboard needs its token: open /?token=TOKEN "
                                             "or send 'Authorization: Bearer TOKEN'", challenge=True)
                return

        async def secured(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS
            await send(message)

        await self.app(scope, receive, secured)

    @staticmethod
    async def refuse(send: Any, status: int, error: str, challenge: bool = False) -> None:
        body = json.dumps({"error": error}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if challenge:
            headers.append((b"www-authenticate", b'Bearer realm="synapticllamas-dashboard"'))
        await send({"type": "http.response.start", "status": status, "headers": headers + SECURITY_HEADERS})
        await send({"type": "http.response.body", "body": body})
