"""The Redis publisher against a real redis-server: delivery, journal, registration, no duplicates."""
import asyncio
import json
import signal

from event_support import CONTRACT_FIELDS, Subscriber, journal, make_app, publish_marker
from support import RedisCliSubscriber, until, wait_for

from synapticllamas.events.contract import APPS_HASH, COMPONENTS, LEVELS
from synapticllamas.events.publisher import LAST_SEQ_PREFIX


def test_redis_cli_psubscribe_receives_each_event_exactly_once_with_every_field(tmp_path, redis_server):
    sub = RedisCliSubscriber(redis_server.port)       # the reference document's own command
    app = make_app(tmp_path, redis_server.url)
    created = []

    async def scenario():
        app.observer.add_sink(created.append)
        await app.start()
        started, outcome = await app.redis_on()
        assert (started, outcome) == (True, (True, None))
        for i, component in enumerate(COMPONENTS):
            for level in LEVELS:
                app.observer.emit(component, f"test_{level}", f"{component} {level} ünïcode [x] \"q\" {i}",
                                  {"n": i, "nested": {"list": [1, 2.5, None]}}, level=level)
        await app.close()

    asyncio.run(scenario())
    published = created        # `redis on` sends what came before it too: everything since register
    assert [e.event_type for e in published[:2]] == ["register", "redis_on"]
    assert len(published) >= len(COMPONENTS) * len(LEVELS) + 3    # + register, redis_on, unregister

    marker = json.dumps({"marker": publish_marker(redis_server.port)})
    wait_for(lambda: marker in sub.raw, 10, what="the marker published after the app closed")   # a repeat came before it
    received = sub.raw[3:sub.raw.index(marker) - 3]   # after the three lines that confirmed the subscription
    sub.close()

    messages = [received[i:i + 4] for i in range(0, len(received), 4)]
    assert all(m[0] == "pmessage" and m[1] == "synapticllamas:llama_cpp:*" for m in messages)
    events = [json.loads(m[3]) for m in messages]
    assert [e["seq"] for e in events] == [e.seq for e in published]            # each once, in order
    for (_, _, channel, _), event, original in zip(messages, events, published, strict=True):
        assert set(event) == CONTRACT_FIELDS
        assert channel == f"synapticllamas:llama_cpp:{event['component']}"
        assert event == json.loads(original.to_json())
        assert event["source"]["instance"] == app.instance


def test_a_late_reader_finds_all_50_events_in_the_journal(tmp_path, redis_server):
    app = make_app(tmp_path, redis_server.url)

    async def scenario():
        await app.redis_on()
        for i in range(50):
            app.observer.emit("coordinator", "model_loading", f"loading {i}", {"i": i})
        await until(lambda: app.publisher.status()["buffered"] == 0 and app.publisher.published >= 51,
                    what="the 50 events to be published")
        ours = [e for e in journal(redis_server.port) if e.event_type == "model_loading"]
        await app.close()
        return ours

    ours = asyncio.run(scenario())
    assert [e.details["i"] for e in ours] == list(range(50))
    assert all(e.source["instance"] == app.instance for e in ours)


def test_sampling_decides_what_reaches_redis(tmp_path, redis_server):
    app = make_app(tmp_path, redis_server.url, SOLLOL_OBSERVER_SAMPLING="true", SOLLOL_OBSERVER_SAMPLE_RATE="0.1")

    async def scenario():
        await app.redis_on()
        for i in range(1000):
            app.observer.emit("raw", "log", f"line {i}", sample=True)
        app.observer.emit("coordinator", "start", "llama.cpp coordinator started", {"port": 18080})
        await app.close()

    asyncio.run(scenario())
    entries = journal(redis_server.port)
    assert sum(e.component == "raw" for e in entries) == 100
    assert [e.event_type for e in entries if e.component == "coordinator"] == ["start"]


def test_registration_lives_in_the_apps_hash_while_publishing(tmp_path, redis_server):
    client = redis_server.client()
    app = make_app(tmp_path, redis_server.url)

    async def scenario():
        await app.redis_on()
        await until(lambda: client.hget(APPS_HASH, app.instance), what="the apps hash entry")
        registered = json.loads(client.hget(APPS_HASH, app.instance))
        await app.redis_off()
        after_off = client.hget(APPS_HASH, app.instance)
        await app.close()
        return registered, after_off

    registered, after_off = asyncio.run(scenario())
    assert registered["instance"] == app.instance and registered["mode"] == "standard"
    assert registered["redis_url"] == redis_server.url
    assert after_off is None
    assert [k for k in client.keys("synapticllamas:last_seq:*")] == []   # no bookkeeping left behind


EXEC = b"$4\r\nEXEC\r\n"   # how a batch ends on the wire


class Hop:
    """A TCP hop between the publisher and Redis that, armed, injects one network fault into the
    connection that next sends a batch (MULTI ... EXEC); other connections pass untouched. Redis
    and the publisher are the real ones.

    - "lose_reply": Redis runs the batch and answers; the answer is lost with the connection, so
      the publisher cannot know whether the batch went out.
    - "hold_batch": the batch, and whatever the connection sends after it, is held, as by a network
      that drops the packets, and reaches Redis at release(), however late: TCP retransmits what
      was written even after the program gave up and closed the socket.
    - "hold_after_batch": the batch and its answer pass; what the connection sends next is held."""

    def __init__(self, redis_port: int) -> None:
        self.redis_port = redis_port
        self.fault: str | None = None
        self.lost = 0          # answers lost
        self.held = 0          # bytes held
        self.delivered = 0     # held connections whose bytes Redis has run (it answered, then closed)
        self._release = asyncio.Event()
        self._writers: list[asyncio.StreamWriter] = []
        self._handlers: list[asyncio.Task] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    def arm(self, fault: str) -> None:
        self.fault = fault
        self._release.clear()

    def release(self) -> None:
        self._release.set()

    async def _client(self, creader, cwriter):
        self._handlers.append(asyncio.current_task())
        sreader, swriter = await asyncio.open_connection("127.0.0.1", self.redis_port)
        self._writers += [cwriter, swriter]
        fault: str | None = None
        held: list[bytes] = []

        def flush():
            for chunk in held:
                swriter.write(chunk)
            held.clear()

        async def upstream():
            nonlocal fault
            try:
                while data := await creader.read(65536):
                    if self.fault and fault is None and EXEC in data:
                        fault, self.fault = self.fault, None
                        if fault == "hold_after_batch":   # this batch passes, the next bytes do not
                            swriter.write(data)
                            await swriter.drain()
                            continue
                    if fault in ("hold_batch", "hold_after_batch") and not self._release.is_set():
                        held.append(data)
                        self.held += len(data)
                        continue
                    flush()
                    swriter.write(data)
                    await swriter.drain()
            except OSError:
                pass
            if held or (fault in ("hold_batch", "hold_after_batch") and not self._release.is_set()):
                await self._release.wait()   # the publisher is gone; its bytes are still on their way
                flush()
                await swriter.drain()
            if swriter.can_write_eof():
                swriter.write_eof()          # Redis runs what it got, answers, and closes

        async def downstream():
            try:
                while data := await sreader.read(65536):
                    if fault == "lose_reply":
                        self.lost += 1
                        break
                    if not cwriter.is_closing():
                        cwriter.write(data)
                        await cwriter.drain()
            except OSError:
                pass
            finally:
                cwriter.close()
                if fault in ("hold_batch", "hold_after_batch"):
                    self.delivered += 1
                if fault == "lose_reply":
                    swriter.close()

        await asyncio.gather(upstream(), downstream())
        swriter.close()

    async def aclose(self) -> None:
        self.server.close()
        self._release.set()
        for writer in self._writers:
            writer.close()
        await asyncio.gather(*self._handlers, return_exceptions=True)


def test_a_batch_whose_reply_was_lost_is_not_sent_twice(tmp_path, redis_server):
    subscriber = Subscriber(redis_server.port)
    subscriber.start()
    assert subscriber.ready.wait(10)

    async def scenario():
        hop = Hop(redis_server.port)
        app = make_app(tmp_path, f"redis://127.0.0.1:{await hop.start()}")
        await app.redis_on()
        await until(lambda: app.publisher.status()["buffered"] == 0 and app.publisher.connected)
        hop.arm("lose_reply")
        for i in range(5):                                   # one batch
            app.observer.emit("rpc_backend", "connect", f"backend {i} up", {"i": i})
        await until(lambda: hop.lost == 1, what="the reply to be lost")
        await until(lambda: app.publisher.status()["reconnects"] == 1, what="the publisher to reconnect")
        for i in range(5, 10):
            app.observer.emit("rpc_backend", "connect", f"backend {i} up", {"i": i})
        await until(lambda: app.publisher.status()["buffered"] == 0, what="the second batch")
        status = app.publisher.status()
        await app.close()
        await hop.aclose()
        return status

    status = asyncio.run(scenario())
    subscriber.sync()                # a repeat would have come by now
    subscriber.stop()
    ours = [e["details"]["i"] for e in subscriber.raw if e["event_type"] == "connect"]
    assert ours == list(range(10))                                               # pub/sub: once each
    assert [e.details["i"] for e in journal(redis_server.port) if e.event_type == "connect"] == list(range(10))
    assert status["dropped"] == 0 and status["last_error"] is not None


def apps_entry_owner(client, instance):
    """The generation of the publisher whose registration is in the apps hash (None: no entry)."""
    entry = client.hget(APPS_HASH, instance)
    return entry and json.loads(entry)["publisher"]["generation"]


def test_redis_hangs_during_redis_off_then_redis_on_again_three_times(tmp_path, redis_server):
    """`redis on`, Redis hangs (SIGSTOP), `redis off` gives up after 2 s, Redis wakes up (SIGCONT),
    `redis on`; three times. The publisher `redis off` left behind still has its last batch in the
    connection; whatever it does when Redis wakes, the live publisher keeps its apps entry and
    last_seq key, and what it sends reaches the journal once."""
    client = redis_server.client()
    app = make_app(tmp_path, redis_server.url)
    created = []

    async def scenario():
        app.observer.add_sink(created.append)
        await app.start()
        assert (await app.redis_on())[1] == (True, None)
        owners = []
        for _ in range(3):
            old = app.publisher
            await until(lambda old=old: old.connected and old.status()["buffered"] == 0, what="an idle publisher")
            redis_server.proc.send_signal(signal.SIGSTOP)
            try:
                off = await app.redis_off()
            finally:
                redis_server.proc.send_signal(signal.SIGCONT)
            assert off["unsent"] >= 1, off           # "queued events were NOT sent": its redis_off event
            last_on = app.observer.seq
            assert await app.redis_on() == (True, (True, None))
            live = app.publisher
            await until(lambda old=old: old.state == "closed", what="the publisher left behind to end")
            await until(lambda live=live: live.status()["buffered"] == 0, what="the new publisher's backlog")
            owners.append((apps_entry_owner(client, app.instance), live.generation))
        for i in range(20):
            app.observer.emit("rpc_backend", "connect", f"backend {i} up", {"i": i})
        await until(lambda: live.status()["buffered"] == 0 and live.published >= 20, what="the 20 events")
        expected = [e.seq for e in created if e.seq > last_on]
        last_seq = client.get(LAST_SEQ_PREFIX + app.instance)
        ours = [e.seq for e in journal(redis_server.port) if e.source["instance"] == app.instance]
        await app.close()
        return owners, last_on, expected, last_seq, ours

    owners, last_on, expected, last_seq, ours = asyncio.run(scenario())
    assert [found for found, _ in owners] == [live for _, live in owners]   # the entry is the live publisher's
    assert last_seq is not None and int(last_seq) == expected[-1]
    assert [seq for seq in ours if seq > last_on] == expected               # each once, in order
    assert client.hget(APPS_HASH, app.instance) is None                     # its own exit still unregisters


def test_late_commands_of_a_publisher_left_behind_never_undo_the_next_one(tmp_path, redis_server):
    """What a publisher left behind by `redis off` had written reaches Redis after the next
    publisher registered (a network that held its packets, then delivered them): first its
    unregister (HDEL of the apps entry, DEL of last_seq), then a batch (with its older seq for
    last_seq). The live publisher's entry and last_seq key stay as they are."""
    client = redis_server.client()
    created = []

    async def scenario():
        hop = Hop(redis_server.port)
        app = make_app(tmp_path, f"redis://127.0.0.1:{await hop.start()}")
        app.observer.add_sink(created.append)
        await app.redis_on()
        after = []
        for n, fault in enumerate(("hold_after_batch", "hold_batch"), 1):
            old = app.publisher
            await until(lambda old=old: old.connected and old.status()["buffered"] == 0, what="an idle publisher")
            hop.arm(fault)
            await app.redis_off()      # gives up after 2 s (unless it reconnected meanwhile: Redis is up)
            assert hop.held
            last_on = app.observer.seq
            assert await app.redis_on() == (True, (True, None))
            live = app.publisher
            await until(lambda live=live: live.status()["buffered"] == 0 and live.published,
                        what="the new publisher to register and send its backlog")
            assert apps_entry_owner(client, app.instance) == live.generation
            hop.release()
            await until(lambda n=n: hop.delivered == n, what="the held commands to reach Redis")
            sent = max(e.seq for e in journal(redis_server.port) if e.source["instance"] == app.instance)
            after.append((apps_entry_owner(client, app.instance), client.get(LAST_SEQ_PREFIX + app.instance),
                          live.generation, sent))
        app.observer.emit("rpc_backend", "connect", "backend up")
        await until(lambda: live.status()["buffered"] == 0, what="one more event")
        expected = [e.seq for e in created if e.seq > last_on]
        ours = [e.seq for e in journal(redis_server.port) if e.source["instance"] == app.instance]
        await app.close()
        await hop.aclose()
        return after, last_on, expected, ours

    after, last_on, expected, ours = asyncio.run(scenario())
    for owner, last_seq, live, sent in after:
        assert owner == live, "the live publisher's apps entry was taken away"
        assert last_seq is not None and int(last_seq) == sent, (last_seq, sent)
    assert [seq for seq in ours if seq > last_on] == expected
