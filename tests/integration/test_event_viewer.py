"""`python3 main.py events [--follow]`: the terminal viewer, against a real redis-server."""
import asyncio
import io
import json
import re
import signal
import socket
import subprocess

from event_support import make_app
from support import PYTHON, ROOT, PipedShell, RedisServer, free_port, shell_env, until

from synapticllamas.events import viewer as viewer_module


class Viewer(PipedShell):
    """`python3 main.py events --redis-url URL ARGS`, its stdout (the events) and stderr (what it
    says about Redis) read apart."""

    def __init__(self, tmp, url, *args):
        super().__init__(tmp, "events", "--redis-url", url, *args)

    def lines(self, n, timeout=10):
        return [self.read_until("", timeout, stream="stdout")[0].string for _ in range(n)]

    def said(self, text, timeout=10):
        """Wait for a stderr line containing `text`; return it."""
        return self.read_until(re.escape(text), timeout, stream="stderr")[0].string

    def stop(self):
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(10)


def emit_batch(app, start, n):
    for i in range(start, start + n):
        app.observer.emit("rpc_backend", "connect", f"backend {i} up", {"i": i})


def test_replays_the_journal_then_follows_across_a_redis_restart(tmp_path, redis_server):
    app = make_app(tmp_path / "app", redis_server.url)
    holder = {}

    async def scenario():
        await app.redis_on()
        emit_batch(app, 0, 30)
        await until(lambda: app.publisher.status()["buffered"] == 0 and app.publisher.published >= 31)
        viewer = holder["viewer"] = await asyncio.to_thread(
            Viewer, tmp_path / "viewer", redis_server.url, "--follow", "--replay", "10", "--json",
            "--component", "rpc_backend")
        await asyncio.to_thread(viewer.said, "following synapticllamas:llama_cpp:*")
        replayed = await asyncio.to_thread(viewer.lines, 10)
        emit_batch(app, 30, 5)                                             # live
        live = await asyncio.to_thread(viewer.lines, 5)

        await asyncio.to_thread(redis_server.kill)
        await asyncio.to_thread(viewer.said, "is not reachable")   # the reason depends on what broke first
        emit_batch(app, 35, 5)                                             # while Redis is down
        await asyncio.to_thread(redis_server.start)
        await asyncio.to_thread(viewer.said, "Reconnected to")
        after = await asyncio.to_thread(viewer.lines, 5, 15)
        await app.close()
        return replayed, live, after

    try:
        replayed, live, after = asyncio.run(scenario())
    finally:
        viewer = holder.get("viewer")
        code = viewer.stop() if viewer else None
    assert [json.loads(line)["details"]["i"] for line in replayed] == list(range(20, 30))
    assert [json.loads(line)["details"]["i"] for line in live] == list(range(30, 35))
    after_events = [json.loads(line) for line in after]
    assert [e["details"]["i"] for e in after_events] == list(range(35, 40))   # none lost, none twice
    assert code == 0
    extra = [json.loads(line) for line in viewer.unread("stdout", timeout=10)]
    assert all(e["event_type"] != "connect" for e in extra)                # and nothing repeated later


def test_waits_for_redis_that_is_not_there_yet(tmp_path):
    port = free_port()
    url = f"redis://127.0.0.1:{port}"
    server = RedisServer(tmp_path / "redis", port=port)
    viewer = Viewer(tmp_path, url, "--follow")
    try:
        line = viewer.said("not reachable")
        assert line == (f"Redis at {url} is not reachable (connection refused); retrying until it is"
                        " (Ctrl-C to stop)")
        server.start()
        viewer.said(f"Connected to {url} (0 events from the journal)")
        app = make_app(tmp_path / "app", url)

        async def scenario():
            await app.redis_on()
            app.observer.emit("coordinator", "start", "llama.cpp coordinator started", {"port": 18080})
            await app.close()

        asyncio.run(scenario())
        shown = viewer.read_until("coordinator/start", 10, stream="stdout")[0].string
        assert shown.split(" ", 3)[2:] == [app.instance, "INFO     coordinator/start llama.cpp coordinator started"]
    finally:
        assert viewer.stop() == 0
        server.kill()


def test_without_follow_a_missing_redis_is_one_line_and_exit_1(tmp_path):
    url = f"redis://127.0.0.1:{free_port()}"
    proc = subprocess.run([PYTHON, str(ROOT / "main.py"), "events", "--redis-url", url], capture_output=True,
                          text=True, env=shell_env(tmp_path), timeout=30)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == f"Error: cannot read events from Redis at {url}: connection refused\n"


def test_a_silent_redis_is_reported_with_the_viewers_own_timeout(monkeypatch):
    """A server that accepts connections and never answers. The message names the timeout the
    viewer really waited (its reply timeout, shortened here so the test need not wait 10 s)."""
    monkeypatch.setattr(viewer_module, "READ_TIMEOUT", 0.3)
    with socket.create_server(("127.0.0.1", 0)) as silent:    # the kernel accepts; nobody answers
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}"
        err = io.StringIO()
        assert viewer_module.Viewer(url, 20, out=io.StringIO(), err=err).run(follow=False) == 1
    assert err.getvalue() == f"Error: cannot read events from Redis at {url}: no reply within 0.3 s\n"


def test_sampled_is_not_lost_the_viewer_says_a_loss_and_sums_both(tmp_path, redis_server):
    """An app that samples 1 in 10 raw lines, and an outage that dropped three kept events: the viewer
    prints a line for the loss only (stderr), and a summary of both kinds of gap at the end."""
    client = redis_server.client()
    source = {"app": "synapticllamas", "instance": "sampler:7", "host": "sampler"}
    events = [{"timestamp": 1.0 + i, "component": "raw", "event_type": "log", "message": f"kept {i}",
               "details": {}, "level": "info", "source": source, "seq": 10 * i, "sampled": 9 * i}
              for i in range(1, 11)]
    for ev in events[:3] + events[6:]:                 # seq 40, 50, 60 never reached Redis
        client.xadd("synapticllamas:events", {"event": json.dumps(ev)})
    proc = subprocess.run([PYTHON, str(ROOT / "main.py"), "events", "--redis-url", redis_server.url,
                           "--replay", "100", "--component", "raw"], capture_output=True, text=True,
                          env=shell_env(tmp_path), cwd=ROOT, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("kept ") == 7
    said = proc.stderr.splitlines()
    assert [line for line in said if "lost (" in line] == [
        "-- 3 events from sampler:7 lost (seq 31-69 never arrived: dropped in a Redis outage or trimmed from the"
        " journal; 36 more sampled out by the app) --"]
    assert said[-1] == "sampler:7: 81 sampled out by the app (not lost), 3 lost"
    assert "missing" not in proc.stderr


def test_follow_goes_on_after_events_that_are_not_valid_and_later_replays_work(tmp_path, redis_server):
    """One event with "timestamp": 1e20 or "seq": 1e999 used to end `events --follow` (and every
    later replay: it stays in the journal) with a traceback. Now each is one line on stderr."""
    client = redis_server.client()
    source = {"app": "synapticllamas", "instance": "real:1:00000000", "host": "real"}

    def event(n, message, **fields):
        return {"timestamp": 1.7e9 + n, "component": "system", "event_type": "note", "message": message,
                "details": {}, "level": "info", "source": source, "seq": n, "sampled": 0, **fields}

    def good(seq, message):
        return json.dumps(event(seq, message))

    bad = [json.dumps(event(5, "x", timestamp=1e20)), json.dumps(event(7, "x")).replace('"seq": 7', '"seq": 1e999'),
           json.dumps(event(7, "x", source="real:1")), json.dumps(event(8, "x", details=[1])),
           json.dumps(event(9, "x", level=7)), "not json", json.dumps([1, 2]), json.dumps(event(10, "x", seq=2**60))]
    assert "1e999" in bad[1]

    def push(*texts):
        pipe = client.pipeline(transaction=True)
        for text in texts:
            pipe.xadd("synapticllamas:events", {"event": text})
            pipe.publish("synapticllamas:llama_cpp:system", text)
        pipe.execute()

    viewer = Viewer(tmp_path / "viewer", redis_server.url, "--follow", "--replay", "0")
    try:
        viewer.said("following synapticllamas:llama_cpp:*")
        push(good(1, "before the bad ones"), *bad, good(2, "after the bad ones \x1b[2J"),
             json.dumps(event(3, "forged far ahead", seq=2**53 - 1)), good(3, "the real app goes on"))
        lines = viewer.lines(4)
        assert "before the bad ones" in lines[0]
        assert "after the bad ones \\x1b[2J" in lines[1] and "\x1b" not in "".join(lines)   # shown escaped
        assert "forged far ahead" in lines[2] and "the real app goes on" in lines[3]
        assert viewer.stop() == 0
    finally:
        viewer.kill()
    err = [line for _, line in viewer.transcript if _ == "stderr"]
    skipped = [line for line in err if line.startswith("(skipped a message on synapticllamas:llama_cpp:system: ")]
    assert len(skipped) == len(bad), err
    assert any("timestamp: 1e+20 is not a number from 0 to 4102444800" in line for line in skipped), skipped
    assert not any("lost (" in line for line in err), err           # the forged seq is no loss
    assert err[-1] == f"{len(bad)} messages skipped: not valid SynapticLlamas events (last: " \
                      f"seq: {2**60} is not an integer from 0 to {2**53 - 1})", err
    assert not any("Traceback" in line for line in err)

    # a later replay reads the same journal and says the same
    proc = subprocess.run([PYTHON, str(ROOT / "main.py"), "events", "--redis-url", redis_server.url,
                           "--replay", "100"], capture_output=True, text=True, env=shell_env(tmp_path), cwd=ROOT,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\n") == 4 and "the real app goes on" in proc.stdout
    assert proc.stderr.splitlines()[-1].startswith(f"{len(bad)} messages skipped: not valid SynapticLlamas events")
