"""`python3 main.py events [--follow]`: a terminal event viewer for people without a browser.

It reads Redis only, so it runs on any machine that can reach it: first the journal's last N events,
then (with --follow) every event published on synapticllamas:llama_cpp:*, one line each. It
subscribes before it reads the journal and drops repeats by (instance, seq), so nothing published
in between is missed or shown twice. When Redis goes away it says so, retries, and on reconnecting
prints from the journal what it missed.
"""
from __future__ import annotations

import sys
import time
from typing import Any, TextIO

import click

from synapticllamas.events.contract import (
    CHANNEL_PATTERN,
    COMPONENTS,
    JOURNAL_FIELD,
    JOURNAL_STREAM,
    LEVEL_RANK,
    LEVELS,
    Event,
)

CONNECT_TIMEOUT = 2.0    # to connect, and for Redis to confirm the subscription
READ_TIMEOUT = 10.0      # for any other reply
RETRY_FIRST, RETRY_CAP = 0.5, 5.0
CATCH_UP = 10000     # journal entries read after a reconnection, at most
REMEMBERED = 50000   # (instance, seq) pairs kept to drop repeats


class Viewer:
    def __init__(self, url: str, replay: int, component: str | None = None, level: str | None = None,
                 as_json: bool = False, out: TextIO | None = None, err: TextIO | None = None,
                 redis_ca_file: str | None = None, announce_key: bytes | None = None) -> None:
        """`announce_key`: the cluster's announcement key; node events not signed with it are
        marked (their age is not judged: the journal is history)."""
        # imported here, not above: the shell's start-up imports this module for its click command
        from synapticllamas.config import redact_url
        from synapticllamas.events.redis_options import redis_options
        from synapticllamas.trust.signing import Verifier

        self.redis_options = redis_options(url, redis_ca_file)
        self._verifier = Verifier(announce_key, window=float("inf")) if announce_key else None
        from synapticllamas.events.dedup import SeenEvents, identity
        from synapticllamas.events.gaps import Gaps
        from synapticllamas.events.schema import Tally

        self.url = url
        self.shown_url = redact_url(url)
        self.replay = replay
        self.component = component
        self.floor = LEVEL_RANK[level] if level else 0
        self.as_json = as_json
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self._seen = SeenEvents(REMEMBERED)
        self._identity = identity
        self.gaps = Gaps()                   # every event counts, filtered out or not
        self.skipped = Tally()               # messages that are not valid events (events/schema.py)
        self._last_id: bytes | None = None   # newest journal entry at the last (re)connection
        self.field = JOURNAL_FIELD.encode()

    # ------------------------------------------------------------ printing

    def say(self, text: str) -> None:
        self.err.write(text + "\n")
        self.err.flush()

    def handle(self, payload: bytes, where: str) -> bool:
        """Print one event unless it was shown before or is filtered out. True if printed."""
        event = self.decode(payload, where)
        if event is None:
            return False
        key = self._identity(event.source, event.seq)
        if key is not None and not self._seen.add(key):
            return False
        self._account(event)
        if not self._passes(event):
            return False
        if self.as_json:
            line = event.to_json()
        else:
            from synapticllamas.events.lines import format_line

            line = self._mark(event, payload) + format_line(event, with_source=True)
        self.out.write(line + "\n")
        self.out.flush()
        return True

    def _mark(self, event: Event, payload: bytes) -> str:
        """'[unsigned] ' or '[bad signature] ' before a node event the cluster key does not vouch for."""
        from synapticllamas.events.contract import Component

        if self._verifier is None or event.component != Component.NODE:
            return ""
        from synapticllamas.events.schema import load_json
        from synapticllamas.trust.signing import vouched

        trust = vouched(self._verifier, load_json(payload))   # decoded by the schema already: valid JSON
        return "" if trust == "signed" else "[unsigned] " if trust == "unsigned" else "[bad signature] "

    def _account(self, event: Event) -> None:
        """Sampled is not lost: a loss gets a line of its own (stderr), sampling only the summary."""
        from synapticllamas.events.contract import Component, SystemEvent
        from synapticllamas.events.gaps import describe

        instance = str(event.source.get("instance", "?"))
        new_run = event.component == Component.SYSTEM and event.event_type == SystemEvent.REGISTER
        gap = self.gaps.note(instance, event.seq, event.sampled, new_run)
        if gap is not None and gap.lost:
            from synapticllamas.util.text import safe

            self.say(f"-- {safe(describe(instance, gap))} --")

    def decode(self, payload: bytes, where: str) -> Event | None:
        """The event, or None: a message that is not a valid event is said (one line, its reason
        escaped), counted for the summary and skipped; it never stops the viewer."""
        from synapticllamas.events.schema import Invalid, decode_event
        from synapticllamas.util.text import shown

        try:
            return decode_event(payload)
        except Invalid as exc:
            self.skipped.count(exc)
            self.say(f"(skipped a message on {shown(where, 80)}: not a valid SynapticLlamas event: {shown(str(exc), 200)})")
            return None

    def summary(self) -> None:
        """Per app with a gap: how many events sampling left out (not lost) and how many were lost;
        then how many messages were skipped as not valid events."""
        from synapticllamas.util.text import safe

        for instance, t in sorted(self.gaps.items()):
            if t.sampled or t.lost or t.out_of_sequence:
                stray = f", {t.out_of_sequence} out of sequence (not counted)" if t.out_of_sequence else ""
                self.say(f"{safe(instance)}: {t.sampled} sampled out by the app (not lost), {t.lost} lost{stray}")
        if self.skipped.total:
            self.say(f"{self.skipped.total} message{'s' if self.skipped.total != 1 else ''} skipped: not valid "
                     f"SynapticLlamas events (last: {safe(self.skipped.last or '')})")

    # ------------------------------------------------------------ reading

    def run(self, follow: bool) -> int:
        from redis import Redis
        from redis.backoff import NoBackoff
        from redis.exceptions import RedisError
        from redis.retry import Retry

        from synapticllamas.events.redis_errors import describe
        from synapticllamas.util.backoff import Backoff

        first, down_since, backoff = True, None, Backoff(RETRY_FIRST, RETRY_CAP)
        while True:
            client = Redis.from_url(self.url, socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=READ_TIMEOUT,
                                    retry=Retry(NoBackoff(), 0), socket_keepalive=True, **self.redis_options)
            pubsub = client.pubsub() if follow else None
            try:
                if pubsub is not None:
                    self._subscribe(pubsub)
                shown = self._read_journal(client, first)
                if first:
                    what = f"{shown} events from the journal" if self.replay else "no replay"
                    self.say(f"Connected to {self.shown_url} ({what})" +
                             (f"; following {CHANNEL_PATTERN} (Ctrl-C to stop)" if follow else ""))
                elif down_since is not None:
                    self.say(f"Reconnected to {self.shown_url} after {time.monotonic() - down_since:.1f} s;"
                             f" {shown} missed events read from the journal")
                if pubsub is None:
                    self.summary()
                    return 0
                first, down_since = False, None
                backoff.reset()
                while True:
                    message = pubsub.get_message(timeout=1.0)
                    if message and message["type"] == "pmessage":
                        self.handle(message["data"], message["channel"].decode(errors="replace"))
            except (RedisError, OSError) as exc:
                reason = describe(exc, connect_timeout=CONNECT_TIMEOUT, reply_timeout=READ_TIMEOUT)
                if not follow:
                    self.say(f"Error: cannot read events from Redis at {self.shown_url}: {reason}")
                    return 1
                if down_since is None:
                    down_since = time.monotonic()
                    self.say(f"Redis at {self.shown_url} is not reachable ({reason});"
                             " retrying until it is (Ctrl-C to stop)")
                time.sleep(backoff.next())
            finally:
                if pubsub is not None:
                    pubsub.close()
                client.close()

    def _subscribe(self, pubsub: Any) -> None:
        pubsub.psubscribe(CHANNEL_PATTERN)
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while time.monotonic() < deadline:   # the journal is read only once the subscription holds
            message = pubsub.get_message(timeout=0.2)
            if message and message["type"] == "psubscribe":
                return
        raise TimeoutError(f"no subscription confirmed within {CONNECT_TIMEOUT:g} s")

    def _read_journal(self, client: Any, first: bool) -> int:
        """Print the replay (first connection) or what was journalled since the last connection."""
        newest = client.xrevrange(JOURNAL_STREAM, count=1)
        if first:
            entries = self._last_matching(client, self.replay) if self.replay else []
        else:
            low = b"(" + self._last_id if self._last_id is not None else "-"
            entries = client.xrevrange(JOURNAL_STREAM, min=low, count=CATCH_UP)
        if newest:
            self._last_id = newest[0][0]
        shown = 0
        for _, fields in reversed(entries):
            if self.field in fields:
                shown += self.handle(fields[self.field], JOURNAL_STREAM)
        return shown

    def _last_matching(self, client: Any, n: int) -> list:
        """The journal, newest first, back to the n-th newest entry that passes the filters (reading
        back at most CATCH_UP entries). The entries in between come too: the filters decide what is
        printed, but every event counts for the gaps in seq."""
        scanned: list = []
        high: Any = "+"
        found = 0
        while found < n and len(scanned) < CATCH_UP:
            page = client.xrevrange(JOURNAL_STREAM, max=high, count=max(n, 200))
            if not page:
                break
            for entry in page:
                scanned.append(entry)
                if self.field in entry[1] and self.matches(entry[1][self.field]):
                    found += 1
                    if found == n:
                        return scanned
            high = b"(" + page[-1][0]
        return scanned

    def matches(self, payload: bytes) -> bool:
        from synapticllamas.events.schema import Invalid, decode_event

        try:
            event = decode_event(payload)
        except Invalid:
            return False
        return self._passes(event)

    def _passes(self, event: Event) -> bool:
        return not (self.component and event.component != self.component) and \
            LEVEL_RANK.get(event.level, 1) >= self.floor


@click.command("events")
@click.option("--follow", "-f", is_flag=True, help="Keep printing events as they are published (Ctrl-C stops).")
@click.option("--redis-url", metavar="URL", help="Redis to read (default: SOLLOL_REDIS_URL or the main --redis-url).")
@click.option("--replay", metavar="N", default=20, show_default=True, type=click.IntRange(min=0),
              help="First print the journal's last N events (that pass the filters).")
@click.option("--component", type=click.Choice(COMPONENTS), help="Only this component.")
@click.option("--level", type=click.Choice(LEVELS), help="Only this level and more severe.")
@click.option("--json", "as_json", is_flag=True, help="Print each event as its JSON object.")
@click.pass_obj
def events_viewer(settings: Any, follow: bool, redis_url: str | None, replay: int, component: str | None,
                  level: str | None, as_json: bool) -> None:
    """Print SynapticLlamas events from Redis: the journal's last N, then live with --follow."""
    from synapticllamas.config import parse_redis_url, redact_url

    url = settings.redis_url
    if redis_url is not None:
        try:
            url = parse_redis_url(redis_url)
        except ValueError as exc:
            click.echo(f"Error: --redis-url={redact_url(redis_url)!r} is not valid: {exc}", err=True)
            sys.exit(2)
    from synapticllamas.trust.key import ClusterKeyError, from_settings

    try:
        key = from_settings(settings)
    except ClusterKeyError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2)
    viewer = Viewer(url, replay, component, level, as_json, redis_ca_file=settings.redis_ca_file,
                    announce_key=key.derive("announce") if key else None)
    try:
        status = viewer.run(follow)
    except KeyboardInterrupt:
        viewer.summary()
        status = 0
    sys.exit(status)
