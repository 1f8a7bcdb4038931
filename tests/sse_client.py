"""A server-sent-events client for tests: reads a real HTTP stream on a thread, parses every frame.

Nothing is faked: it speaks HTTP/1.1 to the dashboard process over loopback, as EventSource would
(including Last-Event-ID), and records each message with its id, event name and data.
"""
from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class Message:
    id: str | None
    event: str
    data: str

    def json(self) -> Any:
        return json.loads(self.data)


class SSEClient:
    def __init__(self, port: int, path: str = "/events", headers: dict[str, str] | None = None,
                 last_event_id: str | None = None) -> None:
        self.messages: list[Message] = []
        self.status_code: int | None = None
        self.error: BaseException | None = None
        self.closed = threading.Event()
        self._lock = threading.Condition()    # notified for each message and when the stream ends
        self._conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        hdrs = {"Accept": "text/event-stream", **(headers or {})}
        if last_event_id:
            hdrs["Last-Event-ID"] = last_event_id
        self._conn.request("GET", path, headers=hdrs)
        self._response = self._conn.getresponse()
        self.status_code = self._response.status
        self.headers = dict(self._response.getheaders())
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        event, data, ident = "message", [], None
        try:
            while True:
                line = self._response.readline()
                if not line:
                    break
                line = line.decode("utf-8").rstrip("\r\n")
                if line == "":
                    if data:
                        with self._lock:
                            self.messages.append(Message(ident, event, "\n".join(data)))
                            self._lock.notify_all()
                    event, data, ident = "message", [], None
                elif line.startswith(":"):
                    continue
                else:
                    name, _, value = line.partition(":")
                    value = value[1:] if value.startswith(" ") else value
                    if name == "data":
                        data.append(value)
                    elif name == "event":
                        event = value
                    elif name == "id":
                        ident = value
        except (OSError, ValueError, AttributeError, http.client.HTTPException) as exc:  # AttributeError: closed under us
            if not self.closed.is_set():
                self.error = exc
        finally:
            self.closed.set()
            with self._lock:
                self._lock.notify_all()

    # ------------------------------------------------------------ views

    def snapshot(self) -> list[Message]:
        with self._lock:
            return list(self.messages)

    def events(self) -> list[Message]:
        """The app events (default SSE event name), in arrival order."""
        return [m for m in self.snapshot() if m.event == "message"]

    def named(self, name: str) -> list[Message]:
        return [m for m in self.snapshot() if m.event == name]

    def wait_for(self, predicate: Callable[[SSEClient], Any], timeout: float = 10.0, what: str = "") -> Any:
        """The first truthy value of `predicate(self)`, checked again as each message arrives."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                count = len(self.messages)
            value = predicate(self)
            if value:
                return value
            if self.closed.is_set():
                raise AssertionError(f"the stream ended while waiting for {what}: {self.error!r}")
            left = deadline - time.monotonic()
            if left <= 0:
                tail = "\n".join(f"  {m.event} {m.id} {m.data[:160]}" for m in self.snapshot()[-15:])
                raise AssertionError(f"timed out after {timeout}s waiting for {what or 'SSE condition'}; "
                                     f"last messages:\n{tail}")
            with self._lock:   # until a message arrives after the ones the predicate saw, or the end
                self._lock.wait_for(lambda n=count: len(self.messages) != n or self.closed.is_set(), left)

    def close(self) -> None:
        self.closed.set()
        try:
            sock = self._conn.sock
            if sock is not None:
                import socket

                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._conn.close()
        self._thread.join(5)
