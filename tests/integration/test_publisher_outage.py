"""Redis goes away and comes back: nothing lost, nothing twice, in order; overflow is counted and told.

redis-server is really killed (SIGKILL) and restarted on the same port. It runs without persistence,
so the restarted server has an empty journal: it must receive every event the old one did not run.
"""
import asyncio

from event_support import AsyncShell, Subscriber, journal, make_app
from support import until

from synapticllamas.commands.publishing import redis_command
from synapticllamas.shell.render import render_plain

RATE = 1000   # events per second


class Producer:
    """raw/log events at RATE per second, paced by the loop clock, until stop(); `n` counts them."""

    def __init__(self, app) -> None:
        self.app = app
        self.n = 0
        self._stop = asyncio.Event()
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        while not self._stop.is_set():
            due = int((loop.time() - start) * RATE)
            while self.n < due:
                self.app.observer.emit("raw", "log", f"line {self.n} " + "x" * 200,
                                       {"n": self.n, "stream": "stderr"})
                self.n += 1
            await asyncio.sleep(0.002)

    async def more(self, count: int, what: str) -> None:
        """Wait until `count` more events have been emitted (about count / RATE seconds)."""
        target = self.n + count
        await until(lambda: self.n >= target, 10 + count / RATE, what)

    async def stop(self) -> None:
        self._stop.set()
        await self._task


def test_kill_and_restart_during_1000_events_per_second(tmp_path, redis_server):
    app = make_app(tmp_path / "app", redis_server.url)
    subscriber = Subscriber(redis_server.port, instance=app.instance)
    subscriber.start()
    assert subscriber.ready.wait(10)
    created = []
    answers = {}

    async def scenario():
        app.observer.add_sink(created.append)
        await app.start()
        assert (await app.redis_on())[1] == (True, None)
        shell = await AsyncShell.start(tmp_path / "shell", redis_server.url, "--redis")
        await shell.ask("redis status", "last error")
        producer = Producer(app)
        await producer.more(500, "500 events before the outage")
        await until(lambda: subscriber.raw, 5, "the first of them at the subscriber")

        kill_seq = app.observer.seq
        await asyncio.to_thread(redis_server.kill)
        await until(lambda: not app.publisher.connected, 5, "the publisher to notice the outage")
        # the shell is used as usual meanwhile; its own publisher has to find out and buffer too
        answers["redis off"] = await shell.ask("redis off", "Redis publishing OFF")
        answers["redis on"] = await shell.ask("redis on", "Redis publishing ON")
        answers["status"] = await shell.ask("status", "uptime")
        answers["events"] = await shell.ask("events 3", "3 shown")
        answers["redis status"] = await shell.ask("redis status", "last error")
        await producer.more(1000, "1000 events during the outage")
        during = app.publisher.status()
        await asyncio.to_thread(redis_server.start)

        await until(lambda: app.publisher.connected, 10, "the publisher to reconnect")
        await producer.more(500, "500 events after it")
        await producer.stop()
        await until(lambda: app.publisher.status()["buffered"] == 0, 10, "the backlog to be flushed")
        final = app.publisher.status()
        await app.close()
        code, shell_err = await shell.exit()
        return kill_seq, during, final, code, shell_err

    kill_seq, during, final, code, shell_err = asyncio.run(scenario())
    expected = [e.seq for e in created]     # everything since register: `redis on` sends the earlier ones too
    try:
        subscriber.sync()                   # what has not arrived by now never will
    finally:
        subscriber.stop()

    # the outage's 1000 events (and more) were held, none dropped
    assert during["buffered"] >= 1000 and not during["connected"] and during["dropped"] == 0, during
    assert final["dropped"] == 0 and final["reconnects"] == 1
    delivered = [e.seq for e in subscriber.delivered]
    assert delivered == expected                                    # every event, in order, none twice
    raw_seqs = [e["seq"] for e in subscriber.raw]
    assert len(raw_seqs) == len(set(raw_seqs))                      # pub/sub itself never repeated one
    assert raw_seqs == sorted(raw_seqs)

    # the restarted server's journal holds everything the old one had not run, once, in order
    restarted = [e.seq for e in journal(redis_server.port) if e.source["instance"] == app.instance]
    assert restarted == expected[expected.index(restarted[0]):]
    assert restarted[0] <= kill_seq + 1
    before_kill = set(raw_seqs)
    assert all(seq in before_kill for seq in expected if seq < restarted[0])

    # the shell answered normally while Redis was gone, and told the truth
    assert "NOT sent" in answers["redis off"][1]
    assert "is unreachable (connection refused); buffering up to 10000 events" in answers["redis on"][1]
    assert "unreachable" in answers["status"][1]
    assert "ON, unreachable: buffering and retrying" in answers["redis status"][1]
    assert code == 0, shell_err
    # ...and its events from the outage reached Redis after the restart without another command
    shell_events = [(e.event_type, e.details.get("url")) for e in journal(redis_server.port)
                    if e.source["instance"] != app.instance]
    assert ("redis_on", redis_server.url) in shell_events and ("unregister", None) in shell_events


def test_overflow_drops_the_oldest_counts_them_and_says_so(tmp_path, redis_server):
    app = make_app(tmp_path, redis_server.url, SOLLOL_OBSERVER_MAX_EVENTS="100")

    async def scenario():
        await app.redis_on()
        await until(lambda: app.publisher.status()["buffered"] == 0 and app.publisher.connected)
        await asyncio.to_thread(redis_server.kill)
        # 500 events during the outage: a probe, the publisher's own redis_disconnected notice, 498 more
        app.observer.emit("model", "probe", "first event of the outage")
        await until(lambda: any(e.event_type == "redis_disconnected" for e in app.observer.buffer), 5,
                    "the publisher to notice the outage")
        for i in range(498):
            app.observer.emit("raw", "log", f"line {i}", {"i": i})
        during = app.publisher.status()
        status_text = render_plain(await redis_command(app, ["status"]))
        outage = [e.seq for e in app.observer.buffer][-100:]              # the newest 100 of the 500
        await asyncio.to_thread(redis_server.start)
        await until(lambda: any(e.event_type == "events_dropped" for e in journal(redis_server.port)), 10,
                    "system/events_dropped to be published")
        after = app.publisher.status()
        after_text = render_plain(await redis_command(app, ["status"]))
        await app.close()
        return during, status_text, outage, after, after_text

    during, status_text, outage, after, after_text = asyncio.run(scenario())
    assert (during["buffered"], during["dropped"]) == (100, 400)
    assert "dropped          400" in status_text and "buffered         100 (limit 100)" in status_text
    assert after["dropped"] == 400 and "dropped          400" in after_text

    entries = journal(redis_server.port)
    seqs = [e.seq for e in entries]
    assert seqs[:100] == outage                        # the newest 100, in order; the oldest 400 are gone
    assert [e.details["i"] for e in entries[:100]] == list(range(398, 498))
    dropped_events = [e for e in entries if e.event_type == "events_dropped"]
    assert len(dropped_events) == 1
    assert dropped_events[0].details["dropped"] == 400 and dropped_events[0].level == "warning"
    assert "400 events were dropped" in dropped_events[0].message
