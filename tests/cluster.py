"""A simulated cluster on one machine: one network namespace per host, joined by a bridge.

Layout. The root namespace (where Redis, the shell and llama-server run) gets a Linux bridge with
the address `root_address` (10.250.N.1/24); each host is a network namespace whose `eth0` (one end
of a veth pair, 10.250.N.(10+i)/24) has its other end plugged into that bridge, like machines on a
switch. A bridge rather than point-to-point links because it is what a home or lab cluster is: one
subnet, one address of the coordinator that every worker reaches, workers that reach each other,
and a node that finds "the interface that routes to Redis" the way it would on a real LAN. Nothing
is routed or forwarded: a host has no default route, so it reaches only the cluster subnet, and its
loopback is its own (a server on the root's 127.0.0.1 is invisible to hosts: bind to root_address).
Processes started in a host also get their own UTS namespace with the host's name as hostname.
Host-to-host frames are bridged: with br_netfilter loaded and an iptables FORWARD policy that drops
(Docker sets one), they would be dropped; host <-> root traffic is local, not forwarded, either way.

Link speed (`rate_mbit`): `tc qdisc tbf` as the root qdisc of both ends of a host's veth pair, so
the rate holds each way (root-side end: traffic to the host; eth0 in the host: traffic from it).
See tbf_args() for burst and latency. Host-to-host traffic crosses both and is limited too.

CPU (`cpu_quota`, cores per host, None: no limit): a cgroup v1 CPU controller group per host
(/sys/fs/cgroup/cpu/slc<tag>h<i>, cfs_quota_us = cores x cfs_period_us of 100 ms) that every process
started in the host joins before it execs: the host's processes share that much CPU, as a small
machine's would. Processes started in the same host share its identity too: the host's name is
passed as SYNAPTICLLAMAS_HOST_ID (util/host.py: the hosts share one kernel, so by the kernel's
boot id they would be one machine).

Names and addresses. Every name carries a tag, the owner's pid and a per-process counter in base 36
(`slc<pid>-<n>`: bridge `...b`, veths `...v<i>`, namespaces `...h<i>`), so interface names stay under
15 characters and parallel runs never share a name. The /24 is taken, under a lock file, from
10.250.0.0/16 (tests/netns.py uses 10.253/10.254) as the first one no root-namespace address uses.

Clean-up. close() (also __exit__ on an exception or KeyboardInterrupt, with SIGINT/SIGTERM held
until it is done) stops the processes it started, then every process left in the hosts (children
of children too: `ip netns pids`), deletes the veths (their qdiscs go with them), the bridge and the
namespaces, and checks that no name with its tag is left. A run that was SIGKILLed leaves its
parts behind: each cluster holds an flock on /run/synapticllamas-cluster/<tag>.lock while it lives,
and every new cluster first removes the parts of any tag whose lock is free (owner dead).

Use (needs root; without it the set-up fails and says so):

    def test_something(make_cluster):          # fixture below; tests/conftest.py imports it
        cluster = make_cluster(3, rate_mbit=100)        # or a list, one rate (or None) per host
        proc = cluster.hosts[0].popen([rpc_server, "-H", cluster.hosts[0].address, "-p", "50052"])
        ... connect from the test (root namespace) to f"{cluster.hosts[0].address}:50052" ...
        cluster.hosts[0].link_down()                    # the host's cable is pulled; link_up() plugs it

or as a context manager: `with SimulatedCluster(2) as cluster: ...`.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import itertools
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

STATE_DIR = Path("/run/synapticllamas-cluster")
CGROUP_ROOT = Path("/sys/fs/cgroup/cpu")       # cgroup v1's CPU controller (cpu.cfs_quota_us)
CPU_PERIOD_US = 100_000
SUPERNET = ipaddress.ip_network("10.250.0.0/16")
FIRST_HOST = 10                       # host i is .(10+i): the low addresses stay free for the root side
NAME = re.compile(r"^slc([0-9a-z]+)-([0-9a-z]+)[bvh]\d*$")
_counter = itertools.count()


def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if n == 0:
            return out


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=15)
    if check and proc.returncode != 0:
        raise RuntimeError(f"'ip {' '.join(args)}' failed: {proc.stderr.strip()} "
                           "(the simulated cluster needs root, ip netns, veth, bridge and tc)")
    return proc


def _tc(*args: str) -> None:
    proc = subprocess.run(["tc", *args], capture_output=True, text=True, timeout=15)
    if proc.returncode != 0:
        raise RuntimeError(f"'tc {' '.join(args)}' failed: {proc.stderr.strip()}")


def tbf_args(rate_mbit: float) -> list[str]:
    """The tbf parameters for `rate_mbit`.

    burst: at least 128 KiB, so a 64 KiB GSO packet from the veth (TSO is on) fits in the bucket and
    is not split in software; above ~200 Mbit/s, 5 ms of the rate. The first 128 KiB of a transfer
    go at line speed, about 10 ms at 100 Mbit/s: nothing next to a model load.
    latency 100 ms: the queue holds 100 ms of data before tbf drops (250 KB at 20 Mbit/s, 1.25 MB at 100). TCP here
    may put MBs into the qdisc at once (tcp_limit_output_bytes) and the veths have no real round
    trip, so a short queue only means losses: a 4 MB transfer at 20 Mbit/s lost 25 packets with 20 ms,
    6 with 50 ms, none with 100 ms (the rate, 19.7 Mbit/s of payload, was the same each time). A
    heartbeat behind a model load on a slow link waits up to this long, as behind a real switch.
    """
    rate_bytes = rate_mbit * 1e6 / 8
    burst = max(128 * 1024, int(rate_bytes * 0.005))
    return ["tbf", "rate", f"{int(rate_mbit * 1e6)}bit", "burst", str(burst), "latency", "100ms"]


class Host:
    """One simulated machine: a network namespace with eth0 on the cluster's bridge."""

    def __init__(self, cluster: SimulatedCluster, index: int, address: str, rate_mbit: float | None) -> None:
        self.cluster = cluster
        self.index = index
        self.name = f"host{index}"                  # its hostname, for the processes it runs
        self.netns = f"slc{cluster.tag}h{index}"
        self.veth = f"slc{cluster.tag}v{index}"     # the root-namespace end, a port of the bridge
        self.address = address
        self.rate_mbit = rate_mbit
        self.cgroup: Path | None = None             # its CPU quota's cgroup, when it has one
        self.cpu_quota: float | None = None

    def _argv(self, argv: Sequence[str | os.PathLike]) -> list[str]:
        # ip netns exec execs the program (the pid is the program's); unshare + sh set the hostname.
        # The CPU cgroup is joined before: `ip netns exec` mounts a sysfs of its own, without cgroups
        # and, with a CPU quota, the CPU controller is mounted there again, as a container runtime
        # does, so a process can read its own quota
        mount = ' && mount -t tmpfs cgroup /sys/fs/cgroup && mkdir /sys/fs/cgroup/cpu' \
                ' && mount -t cgroup -o cpu cgroup /sys/fs/cgroup/cpu' if self.cgroup else ""
        inside = ["ip", "netns", "exec", self.netns, "unshare", "--uts", "--", "sh", "-c",
                  f'hostname "$0"{mount} && exec "$@"', self.name, *map(str, argv)]
        if self.cgroup is None:
            return inside
        return ["sh", "-c", f'echo $$ > "{self.cgroup}/cgroup.procs" && exec "$@"', "sh", *inside]

    def _env(self, env: dict[str, str] | None) -> dict[str, str]:
        return {**(os.environ if env is None else env), "SYNAPTICLLAMAS_HOST_ID": self.name}

    def popen(self, argv: Sequence[str | os.PathLike], *, env: dict[str, str] | None = None,
              **kwargs) -> subprocess.Popen:
        """Start `argv` inside the host (Popen keyword arguments pass through); stopped by close()."""
        proc = subprocess.Popen(self._argv(argv), env=self._env(env), **kwargs)
        self.cluster._procs.append(proc)
        return proc

    def run(self, argv: Sequence[str | os.PathLike], *, env: dict[str, str] | None = None, timeout: float = 30,
            check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
        """Run `argv` inside the host to completion; text output captured."""
        return subprocess.run(self._argv(argv), env=self._env(env), input=input, capture_output=True, text=True,
                              timeout=timeout, check=check)

    def set_cpu_quota(self, cores: float | None) -> None:
        """Limit the CPU of every process started in the host from now on to `cores` (None: none)."""
        if cores is None:
            if self.cgroup is not None:
                (self.cgroup / "cpu.cfs_quota_us").write_text("-1")
            self.cpu_quota = None
            return
        if self.cgroup is None:
            self.cgroup = CGROUP_ROOT / self.netns
            self.cgroup.mkdir(exist_ok=True)
        (self.cgroup / "cpu.cfs_period_us").write_text(str(CPU_PERIOD_US))
        (self.cgroup / "cpu.cfs_quota_us").write_text(str(max(1000, int(cores * CPU_PERIOD_US))))
        self.cpu_quota = cores

    def pids(self) -> list[int]:
        """Every process running in the host now."""
        return _pids_in(self.netns)

    def link_down(self) -> None:
        """Pull the host's cable: its bridge port goes down, eth0 loses its carrier."""
        _ip("link", "set", self.veth, "down")

    def link_up(self) -> None:
        _ip("link", "set", self.veth, "up")

    def set_rate(self, rate_mbit: float | None) -> None:
        """Limit both directions of the host's link to `rate_mbit` (None: no limit)."""
        for prefix in ([], ["-n", self.netns]):
            dev = self.veth if not prefix else "eth0"
            if rate_mbit is None:
                if self.rate_mbit is not None:
                    _tc(*prefix, "qdisc", "del", "dev", dev, "root")
            else:
                _tc(*prefix, "qdisc", "replace", "dev", dev, "root", *tbf_args(rate_mbit))
        self.rate_mbit = rate_mbit

    def __repr__(self) -> str:
        return f"Host({self.name}, {self.address}, netns={self.netns}, rate_mbit={self.rate_mbit})"


class SimulatedCluster:
    """`n_hosts` hosts on one bridged subnet with the root namespace; see the module docstring."""

    def __init__(self, n_hosts: int, rate_mbit: float | Sequence[float | None] | None = None,
                 cpu_quota: Sequence[float | None] | None = None) -> None:
        if not 1 <= n_hosts <= 200:
            raise ValueError("n_hosts must be between 1 and 200")
        rates = list(rate_mbit) if isinstance(rate_mbit, Sequence) else [rate_mbit] * n_hosts
        if len(rates) != n_hosts:
            raise ValueError(f"{len(rates)} rates for {n_hosts} hosts")
        self._quotas = list(cpu_quota) if cpu_quota is not None else [None] * n_hosts
        if len(self._quotas) != n_hosts:
            raise ValueError(f"{len(self._quotas)} CPU quotas for {n_hosts} hosts")
        self.tag = f"{_base36(os.getpid())}-{_base36(next(_counter))}"
        self.bridge = f"slc{self.tag}b"
        self._rates = rates
        self._procs: list[subprocess.Popen] = []
        self._lock: int | None = None
        self.root_address = ""
        self.subnet: ipaddress.IPv4Network | None = None
        self.hosts: list[Host] = []

    # -- set-up ---------------------------------------------------------------------------------

    def __enter__(self) -> SimulatedCluster:
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def _setup(self) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        with _locked(STATE_DIR / "alloc.lock"):
            self._lock = _hold(STATE_DIR / f"{self.tag}.lock")
            remove_leftovers()
            self.subnet = _free_subnet()
            self.root_address = str(self.subnet.network_address + 1)
            # the bridge and its address claim the subnet before the allocation lock is released
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("link", "set", self.bridge, "addrgenmode", "none")      # no IPv6 chatter on the links
            _ip("addr", "add", f"{self.root_address}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
        for i, rate in enumerate(self._rates):
            host = Host(self, i, str(self.subnet.network_address + FIRST_HOST + i), None)
            self.hosts.append(host)
            _ip("netns", "add", host.netns)
            _ip("link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
            _ip("link", "set", host.veth, "addrgenmode", "none")
            _ip("link", "set", host.veth, "master", self.bridge)
            _ip("link", "set", host.veth, "up")
            _ip("-n", host.netns, "link", "set", "eth0", "addrgenmode", "none")
            _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _ip("-n", host.netns, "link", "set", "eth0", "up")
            _ip("-n", host.netns, "link", "set", "lo", "up")
            if rate is not None:
                host.set_rate(rate)
            if self._quotas[i] is not None:
                host.set_cpu_quota(self._quotas[i])

    # -- tear-down ------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop every process in the hosts and remove everything this cluster made. Idempotent."""
        with _signals_held():
            for proc in self._procs:
                if proc.poll() is None:
                    proc.terminate()
            deadline = time.monotonic() + 3           # one grace period for all of them
            for proc in self._procs:
                try:
                    proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            self._procs.clear()
            _remove_tag(self.tag)
            if self._lock is not None:
                (STATE_DIR / f"{self.tag}.lock").unlink(missing_ok=True)
                os.close(self._lock)
                self._lock = None
            left = _names_of(self.tag)
            if left:
                raise RuntimeError(f"the simulated cluster {self.tag} could not remove {left}")

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SimulatedCluster({self.tag}, root={self.root_address}, hosts={self.hosts})"


# -- names, leftovers, locks ------------------------------------------------------------------------

def _netns_names() -> list[str]:
    return [line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()]


def _link_names() -> list[str]:
    # `ip -o link` prints "3: name@peer: <...>"; the peer of a veth in another namespace is "if12"
    return [line.split(":")[1].strip().split("@")[0] for line in _ip("-o", "link", "show").stdout.splitlines()]


def _names_of(tag: str) -> list[str]:
    """Every namespace and root-namespace link that carries `tag`."""
    return [n for n in _netns_names() + _link_names() if (m := NAME.match(n)) and f"{m[1]}-{m[2]}" == tag]


def _remove_tag(tag: str) -> None:
    """Remove the parts of cluster `tag`, whoever made them: processes, veths, bridge, namespaces."""
    namespaces = [n for n in _names_of(tag) if n.startswith(f"slc{tag}h")]
    for ns in namespaces:
        _empty_namespace(ns)
    for group in CGROUP_ROOT.glob(f"slc{tag}h*") if CGROUP_ROOT.is_dir() else []:
        with contextlib.suppress(OSError):          # empty now: its processes were in the namespace
            group.rmdir()
    # deleting the root-side veth deletes its peer at once; a deleted namespace frees it only later
    for link in _names_of(tag):
        if not link.startswith(f"slc{tag}h"):
            _ip("link", "del", link, check=False)
    for ns in namespaces:
        _ip("netns", "del", ns, check=False)


def _pids_in(ns: str) -> list[int]:
    proc = _ip("netns", "pids", ns, check=False)
    return [int(p) for p in proc.stdout.split()] if proc.returncode == 0 else []


def _empty_namespace(ns: str) -> None:
    """SIGTERM what still runs in `ns`, SIGKILL what is left after 2 s, wait until it is empty."""
    for sig, grace in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 10.0)):
        pids = _pids_in(ns)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            time.sleep(0.02)
            pids = _pids_in(ns)
        if not pids:
            return
    raise RuntimeError(f"processes {pids} in network namespace {ns} survived SIGKILL")


def remove_leftovers() -> None:
    """Remove the parts of every cluster whose owner is gone (a run that was killed)."""
    groups = [g.name for g in CGROUP_ROOT.glob("slc*")] if CGROUP_ROOT.is_dir() else []
    tags = {f"{m[1]}-{m[2]}" for n in _netns_names() + _link_names() + groups if (m := NAME.match(n))}
    for tag in tags:
        if _owner_gone(tag):
            _remove_tag(tag)
            (STATE_DIR / f"{tag}.lock").unlink(missing_ok=True)


def _owner_gone(tag: str) -> bool:
    """The owner's lock is free, or (no lock file) its pid is not alive. The lock also covers an
    owner in another pid namespace that shares this network namespace."""
    path = STATE_DIR / f"{tag}.lock"
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        pid = int(tag.split("-")[0], 36)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return pid == os.getpid()          # our own pid without our lock: a run before ours had it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    finally:
        os.close(fd)


def _hold(path: Path) -> int:
    """Open and flock `path` for the cluster's lifetime (released by the kernel if we die)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = _hold(path)
    try:
        yield
    finally:
        os.close(fd)


def _free_subnet() -> ipaddress.IPv4Network:
    """The first /24 of SUPERNET that no address or route in the root namespace uses."""
    used = [ipaddress.ip_interface(line.split()[3]).network
            for line in _ip("-4", "-o", "addr", "show").stdout.splitlines()]
    for line in _ip("-4", "route", "show", "table", "all").stdout.splitlines():
        for word in line.split()[:2]:       # "10.1.0.0/24 dev ..." or "blackhole 10.1.0.0/24"
            with contextlib.suppress(ValueError):
                used.append(ipaddress.ip_network(word, strict=False))
                break
    for subnet in SUPERNET.subnets(new_prefix=24):
        if not any(subnet.overlaps(u) for u in used):
            return subnet
    raise RuntimeError(f"no free /24 left in {SUPERNET}")


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP while cleaning up, so a second Ctrl-C does not leave parts behind;
    they are delivered when it is done."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@pytest.fixture
def make_cluster():
    """Factory fixture: make_cluster(n_hosts, rate_mbit=None) -> a SimulatedCluster that is set up
    now and removed after the test (also when it fails)."""
    clusters: list[SimulatedCluster] = []

    def make(n_hosts: int, rate_mbit: float | Sequence[float | None] | None = None,
             cpu_quota: Sequence[float | None] | None = None) -> SimulatedCluster:
        cluster = SimulatedCluster(n_hosts, rate_mbit, cpu_quota)
        clusters.append(cluster)
        return cluster.__enter__()

    yield make
    for cluster in reversed(clusters):
        cluster.close()
