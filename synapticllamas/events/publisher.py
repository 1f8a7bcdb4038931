"""RedisPublisher: the observer's sink that sends events to Redis without ever making the caller wait.

Why a thread: bench/publish.py measures redis-py's synchronous client (with hiredis) well ahead of
redis.asyncio for pipelined PUBLISH + XADD, and DESIGN.md allows a dedicated sender thread for that
reason. The rules that keep it safe:

- The deque `_queue` (and its wake-up) is the only structure both threads change. The sink, on the
  loop, appends to it; the sender thread pops from it. Every other attribute has one writer: the
  loop writes `enabled`, `_overflowed`, `_stopping`...; the thread writes `connected`, `published`,
  `_trimmed`, `last_error`...; the other side only reads them (single attribute reads are atomic).
- Observer state is loop-only, so the thread never calls observer.emit(): its notices
  (redis_connected, redis_disconnected, events_dropped, error) go through loop.call_soon_threadsafe.

Events are turned into JSON on the thread, so emitters hand `details` over and do not change it
afterwards (each emitter builds a fresh dict).

Delivery, per batch of up to BATCH events, in one round trip:

    MULTI, (XADD journal MAXLEN ~ max_events * event <json>, PUBLISH <channel> <json>) x n,
    EVAL MARK_SENT (SET synapticllamas:last_seq:<instance> <last seq>, see Generations), EXEC

XADD comes before PUBLISH so that a subscriber which subscribes first and then reads the journal
misses nothing. MULTI/EXEC makes a batch all-or-nothing: if the connection breaks before Redis read
EXEC, Redis discards the batch and we resend it. If it breaks after Redis ran EXEC but before we read
the reply, the batch did go out; after reconnecting we read the last_seq key and drop the batch
instead of sending it twice. So on one Redis server there are no duplicates. (A server killed
without persistence loses that key along with the journal; a batch it ran in the last
microseconds before dying may then reach a re-subscribed client twice. Subscribers can drop such a
repeat by (source.instance, seq), which is what seq is for.)

While Redis is unreachable the events wait, oldest first, up to SOLLOL_OBSERVER_MAX_EVENTS; beyond
that the oldest are dropped and counted, and a system/events_dropped event says how many once
Redis is back. Reconnection uses capped exponential backoff with jitter (util/backoff.py).

On each connection the app registers in the apps hash and removes the entries of apps on its own
host (and pid namespace) whose process is gone: a shell killed with SIGKILL never unregisters.

Generations. Each `redis on` starts a new publisher (a new sender thread). `redis off` gives the
old one 2 s; against a Redis that hangs (stopped, swapping, a network that drops packets) it may
still hold a connection afterwards, with commands already written into it: its last batch (with a
SET of last_seq), its unregister (HDEL of the apps entry, DEL of last_seq), or it gets a late reply
and only then sends its unregister. Those run when Redis wakes or the network delivers them (TCP
retransmits what was written even after the socket was closed), possibly after the next publisher
registered on its own connection: the old publisher would delete the new one's apps entry and
last_seq key, or put an older seq into last_seq (and the new one would then resend a batch Redis
had run). Making `redis on` wait for the old thread would not help: what it wrote before it ended
still arrives later, and `redis on` must answer within 2 s. So the guard is in Redis, where the
order is decided:

- Every publisher has a generation: (run, n), `run` random per process, `n` counting publishers
  in it. It is part of the registration it writes to the apps hash (`publisher` field), so the
  entry says which publisher owns this instance's bookkeeping.
- Each write that could hurt a later publisher is a small Lua script (atomic, like MULTI/EXEC)
  that checks the entry first: registering is refused to a publisher older than the one
  registered (same run, smaller n); the batch's last_seq SET runs only while the entry is this
  publisher's (or absent); unregistering, like removing a dead app, deletes the entry and its
  last_seq key only if the entry is still exactly the registration that was read or written.
- Events themselves (XADD + PUBLISH) are not guarded: an old publisher's late batch holds events
  from before `redis off`, which are real, and the journal keeps them.

So this needs EVAL (Redis's @scripting ACL category) besides the commands above.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import secrets
import threading
import time
from collections import deque
from typing import Any

from synapticllamas.config import redact_url
from synapticllamas.events import schema
from synapticllamas.events.contract import APPS_HASH, CHANNEL_PATTERN, JOURNAL_FIELD, JOURNAL_STREAM, Event
from synapticllamas.events.redis_errors import describe
from synapticllamas.events.redis_options import redis_options
from synapticllamas.util.backoff import Backoff

BATCH = 500                 # events per transaction: big enough to amortise the round trip
CONNECT_TIMEOUT = 1.5       # `redis on` reports within 2 s
SOCKET_TIMEOUT = 2.0        # a reply slower than this counts as a broken connection
BACKOFF_FIRST = 0.05        # seconds before the first retry; doubles, with jitter
BACKOFF_CAP = 2.0
LAST_SEQ_PREFIX = "synapticllamas:last_seq:"   # per instance: seq of the last batch Redis ran
LAST_SEQ_TTL = 86400        # a crashed app's key expires by itself

RUN = secrets.token_hex(8)          # this process, as opposed to an earlier one with the same pid
_generations = itertools.count(1)   # publishers started in this process, in order

# Register, unless a later publisher of this process already has (then 0: this one is stale).
# KEYS[1] apps hash; ARGV[1] instance, ARGV[2] registration JSON, ARGV[3] run, ARGV[4] generation
REGISTER = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current then
  local ok, reg = pcall(cjson.decode, current)
  local pub = ok and type(reg) == 'table' and reg['publisher']
  if type(pub) == 'table' and pub['run'] == ARGV[3] and (tonumber(pub['generation']) or 0) > tonumber(ARGV[4]) then
    return 0
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""

# The batch's last_seq SET. The key is the registered publisher's: a late batch of an earlier one
# must not put an older seq into it.
# KEYS[1] apps hash, KEYS[2] last_seq key; ARGV[1] instance, ARGV[2] registration, ARGV[3] seq, ARGV[4] ttl
MARK_SENT = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current and current ~= ARGV[2] then
  return 0
end
redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[4])
return 1
"""

# Compare-and-delete, for unregistering and for removing dead apps: an entry written since it was
# read (by a newer publisher) stays. KEYS[1] apps hash, KEYS[i+1] the last_seq key of app i,
# ARGV[2i-1] its instance, ARGV[2i] the registration it must still have
FORGET = """
local gone = 0
for i = 2, #KEYS do
  if redis.call('HGET', KEYS[1], ARGV[2 * i - 3]) == ARGV[2 * i - 2] then
    redis.call('HDEL', KEYS[1], ARGV[2 * i - 3])
    redis.call('DEL', KEYS[i])
    gone = gone + 1
  end
end
return gone
"""


def pid_namespace() -> str | None:
    """Which pid numbering this process sees ("pid:[4026531836]"); None without /proc. Containers
    that share the host name (host networking) each have their own, and a pid means nothing outside it."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def process_gone(pid: Any) -> bool:
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:   # PermissionError: it exists, it is someone else's
        return False
    return False


class _Refused(Exception):
    """Redis answered but refused a batch (EXECABORT, NOAUTH...): nothing of it ran."""


CHECK_ABOVE = 8192   # bytes: a smaller event of ours is within every size limit readers apply
_misfits: set[tuple[str, str]] = set()
log = logging.getLogger("synapticllamas.publisher")


def encode(event: Event, signer: Any = None) -> bytes:
    """The event's JSON, as every reader will accept it (events/schema.py): details that are too big,
    too deep, not finite or cannot be encoded at all are fitted (cut), or replaced by a note. With
    a signer (trust/signing.Signer, a node with the cluster key), signed: what is signed is that
    JSON, so a reader that decodes it with the schema verifies exactly what it got."""
    data = _fitted(event)
    if signer is None:
        return data
    return json.dumps(signer.sign(json.loads(data)), separators=(",", ":"), ensure_ascii=False).encode()


def _fitted(event: Event) -> bytes:
    try:
        data = event.to_json().encode()
        if len(data) > CHECK_ABOVE:
            schema.decode_event(data)
        elif event.component in schema.TYPED_COMPONENTS or (event.component, event.event_type) in schema.TYPED_TYPES:
            schema.check_typed(event)    # a few field checks: the sizes cannot be exceeded this small
        return data
    except (TypeError, ValueError, RecursionError) as exc:   # schema.Invalid is a ValueError
        problem = f"{type(exc).__name__}: {exc}"[:200]
        if isinstance(exc, schema.Invalid) and exc.where.startswith("details.") and \
                (event.component, event.event_type) not in _misfits:
            _misfits.add((event.component, event.event_type))   # our bug: once per type in the log
            log.warning("our own %s/%s event fails the event schema (%s): sent with its details fitted",
                        event.component, event.event_type, exc)
    message = schema.cut_message(str(event.message))
    candidate = b""
    for attempt in range(2):
        details = schema.fit(event.details) if attempt == 0 else {"unencodable_details": problem}
        try:
            candidate = Event(event.timestamp, event.component, event.event_type, message, details,
                              event.level, event.source, event.seq, event.sampled).to_json().encode()
            schema.decode_event(candidate)
            return candidate
        except (TypeError, ValueError, RecursionError) as exc:
            problem = f"{type(exc).__name__}: {exc}"[:200]
    return candidate   # only when our own timestamp or source is broken: nothing better to send


def _instance_of(field: Any, registration: Any) -> str:
    """The instance a hash entry belongs to (its last_seq key is per instance): the registration's
    `instance`, else the field itself (the apps hash is keyed by instance)."""
    try:
        instance = json.loads(registration).get("instance")
    except (ValueError, AttributeError, TypeError):
        instance = None
    if isinstance(instance, str) and instance:
        return instance
    return field.decode() if isinstance(field, bytes) else str(field)


class RedisPublisher:
    def __init__(self, settings: Any, observer: Any, registration: dict[str, Any] | None = None,
                 hash_key: str = APPS_HASH, field: str | None = None, signer: Any = None) -> None:
        """`hash_key`/`field`: where the registration lives: the apps hash under the instance (a
        shell), or the nodes hash under the node's HOST:PORT (`main.py node`). `signer`
        (trust/signing.Signer): every event and every registration written is signed, at the
        moment it is written, so a batch held through an outage goes out with a fresh signature."""
        self._signer = signer
        self.observer = observer
        self.url = settings.redis_url
        self.redis_options = redis_options(self.url, getattr(settings, "redis_ca_file", None))
        self.shown_url = redact_url(self.url)
        self.max_events = settings.observer_max_events
        self.instance = observer.source["instance"]
        self._hash = hash_key
        self._field = field or self.instance
        self.generation = next(_generations)
        registration = self._stamped(registration or {"instance": self.instance})
        self._host, self._pid_ns = registration.get("host") or registration.get("hostname"), registration["pid_ns"]
        self._registration_obj = registration           # what is signed again at each write
        self._registration = self._as_written(registration)
        self._next_registration: dict[str, Any] | None = None   # written on the loop by update_registration()
        self._last_seq_key = LAST_SEQ_PREFIX + self.instance
        # read here, not at import: what describe() names is what the connection really uses
        self.connect_timeout = CONNECT_TIMEOUT
        self.reply_timeout = SOCKET_TIMEOUT

        # shared: the queue and how the sink wakes the thread
        self._queue: deque[Event] = deque()
        self._wake = threading.Event()
        self._idle = False              # written by the thread: it is (about to be) waiting on _wake
        self._stop = threading.Event()  # interrupts the thread's backoff sleep on close()

        # written on the loop only
        self.enabled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._remove_sink: Any = None
        self._overflowed = 0            # events the sink pushed out of a full queue
        self._drops_reported = 0
        self._stopping = False
        self._deadline = float("inf")   # monotonic time by which close() wants the thread done
        self._first: asyncio.Future | None = None     # (connected, error) of the first attempt
        self._finished: asyncio.Future | None = None  # the thread ended: events it could not send

        # written by the sender thread only
        self.state = "off"              # connecting | connected | retrying | closed
        self.connected = False
        self.published = 0
        self.reconnects = 0             # connections made after a failed attempt or a lost connection
        self.failed_attempts = 0
        self.last_error: str | None = None
        self.flushed_on_close = 0
        self._trimmed = 0               # oldest events dropped from the batch held during an outage
        self._inflight: list[Event] = []
        self._inflight_last_seq = 0
        self._inflight_trimmed = 0
        self._inflight_unknown = False  # a send failed: Redis may or may not have run the batch
        self._drops_seen = 0
        self._next_drop_report = 0.0
        self._announced: str | None = None   # the last connection notice sent: "up" or "down"
        self._outage: tuple[float, int] | None = None   # (seconds, events buffered) of the last outage
        self._last_exec_error: str | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ loop side

    def start(self, backlog: Any = ()) -> None:
        """Attach to the observer and start the sender thread (from the event loop).

        `backlog`: events emitted before publishing was on, sent first and in order (the newest
        max_events of them), so a subscriber sees the app's history from `register` on."""
        if self.enabled:
            return
        # Import redis here, on the loop's thread, before the sender thread exists: two threads
        # importing redis and redis.asyncio at once (node discovery starts with `redis on` too)
        # can hit CPython's import-lock deadlock detection and kill one of them.
        import redis.backoff
        import redis.exceptions
        import redis.retry  # noqa: F401
        self._queue.extend(list(backlog)[-self.max_events:])
        self._loop = asyncio.get_running_loop()
        self._first = self._loop.create_future()
        self._finished = self._loop.create_future()
        self.enabled = True
        self.state = "connecting"
        self._remove_sink = self.observer.add_sink(self._sink)
        self._thread = threading.Thread(target=self._run, name="redis-publisher", daemon=True)
        self._thread.start()

    def _sink(self, event: Event) -> None:
        """The observer's sink: O(1), no I/O. A full queue loses its oldest event, counted."""
        queue = self._queue
        if len(queue) >= self.max_events:
            try:
                queue.popleft()
                self._overflowed += 1
            except IndexError:  # the sender emptied it meanwhile: nothing was lost
                pass
        queue.append(event)
        if self._idle:
            self._wake.set()

    async def wait_first_attempt(self, timeout: float) -> tuple[bool, str | None] | None:
        """(connected, error) of the first connection attempt, or None if it has not ended in time."""
        assert self._first is not None
        try:
            return await asyncio.wait_for(asyncio.shield(self._first), timeout)
        except TimeoutError:
            return None

    async def close(self, timeout: float = 2.0) -> dict[str, Any]:
        """Stop taking events, send what is queued within `timeout` seconds, unregister, stop.

        Returns {"flushed": sent during close, "unsent": events left behind, "timed_out": bool}."""
        if not self.enabled:
            return {"flushed": 0, "unsent": 0, "timed_out": False}
        assert self._finished is not None
        self.enabled = False
        self._remove_sink()
        self._deadline = time.monotonic() + timeout
        self._stopping = True
        self._wake.set()
        self._stop.set()
        try:
            unsent = await asyncio.wait_for(asyncio.shield(self._finished), timeout)
            timed_out = False
        except TimeoutError:  # the thread is a daemon: it ends at its next check or with us
            unsent, timed_out = len(self._queue) + len(self._inflight), True
        return {"flushed": self.flushed_on_close, "unsent": unsent, "timed_out": timed_out}

    def status(self) -> dict[str, Any]:
        queued = len(self._queue) + len(self._inflight)
        # during an outage the thread trims the held batch only when it wakes; count it already
        excess = max(0, queued - self.max_events) if not self.connected else 0
        return {
            "enabled": self.enabled,
            "connected": self.connected,
            "state": self.state if self.enabled else "off",
            "url": self.shown_url,
            "channels": CHANNEL_PATTERN,
            "journal": JOURNAL_STREAM,
            "published": self.published,
            "buffered": queued - excess,
            "buffer_limit": self.max_events,
            "dropped": self._overflowed + self._trimmed + excess,
            "last_error": self.last_error,
            "reconnects": self.reconnects,
            "failed_attempts": self.failed_attempts,
        }

    def _from_thread(self, callback: Any, *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)  # type: ignore[union-attr]
        except RuntimeError:  # the loop is closed: the app is gone, nobody to tell
            pass

    def _settle_first(self, connected: bool, error: str | None) -> None:
        if self._first is not None and not self._first.done():
            self._first.set_result((connected, error))

    def _settle_finished(self, unsent: int) -> None:
        if self._finished is not None and not self._finished.done():
            self._finished.set_result(unsent)

    def _notice(self, event_type: str, message: str, details: dict[str, Any], level: str) -> None:
        if self.enabled:   # after close() the outcome is reported by whoever closed us
            self.observer.emit("system", event_type, message, details, level=level)

    def _emit_drops(self) -> None:
        total = self._overflowed + self._trimmed
        new = total - self._drops_reported
        if new <= 0 or not self.enabled:
            return
        self._drops_reported = total
        self.observer.emit(
            "system", "events_dropped",
            f"{new} events were dropped: the outage buffer holds at most {self.max_events}",
            {"dropped": new, "total_dropped": total, "buffer_limit": self.max_events, "url": self.shown_url},
            level="warning")

    # ------------------------------------------------------------ sender thread

    def _run(self) -> None:
        from redis import ConnectionPool
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # No retries inside redis-py: a silent resend could duplicate a batch; we decide here.
        pool = ConnectionPool.from_url(
            self.url, socket_connect_timeout=self.connect_timeout, socket_timeout=self.reply_timeout,
            retry=Retry(NoBackoff(), 0), health_check_interval=0, socket_keepalive=True,
            client_name="synapticllamas", **self.redis_options)
        conn = None
        first = True                   # no connection attempt has ended yet
        lost_at: float | None = None   # when the current outage began
        backoff, delay = Backoff(BACKOFF_FIRST, BACKOFF_CAP), 0.0
        progressed = False             # a batch went out on the current connection
        while True:
            if conn is None:
                if self._stopping and (not self._pending() or time.monotonic() >= self._deadline):
                    break
                if delay and not self._stopping:
                    self._trim()
                    self._stop.wait(delay)
                try:
                    conn = self._connect(pool)
                except Exception as exc:  # whatever the reason: keep buffering and retry
                    self._attempt_failed(exc, first)
                    lost_at = lost_at or time.monotonic()
                    first = False
                    if self._stopping:
                        break   # close() allows one attempt, then leaves the rest unsent
                    delay = backoff.next()
                    continue
                self._trim()
                self._on_connect(first, lost_at)
                first, lost_at, progressed = False, None, False
            if not self._inflight and not self._take_batch():
                if self._stopping:
                    break
                self._announce_up()
                self._report_drops(force=True)
                self._wait_for_work()
                continue
            if self._stopping and time.monotonic() >= self._deadline:
                break
            try:
                self._send(conn)
            except Exception as exc:
                conn.disconnect()
                conn = None
                lost_at = time.monotonic()
                self._send_failed(exc)
                if progressed:   # a working connection broke: try again at once
                    backoff.reset()
                    delay = 0.0
                else:            # this connection never managed a batch: do not spin
                    delay = backoff.next()
                continue
            progressed = True
            self._announce_up()
            self._report_drops(force=False)
        unsent = self._pending()
        if conn is not None:
            self._unregister(conn)
        self.connected = False
        self.state = "closed"
        self._from_thread(self._settle_finished, unsent)

    def _stamped(self, registration: dict[str, Any]) -> dict[str, Any]:
        # seq: the last event created before this registration, so a reader that starts from the
        # hash knows which of the app's events are older than what it read (signed replays)
        return dict(registration, pid_ns=pid_namespace(), publisher={"run": RUN, "generation": self.generation},
                    seq=self.observer.seq)

    def _as_written(self, registration: dict[str, Any]) -> str:
        if self._signer is not None:
            registration = self._signer.sign(registration)
        return json.dumps(registration, default=str)

    def update_registration(self, registration: dict[str, Any]) -> None:
        """(loop) A newer registration (a node's heartbeat refreshes it): written with the next batch,
        or at the next connection. One attribute write: the thread only reads it."""
        self._next_registration = self._stamped(registration)

    def _take_registration(self) -> str:
        """(thread) The registration to write now; from here on it is the one the guards compare.
        Signed, it is signed now: a reconnection after an outage does not write an old signature."""
        pending = self._next_registration
        if pending is not None:
            self._registration_obj = pending
            if self._next_registration is pending:
                self._next_registration = None
        if pending is not None or self._signer is not None:
            self._registration = self._as_written(self._registration_obj)
        return self._registration

    def _pending(self) -> int:
        return len(self._inflight) + len(self._queue)

    def _connect(self, pool: Any) -> Any:
        """Connect, (re-)register the app, and settle a batch whose fate a broken connection hid."""
        conn = pool.make_connection()
        try:
            conn.connect()
            commands: list[tuple[Any, ...]] = [
                ("EVAL", REGISTER, 1, self._hash, self._field, self._take_registration(), RUN, self.generation),
                ("HGETALL", self._hash)]
            if self._inflight_unknown:
                commands.append(("GET", self._last_seq_key))
            replies = self._roundtrip(conn, commands)
            self._remove_dead_apps(conn, replies[1])
        except BaseException:
            conn.disconnect()
            raise
        if self._inflight_unknown:
            self._inflight_unknown = False
            last = replies[-1]
            if last is not None and int(last) >= self._inflight_last_seq:
                # Redis ran the batch before the connection broke: it is out, do not send it again
                self.published += len(self._inflight) + self._inflight_trimmed
                self._trimmed -= self._inflight_trimmed
                self._inflight = []
                self._inflight_trimmed = 0
        return conn

    def _remove_dead_apps(self, conn: Any, apps: Any) -> None:
        """Delete the registrations of this host's (and pid namespace's) apps whose process is gone,
        each only if it is still the one read here."""
        if not self._host:
            return
        pairs = apps.items() if isinstance(apps, dict) else zip(apps[::2], apps[1::2], strict=True)   # RESP3 / RESP2
        dead: list[tuple[Any, Any]] = []
        for instance, text in pairs:
            try:
                reg = json.loads(text)
            except ValueError:   # not ours to judge
                continue
            if (isinstance(reg, dict) and (reg.get("host") or reg.get("hostname")) == self._host
                    and reg.get("pid_ns") == self._pid_ns
                    and process_gone(reg.get("pid"))):
                dead.append((instance, text))
        if dead:
            try:
                self._forget(conn, dead)
            except _Refused:     # housekeeping: never a reason not to publish
                pass

    def _forget(self, conn: Any, entries: list[tuple[Any, Any]]) -> None:
        """Delete these (instance, registration) apps entries and their last_seq keys, each only if
        the entry still holds that registration (one script: nothing can come in between)."""
        keys = [(LAST_SEQ_PREFIX + _instance_of(field, text)).encode() for field, text in entries]
        args = [part for entry in entries for part in entry]
        self._roundtrip(conn, [("EVAL", FORGET, 1 + len(keys), self._hash, *keys, *args)])

    def _roundtrip(self, conn: Any, commands: list[tuple[Any, ...]]) -> list[Any]:
        from redis.exceptions import ResponseError

        conn.send_packed_command(conn.pack_commands(commands), check_health=False)
        replies: list[Any] = []
        error: ResponseError | None = None
        for _ in commands:      # read every reply, even after an error, to stay in step
            try:
                replies.append(conn.read_response())
            except ResponseError as exc:
                replies.append(exc)
                error = error or exc
        if error is not None:
            raise _Refused(str(error))
        return replies

    def _take_batch(self) -> bool:
        queue = self._queue
        batch = []
        try:
            for _ in range(min(len(queue), BATCH)):
                batch.append(queue.popleft())
        except IndexError:
            pass
        if batch:
            self._inflight = batch
            self._inflight_last_seq = batch[-1].seq
            self._inflight_trimmed = 0
        return bool(batch)

    def _send(self, conn: Any) -> None:
        from redis.exceptions import ResponseError

        batch = self._inflight
        maxlen = self.max_events
        commands: list[tuple[Any, ...]] = [("MULTI",)]
        for event in batch:
            data = encode(event, self._signer)
            commands.append(("XADD", JOURNAL_STREAM, "MAXLEN", "~", maxlen, "*", JOURNAL_FIELD, data))
            commands.append(("PUBLISH", event.channel, data))
        if self._next_registration is not None:     # a refreshed registration goes with the batch
            commands.append(("EVAL", REGISTER, 1, self._hash, self._field, self._take_registration(), RUN,
                             self.generation))
        commands.append(("EVAL", MARK_SENT, 2, self._hash, self._last_seq_key, self._field, self._registration,
                         self._inflight_last_seq, LAST_SEQ_TTL))
        commands.append(("EXEC",))
        self._inflight_unknown = True
        try:
            results = self._roundtrip(conn, commands)[-1]
        except _Refused:
            self._inflight_unknown = False   # MULTI was aborted: nothing ran, resend it later
            raise
        self._inflight_unknown = False
        self.published += len(batch)
        if self._stopping:
            self.flushed_on_close += len(batch)
        self._inflight = []
        self._inflight_trimmed = 0
        # A command that failed inside EXEC (a journal key of the wrong type...) did not stop the
        # others: the batch went out. Say so once per distinct error, not once per batch.
        failed = next((r for r in results or () if isinstance(r, ResponseError)), None)
        if failed is not None and str(failed) != self._last_exec_error:
            self._last_exec_error = self.last_error = f"Redis rejected part of a batch: {failed}"
            self._from_thread(self._notice, "error", self.last_error,
                              {"url": self.shown_url, "error": str(failed)}, "error")

    def _report_drops(self, force: bool) -> None:
        """Ask the loop to publish system/events_dropped: when idle, else at most once a second."""
        dropped = self._overflowed + self._trimmed
        now = time.monotonic()
        if dropped > self._drops_seen and (force or now >= self._next_drop_report):
            self._drops_seen = dropped
            self._next_drop_report = now + 1.0
            self._from_thread(self._emit_drops)

    def _wait_for_work(self) -> None:
        # _idle is set before the queue is checked and read by the sink after it appends, so an
        # event appended while we decide to sleep always finds _idle true and sets _wake.
        self._idle = True
        if not self._queue and not self._stopping:
            self._wake.wait()
        self._wake.clear()
        self._idle = False

    def _trim(self) -> None:
        """During an outage: keep the newest max_events of held batch + queue, count the rest."""
        excess = len(self._inflight) + len(self._queue) - self.max_events
        if excess > 0 and self._inflight:
            n = min(excess, len(self._inflight))
            del self._inflight[:n]
            self._trimmed += n
            self._inflight_trimmed += n

    def _on_connect(self, first: bool, lost_at: float | None) -> None:
        self.connected = True
        self.state = "connected"
        if first:
            self._from_thread(self._settle_first, True, None)
        else:
            self.reconnects += 1
        self._outage = (round(time.monotonic() - lost_at, 3), self._pending()) if lost_at is not None else None

    def _announce_up(self) -> None:
        """redis_connected, once a batch went through (so a server that refuses batches stays quiet)."""
        if self._announced == "up":
            return
        self._announced = "up"
        details: dict[str, Any] = {"url": self.shown_url, "channels": CHANNEL_PATTERN}
        if self._outage is None:
            message = f"Redis connected: {self.shown_url} (channels {CHANNEL_PATTERN})"
        else:
            outage_s, buffered = self._outage
            message = (f"Redis connected at {self.shown_url} after {outage_s:g} s unreachable;"
                       f" sending the {buffered} events buffered meanwhile")
            details.update(outage_s=outage_s, buffered=buffered, reconnects=self.reconnects)
        self._from_thread(self._notice, "redis_connected", message, details, "info")

    def _announce_down(self, message: str) -> None:
        """redis_disconnected, once per outage (not once per retry)."""
        if self._announced == "down":
            return
        self._announced = "down"
        self._from_thread(
            self._notice, "redis_disconnected", f"{message}; buffering up to {self.max_events} events and retrying",
            {"url": self.shown_url, "error": self.last_error, "buffer_limit": self.max_events}, "warning")

    def _attempt_failed(self, exc: BaseException, first: bool) -> None:
        self.failed_attempts += 1
        self.last_error = self._describe(exc)
        self.connected = False
        self.state = "retrying"
        if first:
            self._from_thread(self._settle_first, False, self.last_error)
        self._announce_down(f"Redis unreachable at {self.shown_url} ({self.last_error})")

    def _send_failed(self, exc: BaseException) -> None:
        self.connected = False
        self.state = "retrying"
        self.last_error = self._describe(exc)
        self._announce_down(f"Publishing to {self.shown_url} failed ({self.last_error})")

    def _describe(self, exc: BaseException) -> str:
        return describe(exc, connect_timeout=self.connect_timeout, reply_timeout=self.reply_timeout)

    def _unregister(self, conn: Any) -> None:
        """On close: take the app out of the apps hash (within the close deadline, best effort)."""
        try:
            self._forget(conn, [(self._field, self._registration)])
        except Exception as exc:
            self.last_error = self._describe(exc)
        finally:
            conn.disconnect()
