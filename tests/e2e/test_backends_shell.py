"""`backends` as a user drives it: the real shell process, real ggml-rpc-servers, a real Redis."""
import os
import re
import signal
import socket
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from procs import rpc_servers_on
from support import PipedShell, RedisCliSubscriber, run_piped, shell_env, wait_for

BAD = ["foo", "host:0", "host:99999", ":50052", "a b:1"]


class Shell(PipedShell):
    """support.PipedShell with a 30 s default wait, and a clean-up that sends SIGTERM first, so the
    shell still stops the rpc-servers it spawned."""

    timeout = 30.0

    def kill(self, grace: float | None = 15.0) -> None:
        super().kill(grace)


def started_ports(match):
    return [int(a.rsplit(":", 1)[1]) for a in match.group(1).split(", ")]


# ---------------------------------------------------------------- bad input

def test_bad_addresses_and_bad_file_lines_are_one_line_errors(tmp_path):
    conf = tmp_path / "config" / "synapticllamas" / "rpc_backends.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text("10.0.0.1:50052\n10.0.0.2:0\n10.0.0.3\n")
    script = "backends add 10.0.0.4\n" + "".join(f"backends add '{b}'\n" for b in BAD) + "backends list\n"
    env = shell_env(tmp_path, SOLLOL_RPC_BACKEND_HEARTBEAT="false")
    proc = run_piped(script, tmp_path, env=env, timeout=60)
    assert proc.returncode == 1                      # some commands failed; the shell went on
    errors = proc.stderr.strip().splitlines()
    assert errors[0] == (f"[rpc_registry] backends file {conf} line 2: backend address '10.0.0.2:0' has port "
                         "'0'; expected HOST, HOST:PORT or [IPv6]:PORT with a port from 1 to 65535")
    assert len(errors) == 1 + len(BAD), proc.stderr
    for bad, line in zip(BAD, errors[1:], strict=True):
        assert line.startswith("Error: ") and repr(bad) in line, line
    assert "Traceback" not in proc.stderr
    listed = [line.split()[0] for line in proc.stdout.splitlines() if line.startswith("10.0.0.")]
    assert listed == ["10.0.0.1:50052", "10.0.0.3:50052", "10.0.0.4:50052"]
    assert conf.read_text() == "10.0.0.1:50052\n10.0.0.2:0\n10.0.0.3\n10.0.0.4:50052\n"


def test_odd_ports_are_named_and_checked_before_anything_starts(tmp_path):
    """Unicode digits int() would take or choke on, a --port-base whose ports run past 65535, and
    input with an escape sequence: one line each, naming the value, nothing started."""
    script = ("backends add 127.0.0.1:\u00b2\nbackends add 127.0.0.1:\u0665\n"
              "backends spawn 2 --port-base 65535\nbackends spawn 1 --port-base \u00b2\n"
              "backends spawn 1 --port-base ' 80'\nbackends 'x\x1b[31m'\nbackends list\n")
    proc = run_piped(script, tmp_path, env=shell_env(tmp_path, SOLLOL_RPC_BACKEND_HEARTBEAT="false"), timeout=60)
    accepted = "expected HOST, HOST:PORT or [IPv6]:PORT with a port from 1 to 65535"
    assert [line for line in proc.stderr.splitlines() if not line.startswith("Usage: ")] == [
        f"Error: backend address '127.0.0.1:\u00b2' has port '\u00b2'; {accepted}",
        f"Error: backend address '127.0.0.1:\u0665' has port '\u0665'; {accepted}",
        "Error: --port-base 65535 with 2 backends needs ports up to 65536; ports go from 1 to 65535",
        "Error: argument --port-base: port '\u00b2' is not valid; expected a number from 1 to 65535",
        "Error: argument --port-base: port ' 80' is not valid; expected a number from 1 to 65535",
        "Error: unknown subcommand 'x\\x1b[31m'; accepted: list, add, remove, check, spawn, stop-local, discover",
    ], proc.stderr
    assert "Starting" not in proc.stdout and "\x1b" not in proc.stdout + proc.stderr
    assert "No RPC backends configured." in proc.stdout


# ---------------------------------------------------------------- no probes while the heartbeat is off

class CountingListener:
    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()


class HealthyServer(ThreadingHTTPServer):
    """A llama-server as `coordinator attach` sees it: /health answers ok. It counts the checks,
    which the shell makes on its own clock: the test's measure of how long the shell sat idle."""

    def __init__(self):
        self.checks = 0
        server = self

        class Health(BaseHTTPRequestHandler):
            def do_GET(self):
                server.checks += 1
                body = b'{"status":"ok"}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Health)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def close(self):
        self.shutdown()
        self.server_close()


@pytest.mark.parametrize("heartbeat", ["false", "true"])
def test_heartbeat_variable_decides_whether_anything_probes_while_idle(tmp_path, heartbeat):
    listener = CountingListener()
    coordinator = HealthyServer()
    shell = Shell(tmp_path, "--rpc-backend", listener.address, SOLLOL_RPC_BACKEND_HEARTBEAT=heartbeat,
                  SOLLOL_RPC_BACKEND_HEARTBEAT_INTERVAL="0.1", SYNAPTICLLAMAS_ATTACH_CHECK_INTERVAL="0.1")
    try:
        shell.send("backends list", f"coordinator attach {coordinator.url}")
        shell.expect(re.escape(listener.address))
        shell.expect(r"^Watching .*: it is up")
        # idle at the prompt for 8 state checks of the attached server: 8 ticks of a 0.1 s clock,
        # as long as 8 rounds of the backend heartbeat (the first check was the attach itself)
        wait_for(lambda: coordinator.checks >= 1 + 8, 30, what="8 state checks of the attached server")
        idle = listener.accepted
        if heartbeat == "false":
            assert idle == 0, f"{idle} probe connections while idle with SOLLOL_RPC_BACKEND_HEARTBEAT=false"
            shell.send("backends check")
            shell.expect(r"^Probed 1 backend in")
            # the listener does count: `check` is one connect (its thread may count it a moment after
            # the shell has printed the result: the kernel completed the handshake before accept())
            wait_for(lambda: listener.accepted >= 1, 10, what="the listener to count the probe")
            assert listener.accepted == 1
        else:
            # the probes go on while idle (how many in those 8 ticks depends on the machine's load)
            wait_for(lambda: listener.accepted >= 4, 30, what="4 probe connections while idle")
        shell.send("exit")
        assert shell.wait() == 0
    finally:
        listener.sock.close()
        coordinator.close()
        shell.kill()


# ---------------------------------------------------------------- no orphans

@pytest.mark.parametrize("ending", ["exit", "eof", "sigterm"])
def test_no_spawned_rpc_server_survives_the_shell(tmp_path, rpc_server_binary, ending):
    shell = Shell(tmp_path, SOLLOL_RPC_BACKEND_HEARTBEAT="false")
    shell.send("backends spawn 2")
    ports = started_ports(shell.expect(r"^Started 2 local backends: (.+) \(not saved"))
    assert len(rpc_servers_on(ports)) == 2
    if ending == "exit":
        shell.send("exit")
    elif ending == "eof":
        shell.proc.stdin.close()
    else:
        shell.proc.send_signal(signal.SIGTERM)
    status = shell.wait()
    assert status == {"exit": 0, "eof": 0, "sigterm": 128 + signal.SIGTERM}[ending]
    assert rpc_servers_on(ports) == {}


# ---------------------------------------------------------------- spawn, kill, restart, seen on Redis

def test_spawn_kill_restart_seen_by_a_redis_subscriber(tmp_path, redis_server, rpc_server_binary):
    sub = RedisCliSubscriber(redis_server.port)
    read = 0        # events before this index have been looked at: each wait looks only at newer ones

    def wait_event(component, event_type, timeout=15, **details):
        nonlocal read
        i, event = sub.wait_for_event(component, event_type, timeout, after=read, **details)
        read = i + 1
        return event

    def counts(beat):
        return beat["details"]["total_configured"], beat["details"]["total_active"]

    restarted = None
    shell = Shell(tmp_path, "--redis", "--redis-url", redis_server.url, SOLLOL_RPC_BACKEND_HEARTBEAT_INTERVAL="1")
    try:
        wait_event("system", "register")
        assert counts(wait_event("rpc_registry", "heartbeat")) == (0, 0)
        shell.send("backends spawn 2")
        keys = started_ports(shell.expect(r"^Started 2 local backends: (.+) \(not saved"))
        keys = [f"127.0.0.1:{p}" for p in keys]
        for key in keys:
            wait_event("rpc_backend", "connect", address=key)
        beat = wait_event("rpc_registry", "heartbeat")
        assert beat["message"] == "rpc_backend_connect on rpc_registry"
        assert counts(beat) == (2, 2)
        assert [(b["address"], b["state"]) for b in beat["details"]["backends"]] == [(k, "up") for k in keys]

        victim = keys[0]
        port = int(victim.rsplit(":", 1)[1])
        [pid] = rpc_servers_on([port])
        os.kill(pid, signal.SIGKILL)
        # the exit is awaited, not found by probes: only the exit's status names the signal
        # (bench/backends.py measures how soon)
        lost = wait_event("rpc_backend", "disconnect", address=victim)
        assert "SIGKILL" in lost["details"]["reason"] and lost["level"] == "warning"
        beat = wait_event("rpc_registry", "heartbeat")    # the next one counts it out
        assert counts(beat) == (2, 1)
        assert dict((b["address"], b["state"]) for b in beat["details"]["backends"])[victim] == "down"

        # the same port comes back (started by the test, as an admin would restart it)
        restarted = subprocess.Popen([str(rpc_server_binary), "--host", "127.0.0.1", "--port", str(port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        back = wait_event("rpc_backend", "connect", address=victim)
        assert back["details"]["from_state"] == "down"
        assert counts(wait_event("rpc_registry", "heartbeat")) == (2, 2)

        shell.send("exit")
        assert shell.wait() == 0
        wait_event("system", "unregister")
        assert rpc_servers_on([int(keys[1].rsplit(":", 1)[1])]) == {}
    finally:
        shell.kill()
        if restarted is not None:
            restarted.kill()
            restarted.wait(5)
        sub.close()
