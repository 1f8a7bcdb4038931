"""A cluster that lets no one in, on simulated hosts (tests/cluster.py): two nodes with the cluster key
on host0 and host1, a shell with the key in the root namespace, and host2 as a stranger on the same
bridge (later the home of a node with another cluster's key).

Everything is real: `python3 main.py cluster init` makes the key and the file is copied to each
node's config directory, as the README says; the nodes run the real ggml-rpc-server behind real
stunnel; llama-server loads the demo model through the shell's ends of the links. What rpc-server
sees is read from its own output: each client it serves is an `Accepted client connection` line,
which the nodes publish as raw events (sampling off for these nodes, so every line is there).

One cluster for the whole module (it takes seconds to build), the tests in the order a user would
meet these things; each test says what it leaves behind.
"""
from __future__ import annotations

import json
import re
import time

import pytest
from cluster import SimulatedCluster
from dashboard_support import Dashboard
from llama_support import tagged
from node_support import NODE_PORT, NodesOnHosts
from support import PYTHON, wait_for

from synapticllamas.trust import key as cluster_key
from synapticllamas.trust import signing

pytestmark = pytest.mark.llama

ACCEPTED = "Accepted client connection"
SAVED = "[set_tensor] saved to"
PROBE = """
import socket, sys
for port in map(int, sys.argv[2:]):
    try:
        with socket.create_connection((sys.argv[1], port), timeout=3) as s:
            s.sendall(b"\\x00" * 64 + b"GET / HTTP/1.0\\r\\n\\r\\n")     # rpc-server's hello would start with 0
            s.settimeout(3)
            print(port, repr(s.recv(100)))
    except OSError as exc:
        print(port, type(exc).__name__)
"""


@pytest.fixture(scope="module")
def trusted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trust")
    with tagged() as tag, SimulatedCluster(3) as cluster, \
            NodesOnHosts(cluster, tmp, tag, secure=True, hosts=[0, 1],
                         node_env={"SOLLOL_OBSERVER_SAMPLING": "false"}) as on_hosts:
        on_hosts.wait_all_up()
        shell = on_hosts.shell("--distributed")
        shell.send("redis on")
        shell.expect(r"Redis publishing ON -> ")
        yield on_hosts, shell
        shell.exit()


def rpc_clients(on_hosts: NodesOnHosts, address: str) -> int:
    return sum(1 for e in on_hosts.sub.events() if e["component"] == "raw" and e["details"].get("backend") == address
               and ACCEPTED in e["message"])


def cached(on_hosts: NodesOnHosts) -> int:
    """Tensors our nodes' rpc-servers wrote to their caches: rpc-server says `[set_tensor] saved to`
    for each one it received whole (one it finds in its cache it takes silently)."""
    return sum(1 for e in on_hosts.sub.events() if e["component"] == "raw" and SAVED in e["message"]
               and e["details"].get("backend") in on_hosts.addresses)


def heard_from_all_since(on_hosts: NodesOnHosts, mark: int) -> None:
    """A heartbeat of each node after `mark`: a node publishes in order, so its earlier lines are in."""
    for address in on_hosts.addresses:
        on_hosts.sub.wait_for_event("node", "heartbeat", address=address, after=mark, timeout=10)


def listening(host) -> list[tuple[str, str]]:
    """(local address, process name) of every listening TCP socket in the host's namespace."""
    out = host.run(["ss", "-ltnpH"]).stdout
    found = []
    for line in out.splitlines():
        fields = line.split()
        name = re.search(r'users:\(\("([^"]+)"', line)
        found.append((fields[3], name[1] if name else "?"))
    return found


def publish(on_hosts: NodesOnHosts, event: dict) -> None:
    on_hosts.redis.client().publish("synapticllamas:llama_cpp:node", json.dumps(event))


def announce_key(on_hosts: NodesOnHosts) -> bytes:
    return cluster_key.read(on_hosts.key_file).derive("announce")


def test_rpc_server_listens_on_loopback_only_and_a_stranger_reaches_nothing(trusted):
    on_hosts, _ = trusted
    stranger = on_hosts.cluster.hosts[2]
    for host, address in zip(on_hosts.hosts, on_hosts.addresses, strict=True):
        sockets = listening(host)
        rpc = [local for local, name in sockets if "rpc-server" in name]
        assert len(rpc) == 1 and rpc[0].startswith("127.0.0.1:"), sockets
        assert (f"{host.address}:{NODE_PORT}", "stunnel4") in sockets, sockets
        assert all(local.startswith(("127.0.0.1:", f"{host.address}:")) for local, _ in sockets), sockets
        registration = json.loads(on_hosts.redis.client().hget("synapticllamas:nodes", address))
        assert registration["link"] == "tls-psk" and registration["auth"]["mac"]

        # from the stranger, every port of the node that is reachable at all
        ports = [int(local.rsplit(":", 1)[1]) for local, _ in sockets if not local.startswith("127.")]
        least = len(ports)
        before = rpc_clients(on_hosts, address)
        mark = len(on_hosts.sub.events())
        _, heartbeat = on_hosts.sub.wait_for_event("node", "heartbeat", address=address, after=mark, timeout=10)
        least += heartbeat["details"]["link_refused"]
        probed = stranger.run([PYTHON, "-c", PROBE, host.address, *map(str, ports)]).stdout
        assert all(line.endswith(("b''", "ConnectionResetError")) for line in probed.splitlines()), probed
        # the node's next heartbeats count the refusals: by then rpc-server would have had its client
        def counted(address=address, least=least, mark=mark) -> bool:
            return any(e["component"] == "node" and e["event_type"] == "heartbeat"
                       and e["details"]["address"] == address and e["details"]["link_refused"] >= least
                       for e in on_hosts.sub.events()[mark:])

        wait_for(counted, 10, what="the refusals in a heartbeat")
        assert rpc_clients(on_hosts, address) == before


def test_forged_and_replayed_announcements_change_nothing(trusted):
    on_hosts, shell = trusted
    shell.send("backends")
    shell.expect(r"^\s*" + re.escape(on_hosts.addresses[1]))
    real = next(e for e in on_hosts.sub.events() if e["component"] == "node" and e["event_type"] == "node_up"
                and e["details"]["address"] == on_hosts.addresses[0])
    forged = {**real, "details": {**real["details"], "address": "127.0.0.99:50052", "memory_offered_mib": 999999}}
    forged.pop("auth")
    publish(on_hosts, forged)                                                  # unsigned
    shell.expect(r"ignored an unsigned announcement for 127\.0\.0\.99:50052")
    other = cluster_key.ClusterKey(b"\x01" * 32).derive("announce")
    publish(on_hosts, signing.Signer(other).sign({**forged, "details": {**forged["details"],
                                                                        "address": "127.0.0.98:50052"}}))
    shell.expect(r"ignored an announcement signed with another key \(wrong cluster key\?\) for 127\.0\.0\.98:50052")
    publish(on_hosts, real)                                                    # the real one again, seconds later
    shell.expect(rf"ignored a replayed announcement for {re.escape(on_hosts.addresses[0])}")
    # what a replay from minutes before looks like: the real node_up with its signature of then
    # (re-signed here with the key and a clock five minutes back, as the node's was)
    old = signing.Signer(announce_key(on_hosts), clock=lambda: time.time() - 300).sign(
        {**real, "details": {**real["details"], "address": on_hosts.addresses[1]}})
    publish(on_hosts, old)
    shell.expect(rf"ignored an announcement signed 30\d s ago \(a replay\? valid for 30 s\) for "
                 rf"{re.escape(on_hosts.addresses[1])}")
    shell.send("backends")
    _, lines = shell.read_until(r"^\s*" + re.escape(on_hosts.addresses[1]))
    table = "\n".join(lines)
    assert "127.0.0.99" not in table and "127.0.0.98" not in table
    shell.send("backends discover")
    _, lines = shell.read_until(r"nodes? announced on")
    assert lines[-1].startswith("2 nodes announced"), lines
    # what was ignored, counted by reason; both nodes behind their encrypted links
    assert "announcements checked with the cluster key, " in lines[-1], lines
    assert all(f"{reason} " in lines[-1] for reason in ("unsigned", "bad_signature", "replayed", "stale")), lines
    assert all(any(a in line and line.rstrip().endswith("encrypted") for line in lines) for a in on_hosts.addresses)

    # the dashboard with the key (the shell's machine holds it) marks what the key does not vouch for
    on_hosts.redis.client().hset("synapticllamas:nodes", "127.0.0.99:50052", json.dumps(
        {"address": "127.0.0.99:50052", "state": "up", "memory_offered_mib": 999999}))
    dashboard = Dashboard(on_hosts.tmp, on_hosts.redis.url)
    try:
        status, body = dashboard.get("/api/nodes")
        assert status == 200
        trust = {n["address"]: n.get("trust") for n in body["nodes"]}
        assert trust == {**dict.fromkeys(on_hosts.addresses, "signed"), "127.0.0.99:50052": "unsigned"}, trust
    finally:
        dashboard.stop()
        on_hosts.redis.client().hdel("synapticllamas:nodes", "127.0.0.99:50052")


def test_a_node_with_another_clusters_key_is_refused_in_one_line(trusted, tmp_path):
    on_hosts, shell = trusted
    host = on_hosts.cluster.hosts[2]
    other = tmp_path / "other.key"
    cluster_key.create(other)
    on_hosts.copy_key(host, other)
    node = on_hosts.start_node(host)
    try:
        address = f"{host.address}:{NODE_PORT}"
        on_hosts.sub.wait_for_event("node", "node_up", address=address, timeout=30)
        shell.expect(rf"ignored an announcement signed with another key \(wrong cluster key\?\) for "
                     rf"{re.escape(address)}")
        shell.send("backends")
        _, lines = shell.read_until(r"^\s*" + re.escape(on_hosts.addresses[1]))
        assert address not in "\n".join(lines)

        # were its announcement believed (re-signed here with our key, which no node of ours can
        # do: its announcements and its link use one key), its link would still refuse ours: the
        # start says so in one line, leaves it out and places the model on the others
        real = next(e for e in on_hosts.sub.events() if e["component"] == "node" and e["event_type"] == "node_up"
                    and e["details"]["address"] == address)
        publish(on_hosts, signing.Signer(announce_key(on_hosts)).sign(real))
        # the shell takes it (one line), and only then does `backends` list it
        shell.expect(rf"RPC backend {re.escape(address)} connected")
        shell.send("backends")
        shell.expect(r"^\s*" + re.escape(address))
        # the node's own probe at its start: its line is in by the node's next heartbeat (in order)
        on_hosts.sub.wait_for_event("node", "heartbeat", address=address, after=len(on_hosts.sub.events()),
                                    timeout=10)
        clients = rpc_clients(on_hosts, address)
        mark = len(on_hosts.sub.events())
        shell.send("coordinator start")
        match, lines = shell.read_until(r"Coordinator running .* RPC backends: (.*); ready", timeout=120)
        assert sorted(match.group(1).split(", ")) == sorted(on_hosts.addresses)
        refused = f"link to {address} failed to authenticate (wrong cluster key?)"
        assert any(refused in line for line in lines), lines
        _, starting = on_hosts.sub.wait_for_event("coordinator", "starting", after=mark, timeout=5)
        assert starting["details"]["left_out"] == {address: refused}, starting["details"]
        i, failed = on_hosts.sub.wait_for_event("rpc_backend", "link_failed", after=mark, timeout=5)
        assert failed["details"]["backend"] == address and failed["details"]["reason"] == "key"
        # its rpc-server had no client of ours: a client's line would be in by the node's next heartbeat
        on_hosts.sub.wait_for_event("node", "heartbeat", address=address, after=i + 1, timeout=10)
        assert rpc_clients(on_hosts, address) == clients
        # the weights crossed the links and the nodes' rpc-servers cached them (the next test's start
        # of the same placement then finds them there)
        wait_for(lambda: cached(on_hosts) >= 1, 10, what="a tensor cached on a node")
        shell.send("coordinator stop")
        shell.expect(r"stopped")
        shell.send(f"backends remove {address}")
        shell.expect(re.escape(address))
    finally:
        node.terminate()
        node.wait(20)


def test_coordinator_answer_and_failover_over_the_links_and_a_forged_node_down_does_nothing(trusted):
    on_hosts, shell = trusted
    a, b = on_hosts.addresses
    heard_from_all_since(on_hosts, len(on_hosts.sub.events()))   # the last load's lines are all in
    saved = cached(on_hosts)
    shell.send("coordinator start")
    match, _ = shell.read_until(r"Coordinator running .* RPC backends: (.*); ready", timeout=120)
    assert sorted(match.group(1).split(", ")) == sorted(on_hosts.addresses)
    shell.send("coordinator ask \"Once upon a time\" --n 8")
    shell.expect(r"tokens")
    # a warm load: the placement of the last start, every big tensor taken from the nodes' caches
    heard_from_all_since(on_hosts, len(on_hosts.sub.events()))
    assert cached(on_hosts) == saved
    shell.send("events 200 --component rpc_backend")
    shell.read_until(r"link_open.*" + re.escape(b) + "|" + r"link_open.*" + re.escape(a))
    shell.send("coordinator logs 400")
    shell.read_until(r"RPC\d*\[127\.0\.0\.1:\d+\] model buffer size", timeout=10)
    assert all(rpc_clients(on_hosts, address) >= 1 for address in on_hosts.addresses)   # llama-server's, via the links

    # a forged node_down for a held node: ignored, no failover
    forged = {"timestamp": time.time(), "component": "node", "event_type": "node_down", "message": f"node {a} down",
              "details": {"address": a, "state": "down", "reason": "signal"}, "level": "info",
              "source": {"app": "synapticllamas-node", "instance": "evil:1", "host": "evil"}, "seq": 10**6}
    mark = len(on_hosts.sub.events())
    publish(on_hosts, forged)
    shell.expect(rf"ignored an unsigned announcement for {re.escape(a)}")
    shell.send("coordinator status")
    shell.expect(r"state\s+running")
    assert not [e for e in on_hosts.sub.events()[mark:] if e["component"] == "coordinator"
                and e["event_type"] in ("stopping", "stop", "failover")]

    # a real loss: the node on host1 stops; the coordinator fails over to host0, through its link
    mark = len(on_hosts.sub.events())
    on_hosts.nodes[1].terminate()
    _, failover = on_hosts.sub.wait_for_event("coordinator", "failover", after=mark, timeout=60)
    assert failover["details"]["lost"] == [b] and failover["details"]["survivors"] == [a], failover["details"]
    shell.send("coordinator ask \"Once upon a time\" --n 8")
    shell.expect(r"tokens", timeout=60)
