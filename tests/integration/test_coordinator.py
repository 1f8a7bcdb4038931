"""CoordinatorManager with the real llama-server, real ggml-rpc-server and the real demo model.

In-process: the manager, the registry and an observer with sampling off, so every event can be
checked. The shell-level tests (piped, Redis subscriber, `backends spawn 2`) are in
tests/e2e/test_coordinator_shell.py.
"""
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import time

import pytest
from llama_support import (
    TAG_VAR,
    Collector,
    RpcServers,
    llama_binaries,
    pid_alive,
    settings_for,
    tagged,
    tagged_processes,
)
from support import free_port, until, wait_for

from synapticllamas.events.observer import Observer
from synapticllamas.gateway.core import Gateway, Request
from synapticllamas.llama.coordinator import CoordinatorManager
from synapticllamas.llama.preflight import CoordinatorError
from synapticllamas.rpc.registry import RpcRegistry

pytestmark = pytest.mark.llama


@pytest.fixture(autouse=True)
def tag(monkeypatch):
    """Tag every process the test starts; after the test none of them may be left."""
    with tagged() as value:
        monkeypatch.setenv(TAG_VAR, value)
        yield value


def make(tmp_path, **values):
    settings = settings_for(tmp_path, **values)
    observer = Observer(sampling=False)
    events = Collector(observer)
    registry = RpcRegistry(settings, observer)
    mgr = CoordinatorManager(settings, observer, registry)
    mgr.gateway = Gateway(settings, observer, mgr)     # the request core every request goes through
    return mgr, registry, events


async def ask(mgr, prompt, n, on_token, say=None):
    """`coordinator ask` as the shell sends it: through the gateway's core."""
    _, out = await mgr.gateway.complete(Request("shell", "completion", {"n_predict": n}, prompt=prompt),
                                        say, on_token)
    return {"tokens": out.tokens, "seconds": out.seconds, "resumed": out.resumed}


async def next_event(events, component, event_type, after=0, timeout=15.0):
    """Wait (on the loop) for an event of that type beyond index `after`; returns (index, event)."""
    deadline = time.monotonic() + timeout
    while True:
        for i, e in enumerate(events.events[after:], after):
            if e.component == component and e.event_type == event_type:
                return i, e
        if time.monotonic() > deadline:
            seen = [(e.component, e.event_type) for e in events.events]
            raise AssertionError(f"no {component}/{event_type} within {timeout}s; saw {seen}")
        await asyncio.sleep(0.01)


def test_start_ask_stop_in_standard_mode(tmp_path):
    mgr, _, events = make(tmp_path)
    _, _, model = llama_binaries()

    async def main():
        status = await mgr.start()
        assert status["state"] == "running" and mgr.state == "running"
        pid = status["pid"]
        tokens: list[str] = []
        result = await ask(mgr, "Once upon a time", 8, tokens.append)
        assert "".join(tokens).strip(), "no text generated"
        assert result["tokens"] == len(tokens) and 1 <= result["tokens"] <= 8
        # a request from another client, straight to llama-server's port (as curl would)
        import httpx

        async with httpx.AsyncClient() as client:
            answer = await client.post(f"{mgr.url}/completion", json={"prompt": "The sky is", "n_predict": 5})
        assert answer.status_code == 200
        await until(lambda: len(events.of("coordinator", "inference")) == 2, 10, "two inference events")
        await mgr.stop()
        return pid

    pid = asyncio.run(main())
    assert not pid_alive(pid)
    assert mgr.state == "stopped"
    assert events.lifecycle() == ["starting", "start", "stopping", "stop"]
    starting, start = events.of("coordinator", "starting")[0], events.of("coordinator", "start")[0]
    assert starting.details["from_state"] == "stopped" and starting.details["pid"] == pid
    assert start.message == "llama.cpp coordinator started"
    assert start.details["from_state"] == "starting" and start.details["pid"] == pid
    assert start.details["port"] == mgr.settings.coordinator_port and start.details["rpc_backends"] == []
    assert start.details["model_path"] == str(model) and start.details["load_s"] > 0
    stop = events.of("coordinator", "stop")[0]
    assert stop.details["reason"] == "user" and stop.details["from_state"] == "stopping"
    assert stop.details["exit_code"] == 0 or stop.details.get("signal") == "SIGTERM"
    # model loading progress, then the load, all before `start`
    order = [(e.component, e.event_type) for e in events.events if e.component in ("model", "coordinator")]
    loading = [i for i, k in enumerate(order) if k == ("model", "model_loading")]
    assert loading and order.index(("model", "model_load")) > loading[-1]
    assert order.index(("coordinator", "start")) > order.index(("model", "model_load"))
    assert [e.details["step"] for e in events.of("model", "model_loading")] == [1, 2, 3, 4, 5]
    # raw lines are events and are kept for `coordinator logs`
    assert any("listening on" in e.message for e in events.of("raw", "log"))
    assert any("listening on" in text for _, _, _, text in mgr.logs)
    assert [e.details["status"] for e in events.of("gateway", "request")] == ["ok"]     # one event per request
    # one `inference` event per request, ours and the other client's alike, from llama-server's log
    ours, theirs = events.of("coordinator", "inference")
    assert ours.details["generated_tokens"] == 8 and theirs.details["generated_tokens"] == 5
    for e in (ours, theirs):
        assert e.details["prompt_tokens"] > 0 and e.details["tokens_per_second"] > 0 and e.details["pid"] == pid


def test_sigkill_is_a_crash_seen_at_once_then_backoff_and_a_new_start(tmp_path):
    mgr, _, events = make(tmp_path, coordinator_backoff=0.2)

    async def main():
        first = (await mgr.start())["pid"]
        mark = len(events.events)
        killed_at = time.time()
        os.kill(first, signal.SIGKILL)
        i, stop = await next_event(events, "coordinator", "stop", mark, timeout=5)
        _, backoff = await next_event(events, "coordinator", "backoff", i)
        _, start = await next_event(events, "coordinator", "start", i, timeout=30)
        await mgr.stop()
        return first, killed_at, stop, backoff, start

    first, killed_at, stop, backoff, start = asyncio.run(main())
    assert stop.details["reason"] == "crash" and stop.details["signal"] == "SIGKILL"
    assert stop.level == "error" and stop.details["pid"] == first and stop.details["from_state"] == "running"
    assert stop.timestamp - killed_at < 1.0, "the death must be seen at once (the exit is awaited)"
    assert backoff.details["delay_s"] == pytest.approx(0.2) and backoff.details["tries"] == 1
    assert start.details["pid"] != first and start.details["restarts"] == 1
    assert events.lifecycle() == ["starting", "start", "stop", "backoff", "starting", "start", "stopping", "stop"]
    assert mgr.status()["restarts"] == 1


def test_restarts_that_keep_failing_end_in_fatal(tmp_path):
    _, _, demo = llama_binaries()
    model = tmp_path / "model.gguf"
    shutil.copy(demo, model)
    mgr, _, events = make(tmp_path, coordinator_backoff=0.05, coordinator_max_restarts=2)

    async def main():
        pid = (await mgr.start(model))["pid"]
        # still a GGUF by its magic bytes, so pre-flight passes and llama-server itself fails on it
        model.write_bytes(demo.read_bytes()[:4000])
        os.kill(pid, signal.SIGKILL)
        await next_event(events, "coordinator", "fatal", timeout=60)
        # on the loop the manager lives on (a second asyncio.run would be another loop)
        with pytest.raises(CoordinatorError, match="not running"):
            await mgr.stop()

    asyncio.run(main())
    assert mgr.state == "fatal"
    assert events.lifecycle() == ["starting", "start", "stop", "backoff", "starting", "stop", "backoff",
                                  "starting", "stop", "fatal"]
    stops = events.of("coordinator", "stop")
    assert [s.details["reason"] for s in stops] == ["crash", "startup_failed", "startup_failed"]
    assert "failed to load model" in stops[-1].details["error"]
    assert [b.details["delay_s"] for b in events.of("coordinator", "backoff")] == [0.05, 0.1]
    fatal = events.of("coordinator", "fatal")[0]
    assert fatal.level == "critical" and fatal.details["tries"] == 2
    assert len(events.of("model", "model_load_failed")) == 2


def test_heartbeat_every_second_names_the_coordinator_and_its_backends(tmp_path, tag):
    servers = RpcServers(2, dict(os.environ))
    try:
        mgr, registry, events = make(tmp_path, distributed=True, rpc_heartbeat_interval=1.0,
                                     rpc_backends=tuple(servers.addresses))

        async def main():
            await registry.start()
            status = await mgr.start()
            _, first = await next_event(events, "coordinator", "heartbeat", timeout=10)
            i = events.events.index(first)
            _, second = await next_event(events, "coordinator", "heartbeat", i + 1, timeout=10)
            await mgr.stop()
            await registry.close()
            return status, first, second

        status, first, second = asyncio.run(main())
    finally:
        servers.close()
    port = mgr.settings.coordinator_port
    assert status["backends"] == servers.addresses
    for beat in (first, second):
        assert beat.message == f"rpc_backend_connect on 127.0.0.1:{port}"
        assert beat.details["backends"] == servers.addresses and beat.details["health"] == "ok"
        assert beat.details["restarts"] == 0 and beat.level == "info"
    assert second.timestamp - first.timestamp > 0.5      # one a second, not more
    assert second.details["uptime_s"] > first.details["uptime_s"]
    start = events.of("coordinator", "start")[0]
    assert start.details["rpc_backends"] == servers.addresses
    # the load log's per-backend buffers reach the start event
    assert set(servers.addresses) <= set(start.details["devices"])
    assert all(start.details["devices"][a]["model_mib"] > 0 for a in servers.addresses)


def test_a_backend_dying_under_a_request_is_named_left_out_and_the_request_retried(tmp_path):
    """rpc-servers this shell did not start (nothing tells it that one died, and the heartbeat is
    off): the request finds out. llama-server aborts, the shell names the dead backend, restarts
    on the other, and sends the request again: the user gets an answer, and one line saying why
    it took longer."""
    servers = RpcServers(2, dict(os.environ))
    try:
        mgr, registry, events = make(tmp_path, distributed=True, coordinator_backoff=0.1,
                                     rpc_backends=tuple(servers.addresses))
        dead, alive = servers.addresses[1], servers.addresses[0]

        async def main():
            await registry.start()
            await mgr.start()
            servers.kill(1)
            said: list[str] = []
            tokens: list[str] = []
            result = await ask(mgr, "Once upon a time", 8, tokens.append, said.append)
            i, stop = await next_event(events, "coordinator", "stop")
            _, starting = await next_event(events, "coordinator", "starting", i)
            _, start = await next_event(events, "coordinator", "start", i, timeout=30)
            await mgr.stop()
            await registry.close()
            return said, result, tokens, stop, starting, start

        said, result, tokens, stop, starting, start = asyncio.run(main())
    finally:
        servers.close()
    assert len(said) == 1 and "Remote RPC server crashed" in said[0] and dead in said[0]
    assert "sending the request again once it is back" in said[0]
    assert "".join(tokens).strip() and result["tokens"] >= 1
    assert stop.details["reason"] == "crash" and stop.details["signal"] == "SIGABRT"
    assert stop.details["failed_backends"] == [dead] and dead in stop.message
    assert starting.details["rpc_backends"] == [alive] and starting.details["left_out"] == {dead: "down"}
    assert dead in starting.message
    assert start.details["rpc_backends"] == [alive]
    # one event for the request: answered, after being sent again once
    assert [(e.details["status"], e.details["resumed"]) for e in events.of("gateway", "request")] == [("ok", 1)]


def test_a_backend_down_at_start_is_named(tmp_path):
    servers = RpcServers(2, dict(os.environ))
    try:
        mgr, registry, events = make(tmp_path, distributed=True, rpc_backends=tuple(servers.addresses))

        def kill_backend_under_it(change):
            # the registry has just seen both up; freeze llama-server before it connects, kill a
            # backend, let it go on: it finds the backend gone and must say which
            if change.state == "starting":
                os.kill(change.details["pid"], signal.SIGSTOP)
                servers.kill(1)
                os.kill(change.details["pid"], signal.SIGCONT)

        mgr.hooks.subscribe("on_state_change", kill_backend_under_it)

        async def main():
            await registry.start()
            with pytest.raises(CoordinatorError) as failure:
                await mgr.start()
            await registry.close()
            return str(failure.value)

        message = asyncio.run(main())
    finally:
        servers.close()
    assert f"Failed to connect to RPC backend {servers.addresses[1]}" in message
    stop = events.of("coordinator", "stop")[0]
    assert stop.details["reason"] == "startup_failed" and stop.details["failed_backends"] == [servers.addresses[1]]
    assert mgr.state == "exited" and not events.of("coordinator", "backoff")   # a user's start is not retried


def test_preflight_errors_are_one_line_and_start_nothing(tmp_path, tag):
    text = tmp_path / "notes.txt"
    text.write_text("hello, not a model\n")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    dead_port = free_port()
    cases = [
        ({}, {"model": tmp_path / "missing.gguf"}, "does not exist"),
        ({}, {"model": text}, "is not a GGUF file"),
        ({}, {"model": tmp_path}, "is not a file"),
        ({"coordinator_port": busy.getsockname()[1]}, {}, "is already in use"),
        ({"llama_server": str(tmp_path / "nope")}, {}, "is not an executable file"),
        ({"distributed": True}, {}, "no RPC backend is configured in distributed mode; start two local ones "
                                   "with `backends spawn 2`"),
        ({"distributed": True, "rpc_backends": (f"127.0.0.1:{dead_port}",)}, {},
         f"no healthy RPC backend (127.0.0.1:{dead_port} (down))"),
    ]
    async def start_fails(mgr, registry, kwargs):
        await registry.start()
        with pytest.raises(CoordinatorError) as failure:
            await mgr.start(**kwargs)
        return str(failure.value)

    try:
        for values, kwargs, expected in cases:
            mgr, registry, events = make(tmp_path, **values)
            message = asyncio.run(start_fails(mgr, registry, kwargs))
            assert expected in message, (values, kwargs, message)
            assert "\n" not in message
            assert mgr.state == "stopped" and not events.of("coordinator"), (values, kwargs)
            assert not tagged_processes(tag)
    finally:
        busy.close()


def test_cancelling_a_start_kills_the_child(tmp_path):
    mgr, _, events = make(tmp_path)

    async def main():
        task = asyncio.ensure_future(mgr.start())
        mgr.hooks.subscribe("on_state_change", lambda c: c.state == "starting" and task.cancel())
        with pytest.raises(asyncio.CancelledError):
            await task
        return events.of("coordinator", "starting")[0].details["pid"]

    pid = asyncio.run(main())
    assert not pid_alive(pid)
    assert mgr.state == "stopped"
    assert events.lifecycle() == ["starting", "stopping", "stop"]     # a kill we send goes through stopping
    assert events.of("coordinator", "stop")[0].details["reason"] == "user"


def test_attach_sees_an_external_coordinator_come_and_go(tmp_path):
    server, _, model = llama_binaries()
    mgr, _, events = make(tmp_path, attach_check_interval=0.3)
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    async def main():
        ok, _ = await mgr.attach(url)
        assert not ok and mgr.state == "stopped"
        external = await asyncio.create_subprocess_exec(
            str(server), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-c", "512", "-t", "1",
            "--no-webui", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _, start = await next_event(events, "coordinator", "start", timeout=30)
            external.kill()
            await asyncio.wait_for(external.wait(), 10)
            _, stop = await next_event(events, "coordinator", "stop", timeout=10)
        finally:
            if external.returncode is None:
                external.kill()
                await asyncio.wait_for(external.wait(), 10)
        await mgr.detach()
        return start, stop

    start, stop = asyncio.run(main())
    assert start.details["reason"] == "attached" and start.details["url"] == url and start.details["pid"] is None
    assert stop.details["reason"] == "health" and stop.details["attached"] is True
    assert mgr.state == "stopped" and mgr.attached is None
    with pytest.raises(CoordinatorError, match="not watching"):
        asyncio.run(mgr.detach())


def test_bad_attach_url_is_one_line(tmp_path):
    mgr, _, _ = make(tmp_path)
    for url, expected in [("ftp://x:1", "not supported"), ("http://h:99999", "not valid"),
                          ("http://h:1/v1", "has a path")]:
        with pytest.raises(CoordinatorError, match=expected):
            asyncio.run(mgr.attach(url))
        assert mgr.attached is None


def test_start_timeout_stops_the_child(tmp_path):
    mgr, _, events = make(tmp_path, coordinator_start_timeout=0.05)

    async def main():
        with pytest.raises(CoordinatorError, match=r"did not report ok within 0\.05s"):
            await mgr.start()

    asyncio.run(main())
    stop = events.of("coordinator", "stop")[0]
    assert stop.details["reason"] == "startup_failed" and mgr.state == "exited"
    wait_for(lambda: not pid_alive(stop.details["pid"]), 5, what="the timed-out llama-server to be gone")


def test_an_api_key_is_sent_by_ask_and_shown_in_no_event_nor_log(tmp_path):
    key = "sk-test-QZWXQZWX"          # its tail QZWX: llama-server itself prints `api_keys: ****QZWX`
    mgr, _, events = make(tmp_path, coordinator_args=f"-t 1 --api-key {key}")

    async def main():
        await mgr.start()
        try:
            tokens: list[str] = []
            await ask(mgr, "Once upon a time", 4, tokens.append)
            return tokens
        finally:
            await mgr.stop()

    tokens = asyncio.run(main())
    assert "".join(tokens).strip(), "no text generated"
    starting = events.of("coordinator", "starting")[0]
    assert starting.details["argv"][-3:] == ["1", "--api-key", "REDACTED"]
    published = "\n".join(e.to_json() for e in events.events)
    logs = "\n".join(text for _, _, _, text in mgr.logs)
    assert "api_keys: ****" in logs       # llama-server's own line about the key is still there
    for text in (published, logs):
        assert key not in text and "QZWX" not in text


def test_a_heartbeat_interval_below_a_health_answer_keeps_the_coordinator(tmp_path):
    """rpc_heartbeat_interval 10 ns (far below config's 0.1 s minimum, which settings_for does not
    apply): one /health at a time, each with the full timeout, the ticks it outlasts skipped. The
    timeout must not shrink with the interval, or every /health fails and a healthy server is
    restarted for `health`."""
    mgr, _, events = make(tmp_path, rpc_heartbeat_interval=1e-8)

    async def main():
        await mgr.start()
        # 20 heartbeats, each a /health that outlasts many intervals; two failed ones would stop it
        await until(lambda: len(events.of("coordinator", "heartbeat")) >= 20 or mgr.state != "running", 30,
                    what="20 heartbeats")
        state = mgr.state
        await mgr.stop()
        return state

    assert asyncio.run(main()) == "running"
    assert events.lifecycle() == ["starting", "start", "stopping", "stop"]
    beats = events.of("coordinator", "heartbeat")
    assert beats and {b.details["health"] for b in beats} == {"ok"}
