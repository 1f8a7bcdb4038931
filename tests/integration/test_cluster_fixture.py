"""The simulated cluster (tests/cluster.py): what the node tests rely on, checked on the real kernel.

Needs root (ip netns, veth, bridge, tc); without it these tests fail and say so.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from cluster import STATE_DIR, SimulatedCluster, _link_names, _locked, _netns_names, _pids_in
from llama_run import LlamaServer, start_rpc_server
from llama_support import pid_alive
from support import wait_for

# Run in a host or in the root namespace: `python -c ... ARGS`; one line of output each.
ECHO = r"""
import socket, sys, threading
def echo(c):
    while (b := c.recv(1024)):
        c.sendall(b)
    c.close()
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 0)); s.listen(8); print(s.getsockname()[1], flush=True)
while True:
    threading.Thread(target=echo, args=(s.accept()[0],), daemon=True).start()
"""
CONNECT = r"""
import socket, sys, errno
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])) as s:
        s.sendall(socket.gethostname().encode()); s.shutdown(socket.SHUT_WR)
        print("ok", s.recv(100).decode())
except TimeoutError:
    print("timeout")
except OSError as exc:
    print(errno.errorcode.get(exc.errno, str(exc)))
"""
SINK = r"""
import socket, sys
s = socket.socket(); s.bind((sys.argv[1], 0)); s.listen(1); print(s.getsockname()[1], flush=True)
c, _ = s.accept(); n = 0
while (b := c.recv(1 << 16)):
    n += len(b)
c.sendall(str(n).encode()); c.close()
"""
SEND = r"""
import socket, sys, time
data = b"\x5a" * int(sys.argv[3])
start = time.monotonic()
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60) as s:
    s.sendall(data); s.shutdown(socket.SHUT_WR)
    received = int(s.recv(100))
print(received, time.monotonic() - start)
"""


def serve(popen, script: str, address: str) -> tuple[subprocess.Popen, int]:
    """Start a listener script through `popen` (a host's, or subprocess.Popen for the root namespace)."""
    proc = popen([sys.executable, "-c", script, address], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.strip().isdigit(), f"the listener did not start: {line!r}"
    return proc, int(line)


def root_connect(address: str, port: int, timeout: float = 5) -> str:
    return subprocess.run([sys.executable, "-c", CONNECT, address, str(port), str(timeout)],
                          capture_output=True, text=True, timeout=timeout + 10).stdout.strip()


def host_connect(host, address: str, port: int, timeout: float = 5) -> str:
    return host.run([sys.executable, "-c", CONNECT, address, str(port), str(timeout)], timeout=timeout + 10).stdout.strip()


def test_hosts_and_the_root_namespace_reach_each_other(make_cluster):
    cluster = make_cluster(2)
    h0, h1 = cluster.hosts
    assert len({cluster.root_address, h0.address, h1.address}) == 3
    root_proc, root_port = serve(subprocess.Popen, ECHO, cluster.root_address)
    try:
        # a host reaches a server bound to root_address (Redis, in the node tests), under its own hostname
        assert host_connect(h0, cluster.root_address, root_port) == "ok host0"
        assert host_connect(h1, cluster.root_address, root_port) == "ok host1"
    finally:
        root_proc.kill()
        root_proc.wait()
    _, port0 = serve(h0.popen, ECHO, h0.address)
    # the root namespace reaches a server bound to the host's address (llama-server -> rpc-server) ...
    assert root_connect(h0.address, port0).startswith("ok ")
    # ... and so does another host on the same LAN; the peer the server sees is the host's address
    assert host_connect(h1, h0.address, port0) == "ok host1"
    with socket.create_connection((h0.address, port0), timeout=5) as s:
        assert s.getsockname()[0] == cluster.root_address


def test_a_host_reaches_only_the_cluster_subnet(make_cluster):
    cluster = make_cluster(1)
    host = cluster.hosts[0]
    # a server on the root namespace's loopback is invisible: 127.0.0.1 in a host is its own
    root_proc, root_port = serve(subprocess.Popen, ECHO, "127.0.0.1")
    try:
        assert root_connect("127.0.0.1", root_port) == "ok " + socket.gethostname()
        assert host_connect(host, "127.0.0.1", root_port) == "ECONNREFUSED"
    finally:
        root_proc.kill()
        root_proc.wait()
    # no default route: an address outside the subnet (TEST-NET-2) is unreachable at once, not slow
    assert host_connect(host, "198.51.100.1", 50052) == "ENETUNREACH"
    assert "default" not in host.run(["ip", "route"]).stdout


def test_link_down_cuts_a_host_off_and_link_up_restores_it(make_cluster):
    cluster = make_cluster(2)
    host, other = cluster.hosts
    _, port = serve(host.popen, ECHO, host.address)
    held = socket.create_connection((host.address, port), timeout=5)   # as llama-server holds rpc-server
    try:
        held.sendall(b"before")
        assert held.recv(100) == b"before"

        host.link_down()
        assert root_connect(host.address, port, timeout=1.5) in ("timeout", "EHOSTUNREACH")
        assert host_connect(other, host.address, port, timeout=1.5) in ("timeout", "EHOSTUNREACH")
        held.settimeout(1.0)
        held.sendall(b"during")               # queued by TCP: nothing comes back while the cable is out
        with pytest.raises(TimeoutError):
            held.recv(100)

        host.link_up()
        held.settimeout(30)                   # TCP retransmits with backoff: the echo comes when it does
        assert held.recv(100) == b"during"    # the held connection survived the cut
        wait_for(lambda: root_connect(host.address, port, timeout=1).startswith("ok "), 20,
                 what="a new connection after link_up")
    finally:
        held.close()


def transfer(sender, receiver_popen, receiver_address: str, size: int) -> float:
    """Seconds to send `size` bytes from `sender` (a host's run, or the root's) to a sink; checked whole."""
    sink, port = serve(receiver_popen, SINK, receiver_address)
    out = sender([sys.executable, "-c", SEND, receiver_address, str(port), str(size)], timeout=120).stdout.split()
    sink.wait(10)
    assert int(out[0]) == size, f"the sink received {out[0]} of {size} bytes"
    return float(out[1])


def root_run(argv, timeout):
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=True)


def test_tbf_limits_a_hosts_link_both_ways(make_cluster):
    rate, size = 20, 4_000_000
    cluster = make_cluster(2, rate_mbit=[rate, None])
    slow, fast = cluster.hosts
    times = {}
    for host in (slow, fast):
        times[host.name, "to host"] = transfer(root_run, host.popen, host.address, size)
        times[host.name, "from host"] = transfer(host.run, subprocess.Popen, cluster.root_address, size)
    expected = size * 8 / (rate * 1e6)          # 1.6 s at 20 Mbit/s, before TCP/IP headers
    print(f"\n{size} bytes at {rate} Mbit/s, expected >= {expected:.2f}s: " +
          ", ".join(f"{h} {d}: {t:.3f}s" for (h, d), t in times.items()))
    for direction in ("to host", "from host"):
        limited, free = times[slow.name, direction], times[fast.name, direction]
        # tbf can only slow a transfer down: it is never faster than the rate allows (the 128 KiB
        # burst is 3 % of it) ...
        assert limited >= 0.9 * expected, f"{direction}: {limited:.3f}s for {size} bytes at {rate} Mbit/s"
        # ... and the same transfer over an unlimited link of the same machine, in the same run, is
        # many times faster: the time is the qdisc's, not the machine's
        assert limited / free >= 10, f"{direction}: limited {limited:.3f}s vs unlimited {free:.3f}s"


def cluster_parts(cluster: SimulatedCluster) -> set[str]:
    names = set(_netns_names()) | set(_link_names())
    return {n for n in names if n.startswith(f"slc{cluster.tag}")}


@pytest.mark.parametrize("ending", ["normal", "exception", "sigint"])
def test_everything_is_removed_afterwards(ending):
    cluster = SimulatedCluster(2, rate_mbit=50)
    pids = []

    class Boom(Exception):
        pass

    expected = {"normal": None, "exception": Boom, "sigint": KeyboardInterrupt}[ending]
    with pytest.raises(expected) if expected else contextlib.nullcontext(), cluster:
        for host in cluster.hosts:
            # a process that leaves a child behind when it is stopped: found through `ip netns pids`
            host.popen(["sh", "-c", "sleep 300 & sleep 301"])
            wait_for(lambda host=host: len(_pids_in(host.netns)) >= 2, 10, what="the sleeps in the host")
            pids += _pids_in(host.netns)
        parts = cluster_parts(cluster)
        assert parts == {cluster.bridge, *(h.veth for h in cluster.hosts), *(h.netns for h in cluster.hosts)}
        assert (STATE_DIR / f"{cluster.tag}.lock").exists()
        if ending == "exception":
            raise Boom()
        if ending == "sigint":
            os.kill(os.getpid(), signal.SIGINT)      # Python's handler raises KeyboardInterrupt here
            pytest.fail("SIGINT did not interrupt the test")
    assert cluster_parts(cluster) == set()
    assert not any(pid_alive(pid) for pid in pids), "processes of the hosts are left"
    assert not (STATE_DIR / f"{cluster.tag}.lock").exists()
    assert cluster.root_address not in subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True,
                                                      text=True).stdout


CRASH = """
import sys, time
from cluster import SimulatedCluster
cluster = SimulatedCluster(1).__enter__()
cluster.hosts[0].popen(["sleep", "300"])
print(cluster.tag, cluster.hosts[0].netns, flush=True)
time.sleep(300)
"""


def test_parts_of_a_killed_run_are_removed_by_the_next_one():
    tests = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    crashed = subprocess.Popen([sys.executable, "-c", CRASH], stdout=subprocess.PIPE, text=True, env=env)
    tag, netns = crashed.stdout.readline().split()
    wait_for(lambda: _pids_in(netns), 10, what="the sleeper in the crashed run's host")
    sleeper = _pids_in(netns)
    with _locked(STATE_DIR / "alloc.lock"):   # no parallel run's new cluster removes them before we look
        crashed.kill()                        # no clean-up runs: the run is gone, its parts are not
        crashed.wait()
        assert netns in _netns_names() and f"slc{tag}b" in _link_names()
    with SimulatedCluster(1) as cluster:
        assert cluster.tag != tag
        assert netns not in _netns_names()
        assert not any(n.startswith(f"slc{tag}") for n in _link_names())
        assert not any(pid_alive(pid) for pid in sleeper)
        assert not (STATE_DIR / f"{tag}.lock").exists()


@pytest.mark.llama
def test_a_real_rpc_server_in_a_host_serves_llama_server_in_the_root(make_cluster, tmp_path, rpc_server_binary):
    from synapticllamas.llama import binaries

    cluster = make_cluster(1, rate_mbit=1000)
    host = cluster.hosts[0]
    cache = tmp_path / "host0-cache"
    env = {**os.environ, "LLAMA_CACHE": str(cache)}
    proc, out, banner = start_rpc_server(host.popen, rpc_server_binary, host.address, 50052, env=env, cache=True)
    assert banner["endpoint"] == f"{host.address}:50052"
    assert banner["cache"] == str(cache / "rpc")
    assert banner["devices"] and banner["devices"][0]["total_mib"] > 0

    with LlamaServer(binaries.llama_server(), binaries.demo_model(), tmp_path / "llama.log",
                     rpc=[f"{host.address}:50052"]) as llama:
        llama.wait_healthy(60)
        # weights crossed the simulated link: rpc-server in the host wrote them to its cache
        saved = out.wait_line(lambda line: "[set_tensor] saved to" in line, 10, what="a tensor cached in the host")
        assert Path(saved.split("'")[1]).parent == cache / "rpc"
        assert any((cache / "rpc").iterdir())
    assert proc.poll() is None, "rpc-server in the host ended with llama-server"
