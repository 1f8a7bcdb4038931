"""The Redis publisher against a real redis-server: delivery, journal, registration, no duplicates."""
import asyncio
import json
import time

from event_support import CONTRACT_FIELDS, Subscriber, journal, make_app
from support import RedisCliSubscriber, until

from synapticllamas.events.contract import APPS_HASH, COMPONENTS, LEVELS


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

    deadline = time.monotonic() + 10
    while len(sub.raw) < 3 + 4 * len(published) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)                       # a duplicate would arrive now
    received = sub.raw[3:]                # after the three lines that confirmed the subscription
    sub.close()

    messages = [received[i:i + 4] for i in range(0, len(received), 4)]
    assert all(m[0] == "pmessage" and m[1] == "synapticllamas:llama_cpp:*" for m in messages)
    events = [json.loads(m[3]) for m in messages]
    assert [e["seq"] for e in events] == [e.seq for e in published]            # each once, in order
    for (_, _, channel, _), event, original in zip(messages, events, published):
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


class ReplyDropper:
    """A TCP hop between the publisher and Redis that, when armed, lets a request through and then
    loses Redis's reply and closes the connection: the case where Redis ran a batch we never heard
    back about. (A network fault injected on purpose; Redis and the publisher are the real ones.)"""

    def __init__(self, redis_port: int) -> None:
        self.redis_port = redis_port
        self.armed = False
        self.dropped = 0

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _client(self, creader, cwriter):
        sreader, swriter = await asyncio.open_connection("127.0.0.1", self.redis_port)
        losing = False

        async def upstream():
            nonlocal losing
            while data := await creader.read(65536):
                if self.armed and b"EXEC" in data:
                    self.armed, losing = False, True
                swriter.write(data)
                await swriter.drain()
                if losing:
                    await asyncio.sleep(0.2)           # Redis runs the batch and answers...
                    self.dropped += 1
                    break                              # ...and the answer never reaches the publisher

        async def downstream():
            while data := await sreader.read(65536):
                if not losing:
                    cwriter.write(data)
                    await cwriter.drain()

        await asyncio.wait([asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())],
                           return_when=asyncio.FIRST_COMPLETED)
        cwriter.close()
        swriter.close()


def test_a_batch_whose_reply_was_lost_is_not_sent_twice(tmp_path, redis_server):
    subscriber = Subscriber(redis_server.port)
    subscriber.start()
    assert subscriber.ready.wait(10)

    async def scenario():
        dropper = ReplyDropper(redis_server.port)
        port = await dropper.start()
        app = make_app(tmp_path, f"redis://127.0.0.1:{port}")
        await app.redis_on()
        await until(lambda: app.publisher.status()["buffered"] == 0 and app.publisher.connected)
        dropper.armed = True
        for i in range(5):                                   # one batch
            app.observer.emit("rpc_backend", "connect", f"backend {i} up", {"i": i})
        await until(lambda: dropper.dropped == 1, what="the reply to be lost")
        await until(lambda: app.publisher.status()["reconnects"] == 1, what="the publisher to reconnect")
        for i in range(5, 10):
            app.observer.emit("rpc_backend", "connect", f"backend {i} up", {"i": i})
        await until(lambda: app.publisher.status()["buffered"] == 0, what="the second batch")
        status = app.publisher.status()
        await app.close()
        dropper.server.close()
        return app, status

    app, status = asyncio.run(scenario())
    time.sleep(0.3)
    subscriber.stop()
    ours = [e["details"]["i"] for e in subscriber.raw if e["event_type"] == "connect"]
    assert ours == list(range(10))                                               # pub/sub: once each
    assert [e.details["i"] for e in journal(redis_server.port) if e.event_type == "connect"] == list(range(10))
    assert status["dropped"] == 0 and status["last_error"] is not None
