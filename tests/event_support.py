"""Helpers for the publisher tests: an in-process App on a real Redis, and subscribers that read it.

Nothing is faked: the App is the real one with its real publisher, Redis is a real redis-server
(tests/support.py), and the subscribers use redis-py against it.
"""
from __future__ import annotations

import asyncio
import io
import json
import re
import threading
import time
import uuid
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from support import PipedShell, wait_for

from synapticllamas.app import App
from synapticllamas.config import load_settings
from synapticllamas.events.contract import CHANNEL_PATTERN, JOURNAL_FIELD, JOURNAL_STREAM, Event
from synapticllamas.ui import PlainUI

CONTRACT_FIELDS = {"timestamp", "component", "event_type", "message", "details", "level", "source", "seq", "sampled"}
MARKER_CHANNEL = "synapticllamas:llama_cpp:test-marker"   # matches the pattern; no app publishes there


def publish_marker(port: int) -> str:
    """Publish a marker message after everything published so far, and return its token. Redis runs
    commands one at a time and delivers pub/sub messages in that order, so a subscriber that has
    the marker has every message published before it: what has not come by then never will."""
    token = uuid.uuid4().hex
    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        client.publish(MARKER_CHANNEL, json.dumps({"marker": token}))
    finally:
        client.close()
    return token


def make_app(tmp: Path, redis_url: str, **env: str) -> App:
    """The real App, configured like the shell would be from these environment variables."""
    base = {"XDG_CONFIG_HOME": str(tmp / "config"), "XDG_STATE_HOME": str(tmp / "state"),
            "SOLLOL_REDIS_URL": redis_url, "SOLLOL_OBSERVER_SAMPLING": "false"}
    return App(load_settings(env=dict(base, **env)), ui=PlainUI(out=io.StringIO(), err=io.StringIO()))


def journal(port: int) -> list[Event]:
    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        return [Event.from_json(fields[JOURNAL_FIELD.encode()]) for _, fields in client.xrange(JOURNAL_STREAM)]
    finally:
        client.close()


class Subscriber(threading.Thread):
    """psubscribes to synapticllamas:llama_cpp:* and survives Redis restarts the way docs/EVENTS.md tells
    a subscriber to: after each (re)subscription it reads the journal for what it missed, and drops
    repeats by (instance, seq).

    `raw` is every pub/sub payload as received (repeats included); `delivered` is the merged view.

    Not folded into support.RedisCliSubscriber on purpose: that one is the reference command
    (redis-cli, pub/sub only, every message as it arrived), which the "each event exactly once, in
    order" checks need, since a subscriber that drops repeats would pass them whatever was sent. This
    one has to outlive a Redis restart and recover the gap from the journal, which redis-cli cannot."""

    def __init__(self, port: int, instance: str | None = None) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.instance = instance
        self.raw: list[dict] = []
        self.delivered: list[Event] = []
        self.subscriptions = 0
        self.markers: set[str] = set()
        self._seen: set[tuple[str, int]] = set()
        self._stop_flag = threading.Event()
        self.ready = threading.Event()

    def _deliver(self, event: Event) -> None:
        key = (event.source.get("instance", ""), event.seq)
        if (self.instance and key[0] != self.instance) or key in self._seen:
            return
        self._seen.add(key)
        self.delivered.append(event)

    def run(self) -> None:
        while not self._stop_flag.is_set():
            # retries off: redis-py would otherwise reconnect and resubscribe silently, skipping the
            # journal read that recovers what was published while we were away
            client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5, socket_timeout=5,
                                 retry=Retry(NoBackoff(), 0))
            pubsub = client.pubsub()
            try:
                pubsub.psubscribe(CHANNEL_PATTERN)
                while (m := pubsub.get_message(timeout=1)) is None or m["type"] != "psubscribe":
                    pass
                for _, fields in client.xrange(JOURNAL_STREAM):
                    self._deliver(Event.from_json(fields[JOURNAL_FIELD.encode()]))
                self.subscriptions += 1
                self.ready.set()
                while not self._stop_flag.is_set():
                    message = pubsub.get_message(timeout=0.05)
                    if message and message["type"] == "pmessage":
                        data = json.loads(message["data"])
                        if "marker" in data:
                            self.markers.add(data["marker"])
                            continue
                        if not self.instance or data["source"]["instance"] == self.instance:
                            self.raw.append(data)
                        self._deliver(Event.from_dict(data))
            except (redis.RedisError, OSError):
                time.sleep(0.01)   # Redis is down: try again at once, like a dashboard would
            finally:
                pubsub.close()
                client.close()

    def sync(self, timeout: float = 10.0) -> None:
        """Wait until every message published so far has reached this subscriber (publish_marker).
        A marker published while it resubscribes is lost, so it publishes another until one comes."""
        sent: list[str] = []

        def arrived() -> bool:
            if self.markers.intersection(sent):
                return True
            sent.append(publish_marker(self.port))
            return False

        wait_for(arrived, timeout, interval=0.1, what="the subscriber to receive a marker published after the events")

    def stop(self) -> None:
        self._stop_flag.set()
        self.join(5)


class AsyncShell:
    """support.PipedShell for scenarios that run inside asyncio next to an in-process App: each
    blocking step runs in a worker thread, so the loop (and the App on it) keeps running while the
    shell answers."""

    def __init__(self, shell: PipedShell) -> None:
        self.shell = shell

    @classmethod
    async def start(cls, tmp: Path, url: str, *args: str) -> AsyncShell:
        return cls(PipedShell(tmp, *args, SOLLOL_REDIS_URL=url))

    async def ask(self, command: str, last_line: str, timeout: float = 10) -> tuple[float, str]:
        """Send a command; read stdout up to the line starting with `last_line`. (seconds, text)."""
        def ask() -> tuple[float, str]:
            started = time.monotonic()
            self.shell.send(command)
            _, lines = self.shell.read_until("^" + re.escape(last_line), timeout, stream="stdout")
            return time.monotonic() - started, "".join(line + "\n" for line in lines)

        return await asyncio.to_thread(ask)

    async def exit(self) -> tuple[int, str]:
        """Close stdin and wait for the shell to end: (exit status, all it wrote to stderr)."""
        code = await asyncio.to_thread(self.shell.close, 15)
        return code, await asyncio.to_thread(self.shell.stderr)
