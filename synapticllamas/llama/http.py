"""A minimal HTTP/1.1 client on asyncio streams, for llama-server's /health and streamed /completion.

The engine needs two requests, so it does not pull in an HTTP library: one GET with a small JSON
body, and one POST whose answer is a server-sent-event stream (chunked). `Connection: close` keeps
the protocol simple: the body ends at the last chunk or at EOF.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

from synapticllamas.rpc.addresses import normal_host
from synapticllamas.util.text import shown

MAX_HEADER_LINES = 100


class HttpError(ConnectionError):
    """The server did not answer, or answered something that is not HTTP."""


def connect_host(host: str) -> str:
    """Where to connect for a server bound to `host` (a wildcard bind is reached on loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def parse_base_url(url: str) -> tuple[str, int]:
    """http://HOST[:PORT] -> (host, port); raises ValueError with a one-line reason."""
    accepted = "expected http://HOST:PORT, e.g. http://10.0.0.9:8080"
    quoted = f"URL '{shown(url)}'"
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        raise ValueError(f"{quoted} is not valid; {accepted}") from None
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"{quoted} is not supported; {accepted}")
    if normal_host(parts.hostname) is None:
        raise ValueError(f"{quoted} has no valid host; {accepted}")
    if parts.path not in ("", "/") or parts.query:
        raise ValueError(f"{quoted} has a path; {accepted} (the server's root, /health is added)")
    return parts.hostname, port or 80


async def _send(host: str, port: int, method: str, path: str, body: Any = None, bearer: str | None = None
                ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int, dict[str, str]]:
    reader, writer = await asyncio.open_connection(connect_host(host), port)
    data = b"" if body is None else json.dumps(body).encode()
    shown_host = f"[{host}]" if ":" in host else host
    head = [f"{method} {path} HTTP/1.1", f"Host: {shown_host}:{port}", "Connection: close", "Accept: */*"]
    if body is not None:
        head += ["Content-Type: application/json", f"Content-Length: {len(data)}"]
    if bearer:
        head.append(f"Authorization: Bearer {bearer}")
    try:
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
        await writer.drain()
        status_line = await reader.readline()
        parts = status_line.decode("latin-1").split(None, 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not (parts[1].isascii() and parts[1].isdecimal()):
            raise HttpError(f"not an HTTP answer: {status_line[:60]!r}")
        headers: dict[str, str] = {}
        for _ in range(MAX_HEADER_LINES):
            line = (await reader.readline()).decode("latin-1").strip()
            if not line:
                break
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return reader, writer, int(parts[1]), headers
    except BaseException:
        writer.close()
        raise


async def _body(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncIterator[bytes]:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size_line = await reader.readline()
            if not size_line:
                raise HttpError("connection closed in the middle of the response")
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                return
            chunk = await reader.readexactly(size)
            await reader.readline()   # the CRLF after each chunk
            yield chunk
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:
        while chunk := await reader.read(65536):
            yield chunk


async def get_json(host: str, port: int, path: str, timeout: float) -> tuple[int, Any]:
    """GET path -> (status, parsed JSON body or None when it is not JSON)."""
    async def run() -> tuple[int, Any]:
        reader, writer, status, headers = await _send(host, port, "GET", path)
        try:
            body = b"".join([chunk async for chunk in _body(reader, headers)])
        finally:
            writer.close()
        try:
            return status, json.loads(body)
        except ValueError:
            return status, None

    return await asyncio.wait_for(run(), timeout)


async def health(host: str, port: int, timeout: float) -> tuple[bool, str]:
    """(True, "ok") only for 200 with {"status": "ok"}: another service on the port may answer 200."""
    try:
        status, body = await get_json(host, port, "/health", timeout)
    except TimeoutError:
        return False, f"no answer from /health within {timeout:g}s"
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        return False, f"/health: {exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}"
    if status == 200 and isinstance(body, dict) and body.get("status") == "ok":
        return True, "ok"
    message = body.get("error", {}).get("message") if isinstance(body, dict) and isinstance(body.get("error"), dict) \
        else None
    return False, f"/health answered {status}" + (f" ({message})" if message else "")


async def sse(host: str, port: int, path: str, payload: dict[str, Any], connect_timeout: float = 5.0,
              bearer: str | None = None) -> AsyncIterator[dict[str, Any]]:
    """POST payload (with `Authorization: Bearer` when given a key), yield each `data: {...}` event
    of the server-sent-event answer. A non-200 answer raises HttpError with the server's message."""
    reader, writer, status, headers = await asyncio.wait_for(
        _send(host, port, "POST", path, payload, bearer), connect_timeout)
    try:
        if status != 200:
            body = b"".join([chunk async for chunk in _body(reader, headers)])
            try:
                error = json.loads(body).get("error", {})
                message = error.get("message") if isinstance(error, dict) else str(error)
            except (ValueError, AttributeError):
                message = body[:200].decode("utf-8", "replace")
            raise HttpError(f"{path} answered {status}: {message}")
        pending = b""
        async for chunk in _body(reader, headers):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if line.startswith(b"data: "):
                    yield json.loads(line[6:])
                elif line.startswith(b"error: "):
                    raise HttpError(line[7:].decode("utf-8", "replace"))
    finally:
        writer.close()
