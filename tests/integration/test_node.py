"""`python3 main.py node` on this machine (loopback): bad input, Redis away, giving up, the cache.

The real program, the real ggml-rpc-server and a real redis-server; the simulated hosts are in
tests/e2e/test_cluster_nodes.py.
"""
import json
import os
import signal
import socket
import subprocess
import time

import pytest
from llama_support import TAG_VAR, tagged, tagged_processes
from support import PYTHON, ROOT, RedisServer, free_port, wait_for

pytestmark = pytest.mark.llama


@pytest.fixture
def tag():
    with tagged() as value:
        yield value


def node_env(tmp_path, tag, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SOLLOL_", "SYNAPTICLLAMAS_"))}
    env.update({TAG_VAR: tag, "XDG_CACHE_HOME": str(tmp_path / "cache"), "XDG_CONFIG_HOME": str(tmp_path / "config"),
                "PYTHONUNBUFFERED": "1", "SOLLOL_REDIS_URL": "redis://127.0.0.1:1", **extra})
    return env


def run_node(tmp_path, tag, *args, timeout=30, **env):
    return subprocess.run([PYTHON, str(ROOT / "main.py"), "node", "--host", "127.0.0.1", *args], capture_output=True,
                          text=True, env=node_env(tmp_path, tag, **env), cwd=ROOT, timeout=timeout)


def start_node(tmp_path, tag, *args, **env):
    return subprocess.Popen([PYTHON, str(ROOT / "main.py"), "node", "--host", "127.0.0.1", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=node_env(tmp_path, tag, **env), cwd=ROOT)


def accepts(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def test_bad_input_is_one_line_a_nonzero_status_and_nothing_left_running(tmp_path, tag):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    taken = busy.getsockname()[1]
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cases = [
        (["--redis-url", "redis://:secret@host:99999"], 2,
         "Error: --redis-url='redis://:***@host:99999' is not valid: expected redis://[:password@]host[:port][/db], "
         "rediss://... or unix:///path"),
        (["--port", str(taken)], 1, f"Error: port {taken} on 127.0.0.1 is in use (another rpc-server?); "
         "choose another with --port N"),
        (["--port", str(free_port()), "--rpc-server", str(tmp_path / "nope")], 1, "Error: "),
        (["--port", str(free_port()), "--cache-dir", str(blocker / "sub")], 1,
         f"Error: cache directory {blocker / 'sub'}: cannot create it (Not a directory); choose another with "
         "--cache-dir PATH or run with --no-cache"),
        (["--port", "²"], 2, "Error: --port='²' is not valid: expected an integer from 1 to 65535"),
        (["--threads", "0"], 2, "Error: --threads='0' is not valid: expected an integer >= 1"),
        (["--cache-max-gb", "-1"], 2, "Error: --cache-max-gb='-1' is not valid: expected a number greater than 0"),
        (["--port", str(free_port()), "--no-cache", "--cache-max-gb", "1"], 2,
         "Error: --cache-dir and --cache-max-gb need the cache; drop --no-cache"),
    ]
    try:
        for args, status, first in cases:
            proc = run_node(tmp_path, tag, *args)
            assert proc.returncode == status, (args, proc.stdout, proc.stderr)
            lines = proc.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith(first), (args, proc.stderr)
            assert "Traceback" not in proc.stderr and "secret" not in proc.stdout + proc.stderr
            assert tagged_processes(tag) == []
        wildcard = subprocess.run([PYTHON, str(ROOT / "main.py"), "node", "--host", "0.0.0.0"], capture_output=True,
                                  text=True, env=node_env(tmp_path, tag), cwd=ROOT, timeout=30)
        assert wildcard.returncode == 2 and "add --listen-all" in wildcard.stderr
        assert len(wildcard.stderr.strip().splitlines()) == 1
    finally:
        busy.close()


def test_more_memory_than_the_devices_have_is_refused_after_reading_the_banner(tmp_path, tag):
    proc = run_node(tmp_path, tag, "--port", str(free_port()), "--memory", str(10**9))
    assert proc.returncode == 2, proc.stderr
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("Error:")]
    assert line.startswith(f"Error: --memory {10**9} MiB is more than the devices report free (")
    assert tagged_processes(tag) == []


def test_without_redis_it_serves_and_announces_itself_when_redis_answers(tmp_path, tag):
    redis_port = free_port()
    port = free_port()
    node = start_node(tmp_path, tag, "--port", str(port), "--redis-url", f"redis://127.0.0.1:{redis_port}",
                      SOLLOL_RPC_BACKEND_HEARTBEAT_INTERVAL="0.5")
    redis = None
    try:
        # one line says Redis is away; rpc-server serves anyway
        line = node.stderr.readline()
        assert "Redis unreachable at redis://127.0.0.1:" in line and "connection refused" in line, line
        wait_for(lambda: accepts(port), 20, what="rpc-server to accept connections without Redis")
        redis = RedisServer(tmp_path / "redis", port=redis_port).start()
        wait_for(lambda: redis.client().hget("synapticllamas:nodes", f"127.0.0.1:{port}"), 20,
                 what="the node to register once Redis answers")

        def journal():
            return [json.loads(fields["event"])["event_type"]
                    for _, fields in redis.client().xrange("synapticllamas:events")]

        # buffered while Redis was away, sent when it came: the publisher registers as it connects
        # and sends what it holds in the next round trip (with the registration of then)
        wait_for(lambda: "node_up" in journal(), 10, what="the buffered node_up in the journal")
        reg = json.loads(redis.client().hget("synapticllamas:nodes", f"127.0.0.1:{port}"))
        assert reg["state"] == "up" and reg["address"] == f"127.0.0.1:{port}" and reg["rpc_version"] == "7.0.0"
        node.send_signal(signal.SIGINT)
        assert node.wait(20) == 0
        wait_for(lambda: redis.client().hlen("synapticllamas:nodes") == 0, 10, what="the entry to be removed")
    finally:
        if node.poll() is None:
            node.kill()
            node.wait(10)
        if redis is not None:
            redis.kill()


def test_it_gives_up_when_restarts_keep_failing_and_says_why(tmp_path, tag, rpc_server_binary):
    """A crash after which rpc-server comes back resets the count (like the coordinator); restarts
    that fail in a row do not. The binary is the real one behind a wrapper that fails once a marker
    file exists, as a broken driver or a full disk would."""
    marker = tmp_path / "broken"
    wrapper = tmp_path / "rpc-server"
    wrapper.write_text(f'#!/bin/sh\nif [ -e "{marker}" ]; then echo "simulated failure"; exit 3; fi\n'
                       f'exec "{rpc_server_binary}" "$@"\n')
    wrapper.chmod(0o755)
    port = free_port()
    node = start_node(tmp_path, tag, "--port", str(port), "--max-restarts", "2", "--rpc-server", str(wrapper))
    try:
        while "serving on" not in (line := node.stdout.readline()):    # the node has seen it up
            assert line, "the node ended before serving"
        [pid] = [pid for pid, name in tagged_processes(tag) if name.startswith("ggml-rpc")]
        marker.touch()
        os.kill(pid, signal.SIGKILL)
        assert node.wait(30) == 1
        err = node.stderr.read()
        assert "gave up: rpc-server exited 3 times in a row (last: exit code 3)" in err, err
        assert err.count("simulated failure") == 2 and "Traceback" not in err
        assert tagged_processes(tag) == []
    finally:
        if node.poll() is None:
            node.kill()
            node.wait(10)


def test_the_cache_is_pruned_to_its_limit_least_recently_used_first(tmp_path, tag):
    files = tmp_path / "cache" / "synapticllamas" / "rpc-cache" / "rpc"
    files.mkdir(parents=True)
    now = time.time()
    for i, age in enumerate((300, 200, 100)):          # 3 files of 1 MiB, oldest first
        path = files / f"tensor{i}"
        path.write_bytes(b"x" * 2**20)
        os.utime(path, (now - age, now - age))
    port = free_port()
    node = start_node(tmp_path, tag, "--port", str(port), "--cache-max-gb", str(1.5 / 1024))   # 1.5 MiB
    try:
        line = node.stdout.readline() + node.stdout.readline()
        assert "cache over" in line and "removed the 2 least recently used files (2 MiB)" in line, line
        assert sorted(p.name for p in files.iterdir()) == ["tensor2"]
    finally:
        node.send_signal(signal.SIGTERM)
        assert node.wait(20) == 0


def test_with_no_route_to_a_remote_redis_it_refuses_to_announce_loopback(tmp_path, tag):
    """Run in a network namespace of its own (`unshare -n`: no interface up, no route): a remote
    Redis has no route, so there is no address of this machine to announce. The node must not fall
    back to 127.0.0.1 (remote shells would dial their own loopback): one line, exit status 2."""
    proc = subprocess.run(["unshare", "-n", PYTHON, str(ROOT / "main.py"), "node", "--redis-url",
                           "redis://10.255.7.1:6379", "--port", str(free_port())], capture_output=True, text=True,
                          env=node_env(tmp_path, tag), cwd=ROOT, timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        "Error: no route to Redis at 10.255.7.1:6379 (network is unreachable) to choose the address rpc-server "
        "announces; pass --host ADDR, this machine's address on the network the coordinators reach"], proc.stderr
    assert tagged_processes(tag) == []
    bad = run_node(tmp_path, tag, "--host", "no such host!")      # run_node's own --host comes first: replaced
    assert bad.returncode == 2 and bad.stderr.startswith("Error: --host='no such host!' is not valid: expected an IP "
                                                         "address or host name of this machine"), bad.stderr


def without_dac_override() -> list[str]:
    """As root, run without the capabilities that let root read any directory whatever its mode
    (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH): a mode then denies it as it denies any user."""
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"] if os.geteuid() == 0 else []


def test_a_cache_directory_that_cannot_be_read_is_said_once_and_the_heartbeats_go_on(tmp_path, tag, redis_server):
    """The heartbeat is a node's liveness: if it ended on a PermissionError from the cache
    directory, every shell would mark a healthy node down and fail over."""
    files = tmp_path / "cache-home" / "rpc"
    port = free_port()
    env = node_env(tmp_path, tag, SOLLOL_RPC_BACKEND_HEARTBEAT_INTERVAL="0.2")
    node = subprocess.Popen([*without_dac_override(), PYTHON, str(ROOT / "main.py"), "node", "--host", "127.0.0.1",
                             "--port", str(port), "--redis-url", redis_server.url, "--cache-dir",
                             str(tmp_path / "cache-home")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    client = redis_server.client()

    def beats():
        return sum(json.loads(f["event"])["event_type"] == "heartbeat" for _, f in client.xrange("synapticllamas:events"))

    try:
        wait_for(lambda: beats() >= 2, 30, what="the node's first heartbeats")
        files.chmod(0)                                                   # nobody may list it now
        wait_for(lambda: beats() >= 2 + 8, 20, what="heartbeats after the cache became unreadable")
        files.chmod(0o755)
        seen = beats()
        wait_for(lambda: beats() >= seen + 3, 20, what="heartbeats once it is readable again")
        assert node.poll() is None
        entry = json.loads(client.hget("synapticllamas:nodes", f"127.0.0.1:{port}"))
        assert entry["state"] == "up"
    finally:
        if files.exists():
            files.chmod(0o755)
        node.send_signal(signal.SIGTERM)
        status = node.wait(20)
        out, err = node.communicate()
    assert status == 0, err
    said = [line for line in err.splitlines() if "cache directory" in line]
    assert said == [f"node: cannot read the cache directory {files} (permission denied); its size is not updated "
                    "until it can be; rpc-server and the heartbeats go on"], err
    assert f"node: the cache directory {files} can be read again" in out and "Traceback" not in err
