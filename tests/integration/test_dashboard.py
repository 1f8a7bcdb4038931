"""The dashboard process against a real redis-server, with real shells pushing events.

Every test runs `python3 main.py dashboard-server` as a subprocess and talks HTTP to it; shells
are `python3 main.py --redis` processes fed commands on stdin. Events no shell command makes on
demand (a chosen seq, a pub/sub-only publisher) are pushed in the contract's format with redis-py.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import time
from collections import defaultdict

import pytest
from dashboard_support import (
    APPS,
    JOURNAL,
    ContractPublisher,
    Dashboard,
    Shell,
    command_counts,
    healthz_answers,
    instance_of,
)
from sse_client import SSEClient
from support import PYTHON, ROOT, free_port, shell_env, until, wait_for

from synapticllamas.dashboard.hub import HEALTH_INTERVAL


@pytest.fixture
def dashboard(tmp_path, redis_server):
    dash = Dashboard(tmp_path, redis_server.url)
    yield dash
    dash.stop()


@pytest.fixture
def shells(tmp_path, redis_server):
    started: list[Shell] = []

    def start(name: str, **env: str) -> Shell:
        shell = Shell(tmp_path, redis_server.url, name, **env)
        started.append(shell)
        return shell

    yield start
    for shell in started:
        shell.kill()


def by_instance(messages):
    out = defaultdict(list)
    for m in messages:
        ev = m.json()
        out[ev["source"]["instance"]].append(ev)
    return out


def live(client):
    return client.named("live")


def numpat(client) -> int:
    return client.execute_command("PUBSUB", "NUMPAT")


def buffered(shell) -> int:
    """The events a shell holds for Redis, as `redis status` shows them."""
    shell.send("redis status")
    return int(shell.read_until(r"^buffered\s+(\d+)", stream="stdout")[0].group(1))


def not_accepted(port: int) -> int:
    """Connections to the listening socket on this port that the kernel completed and the process has
    not accepted yet (a stopped Redis accepts none): the accept queue, rx_queue of a LISTEN line."""
    with open("/proc/net/tcp") as fh:
        for line in fh.readlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].split(":")[1], 16) == port:
                return int(fields[4].split(":")[1], 16)
    return 0


def test_two_shells_each_event_once_in_order_and_a_late_viewer_gets_the_replay(dashboard, shells, redis_server):
    client = redis_server.client()
    viewer = SSEClient(dashboard.port)
    try:
        viewer.wait_for(live, what="the first viewer to be live")
        a = shells("a", SOLLOL_RPC_BACKEND_HEARTBEAT_INTERVAL="0.5")
        b = shells("b", SOLLOL_RPC_BACKEND_HEARTBEAT_INTERVAL="0.5")
        inst_a, inst_b = instance_of(client, a.pid), instance_of(client, b.pid)
        assert inst_a != inst_b
        a.send("backends add 127.0.0.1:9")   # nothing listens on the discard port: added, then unreachable
        b.send("backends add 127.0.0.1:9")

        status, body = dashboard.get("/api/apps")
        assert status == 200
        listed = {app["instance"]: app for app in body["apps"]}
        assert {inst_a, inst_b} <= set(listed), body
        assert listed[inst_a]["pid"] == a.pid and listed[inst_b]["pid"] == b.pid

        def heartbeats(c):
            seen = by_instance(c.events())
            return all(sum(e["event_type"] == "heartbeat" for e in seen[i]) >= 3 for i in (inst_a, inst_b))

        viewer.wait_for(heartbeats, 20, what="3 registry heartbeats from each shell")
        assert a.exit() == 0, a.output()
        assert b.exit() == 0, b.output()

        def goodbyes(c):
            seen = by_instance(c.events())
            return all(any(e["event_type"] == "unregister" for e in seen[i]) for i in (inst_a, inst_b))

        viewer.wait_for(goodbyes, 10, what="both shells' system/unregister")
        journal = [(sid, json.loads(fields["event"])) for sid, fields in client.xrange(JOURNAL)]
        received = viewer.events()
        # every journaled event exactly once, in journal order, with its journal id as the SSE id
        assert [m.id for m in received] == [sid for sid, _ in journal]
        assert [m.json() for m in received] == [ev for _, ev in journal]
        seen = by_instance(received)
        for inst in (inst_a, inst_b):
            events = seen[inst]
            seqs = [e["seq"] for e in events]
            assert seqs == sorted(set(seqs)), f"{inst}: seq not strictly increasing: {seqs}"
            assert events[0]["event_type"] == "register" and events[-1]["event_type"] == "unregister"
            assert any(e["component"] == "rpc_backend" and e["event_type"] == "added" for e in events)
            assert any(e["message"] == "rpc_backend_connect on rpc_registry" for e in events)

        late = SSEClient(dashboard.port)
        try:
            late.wait_for(live, what="the late viewer's replay")
            assert [m.id for m in late.events()] == [sid for sid, _ in journal]
            assert late.named("live")[0].json() == {"replayed": len(journal)}
        finally:
            late.close()
    finally:
        viewer.close()


def test_nobody_watching_means_no_subscription_no_redis_commands_no_cpu(dashboard, redis_server):
    client = redis_server.client()
    assert numpat(client) == 0, "subscribed before anyone looked"
    viewer = SSEClient(dashboard.port)
    viewer.wait_for(live, what="the viewer to be live")
    assert numpat(client) == 1
    second = SSEClient(dashboard.port)
    second.wait_for(live, what="a second viewer")
    assert numpat(client) == 1, "each viewer must share the one subscription"
    viewer.close()
    second.close()
    wait_for(lambda: numpat(client) == 0, 5, what="the dashboard to unsubscribe after the last viewer left")

    # Nothing happening has no event to wait for: watch for longer than the hub's longest period
    # (its PING every HEALTH_INTERVAL while open), so a timer left running would show.
    idle = HEALTH_INTERVAL + 1
    before = command_counts(client)
    cpu_before = dashboard.cpu_seconds()
    time.sleep(idle)
    cpu_used = dashboard.cpu_seconds() - cpu_before
    after = command_counts(client)
    changed = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    assert changed == {"info": 1}, f"Redis commands while nobody watched (only our own INFO expected): {changed}"
    assert numpat(client) == 0
    # a process that sleeps uses ~0 s; a busy or polling loop shows up well above this
    assert cpu_used < 0.2, f"the idle dashboard used {cpu_used:.2f} s of CPU in {idle:g} s"


def test_a_reconnecting_viewer_resumes_after_its_last_event_id(dashboard, redis_server):
    client = redis_server.client()
    pub = ContractPublisher(client, "resume-host:1")
    for i in range(5):
        pub.emit("system", "note", f"before {i}")
    first = SSEClient(dashboard.port)
    first.wait_for(lambda c: len(c.events()) == 5 and live(c), what="5 replayed events")
    last_id = first.events()[-1].id
    first.close()
    wait_for(lambda: numpat(client) == 0, 5, what="the hub to close")

    for i in range(5):                       # pushed while nobody watched
        pub.emit("system", "note", f"while away {i}")
    again = SSEClient(dashboard.port, last_event_id=last_id)
    try:
        again.wait_for(live, what="the resumed feed")
        assert [e.json()["seq"] for e in again.events()] == [6, 7, 8, 9, 10]
        # the hub is open now: a resume point inside its memory works the same way
        mid = again.events()[1].id
        third = SSEClient(dashboard.port, last_event_id=mid)
        try:
            third.wait_for(live, what="a resume from memory")
            pub.emit("system", "note", "live")
            third.wait_for(lambda c: len(c.events()) == 4, what="3 resumed + 1 live event")
            assert [e.json()["seq"] for e in third.events()] == [8, 9, 10, 11]
        finally:
            third.close()
    finally:
        again.close()


def test_a_resumed_viewer_gets_an_event_the_journal_holds_twice_once(tmp_path, redis_server):
    """A batch re-sent after a Redis crash can put an event in the journal twice (same instance and
    seq). A viewer that resumes from before the hub's memory (here the last 3 entries) gets the
    older part from the journal, and still each event once."""
    client = redis_server.client()
    pub = ContractPublisher(client, "again:1")
    events = [pub.emit("system", "note", f"n{i}") for i in range(1, 6)]
    pub.push(events[2])                                  # seq 3 again
    pub.emit("system", "note", "n6")
    pub.emit("system", "note", "n7")
    first_id = client.xrange(JOURNAL, count=1)[0][0]
    dash = Dashboard(tmp_path, redis_server.url, "--replay", "3")
    viewer = SSEClient(dash.port, last_event_id=first_id)
    try:
        viewer.wait_for(live, what="the resumed feed")
        seqs = [m.json()["seq"] for m in viewer.events()]
        assert sorted(seqs) == [2, 3, 4, 5, 6, 7], seqs
    finally:
        viewer.close()
        dash.stop()


def test_redis_restart_while_watching_then_the_feed_resumes_without_loss(dashboard, shells, redis_server):
    client = redis_server.client()
    viewer = SSEClient(dashboard.port)
    try:
        viewer.wait_for(live, what="the viewer")
        shell = shells("beating", SOLLOL_RPC_BACKEND_HEARTBEAT_INTERVAL="0.3")
        inst = instance_of(client, shell.pid)

        def beats(c):
            return [e for e in by_instance(c.events())[inst] if e["event_type"] == "heartbeat"]

        viewer.wait_for(lambda c: len(beats(c)) >= 2, 15, what="heartbeats before the outage")
        redis_server.kill()
        viewer.wait_for(lambda c: any(m.json()["redis"] == "down" for m in c.named("status")), 10,
                        what="a 'redis down' status event")
        # the shell keeps emitting; its publisher buffers them until Redis is back
        wait_for(lambda: buffered(shell) >= 3, 15, interval=0.1, what="the shell to buffer heartbeats")
        redis_server.start()
        viewer.wait_for(lambda c: c.named("status")[-1].json()["redis"] == "up", 15,
                        what="the dashboard to resubscribe by itself")
        # the API's pooled connection died with the old server: the next request still answers
        assert dashboard.get("/api/apps")[0] == 200
        count = len(beats(viewer))
        viewer.wait_for(lambda c: len(beats(c)) >= count + 3, 15, what="heartbeats after the restart")
        assert shell.exit() == 0, shell.output()
        viewer.wait_for(lambda c: any(e["event_type"] == "unregister" for e in by_instance(c.events())[inst]), 10,
                        what="the shell's unregister")
        seqs = [e["seq"] for e in by_instance(viewer.events())[inst]]
        # nothing lost across the outage (the publisher buffered, the hub caught up), nothing twice
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
        assert len({m.id for m in viewer.events()}) == len(viewer.events())
    finally:
        viewer.close()


def test_an_event_only_published_on_pubsub_is_shown_once(dashboard, redis_server):
    client = redis_server.client()
    viewer = SSEClient(dashboard.port)
    try:
        viewer.wait_for(live, what="the viewer")
        # a publisher that follows only the reference document: PUBLISH, no journal entry
        foreign = {"timestamp": time.time(), "component": "system", "event_type": "note", "message": "from SOLLOL",
                   "details": {}, "level": "info", "source": {"app": "sollol", "instance": "other:7"}, "seq": 1}
        client.publish("synapticllamas:llama_cpp:system", json.dumps(foreign))
        client.publish("synapticllamas:llama_cpp:system", "not json at all")
        journaled = ContractPublisher(client, "journaled:1")
        journaled.emit("system", "note", "journaled")
        viewer.wait_for(lambda c: len(c.events()) == 2, 5, what="both events")
        # a repeat of either would come before an event published after both were shown
        journaled.emit("system", "note", "marker")
        viewer.wait_for(lambda c: c.events()[-1].json()["message"] == "marker", 5, what="the marker")
        events = viewer.events()[:-1]
        assert sorted(e.json()["message"] for e in events) == ["from SOLLOL", "journaled"]
        ids = [e.id for e in events]
        assert ids == sorted(ids, key=lambda s: tuple(int(p) for p in s.replace("~", "-").split("-")))
    finally:
        viewer.close()


def test_every_route_needs_the_token(tmp_path, redis_server):
    dash = Dashboard(tmp_path, redis_server.url, token="t0ken/+&x")
    try:
        for path in ("/", "/events", "/api/events", "/api/apps", "/api/nodes", "/metrics", "/healthz",
                     "/static/app.js", "/static/charts.js"):
            status, body = dash.get(path, auth=False)
            assert status == 401, (path, status)
            assert "token" in body["error"]
            status, _ = dash.get(path, headers={"Authorization": "Bearer wrong"}, auth=False)
            assert status == 401, path
        for path in ("/api/events", "/api/apps", "/api/nodes", "/metrics", "/healthz", "/static/app.js"):
            assert dash.get(path)[0] == 200, path
            assert dash.get(f"{path}?token=t0ken%2F%2B%26x", auth=False)[0] == 200, path
        status, page = dash.get("/?token=t0ken%2F%2B%26x", auth=False)
        assert status == 200 and 'src="static/app.js?token=t0ken%2F%2B%26x"' in page
        feed = SSEClient(dash.port, "/events?token=t0ken%2F%2B%26x")
        try:
            assert feed.status_code == 200
            feed.wait_for(live, what="the feed with ?token=")
        finally:
            feed.close()
    finally:
        dash.stop()


def test_the_redis_password_never_reaches_the_page(tmp_path, redis_server):
    client = redis_server.client()
    client.config_set("requirepass", "s3cretpw")
    client = redis_server.client(password="s3cretpw")
    client.hset(APPS, "leaky:1", json.dumps({"instance": "leaky:1", "redis_url": "redis://:s3cretpw@db:6379/0"}))
    dash = Dashboard(tmp_path, f"redis://:s3cretpw@127.0.0.1:{redis_server.port}/0")
    wrong = Dashboard(tmp_path, f"redis://:wr0ngpw@127.0.0.1:{redis_server.port}/0")
    try:
        bodies = [dash.get(p)[1] for p in ("/", "/healthz", "/api/apps", "/api/events")]
        assert dash.get("/healthz")[1]["redis"] == "up"
        feed = SSEClient(dash.port)
        feed.wait_for(live, what="the feed")
        feed.close()
        bad_feed = SSEClient(wrong.port)
        bad_feed.wait_for(lambda c: c.named("status") and c.named("status")[-1].json()["redis"] == "down", 10,
                          what="the wrong password reported as down")
        bad_feed.close()
        bodies += [m.data for m in feed.snapshot() + bad_feed.snapshot()] + [wrong.get("/healthz")[1]]
        text = json.dumps(bodies)
        assert "s3cretpw" not in text and "wr0ngpw" not in text
        assert "redis://:***@127.0.0.1" in text and "redis://:***@db:6379/0" in text
    finally:
        dash.stop()
        wrong.stop()
    for path in (dash.log_path, wrong.log_path):
        assert "s3cretpw" not in path.read_text() and "wr0ngpw" not in path.read_text()


def test_api_events_since_and_bad_input(dashboard, redis_server):
    pub = ContractPublisher(redis_server.client(), "api:1")
    for i in range(4):
        pub.emit("system", "note", f"n{i}")
    status, body = dashboard.get("/api/events?limit=2")
    assert status == 200 and [e["event"]["seq"] for e in body["events"]] == [3, 4]
    status, body2 = dashboard.get(f"/api/events?since={body['events'][0]['id']}")
    assert [e["event"]["seq"] for e in body2["events"]] == [4]
    assert body2["last_id"] == body["events"][1]["id"]
    # ids Redis refuses: a number above 2^64-1, and the highest id (nothing can come after it)
    for query, name in (("since=yesterday", "since="), ("limit=0", "limit="), ("limit=x", "limit="),
                        ("since=0-99999999999999999999", "since='0-99999999999999999999'"),
                        ("since=18446744073709551615-18446744073709551615", "since='18446744073709551615-")):
        status, err = dashboard.get(f"/api/events?{query}")
        assert status == 400 and err["error"].startswith(name) and "expected" in err["error"], err
        assert "\n" not in err["error"] and "did not answer" not in err["error"], err
    # digits other than ASCII's: '²' passes str.isdigit() and int() refuses it; int() reads '٣' as 3
    for path, name in (("/events?replay=%C2%B2", "replay='²'"), ("/events?replay=%D9%A3", "replay='٣'"),
                       ("/api/events?limit=%D9%A3", "limit='٣'"), ("/api/events?limit=%EF%BC%95", "limit='５'"),
                       ("/api/events?since=%D9%A3-0", "since='٣-0'"), ("/api/events?limit=" + "9" * 5000, "limit='999")):
        status, err = dashboard.get(path)
        assert status == 400 and err["error"].startswith(name) and "expected" in err["error"], (path, err)
        assert "\n" not in err["error"] and len(err["error"]) < 200, err
    status, err = dashboard.get("/events", headers={"Last-Event-ID": "<script>"})
    assert status == 400 and "Last-Event-ID" in err["error"]
    status, err = dashboard.get("/events", headers={"Last-Event-ID": "99999999999999999999-0"})
    assert status == 400 and "Last-Event-ID" in err["error"]
    # Redis answered, with an error that is not about the request: not "did not answer", not 400
    client = redis_server.client()
    client.delete(JOURNAL)
    client.set(JOURNAL, "not a stream")
    status, err = dashboard.get("/api/events")
    assert status == 502 and err["error"].startswith(f"Redis at {redis_server.url} refused the request: WRONGTYPE"), err


def test_api_says_when_redis_is_down_and_page_still_loads(dashboard, redis_server):
    redis_server.kill()
    status, body = dashboard.get("/api/apps")
    assert status == 503 and body["error"].startswith(f"Redis at {redis_server.url} did not answer")
    status, health = dashboard.get("/healthz")
    assert status == 200 and health["status"] == "degraded" and health["redis"] == "down"
    assert dashboard.get("/")[0] == 200


@pytest.mark.parametrize("args, expected", [
    (["--port", "abc"], "Error: --port='abc' is not valid: expected an integer from 1 to 65535"),
    (["--port", "70000"], "Error: --port='70000' is not valid: expected an integer from 1 to 65535"),
    (["--redis-url", "http://:pw@x"], "Error: --redis-url='http://:***@x' is not valid: expected redis://"),
    (["--replay", "-1"], "Error: --replay='-1' is not valid: expected an integer >= 0"),
    (["--token", ""], "Error: --token='' is not valid: expected a non-empty token"),
    (["--metrics-hold", "0"], "Error: --metrics-hold='0' is not valid: expected a number greater than 0"),
    (["--redis-server", "/usr/bin/true"], "Error: --redis-server is only used with --embedded-redis"),
    (["--embedded-redis", "--redis-url", "redis://10.0.0.5:6379"],
     "Error: --embedded-redis runs Redis on this machine's loopback address only; the Redis URL names '10.0.0.5'"),
    (["--embedded-redis", "--redis-server", "/nonexistent/redis-server"],
     "Error: --redis-server='/nonexistent/redis-server' is not valid: expected an executable redis-server"),
])
def test_bad_options_are_one_line_errors(tmp_path, args, expected):
    result = subprocess.run([PYTHON, str(ROOT / "main.py"), "dashboard-server", *args], capture_output=True,
                            text=True, env=shell_env(tmp_path), cwd=ROOT, timeout=30)
    assert result.returncode == 2
    assert result.stderr.startswith(expected), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_a_busy_port_is_one_line_and_the_console_script_serves(tmp_path, redis_server):
    dash = Dashboard(tmp_path, redis_server.url)
    try:
        busy = subprocess.run([PYTHON, str(ROOT / "main.py"), "dashboard-server", "--port", str(dash.port)],
                              capture_output=True, text=True, env=shell_env(tmp_path), cwd=ROOT, timeout=30)
        assert busy.returncode == 1
        assert busy.stderr.strip() == (f"Error: cannot listen on 127.0.0.1:{dash.port}: address already in use; "
                                       "choose another --port")
    finally:
        dash.stop()
    # the `synapticllamas-dashboard` entry point (pyproject [project.scripts]) runs the same server
    port = free_port()
    proc = subprocess.Popen([PYTHON, "-c", "from synapticllamas.dashboard.command import main; main()",
                             "--port", str(port), "--redis-url", redis_server.url],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env=shell_env(tmp_path))
    try:
        first = proc.stdout.readline()
        assert first.startswith("SynapticLlamas dashboard ") and f"http://127.0.0.1:{port}/" in first
        wait_for(lambda: healthz_answers(port), 10, what="the console script's server")
    finally:
        proc.send_signal(signal.SIGINT)
    assert proc.wait(10) == 0          # Ctrl-C: a clean stop
    assert "Traceback" not in proc.stdout.read()


def test_a_viewer_cancelled_while_redis_hangs_leaves_the_hub_closed(redis_server):
    """Server shutdown while Redis hangs: the viewer still waiting for Redis is cancelled. The hub
    runs in this process so its viewer count can be read; Redis is real, stopped with SIGSTOP (it
    accepts the connection and never answers)."""
    from synapticllamas.dashboard.hub import Hub

    async def scenario():
        hub = Hub(redis_server.url)

        async def watch():
            async with hub.viewer():
                await asyncio.sleep(60)

        task = asyncio.create_task(watch())
        await until(lambda: not_accepted(redis_server.port) == 1, what="the hub's connection to reach the stopped Redis")
        assert hub.viewers == 1 and hub.status["redis"] == "connecting"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert hub.viewers == 0 and not hub.subscribed and hub.status["redis"] == "closed"
        await hub.aclose()

    redis_server.proc.send_signal(signal.SIGSTOP)
    try:
        asyncio.run(scenario())
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)


def test_a_hung_redis_is_reported_down_and_the_feed_resumes_when_it_wakes(dashboard, redis_server):
    """Redis stopped with SIGSTOP keeps its connections open and answers nothing: only a PING that
    goes unanswered can tell. The dashboard checks every HEALTH_INTERVAL (5 s) with a 5 s timeout."""
    client = redis_server.client()
    pub = ContractPublisher(client, "hang:1")
    viewer = SSEClient(dashboard.port)
    try:
        viewer.wait_for(live, what="the viewer")
        pub.emit("system", "note", "before the hang")
        viewer.wait_for(lambda c: len(c.events()) == 1, 5, what="the first event")
        redis_server.proc.send_signal(signal.SIGSTOP)
        try:
            down = viewer.wait_for(lambda c: [m.json() for m in c.named("status") if m.json()["redis"] == "down"],
                                   25, what="a 'redis down' status while Redis hangs")
            assert "no answer" in down[0]["error"], down
            # while it hangs, a reconnect attempt must not report it up again: it fails in its turn
            viewer.wait_for(lambda c: "PSUBSCRIBE" in (c.named("status")[-1].json()["error"] or ""), 15,
                            what="a reconnection attempt to fail while Redis hangs")
            statuses = [m.json() for m in viewer.named("status")]
            first_down = next(i for i, s in enumerate(statuses) if s["redis"] == "down")
            assert all(s["redis"] == "down" for s in statuses[first_down:]), statuses
            # /healthz waits CONNECT_TIMEOUT for its PING, and says so
            status, health = dashboard.get("/healthz")
            assert (status, health["redis"], health["error"]) == (200, "down", "no answer to PING within 2 s"), health
        finally:
            redis_server.proc.send_signal(signal.SIGCONT)
        viewer.wait_for(lambda c: c.named("status")[-1].json()["redis"] == "up", 20,
                        what="the dashboard to resubscribe after Redis woke up")
        pub.emit("system", "note", "after the hang")
        viewer.wait_for(lambda c: len(c.events()) == 2, 5, what="an event pushed after the hang")
        assert [e.json()["message"] for e in viewer.events()] == ["before the hang", "after the hang"]
    finally:
        viewer.close()


@pytest.mark.parametrize("bind", ["127.0.0.1", "127.0.0.2"])
def test_bound_to_any_loopback_address_only_loopback_host_names_are_served(tmp_path, redis_server, bind):
    """DNS rebinding: a page on evil.example whose name now resolves to 127.0.0.x must be refused."""
    dash = Dashboard(tmp_path, redis_server.url, host=bind)
    try:
        for host in (f"{bind}:{dash.port}", f"localhost:{dash.port}", f"127.0.0.1:{dash.port}", "[::1]"):
            assert dash.get("/healthz", headers={"Host": host})[0] == 200, host
        for host in (f"evil.example:{dash.port}", f"{bind}.evil.example", "10.0.0.1"):
            status, body = dash.get("/healthz", headers={"Host": host})
            assert status == 421 and body["error"].startswith(f"host {host.split(':')[0]!r} is not served here"), \
                (host, status, body)
        assert "Warning" not in dash.log_path.read_text()
    finally:
        dash.stop()


@pytest.mark.parametrize("guard", ["none", "token", "key"])
def test_listening_beyond_loopback_needs_a_token_or_the_cluster_key(tmp_path, guard):
    """--host 0.0.0.0 in a network namespace of its own (unshare -n: only a downed lo), so the test
    exposes nothing while the dashboard really binds every address."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.fail("this test needs unshare (util-linux) to bind 0.0.0.0 in a private network namespace")
    port = free_port()
    cmd = [unshare, "-n", PYTHON, str(ROOT / "main.py"), "dashboard-server", "--host", "0.0.0.0",
           "--port", str(port), "--redis-url", "redis://127.0.0.1:1"] + (["--token", "s3cret"] if guard == "token" else [])
    env = shell_env(tmp_path)
    if guard == "key":
        from synapticllamas.trust.key import create

        made = create(tmp_path / "config" / "synapticllamas" / "cluster.key")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    if guard == "none":                   # refused before it serves: one line, exit status 2
        assert proc.wait(20) == 2
        stderr = proc.stderr.read()
        assert stderr.splitlines() == [
            f"Error: --host 0.0.0.0 would show every event to anyone who reaches 0.0.0.0:{port}: give --token T (or "
            "SYNAPTICLLAMAS_DASHBOARD_TOKEN), or make a cluster key (`python3 main.py cluster init`) and the dashboard "
            "requires a token made from it"], stderr
        return
    try:
        lines = [proc.stdout.readline() for _ in range(2 if guard == "key" else 1)]
    finally:
        proc.kill()   # not reachable from here to wait for it to serve; a clean stop is tested above
        proc.wait(10)
    stderr = proc.stderr.read()
    assert stderr == "", stderr
    first = lines[-1]
    assert first.startswith("SynapticLlamas dashboard ") and f"http://0.0.0.0:{port}/?token=" in first, (lines, stderr)
    if guard == "key":
        assert lines[0].startswith("Beyond loopback without --token: the token is made from the cluster key")
        assert first.rstrip().endswith("?token=" + made.derive("dashboard").hex()[:32])


def test_a_killed_shells_registration_goes_when_another_shell_on_this_host_connects(dashboard, shells,
                                                                                    redis_server):
    client = redis_server.client()
    victim = shells("victim")
    dead = instance_of(client, victim.pid)
    victim.kill()                             # SIGKILL: it never says goodbye
    assert dead in client.hgetall(APPS)
    reg = json.loads(client.hget(APPS, dead))
    # kept: the same pid on another host or in another pid namespace (a container sharing the host
    # name), a live pid of this host, an entry that is not JSON
    elsewhere = dict(reg, host="elsewhere", instance=f"elsewhere:{victim.pid}")
    container = dict(reg, pid_ns="pid:[1]", instance=f"{reg['host']}:{victim.pid}:container")
    alive = dict(reg, pid=os.getpid(), instance=f"{reg['host']}:{os.getpid()}")
    for entry in (elsewhere, container, alive):
        client.hset(APPS, entry["instance"], json.dumps(entry))
    client.hset(APPS, "junk:1", "not json")
    assert dead in {app["instance"] for app in dashboard.get("/api/apps")[1]["apps"]}

    survivor = shells("survivor")
    fresh = instance_of(client, survivor.pid)
    wait_for(lambda: dead not in client.hgetall(APPS), 10, what=f"the dead shell's entry {dead} to go")
    assert set(client.hgetall(APPS)) == {fresh, elsewhere["instance"], container["instance"], alive["instance"],
                                         "junk:1"}
    assert dead not in {app["instance"] for app in dashboard.get("/api/apps")[1]["apps"]}
    assert survivor.exit() == 0, survivor.output()
