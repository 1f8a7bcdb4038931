"""llama-server's HTTP API, through httpx: /health, and streamed completions (server-sent events).

httpx is imported on first use, not at start-up. Every failure becomes HttpError with one short
line ("connection refused", "no answer within 5s", "not an HTTP answer", the server's own error
message), which the callers quote as it is.
"""
from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from synapticllamas.rpc.addresses import normal_host
from synapticllamas.util.text import shown

ACCEPTED = "expected http://HOST:PORT or https://HOST:PORT, e.g. http://10.0.0.9:8080"


class HttpError(ConnectionError):
    """The server did not answer, or answered something that is not what llama-server says."""


def connect_host(host: str) -> str:
    """Where to connect for a server bound to `host` (a wildcard bind is reached on loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


@dataclass(frozen=True)
class Endpoint:
    """A llama-server: where it is, and the API key its requests carry (never shown)."""
    scheme: str
    host: str
    port: int
    api_key: str | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def _base(self) -> str:
        host = connect_host(self.host)
        return f"{self.scheme}://{f'[{host}]' if ':' in host else host}:{self.port}"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def parse_base_url(url: str, api_key: str | None = None) -> Endpoint:
    """http(s)://HOST[:PORT] -> Endpoint; raises ValueError with a one-line reason."""
    quoted = f"URL '{shown(url)}'"
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        raise ValueError(f"{quoted} is not valid; {ACCEPTED}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{quoted} is not supported; {ACCEPTED}")
    if normal_host(parts.hostname) is None:
        raise ValueError(f"{quoted} has no valid host; {ACCEPTED}")
    if parts.path not in ("", "/") or parts.query:
        raise ValueError(f"{quoted} has a path; {ACCEPTED} (the server's root, /health is added)")
    default = 443 if parts.scheme == "https" else 80
    return Endpoint(parts.scheme, parts.hostname, port or default, api_key)


def _reason(exc: BaseException, timeout: float) -> str:
    """One short line for an httpx failure."""
    import httpx

    if isinstance(exc, httpx.TimeoutException):
        return f"no answer within {timeout:g}s"
    if isinstance(exc, httpx.ConnectError):
        text = str(exc).lower()
        if "refused" in text or "connect call failed" in text:
            return "connection refused"
        if "name or service not known" in text or "nodename nor servname" in text or "no address" in text:
            return "name does not resolve"
        if "certificate" in text or "ssl" in text:
            return f"TLS failed: {shown(str(exc), 160)}"
        return shown(str(exc), 160) or "cannot connect"
    if isinstance(exc, (httpx.RemoteProtocolError, httpx.DecodingError)):
        return "not an HTTP answer"
    if isinstance(exc, httpx.HTTPError):
        return shown(str(exc), 160) or type(exc).__name__
    return shown(str(exc), 160) or type(exc).__name__


def _server_message(body: bytes) -> str:
    """llama-server's error JSON {"error": {"message": ...}}, or the start of the body."""
    try:
        error = json.loads(body).get("error", {})
        message = error.get("message") if isinstance(error, dict) else str(error)
    except (ValueError, AttributeError):
        message = None
    return shown(message or body[:200].decode("utf-8", "replace"), 200)


async def health(endpoint: Endpoint, timeout: float) -> tuple[bool, str]:
    """(True, "ok") only for 200 with {"status": "ok"}: another service on the port may answer 200."""
    import httpx

    try:
        async with httpx.AsyncClient(timeout=timeout) as client:
            response = await client.get(endpoint._base() + "/health", headers=endpoint.headers())
    except (httpx.HTTPError, OSError) as exc:
        return False, f"/health: {_reason(exc, timeout)}"
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code == 200 and isinstance(body, dict) and body.get("status") == "ok":
        return True, "ok"
    error = body.get("error") if isinstance(body, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    return False, f"/health answered {response.status_code}" + (f" ({shown(str(message), 120)})" if message else "")


async def stream(endpoint: Endpoint, path: str, payload: dict[str, Any],
                 connect_timeout: float = 5.0) -> AsyncIterator[dict[str, Any]]:
    """POST payload, yield each `data: {...}` event of the server-sent-event answer (`data: [DONE]`
    ends it). Raises HttpError (one line) for no answer, a non-200 answer, or a broken stream."""
    import httpx

    timeout = httpx.Timeout(connect_timeout, read=None)   # a long generation is not a timeout
    try:
        async with (httpx.AsyncClient(timeout=timeout) as client,
                    client.stream("POST", endpoint._base() + path, json=payload, headers=endpoint.headers())
                    as response):
            if response.status_code != 200:
                body = await response.aread()
                raise HttpError(f"{path} answered {response.status_code}: {_server_message(body)}")
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    data = line[6:].strip()
                    if data == "[DONE]":
                        return
                    yield json.loads(data)
                elif line.startswith("error: "):
                    raise HttpError(shown(line[7:], 200))
    except httpx.HTTPError as exc:
        raise HttpError(_reason(exc, connect_timeout)) from None
