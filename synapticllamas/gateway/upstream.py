"""The gateway's side of llama-server: /apply-template, streamed /completion, and plain JSON calls.

One pooled httpx client for every request (a new connection per request would cost a handshake
each; bench/gateway.py measures what the gateway adds). Two kinds of failure, because the gateway
treats them differently:
- `Lost`: no answer, a broken or unfinished stream, a 5xx: llama-server is probably going away, so
  the request waits for the coordinator and is sent again (resumed when text was delivered);
- `Refused`: a 4xx: the request itself is wrong (a prompt longer than the context, say); the
  client gets the status and llama-server's own message, and nothing is retried.
"""
from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from synapticllamas.llama.http import Endpoint, _reason, _server_message


class Lost(ConnectionError):
    """llama-server did not answer or stopped answering."""


class Refused(Exception):
    """llama-server refused the request (4xx): its status and message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Upstream:
    CONNECT_TIMEOUT = 5.0

    def __init__(self) -> None:
        import httpx

        # read=None: a long generation is not a timeout; the pool is per gateway, not per request
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(self.CONNECT_TIMEOUT, read=None),
                                         limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))

    async def close(self) -> None:
        await self._client.aclose()

    async def call(self, endpoint: Endpoint, method: str, path: str, body: Any = None,
                   timeout: float | None = 60.0) -> Any:
        """One JSON request; its JSON answer. Lost or Refused."""
        import httpx

        try:
            response = await self._client.request(method, endpoint._base() + path, json=body,
                                                   headers=endpoint.headers(), timeout=timeout)
        except httpx.HTTPError as exc:
            raise Lost(f"{path}: {_reason(exc, self.CONNECT_TIMEOUT)}") from None
        _check(path, response.status_code, response.content)
        try:
            return response.json()
        except ValueError:
            raise Lost(f"{path}: not a JSON answer") from None

    async def stream(self, endpoint: Endpoint, path: str, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """POST payload; each `data: {...}` event of the answer. The stream must end with a chunk
        saying `stop` (or `data: [DONE]`): one that just ends is Lost."""
        import httpx

        try:
            async with self._client.stream("POST", endpoint._base() + path, json=payload,
                                           headers=endpoint.headers()) as response:
                if response.status_code != 200:
                    _check(path, response.status_code, await response.aread())
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        data = line[6:].strip()
                        if data == "[DONE]":
                            return
                        try:
                            chunk = json.loads(data)
                        except ValueError:
                            raise Lost(f"{path}: not a JSON event") from None
                        if isinstance(chunk, dict) and "error" in chunk:
                            error = chunk["error"]
                            message = error.get("message") if isinstance(error, dict) else str(error)
                            raise Lost(f"{path}: {message}")
                        yield chunk
                        if isinstance(chunk, dict) and chunk.get("stop") is True:
                            return
                    elif line.startswith("error: "):
                        raise Lost(f"{path}: {line[7:200]}")
        except httpx.HTTPError as exc:
            raise Lost(f"{path}: {_reason(exc, self.CONNECT_TIMEOUT)}") from None
        raise Lost(f"{path}: the stream ended before the last token")


def _check(path: str, status: int, body: bytes) -> None:
    if status < 400:
        return
    message = _server_message(body)
    if (400 <= status < 500 and status not in (408, 429)) or status == 501:   # 501: not served (embeddings)
        raise Refused(status, message)
    raise Lost(f"{path} answered {status}: {message}")
