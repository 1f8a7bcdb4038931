"""Helpers for the publisher tests: an in-process App on a real Redis, and subscribers that read it.

Nothing is faked: the App is the real one with its real publisher, Redis is a real redis-server
(tests/support.py), and the subscribers use redis-py against it.
"""
from __future__ import annotations

import asyncio
import io
import json
import threading
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from synapticllamas.app import App
from synapticllamas.config import load_settings
from synapticllamas.events import CHANNEL_PATTERN, JOURNAL_FIELD, JOURNAL_STREAM, Event
from synapticllamas.ui import PlainUI
from support import PYTHON, ROOT, shell_env

CONTRACT_FIELDS = {"timestamp", "component", "event_type", "message", "details", "level", "source", "seq"}


def make_app(tmp: Path, redis_url: str, **env: str) -> App:
    """The real App, configured like the shell would be from these environment variables."""
    base = {"XDG_CONFIG_HOME": str(tmp / "config"), "XDG_STATE_HOME": str(tmp / "state"),
            "SOLLOL_REDIS_URL": redis_url, "SOLLOL_OBSERVER_SAMPLING": "false"}
    return App(load_settings(env=dict(base, **env)), ui=PlainUI(out=io.StringIO(), err=io.StringIO()))


async def until(predicate, timeout: float = 10.0, what: str = "condition"):
    """Await (without blocking the loop) until predicate() is truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


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

    `raw` is every pub/sub payload as received (repeats included); `delivered` is the merged view."""

    def __init__(self, port: int, instance: str | None = None) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.instance = instance
        self.raw: list[dict] = []
        self.delivered: list[Event] = []
        self.subscriptions = 0
        self._seen: set[tuple[str, int]] = set()
        self._stop_flag = threading.Event()
        self.ready = threading.Event()

    def _deliver(self, event: Event) -> None:
        key = (event.source.get("instance", ""), event.seq)
        if self.instance and key[0] != self.instance or key in self._seen:
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
                        if not self.instance or data["source"]["instance"] == self.instance:
                            self.raw.append(data)
                        self._deliver(Event.from_dict(data))
            except (redis.RedisError, OSError):
                time.sleep(0.01)   # Redis is down: try again at once, like a dashboard would
            finally:
                pubsub.close()
                client.close()

    def stop(self) -> None:
        self._stop_flag.set()
        self.join(5)


class PipedShell:
    """A real `python3 main.py` with a pipe for stdin, answering commands one at a time."""

    def __init__(self, proc):
        self.proc = proc

    @classmethod
    async def start(cls, tmp, url, *args: str):
        env = shell_env(tmp, SOLLOL_REDIS_URL=url)
        proc = await asyncio.create_subprocess_exec(
            PYTHON, str(ROOT / "main.py"), *args, cwd=str(ROOT), env=env,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        return cls(proc)

    async def ask(self, command: str, last_line: str, timeout: float = 10) -> tuple[float, str]:
        """Send a command; read stdout up to the line starting with `last_line`. (seconds, text)."""
        started = time.monotonic()
        self.proc.stdin.write(command.encode() + b"\n")
        await self.proc.stdin.drain()
        lines = []
        while True:
            line = (await asyncio.wait_for(self.proc.stdout.readline(), timeout)).decode()
            assert line, f"the shell ended while answering {command!r}: {''.join(lines)}"
            lines.append(line)
            if line.startswith(last_line):
                return time.monotonic() - started, "".join(lines)

    async def exit(self) -> tuple[int, str]:
        self.proc.stdin.close()
        await asyncio.wait_for(self.proc.wait(), 15)
        return self.proc.returncode, (await self.proc.stderr.read()).decode()
