"""Nodes on simulated hosts: three network namespaces, each running `python3 main.py node` with the
real ggml-rpc-server; Redis and the shell in the root namespace, as on a small lab network.

Everything is real: the network is Linux namespaces joined by a bridge (tests/cluster.py), the
nodes and the shell are this project's programs, llama-server loads the demo model over the three
hosts' rpc-servers.
"""
import json
import os
import re
import signal
from pathlib import Path

import pytest
from llama_support import tagged
from node_support import HEARTBEAT, NodesOnHosts
from support import wait_for

pytestmark = pytest.mark.llama


@pytest.fixture
def tag():
    with tagged() as value:
        yield value


def test_three_nodes_are_found_serve_the_model_and_their_failures_are_seen(tmp_path, make_cluster, tag):
    cluster = make_cluster(3)
    with NodesOnHosts(cluster, tmp_path, tag) as on_hosts:
        redis, sub, addresses, nodes = on_hosts.redis, on_hosts.sub, on_hosts.addresses, on_hosts.nodes
        # each node binds to its address on the route to Redis (no --host given) and announces itself
        for address in addresses:
            sub.wait_for_event("node", "node_up", address=address, timeout=30)
            # started with --insecure (no cluster key): said at start, on stderr and as an event
            _, insecure = sub.wait_for_event("node", "insecure", address=address, timeout=5)
            assert insecure["level"] == "warning" and "without authentication" in insecure["message"]
        assert all("Warning: --insecure: rpc-server listens on" in on_hosts.node_log(h) for h in cluster.hosts)
        registered = redis.client().hgetall("synapticllamas:nodes")
        assert sorted(registered) == sorted(addresses)
        for address in addresses:
            reg = json.loads(registered[address])
            assert reg["rpc_version"] == "7.0.0" and reg["devices"] and reg["devices"][0]["total_mib"] > 0
            assert reg["hostname"] == f"host{addresses.index(address)}" and reg["cache"]["enabled"] is True
            assert reg["heartbeat_interval"] == HEARTBEAT and reg["state"] == "up"

        # a shell with `redis on` lists them, without any `backends add`
        shell = on_hosts.shell("--distributed")
        shell.send("redis on", "backends discover")
        _, lines = shell.read_until(r"3 nodes announced on")
        for address in addresses:
            assert any(line.startswith(address) and re.search(r"\bup\s+up\b", line) for line in lines), lines

        # the demo model over the three hosts' rpc-servers
        shell.send("coordinator start")
        match, _ = shell.read_until(r"Coordinator running .* RPC backends: (.*); ready", timeout=120)
        assert sorted(match.group(1).split(", ")) == sorted(addresses)

        # a host's cable pulled while the coordinator holds its rpc-server: no probe may touch it,
        # its heartbeat stops arriving, and the shell marks it down within 2.5 intervals
        cut = cluster.hosts[1]
        sub.wait_for_event("node", "heartbeat", address=addresses[1], timeout=10)
        cut.link_down()
        shell.read_until(rf"RPC backend {re.escape(addresses[1])} disconnected: node {re.escape(addresses[1])} "
                         r"heartbeat overdue", timeout=3 * 2.5 * HEARTBEAT + 5)
        cut.link_up()

        # killing a node's rpc-server: rpc_server_exit, then rpc_server_restart and node_up again
        mark = len(sub.events())
        rpc = [p for p in cluster.hosts[0].pids() if b"ggml-rpc-server" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(rpc) == 1, rpc
        os.kill(rpc[0], signal.SIGKILL)
        j, exit_event = sub.wait_for_event("node", "rpc_server_exit", address=addresses[0], after=mark, timeout=10)
        assert exit_event["details"]["signal"] == "SIGKILL" and exit_event["details"]["rpc_pid"] == rpc[0]
        k, _ = sub.wait_for_event("node", "rpc_server_restart", address=addresses[0], after=j, timeout=10)
        sub.wait_for_event("node", "node_up", address=addresses[0], after=k, timeout=20)

        # SIGTERM on a node: it stops its rpc-server, says node_down and leaves the hash
        nodes[2].send_signal(signal.SIGTERM)
        assert nodes[2].wait(20) == 0, on_hosts.node_log(cluster.hosts[2])
        sub.wait_for_event("node", "node_down", address=addresses[2], reason="signal", timeout=10)
        wait_for(lambda: addresses[2] not in redis.client().hgetall("synapticllamas:nodes"), 10,
                 what="the stopped node's entry to leave synapticllamas:nodes")
        assert "node: stopped" in on_hosts.node_log(cluster.hosts[2])

        shell.send("exit")
        assert shell.wait() == 0, shell.output()
