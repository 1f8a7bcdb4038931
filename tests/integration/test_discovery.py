"""Node discovery against what anyone on the Redis can send, and a node announced as `localhost`.

Real parts on this machine: redis-server, `python3 main.py node` with the real ggml-rpc-server, the
shell piped, llama-server loading the demo model over the node; redis-cli psubscribe watches.
"""
import json
import os
import re
import signal
import subprocess

import pytest
from llama_support import TAG_VAR, tagged
from support import PYTHON, ROOT, PipedShell, RedisCliSubscriber, free_port

pytestmark = pytest.mark.llama

NODE_CHANNEL = "synapticllamas:llama_cpp:node"
ESCAPE = "\x1b]0;pwned\x07\x1b[2J"


@pytest.fixture
def tag():
    with tagged() as value:
        yield value


def node_event(**fields):
    base = {"timestamp": 1.7e9, "component": "node", "event_type": "node_up", "message": "node up",
            "details": {"address": "10.0.0.99:50052", "state": "up"}, "level": "info",
            "source": {"app": "synapticllamas-node", "instance": "x:1:00000000", "host": "x"}, "seq": 1}
    base.update(fields)
    return json.dumps(base)


# what killed discovery's task or reached the terminal before the schema
BAD_MESSAGES = [
    node_event(source="forged"),                                              # AttributeError in _on_message
    node_event(timestamp=1e20),
    node_event().replace('"seq": 1', '"seq": 1e999'),
    node_event(details="not an object"),
    node_event(details={"address": "10.0.0.99:50052", "state": "up", "rpc_version": "7" + ESCAPE}),
    node_event(details={"address": ["10.0.0.99", 50052], "state": "up"}),
    node_event(details={"address": "10.0.0.99:50052", "devices": [{"name": ESCAPE, "total_mib": 1}]}),
    node_event(message="x" * (2 << 20)),
    "not json at all",
]


def test_a_node_announced_as_localhost_is_up_after_bad_messages_and_its_loss_fails_the_coordinator_over(
        tmp_path, redis_server, tag):
    client = redis_server.client()
    sub = RedisCliSubscriber(redis_server.port)
    # a hash entry nobody can use: read when the shell connects, skipped and counted
    client.hset("synapticllamas:nodes", "10.0.0.98:50052", json.dumps({"address": "10.0.0.98:50052",
                                                                       "rpc_version": ESCAPE, "state": "up"}))
    shell = PipedShell(tmp_path, "--distributed", **{
        TAG_VAR: tag, "SOLLOL_REDIS_URL": redis_server.url, "SOLLOL_RPC_BACKEND_HEARTBEAT_INTERVAL": "1",
        "SYNAPTICLLAMAS_COORDINATOR_PORT": str(free_port()), "SYNAPTICLLAMAS_COORDINATOR_ARGS": "-t 1",
        "SYNAPTICLLAMAS_COORDINATOR_STOP_TIMEOUT": "2"})
    node = None
    try:
        shell.send("redis on")
        shell.expect(r"Redis publishing ON")
        for message in BAD_MESSAGES:
            client.publish(NODE_CHANNEL, message)
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SOLLOL_", "SYNAPTICLLAMAS_"))}
        env.update({TAG_VAR: tag, "XDG_CACHE_HOME": str(tmp_path / "node-cache"), "PYTHONUNBUFFERED": "1",
                    "XDG_CONFIG_HOME": str(tmp_path / "node-config"), "SOLLOL_RPC_BACKEND_HEARTBEAT_INTERVAL": "1"})
        with open(tmp_path / "node.log", "w") as log:
            node = subprocess.Popen([PYTHON, str(ROOT / "main.py"), "node", "--host", "localhost", "--port", str(port),
                                     "--redis-url", redis_server.url, "--threads", "1"], env=env, stdout=log,
                                    stderr=log, cwd=ROOT)
        address = f"127.0.0.1:{port}"                    # announced in the address parser's spelling
        sub.wait_for_event("node", "node_up", address=address, timeout=30)
        # the shell takes it (one line; after the bad messages, on the same subscription), and only
        # then does `backends discover` list it
        shell.expect(rf"RPC backend {re.escape(address)} connected")

        # discovery kept going: the node is a backend, up, and the skipped messages are counted, not shown
        shell.send("backends discover")
        _, lines = shell.read_until(r"1 node announced on")
        [row] = [line for line in lines if line.startswith(address)]
        assert re.search(r"\bup\s+up\b", row) and "7.0.0" in row, lines
        footer = lines[-1]
        assert f"discovery connected; {len(BAD_MESSAGES) + 1} invalid messages skipped (last: " in footer, footer
        shell.send("status")
        _, lines = shell.read_until(r"^nodes\s")
        assert f"following; 1 node announced; {len(BAD_MESSAGES) + 1} invalid messages skipped" in lines[-1], lines
        shell.send("backends list")
        _, lines = shell.read_until(r"up, \d+ down, \d+ unknown")
        assert any(line.startswith(address) and " up " in line for line in lines), lines
        assert not any("\x1b" in line or "\x07" in line for _, line in shell.transcript), "an escape reached stdout"

        # the coordinator over the node; the node leaves: node_down, and the coordinator is stopped for failover
        shell.send("coordinator start")
        shell.read_until(rf"Coordinator running .* RPC backends: {re.escape(address)}; ready", timeout=120)
        mark = len(sub.events())
        node.send_signal(signal.SIGTERM)
        assert node.wait(20) == 0
        sub.wait_for_event("node", "node_down", address=address, after=mark, timeout=10)
        sub.wait_for_event("rpc_backend", "disconnect", address=address, after=mark, timeout=10)
        sub.wait_for_event("coordinator", "stopping", reason="failover", after=mark, timeout=10)
        sub.wait_for_event("coordinator", "waiting", after=mark, timeout=20)   # no backend is left to serve
        assert shell.exit() == 0, shell.output()
    finally:
        shell.kill()
        if node is not None and node.poll() is None:
            node.kill()
            node.wait(10)
        sub.close()
