"""`coordinator` as a user drives it: the real shell, `backends spawn 2` (real ggml-rpc-servers), the real
llama-server and demo model, a real redis-server and `redis-cli psubscribe` as the subscriber."""
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
from llama_support import TAG_VAR, pid_alive, tagged, tagged_processes, wait_gone
from support import PipedShell, RedisCliSubscriber, free_port, run_piped, shell_env

pytestmark = pytest.mark.llama


@pytest.fixture
def tag():
    with tagged() as value:
        yield value


def llama_env(tag, redis_url="redis://127.0.0.1:1", **extra):
    return {TAG_VAR: tag, "SOLLOL_REDIS_URL": redis_url, "SYNAPTICLLAMAS_COORDINATOR_PORT": str(free_port()),
            "SYNAPTICLLAMAS_COORDINATOR_ARGS": "-t 1", **extra}


def kinds(events):
    return [(e["component"], e["event_type"]) for e in events]


def test_piped_end_to_end_seen_in_order_by_a_redis_subscriber(tmp_path, redis_server, tag):
    sub = RedisCliSubscriber(redis_server.port)
    try:
        # the order: the backends come up before `redis on`, whose backlog still carries
        # register and the connects to the subscriber
        script = ('backends spawn 2\nredis on\ncoordinator start\ncoordinator ask "Once upon a time" --n 8\n'
                  'coordinator stop\nexit\n')
        proc = run_piped(script, tmp_path, "--distributed",
                         env=shell_env(tmp_path, **llama_env(tag, redis_server.url)))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        started = re.search(r"Started 2 local backends: (\S+), (\S+) \(", proc.stdout)
        assert started, proc.stdout
        backends = [started.group(1), started.group(2)]
        assert "No model given: using the demo model SmolLM2-135M-Instruct" in proc.stdout
        assert f"RPC backends: {backends[0]}, {backends[1]}" in proc.stdout
        generated = re.search(r"^Once upon a time(.+)$", proc.stdout, re.M)
        assert generated and generated.group(1).strip(), proc.stdout
        assert "Coordinator stopped." in proc.stdout

        sub.wait_for_event("system", "unregister", timeout=20)
        events = [e for e in sub.events() if e["component"] != "raw"]
        order = kinds(events)

        def at(kind, **details):
            for i, e in enumerate(events):
                if (e["component"], e["event_type"]) == kind and \
                        all(e["details"].get(k) == v for k, v in details.items()):
                    return i
            raise AssertionError(f"{kind} {details} not seen; saw {order}")

        assert order[0] == ("system", "register")
        connects = [at(("rpc_backend", "connect"), address=b) for b in backends]
        starting = at(("coordinator", "starting"))
        loading = [i for i, k in enumerate(order) if k == ("model", "model_loading")]
        loaded = at(("model", "model_load"))
        start = at(("coordinator", "start"))
        stop = at(("coordinator", "stop"), reason="user")
        unregister = at(("system", "unregister"))
        assert max(connects) < at(("system", "redis_on")) < starting < min(loading) <= max(loading) < loaded < start < stop < unregister
        assert events[start]["details"]["rpc_backends"] == backends
        assert events[start]["message"] == "llama.cpp coordinator started"
        assert order.count(("coordinator", "start")) == 1 and order.count(("coordinator", "stop")) == 1
        # each event exactly once, seq rising, all from this one shell
        seqs = [e["seq"] for e in sub.events()]
        assert seqs == sorted(set(seqs))
        # raw llama.cpp lines reach the subscriber (sampled: 1 in 10 by default)
        assert any(e["component"] == "raw" for e in sub.events())
    finally:
        sub.close()


def test_crash_and_a_dead_backend_in_one_session(tmp_path, redis_server, tag):
    """SIGKILL llama-server -> crash, backoff, start again; then kill a local backend: the
    coordinator fails over to the survivor at once, and the next ask just works."""
    sub = RedisCliSubscriber(redis_server.port)
    shell = PipedShell(tmp_path, "--distributed",
                       **llama_env(tag, redis_server.url, SYNAPTICLLAMAS_COORDINATOR_BACKOFF="0.2"))
    try:
        shell.send("redis on")
        shell.expect("Redis publishing ON")
        shell.send("backends spawn 2")
        found = shell.expect(r"Started 2 local backends: (\S+), (\S+) \(")
        alive, doomed = found.group(1), found.group(2)
        shell.send("coordinator start")
        first_pid = int(shell.expect(r"Coordinator running at \S+ \(pid (\d+)\)").group(1))

        os.kill(first_pid, signal.SIGKILL)
        i, stop = sub.wait_for_event("coordinator", "stop", reason="crash", timeout=10)
        assert stop["details"]["signal"] == "SIGKILL" and stop["details"]["pid"] == first_pid
        j, _ = sub.wait_for_event("coordinator", "backoff", after=i)
        k, again = sub.wait_for_event("coordinator", "start", after=j, timeout=60)
        assert again["details"]["pid"] != first_pid and again["details"]["rpc_backends"] == [alive, doomed]

        doomed_port = int(doomed.rsplit(":", 1)[1])
        pids = [pid for pid, _ in tagged_processes(tag) if _ == "ggml-rpc-server" and
                f"{doomed_port}".encode() in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(pids) == 1, tagged_processes(tag)
        os.kill(pids[0], signal.SIGKILL)
        # its exit is awaited: the coordinator fails over at once, before any request pays for it
        m, stopping = sub.wait_for_event("coordinator", "stopping", reason="failover", after=k, timeout=20)
        assert doomed in stopping["message"]
        n, starting = sub.wait_for_event("coordinator", "starting", reason="failover", after=m, timeout=20)
        assert starting["details"]["rpc_backends"] == [alive] and starting["details"]["left_out"] == {doomed: "down"}
        _, failover = sub.wait_for_event("coordinator", "failover", after=n, timeout=60)
        assert failover["details"]["lost"] == [doomed] and failover["details"]["survivors"] == [alive]
        assert failover["details"]["downtime_s"] > 0

        shell.send('coordinator ask "Once upon a time" --n 8')
        shell.expect(r"^\[\d+ tokens in ", timeout=30)
        shell.send("coordinator status")
        shell.expect(rf"^RPC backends\s+{re.escape(alive)}$")
        shell.expect(rf"^last failover\s+lost {re.escape(doomed)}; serving again on {re.escape(alive)} after ")
        shell.send("exit")
        assert shell.close() == 0
        shell.unread(timeout=10)           # the shell's output has ended: every line it wrote is read
        assert not [line for _, line in shell.transcript if line.startswith("Error:")]
    finally:
        shell.kill()
        sub.close()


@pytest.mark.parametrize("ending", ["exit", "eof", "SIGTERM", "SIGHUP"])
def test_no_orphans_however_the_shell_ends(tmp_path, tag, ending):
    shell = PipedShell(tmp_path, "--distributed", **llama_env(tag))
    try:
        shell.send("backends spawn 2")
        shell.expect("Started 2 local backends")
        shell.send("coordinator start")
        pid = int(shell.expect(r"Coordinator running at \S+ \(pid (\d+)\)").group(1))
        children = tagged_processes(tag)
        assert sorted(name for _, name in children) == ["ggml-rpc-server", "ggml-rpc-server", "llama-server"]
        if ending == "exit":
            shell.send("exit")
            assert shell.close() == 0
        elif ending == "eof":
            assert shell.close() == 0
        else:
            shell.proc.send_signal(getattr(signal, ending))
            assert shell.proc.wait(60) == 128 + getattr(signal, ending)
        assert not pid_alive(pid)
        assert tagged_processes(tag) == []
    finally:
        shell.kill()


def test_coordinator_mistakes_are_one_line_and_the_shell_goes_on(tmp_path, tag):
    text = tmp_path / "notes.txt"
    text.write_text("not a model")
    script = "\n".join([
        "coordinator start --model /nonexistent/model.gguf",
        f"coordinator start --model {text}",
        "coordinator start --port 0",
        "coordinator stop",
        "coordinator ask hello",
        "coordinator logs zero",
        "coordinator attach ftp://x",
        "coordinator frobnicate",
        "coordinator start",          # distributed mode, no backends
        "coordinator start --port \u00b2",
        "coordinator start --model " + "m" * 5000,
        "coordinator attach 'http://bad\x1bhost:80'",
        "coordinator '\x1b[31m'",
        "status",
    ]) + "\n"
    proc = run_piped(script, tmp_path, "--distributed", env=shell_env(tmp_path, **llama_env(tag)))
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert errors == [
        "Error: model /nonexistent/model.gguf does not exist; give a GGUF file with --model PATH",
        f"Error: model {text} is not a GGUF file (it starts with b'not ', a GGUF file with b'GGUF'); "
        "llama-server needs a .gguf model",
        "Error: argument --port: port '0' is not valid; expected a number from 1 to 65535",
        "Error: the coordinator is not running (state: stopped)",
        "Error: no running coordinator (state: stopped); `coordinator start` first",
        "Error: argument N: 'zero' is not a whole number",
        "Error: URL 'ftp://x' is not supported; expected http://HOST:PORT or https://HOST:PORT, e.g. http://10.0.0.9:8080",
        "Error: unknown subcommand 'frobnicate'; expected one of: start, plan, stop, restart, rebalance, status, logs, attach, "
        "detach, ask",
        "Error: no RPC backend is configured in distributed mode; start two local ones with `backends spawn 2`, "
        "or add one with `backends add HOST:PORT`",
        "Error: argument --port: port '\u00b2' is not valid; expected a number from 1 to 65535",
        f"Error: model {'m' * 197}... cannot be read (File name too long)",
        "Error: URL 'http://bad\\x1bhost:80' has no valid host; expected http://HOST:PORT or https://HOST:PORT, e.g. http://10.0.0.9:8080",
        "Error: unknown subcommand '\\x1b[31m'; expected one of: start, plan, stop, restart, rebalance, status, logs, attach, "
        "detach, ask",
    ], proc.stderr
    assert "Traceback" not in proc.stderr and "\x1b" not in proc.stdout + proc.stderr
    assert "hello" not in proc.stdout      # `ask` says there is no coordinator before echoing the prompt
    assert "mode         distributed" in proc.stdout     # the shell went on to the last line
    assert proc.returncode == 1


def test_ctrl_c_during_start_kills_the_child_and_ends_the_piped_run(tmp_path, tag):
    shell = PipedShell(tmp_path, **llama_env(tag))
    try:
        shell.send("coordinator start")
        pid = int(shell.expect(r"Starting llama-server \(pid (\d+)\)").group(1))
        os.kill(pid, signal.SIGSTOP)          # hold it mid-load, so the Ctrl-C surely comes first
        shell.send("coordinator status")      # queued: a piped run ends at Ctrl-C, like a script
        shell.proc.send_signal(signal.SIGINT)
        shell.expect(r"Cancelled\.")
        wait_gone(pid)
        assert shell.wait() == 128 + signal.SIGINT
        assert tagged_processes(tag) == []
        shell.unread(timeout=10)           # the shell's output has ended: every line it wrote is read
        assert not any(line.startswith("state") for _, line in shell.transcript)   # status never ran
    finally:
        shell.kill()


def test_attach_over_https_with_an_api_key_then_ask(tmp_path, tag):
    """A llama-server someone else started, with TLS and an API key (its certificate trusted through
    SSL_CERT_FILE, as a user with a private CA would): attach, ask, detach. Without the key, ask
    fails in one line with the server's reason."""
    import ssl

    import httpx
    from llama_support import llama_binaries
    from support import wait_for

    server, _, model = llama_binaries()
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    port = free_port()
    external = subprocess.Popen([str(server), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-c", "512",
                                 "-t", "1", "--no-webui", "--ssl-key-file", str(key), "--ssl-cert-file", str(cert),
                                 "--api-key", "sk-lab-secret"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, TAG_VAR: tag})
    try:
        url = f"https://127.0.0.1:{port}"
        trusted = ssl.create_default_context(cafile=str(cert))

        def healthy() -> bool:
            try:
                return httpx.get(url + "/health", verify=trusted, timeout=2).json().get("status") == "ok"
            except (httpx.HTTPError, ValueError):
                return False

        wait_for(healthy, 60, what="the external llama-server's /health over https")
        env = shell_env(tmp_path, SSL_CERT_FILE=str(cert))
        proc = run_piped(f"coordinator attach {url} --api-key sk-lab-secret\ncoordinator ask 'Once upon a time' --n 4\n"
                         "coordinator status\ncoordinator detach\n", tmp_path, env=env)
        assert proc.returncode == 0, proc.stderr
        assert f"Watching {url}: it is up (/health ok)" in proc.stdout
        assert re.search(r"\[\d tokens in [\d.]+s", proc.stdout), proc.stdout
        assert "running (external, attached)" in proc.stdout and f"Stopped watching {url}." in proc.stdout
        assert "sk-lab-secret" not in proc.stdout + proc.stderr
        proc = run_piped(f"coordinator attach {url}\ncoordinator ask hello --n 2\n", tmp_path, env=env)
        assert proc.returncode == 1
        assert [line for line in proc.stderr.splitlines() if line.startswith("Error:")] == \
            ["Error: llama-server refused the request (401): Invalid API Key"]
    finally:
        external.kill()
        external.wait(10)
