"""The hub: one Redis subscription shared by every viewer, open only while someone is watching.

- First viewer: connect, PSUBSCRIBE synapticllamas:llama_cpp:*, then read the journal's last N
  (subscribing first means nothing published in between is missed).
- Live: each pmessage rings a doorbell and the pump reads the journal from the last id it has
  (XREAD). So every event carries its journal id (the SSE id a browser resumes from), arrives once,
  and in journal order, whatever order pub/sub delivered it in. An event announced on pub/sub that
  is not in the journal after GRACE seconds (a publisher that only publishes) is shown from pub/sub.
- Last viewer leaves: unsubscribe, close both connections, drop the ring: no Redis traffic, no work.
  A scrape of /metrics holds the hub open like a viewer, for `hold` seconds after it (a scraper
  comes back every minute or so; reopening each time would re-read the journal each time).
- Metrics: every event taken from Redis also goes to `metrics` (dashboard/metrics.py), which
  outlives the subscription. The first opening feeds it the whole journal, each later opening what
  was journaled since the last one, so its counters are those of everything the journal held.
- Redis down: viewers get a status event; the hub reconnects with capped backoff while anyone
  watches, and the pump resumes from its last id, so events journaled meanwhile are not lost.
  A Redis that hangs with its connections open (stopped, swapping, packets dropped) says nothing
  by itself: a PING on the subscription every HEALTH_INTERVAL seconds must be answered within
  COMMAND_TIMEOUT, else it counts as down.

Everything runs on the server's event loop; state is touched only from it, so no locks except
the one that orders opening and closing.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Hashable
from itertools import islice
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis

from synapticllamas.config import redact_url
from synapticllamas.dashboard import frames
from synapticllamas.dashboard.metrics import Metrics
from synapticllamas.events.contract import APPS_HASH, CHANNEL_PATTERN, JOURNAL_STREAM, NODES_HASH, Event
from synapticllamas.events.dedup import SeenEvents
from synapticllamas.events.redis_errors import describe
from synapticllamas.events.schema import Invalid, Tally, decode_registration, load_json
from synapticllamas.util.backoff import Backoff
from synapticllamas.util.tasks import cancel

GRACE = 0.5              # seconds an event seen on pub/sub may wait for its journal entry
PENDING_BLOCK_MS = 100   # XREAD BLOCK while an announced event is not in the journal yet
BATCH = 1000             # journal entries per XREAD
BACKOFF_FIRST, BACKOFF_CAP = 0.2, 5.0
KEEPALIVE = 15.0         # seconds between comment lines on a quiet feed (proxies, dead clients)
CONNECT_TIMEOUT = 2.0    # to connect; also what /healthz allows its PING
COMMAND_TIMEOUT = 5.0    # for any other answer
HEALTH_INTERVAL = 5.0    # seconds between PINGs on the subscription: a hang shows within 5-10 s

log = logging.getLogger("synapticllamas.dashboard")


class Hub:
    def __init__(self, redis_url: str, replay: int = 1000, capacity: int = 10000,
                 redis_ca_file: str | None = None, announce_key: bytes | None = None) -> None:
        """`announce_key`: the cluster's; node events and registrations then say whether the key
        vouches for them (`trust`), and the page shows the nodes it does not as untrusted."""
        from synapticllamas.events.redis_options import redis_options

        self.redis_url = redis_url
        self.redis_options = redis_options(redis_url, redis_ca_file)
        self._verifier = None
        if announce_key is not None:
            from synapticllamas.trust.signing import Verifier

            self._verifier = Verifier(announce_key, window=float("inf"))   # the journal is history: no age
        self.metrics = Metrics()    # kept while the hub is closed: counters only grow
        self.public_url = redact_url(redis_url)
        self.replay = replay
        self.capacity = max(capacity, replay)
        self.viewers = 0
        # ring of (id key, frame), oldest first; `base` is the absolute index of ring[0]
        self.ring: deque[tuple[frames.Key, bytes]] = deque()
        self.base = 0
        self.last_id = "0-0"        # newest journal id read
        self.fallback_n = 0         # k of the last `<last_id>~k` given to a pub/sub-only event
        self.loaded = False         # the journal's last N have been read for this opening
        self.pending: dict[Hashable, tuple[float, Event, bytes]] = {}
        self.seen = SeenEvents(self.capacity)    # keys of the events in the ring: each is shown once
        # invalid: journal entries that are not valid events (events/schema.py), skipped; invalid_pubsub:
        # pub/sub messages that are not (their journal entry, if any, is counted under invalid too)
        self.counters = {"journal": 0, "pubsub_only": 0, "invalid": 0, "invalid_pubsub": 0, "reconnects": 0}
        self.invalid = Tally()            # why, for /healthz and the log: journal entries
        self.invalid_pubsub = Tally()
        self._invalid_told = 0.0
        self.status: dict[str, Any] = {"redis": "closed", "url": self.public_url, "error": None}
        self.status_version = 0
        self.beats = 0              # keepalive rounds, while the hub is open
        self.views: set[View] = set()
        self._task: asyncio.Task | None = None
        self._beat: asyncio.TimerHandle | None = None
        self._held_until = 0.0      # loop time until which a scrape keeps the hub open
        self._release: asyncio.TimerHandle | None = None
        self._releasing: asyncio.Task | None = None
        self._ready = asyncio.Event()
        self._doorbell = asyncio.Event()
        self._pong = asyncio.Event()
        self._lock = asyncio.Lock()
        self._client: Any = None    # command connection pool for the API routes, made on first use

    # ------------------------------------------------------------ viewers

    @property
    def subscribed(self) -> bool:
        return self._task is not None

    @property
    def end(self) -> int:
        return self.base + len(self.ring)

    @contextlib.asynccontextmanager
    async def viewer(self, last_event_id: str | None = None, replay: int | None = None) -> AsyncIterator[View]:
        """One viewer for as long as the block runs: opens the hub for the first, closes it after the last."""
        async with self._lock:
            self.viewers += 1
            if self._task is None:
                self._open()
        view: View | None = None    # still None when cancelled while waiting for Redis (shutdown)
        try:
            # the first attempt to connect (and read the journal) ends either way within the timeout
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._ready.wait(), CONNECT_TIMEOUT + COMMAND_TIMEOUT)
            view = View(self)
            self.views.add(view)
            await view.start(last_event_id, self.replay if replay is None else replay)
            yield view
        finally:
            if view is not None:
                self.views.discard(view)
            async with self._lock:
                self.viewers -= 1
                if self.viewers == 0 and not self.held:
                    await self._close()

    @property
    def held(self) -> bool:
        return asyncio.get_running_loop().time() < self._held_until

    async def hold(self, seconds: float) -> None:
        """Keep the hub open for `seconds` from now even without a viewer (a /metrics scrape), and
        return once its first reading of Redis has ended (loaded, or failed)."""
        loop = asyncio.get_running_loop()
        async with self._lock:
            self._held_until = max(self._held_until, loop.time() + seconds)
            if self._release is not None:
                self._release.cancel()
            self._release = loop.call_at(self._held_until, self._hold_ended)
            if self._task is None:
                self._open()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._ready.wait(), CONNECT_TIMEOUT + COMMAND_TIMEOUT)

    def _hold_ended(self) -> None:
        self._release = None
        self._releasing = asyncio.create_task(self._close_if_unused(), name="dashboard-hub-release")

    async def _close_if_unused(self) -> None:
        async with self._lock:
            if self.viewers == 0 and not self.held and self._task is not None:
                await self._close()

    def _open(self) -> None:
        self.ring.clear()
        self.pending.clear()
        self.seen.clear()
        self.last_id, self.fallback_n, self.loaded = "0-0", 0, False
        self._ready.clear()
        self._set_status("connecting")
        self._task = asyncio.create_task(self._run(), name="dashboard-hub")
        self._beat = asyncio.get_running_loop().call_later(KEEPALIVE, self._keepalive)

    async def _close(self) -> None:
        if self._beat is not None:
            self._beat.cancel()
            self._beat = None
        task, self._task = self._task, None
        await cancel(task)
        # memory goes with the subscription; the next viewer re-reads the journal
        self.base += len(self.ring)
        self.ring.clear()
        self.pending.clear()
        self.seen.clear()
        self._set_status("closed")

    async def aclose(self) -> None:
        """Server shutdown."""
        if self._release is not None:
            self._release.cancel()
            self._release = None
        async with self._lock:
            await self._close()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # ------------------------------------------------------------ the subscription

    async def _run(self) -> None:
        backoff = Backoff(BACKOFF_FIRST, BACKOFF_CAP)
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis gone, refused, auth failed, or our bug: say so, retry
                if not isinstance(exc, (OSError, aioredis.RedisError)):
                    log.exception("dashboard hub failed")
                if self.status["redis"] == "up":   # it had been working: retry quickly
                    self.counters["reconnects"] += 1
                    backoff.reset()
                self._set_status("down", self.reason(exc))
            self._ready.set()
            await asyncio.sleep(backoff.next())

    async def _session(self) -> None:
        client = aioredis.from_url(self.redis_url, socket_connect_timeout=CONNECT_TIMEOUT,
                                   socket_keepalive=True, **self.redis_options)
        pubsub = client.pubsub()
        tasks: list[asyncio.Task] = []
        try:
            # bounded: a hung server's kernel accepts the connection, and then nothing answers
            await answered(pubsub.psubscribe(CHANNEL_PATTERN), "PSUBSCRIBE")
            # "up" only once Redis has answered: a hung server accepts connections all the same
            confirmed = await pubsub.get_message(timeout=COMMAND_TIMEOUT)
            if confirmed is None or confirmed["type"] != "psubscribe":
                raise ConnectionError(f"no answer to PSUBSCRIBE within {COMMAND_TIMEOUT:g} s")
            if not self.loaded:
                entries = await answered(client.xrevrange(JOURNAL_STREAM, count=self.replay),
                                         "XREVRANGE") if self.replay else []
                entries.reverse()
                if not entries:   # start from now, not from the beginning of time
                    info = await answered(client.xrevrange(JOURNAL_STREAM, count=1), "XREVRANGE")
                    self.last_id = info[0][0].decode() if info else "0-0"
                    if info:
                        await self._catch_up_metrics(client, self.last_id, inclusive=True)
                else:
                    await self._catch_up_metrics(client, entries[0][0].decode(), inclusive=False)
                self._ingest(entries, live=False)
                self.loaded = True
            self._set_status("up")
            self._ready.set()
            self._doorbell.set()   # catch up with what was journaled while we were away
            tasks = [asyncio.create_task(self._listen(pubsub)), asyncio.create_task(self._pump(client)),
                     asyncio.create_task(self._watch(pubsub))]
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()      # raises the failure
            raise ConnectionError("subscription ended")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await pubsub.aclose()
            with contextlib.suppress(Exception):
                await client.aclose()

    async def _listen(self, pubsub: Any) -> None:
        async for message in pubsub.listen():
            if message["type"] == "pong":
                self._pong.set()
            if message["type"] != "pmessage":
                continue
            payload = message["data"]
            event = frames.decode(payload, self.invalid_pubsub)
            if event is None:
                self.counters["invalid_pubsub"] = self.invalid_pubsub.total
                continue
            key = frames.event_key(event, payload)
            if key not in self.seen and key not in self.pending:
                self.pending[key] = (time.monotonic(), event, payload)
            self._doorbell.set()

    async def _watch(self, pubsub: Any) -> None:
        """Raises when a PING on the subscription goes unanswered: Redis hangs."""
        while True:
            await asyncio.sleep(HEALTH_INTERVAL)
            self._pong.clear()
            await pubsub.ping()
            await answered(self._pong.wait(), "PING")

    async def _pump(self, client: Any) -> None:
        while True:
            if not self.pending:
                await self._doorbell.wait()
            self._doorbell.clear()
            reply = await client.xread({JOURNAL_STREAM: self.last_id}, count=BATCH,
                                       block=PENDING_BLOCK_MS if self.pending else None)
            entries = reply[0][1] if reply else []
            self._ingest(entries, live=True)
            self._expire_pending()
            if len(entries) == BATCH:
                self._doorbell.set()

    async def _catch_up_metrics(self, client: Any, upto: str, inclusive: bool) -> None:
        """Feed the metrics the journal older than the replay: all of it at the first opening,
        what came since the last opening afterwards. Bounded pages, so the loop stays responsive."""
        metrics = self.metrics
        low = "-" if metrics.last_id is None else "({}-{}".format(*metrics.last_id[:2])
        high = upto if inclusive else f"({upto}"
        while True:
            page = await answered(client.xrange(JOURNAL_STREAM, low, high, count=BATCH), "XRANGE")
            for raw_id, fields in page:
                sid = raw_id.decode()
                payload = frames.entry_payload(fields)
                event = frames.decode(payload, self.invalid) if payload is not None else None
                if event is not None:
                    metrics.observe(sid, event, live=False)
                else:
                    self._skipped(sid)
            if len(page) < BATCH:
                return
            low = "(" + page[-1][0].decode()

    # ------------------------------------------------------------ the ring

    def _ingest(self, entries: list[tuple[bytes, dict[bytes, bytes]]], live: bool) -> None:
        added = False
        for raw_id, fields in entries:
            sid = raw_id.decode()
            self.last_id, self.fallback_n = sid, 0
            payload = frames.entry_payload(fields)
            event = frames.decode(payload, self.invalid) if payload is not None else None
            if event is None or payload is None:
                self._skipped(sid)
                continue
            key = frames.event_key(event, payload)
            self.pending.pop(key, None)
            if key in self.seen:            # shown from pub/sub before its journal entry came
                continue
            self.metrics.observe(sid, event, live)
            ms, _, seq = sid.partition("-")
            self._append((int(ms), int(seq or 0), 0), key, self.frame(sid, event, payload))
            self.counters["journal"] += 1
            added = True
        if added:
            self._notify()

    def _skipped(self, sid: str) -> None:
        """A journal entry that is no valid event: counted (the last reason is in /healthz), and
        its id still passed, so metrics and the pump move on."""
        self.counters["invalid"] = self.invalid.total
        self.metrics.skip(sid)
        now = time.monotonic()
        if now - self._invalid_told >= 1.0:      # viewers hear the count in the next status, at most once a second
            self._invalid_told = now
            self.status_version += 1
            self._notify()
        if self.invalid.total in (1, 10, 100, 1000) or self.invalid.total % 10000 == 0:
            log.warning("journal entry %s skipped: not a valid event (%d so far; last: %s)", sid,
                        self.invalid.total, self.invalid.last)

    def _expire_pending(self) -> None:
        now, added = time.monotonic(), False
        while self.pending:
            key = next(iter(self.pending))   # oldest first: dicts keep arrival order
            arrived, event, payload = self.pending[key]
            if now - arrived < GRACE:
                break
            del self.pending[key]
            self.fallback_n += 1
            sid = f"{self.last_id}~{self.fallback_n}"
            self.metrics.observe(None, event, live=True)
            self._append(frames.parse_id(sid), key, self.frame(sid, event, payload))
            self.counters["pubsub_only"] += 1
            added = True
        if added:
            self._notify()

    def _append(self, id_key: frames.Key, event_key: Hashable, frame: bytes) -> None:
        self.ring.append((id_key, frame))
        if len(self.ring) > self.capacity:
            self.ring.popleft()
            self.base += 1
        self.seen.add(event_key)

    def frames_since(self, cursor: int) -> list[tuple[frames.Key, bytes]]:
        """Ring entries from absolute index `cursor` on; O(new entries), not O(ring)."""
        count = self.end - max(cursor, self.base)
        if count <= 0:
            return []
        newest_first = list(islice(reversed(self.ring), count))
        newest_first.reverse()
        return newest_first

    def _notify(self) -> None:
        for view in self.views:
            view.wake.set()

    def _keepalive(self) -> None:
        self.beats += 1
        self._notify()
        self._beat = asyncio.get_running_loop().call_later(KEEPALIVE, self._keepalive)

    def _set_status(self, state: str, error: str | None = None) -> None:
        if self.status.get("redis") == state and self.status.get("error") == error:
            return
        self.status = {"redis": state, "url": self.public_url, "error": error, "since": time.time()}
        self.status_version += 1
        self._notify()

    def scrub(self, exc: BaseException) -> str:
        """An error's own text, without the Redis password."""
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return self._without_password(text)

    def reason(self, exc: BaseException) -> str:
        """Why Redis did not answer, in a few words for the page: 'connection refused', 'no answer
        within 2 s' (the hub's own timeouts), 'no answer to PING within 5 s'..."""
        return self._without_password(describe(exc, connect_timeout=CONNECT_TIMEOUT, reply_timeout=COMMAND_TIMEOUT))

    def _without_password(self, text: str) -> str:
        password = urlsplit(self.redis_url).password
        return text.replace(password, "***") if password else text

    # ------------------------------------------------------------ requests (someone is looking)

    def client(self) -> Any:
        if self._client is None:
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            # one retry on a new connection: a pooled one is dead after Redis restarted
            self._client = aioredis.from_url(self.redis_url, socket_connect_timeout=CONNECT_TIMEOUT,
                                             socket_timeout=COMMAND_TIMEOUT, retry=Retry(NoBackoff(), 1),
                                             **self.redis_options)
        return self._client

    async def read_journal(self, since: str | None, limit: int, before: str | None = None
                           ) -> list[tuple[str, Event, bytes]]:
        """Journal entries after `since` (exclusive; the last `limit` when None), oldest first."""
        if since is None:
            entries = await self.client().xrevrange(JOURNAL_STREAM, count=limit)
            entries.reverse()
        else:
            upper = f"({before}" if before else "+"
            entries = await self.client().xrange(JOURNAL_STREAM, f"({frames.stream_part(since)}", upper,
                                                 count=limit)
        out = []
        for raw_id, fields in entries:
            payload = frames.entry_payload(fields)
            event = frames.decode(payload) if payload is not None else None
            if event is not None and payload is not None:
                out.append((raw_id.decode(), event, payload))
        return out

    async def apps(self) -> tuple[dict[str, Any], int]:
        """The apps hash: instance -> registration, each checked by the schema; and how many entries
        were skipped (not valid registrations)."""
        raw = await self.client().hgetall(APPS_HASH)
        apps, skipped = {}, 0
        for instance, text in raw.items():
            try:
                name = instance.decode()
                data = decode_registration(text)
                if not name or len(name) > 128 or not name.isprintable():
                    raise Invalid("field", "not a printable instance id")
            except (Invalid, UnicodeDecodeError):
                skipped += 1
                continue
            apps[name] = redact_strings(data)
        return apps, skipped

    async def nodes(self) -> tuple[dict[str, Any], int]:
        """The nodes hash: HOST:PORT -> what `main.py node` registered, each checked by the schema
        (the field a HOST:PORT, normalised); and how many entries were skipped."""
        from synapticllamas.events.schema import decode_node_entry

        raw = await self.client().hgetall(NODES_HASH)
        nodes, skipped = {}, 0
        for field, text in raw.items():
            try:
                address, data = decode_node_entry(field, text)
            except Invalid:
                skipped += 1
                continue
            trust = self.trust(data)         # the registration as decoded: `auth` is kept in it
            nodes[str(address)] = redact_strings(data) | ({"trust": trust} if trust else {})
        return nodes, skipped

    def trust(self, obj: Any) -> str | None:
        """With the cluster key: `signed`, `unsigned` or `other key` (trust/signing.vouched); None
        without a key."""
        if self._verifier is None:
            return None
        from synapticllamas.trust.signing import vouched

        return vouched(self._verifier, obj)

    def frame(self, sid: str, event: Event, payload: bytes) -> bytes:
        """The SSE frame of an event; a node event carries `trust` when the dashboard has the key.
        The payload was decoded by the schema already (a valid event); `auth` is not part of the
        Event, so the object is read again here, for node events only."""
        if self._verifier is not None and event.component == "node":
            raw = load_json(payload)
            payload = json.dumps(dict(raw, trust=self.trust(raw)), separators=(",", ":"), ensure_ascii=False).encode()
        return frames.frame(sid, event, payload)

    async def ping(self) -> str | None:
        """None when Redis answers, else why not (password scrubbed)."""
        try:
            await answered(self.client().ping(), "PING", CONNECT_TIMEOUT)
        except Exception as exc:
            return self.reason(exc)
        return None


async def answered(awaitable: Any, command: str, timeout: float = COMMAND_TIMEOUT) -> Any:
    """The reply to a command, or ConnectionError when Redis says nothing within `timeout`."""
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except TimeoutError:
        raise ConnectionError(f"no answer to {command} within {timeout:g} s") from None


def redact_strings(value: Any) -> Any:
    """Registrations are shown as they are, but never with a URL's password in them."""
    if isinstance(value, str):
        return redact_url(value) if "://" in value and "@" in value else value
    if isinstance(value, dict):
        return {k: redact_strings(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_strings(v) for v in value]
    return value


class View:
    """One viewer's place in the hub: replay first, then live, each frame once, in order."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.wake = asyncio.Event()               # set by the hub: new frames, status or keepalive
        self.beats = hub.beats
        self.cursor = hub.end
        self.floor: frames.Key | None = None     # resume: skip ring entries up to this id
        self.prefix: list[bytes] = []             # resume: journal entries older than the ring
        self.replay_end = hub.end
        self.live_sent = False
        self.status_version = -1
        self.sent = 0

    async def start(self, last_event_id: str | None, replay: int) -> None:
        hub = self.hub
        if last_event_id:
            self.floor = frames.parse_id(last_event_id)
            self.cursor = hub.base
            if hub.ring and self.floor < hub.ring[0][0] and hub.status["redis"] == "up":
                oldest = hub.ring[0][1].split(b"\n", 1)[0][4:].decode()   # "id: X"
                try:
                    older = await hub.read_journal(last_event_id, hub.capacity, before=frames.stream_part(oldest))
                except Exception:   # the live part still works; the seq gap will show what is missing
                    older = []
                # once each here too: a repeat in the journal (a batch re-sent after a Redis crash)
                # is dropped, and so is an event the ring holds, which this viewer gets from there
                once = SeenEvents(max(len(older), 1))
                for sid, event, payload in older:
                    key = frames.event_key(event, payload)
                    if key not in hub.seen and once.add(key):
                        self.prefix.append(hub.frame(sid, event, payload))
        else:
            self.cursor = max(hub.base, hub.end - replay)

    def take(self) -> bytes:
        """Everything this viewer has not been sent yet, as one chunk (b"" when nothing)."""
        hub, out = self.hub, []
        if self.status_version != hub.status_version:
            self.status_version = hub.status_version
            out.append(frames.control("status", dict(hub.status, viewers=hub.viewers, invalid=hub.invalid.total)))
        if self.prefix:
            out.extend(self.prefix)
            self.sent += len(self.prefix)
            self.prefix = []
        if self.cursor < hub.base:
            out.append(frames.control("lagged", {"skipped": hub.base - self.cursor}))
            self.cursor = hub.base
        entries = hub.frames_since(self.cursor)
        self.cursor = hub.end
        if self.floor is not None and entries:
            floor = self.floor
            entries = [e for e in entries if e[0] > floor]
            if entries:
                self.floor = None
        out.extend(frame for _, frame in entries)
        self.sent += len(entries)
        if not self.live_sent and self.cursor >= self.replay_end and hub.loaded:
            self.live_sent = True
            out.append(frames.control("live", {"replayed": self.sent}))
        if self.beats != hub.beats:
            self.beats = hub.beats
            if not out:
                out.append(b": keepalive\n\n")
        return b"".join(out)
