"""`redis on|off|status` and --redis in a real shell process: the truth within 2 s, and every exit flushes."""
import asyncio
import json
import signal
import socket
import subprocess
import time

import pytest
from event_support import AsyncShell, journal
from support import PYTHON, ROOT, PipedShell, RedisServer, free_port, shell_env, until, wait_for

from synapticllamas.events.contract import APPS_HASH


def test_redis_on_with_nothing_listening_then_redis_starts(tmp_path):
    port = free_port()
    url = f"redis://127.0.0.1:{port}"
    server = RedisServer(tmp_path / "redis", port=port)

    async def scenario():
        shell = await AsyncShell.start(tmp_path, url)
        _, text = await shell.ask("redis on", "Redis publishing ON")
        assert text.strip().endswith(f"Redis publishing ON, but {url} is unreachable (connection refused);"
                                     " buffering up to 10000 events and retrying")
        _, text = await shell.ask("status", "uptime")                     # still usable
        assert f"on, {url} unreachable" in text

        await asyncio.to_thread(server.start)                             # no further command
        instance = await until(lambda: server.client().hkeys(APPS_HASH), 10, "the shell to register")
        flowed = await until(lambda: [e.event_type for e in journal(port)], 10, "events in the journal")
        _, status = await shell.ask("redis status", "last error")
        code, _ = await shell.exit()
        return instance, flowed, status, code

    try:
        instance, flowed, status, code = asyncio.run(scenario())
        lifecycle = [t for t in flowed if t in ("register", "redis_on", "redis_disconnected")]
        assert lifecycle[:3] == ["register", "redis_on", "redis_disconnected"]  # what was buffered, in order
        assert "ON, connected" in status and "reconnects       1" in status
        assert code == 0
        types = [e.event_type for e in journal(port)]
        assert "redis_connected" in types and types[-1] == "unregister"
        assert server.client().hkeys(APPS_HASH) == []                     # gone from the apps hash on exit
        assert len(instance) == 1
    finally:
        server.kill()


def test_redis_on_against_a_server_that_never_answers(tmp_path):
    # A port that accepts connections (the kernel completes the handshake) but never replies: a hung Redis.
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)
        url = f"redis://127.0.0.1:{hung.getsockname()[1]}"

        async def scenario():
            shell = await AsyncShell.start(tmp_path, url)
            _, text = await shell.ask("redis on", "Redis publishing ON")
            _, status = await shell.ask("redis status", "last error")
            started = time.monotonic()
            code, err = await shell.exit()
            return text, status, time.monotonic() - started, code, err

        text, status, exit_seconds, code, err = asyncio.run(scenario())
    # whichever comes first, the 2 s wait of `redis on` or the client's 2 s read timeout, it is the truth
    assert (f"Redis publishing ON, but {url} has not answered within 2 s; buffering" in text
            or f"Redis publishing ON, but {url} is unreachable (no reply within 2 s); buffering" in text)
    assert "ON, connecting" in status or "ON, unreachable" in status
    # bounded, not hung (the flush waits at most 2 s; a hung client would wait for ever)
    assert exit_seconds < 15, f"exit took {exit_seconds:.1f} s with a hung Redis"
    assert code == 0
    assert "events were not sent to Redis" in err


def test_the_password_never_shows(tmp_path):
    url = f"redis://:s3cret@127.0.0.1:{free_port()}/0"
    proc = subprocess.run([PYTHON, str(ROOT / "main.py"), "-c", "redis on", "-c", "redis status", "-c", "status",
                           "-c", "config", "-c", "redis off"],
                          capture_output=True, text=True, env=shell_env(tmp_path, SOLLOL_REDIS_URL=url), timeout=60)
    output = proc.stdout + proc.stderr
    assert "s3cret" not in output
    assert f"redis://:***@127.0.0.1:{url.rsplit(':', 1)[1]}" in output


@pytest.mark.parametrize("how,reason,code", [
    ("eof", "exit", 0), ("exit", "exit", 0), ("SIGTERM", "SIGTERM", 128 + 15), ("SIGHUP", "SIGHUP", 128 + 1),
])
def test_every_way_out_flushes_and_unregisters(tmp_path, redis_server, how, reason, code):
    client = redis_server.client()
    shell = PipedShell(tmp_path, "--redis", SOLLOL_REDIS_URL=redis_server.url)
    try:
        instance = wait_for(lambda: client.hkeys(APPS_HASH), 15, what="the shell in the apps hash")[0]
        registration = json.loads(client.hget(APPS_HASH, instance))
        if how == "eof":
            shell.proc.stdin.close()
        elif how == "exit":
            shell.send("exit")
        else:
            shell.proc.send_signal(getattr(signal, how))
        started = time.monotonic()
        assert shell.wait(10) == code
        assert time.monotonic() - started < 5
    finally:
        shell.kill()
    mine = [e for e in journal(redis_server.port) if e.source["instance"] == instance]
    assert [e.event_type for e in mine][:2] == ["register", "redis_on"]   # --redis: Redis saw the register
    assert mine[0].details["pid"] == registration["pid"] == shell.pid
    assert mine[-1].event_type == "unregister" and mine[-1].details["reason"] == reason
    assert client.hkeys(APPS_HASH) == []
