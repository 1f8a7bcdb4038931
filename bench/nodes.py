#!/usr/bin/env python3
"""Node figures for docs/PERFORMANCE.md: discovery latency, a shell's Redis traffic while nodes idle,
and model loads over slow links, cold (empty caches) against warm (caches filled).

    .venv/bin/python bench/nodes.py [--starts 20] [--idle 30] [--demo-runs 3] [--big-runs 2] [--quick]
                                    [--parts discovery,traffic,load]

About 3.5 minutes with the defaults, under 2 with --quick (10 starts, one load of each model).

Needs root (network namespaces, tc). Everything is real and in one run: a simulated cluster of four
hosts (tests/cluster.py: one network namespace each, bridged to the root namespace, where Redis, the
shell and llama-server run), `python3 main.py node` in the hosts (real ggml-rpc-server), a
redis-server bound to the bridge, the real shell (`python3 main.py --distributed`, piped, `redis on`,
default settings), and a redis-py subscriber in this process that notes when each event arrives.

1. Discovery. `starts` times: launch a node in a host (hosts taken in turn, so 4 of the starts are a
   node the shell has never seen and the rest are a node coming back), wait until the shell lists
   it, stop the node (SIGTERM), wait until the shell marks it down. Times, all from the one clock:
   - launch: time.time() in this process just before Popen (`ip netns exec ... python3 main.py node`);
   - node_up: the `timestamp` of the node's `node/node_up` event (set by its emit(), once its
     rpc-server accepts connections);
   - listed: the `timestamp` of the shell's `rpc_backend/connect` event for that address (set by the
     shell's emit() when its registry marks the backend up: from then on `backends` shows it up and
     `coordinator start` uses it), with reason `node ADDRESS up`.
   Baselines in the same run: launch -> node_up (the node's own start-up, which no shell can beat)
   and node_up -> received by this process's raw subscriber (Redis pub/sub alone).
2. Idle traffic. Three nodes heartbeating every 1 s, a shell with `redis on` and nothing to do: for
   `idle` seconds, every command Redis receives (MONITOR, per connection, named with CLIENT LIST: the
   shell's subscription is `synapticllamas-discovery`, its publisher and each node's publisher
   `synapticllamas`), checked against the INFO commandstats delta. Redis 7.0 has no per-client
   command counter in CLIENT LIST (tot-cmds came later), hence MONITOR.
3. Model load over three 100 Mbit/s links (tbf both ways). Per model and run: three nodes with empty
   cache directories, `coordinator start --model M` (cold), `coordinator stop`, `coordinator start`
   again (warm), `coordinator stop`. Time: the `load_s` of the coordinator's `start` event
   (llama-server spawned -> /health ok). Also the bytes each host received on its link during the
   start and the cache each node holds after. Models: one written here with bench/big_model.py
   (553 MiB, its matrices above rpc-server's 10 MiB cache threshold) and the demo model.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
from big_model import RPC_CACHE_THRESHOLD, write_model  # noqa: E402
from cluster import SimulatedCluster  # noqa: E402
from support import PYTHON, PipedShell, RedisServer, cpu_seconds, free_port, wait_for  # noqa: E402

from synapticllamas.events.contract import CHANNEL_PATTERN  # noqa: E402

NODE_PORT = 50052
NODE_HEARTBEAT = 1.0
LOAD_RATE_MBIT = 100
MIB = 2 ** 20


# ---------------------------------------------------------------- parts

class Listener:
    """A Redis subscriber on its own thread: (receive time, event) of every event."""

    def __init__(self, redis: RedisServer) -> None:
        self.client = redis.client(client_name="bench-listener")
        self.pubsub = self.client.pubsub()
        self.pubsub.psubscribe(CHANNEL_PATTERN)
        self.received: list[tuple[float, dict]] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for message in self.pubsub.listen():
                if message["type"] == "pmessage":
                    self.received.append((time.time(), json.loads(message["data"])))
        except Exception:       # closed at the end
            return

    def mark(self) -> int:
        return len(self.received)

    def find(self, after: int, component: str, event_type: str, **details) -> tuple[float, dict] | None:
        for at, event in self.received[after:]:
            if event["component"] == component and event["event_type"] == event_type and \
                    all(event["details"].get(k) == v for k, v in details.items()):
                return at, event
        return None

    def wait(self, after: int, component: str, event_type: str, timeout: float = 60, **details) -> tuple[float, dict]:
        try:
            return wait_for(lambda: self.find(after, component, event_type, **details), timeout, 0.005,
                            what=f"{component}/{event_type} {details}")
        except AssertionError as exc:
            seen = "\n".join(f"  {e['source']['instance']} {e['component']}/{e['event_type']}: {e['message'][:100]}"
                             for _, e in self.received[after:] if e["event_type"] != "heartbeat")
            raise AssertionError(f"{exc}; events since:\n{seen}") from None

    def close(self) -> None:
        try:
            self.pubsub.close()
            self.client.close()
        except Exception:
            pass


class Nodes:
    """`python3 main.py node` processes in the cluster's hosts."""

    def __init__(self, cluster: SimulatedCluster, redis: RedisServer, home: Path) -> None:
        self.cluster, self.redis, self.home = cluster, redis, home
        self.procs: dict[int, subprocess.Popen] = {}
        self.logs: dict[int, Path] = {}
        self.starts = 0

    def start(self, index: int, cache_dir: Path | None = None) -> subprocess.Popen:
        host = self.cluster.hosts[index]
        self.starts += 1
        home = self.home / f"{host.name}-{self.starts}"
        home.mkdir(parents=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SOLLOL_", "SYNAPTICLLAMAS_"))}
        env.update({"XDG_CACHE_HOME": str(home / "cache"), "XDG_CONFIG_HOME": str(home / "config"),
                    "SOLLOL_RPC_BACKEND_HEARTBEAT_INTERVAL": str(NODE_HEARTBEAT), "PYTHONUNBUFFERED": "1"})
        extra = ["--cache-dir", str(cache_dir)] if cache_dir else []
        with open(home / "node.log", "w") as log:
            proc = host.popen([PYTHON, str(ROOT / "main.py"), "node", "--port", str(NODE_PORT), "--redis-url",
                               self.redis.url, "--threads", "1", "--insecure", *extra], env=env, stdout=log, stderr=log,
                              cwd=ROOT)
        self.procs[index] = proc
        self.logs[index] = home / "node.log"
        return proc

    def log(self, index: int) -> str:
        return self.logs[index].read_text(errors="replace")[-3000:]

    def stop(self, index: int) -> None:
        proc = self.procs.pop(index)
        proc.terminate()
        if proc.wait(20) != 0:
            raise RuntimeError(f"node in host{index} exited with {proc.returncode}")

    def stop_all(self) -> None:
        for index in list(self.procs):
            self.stop(index)

    def address(self, index: int) -> str:
        return f"{self.cluster.hosts[index].address}:{NODE_PORT}"


def open_shell(tmp: Path, redis: RedisServer, name: str) -> PipedShell:
    shell = PipedShell(tmp / name, "--distributed", SOLLOL_REDIS_URL=redis.url,
                       SYNAPTICLLAMAS_COORDINATOR_PORT=str(free_port()))
    shell.send("redis on")
    shell.read_until(r"Redis publishing ON", timeout=30, stream="stdout")
    return shell


def close_shell(shell: PipedShell) -> None:
    try:
        if shell.exit(60) != 0:
            print(f"warning: the shell exited with {shell.proc.returncode}", file=sys.stderr)
    finally:
        shell.kill()


def wait_listed(listener: Listener, after: int, nodes: Nodes, index: int, shell: PipedShell,
                timeout: float = 30) -> tuple[float, dict]:
    try:
        return listener.wait(after, "rpc_backend", "connect", timeout, address=nodes.address(index))
    except AssertionError as exc:
        shell.send("redis status", "backends discover", "events 40", "status")
        time.sleep(2)
        raise AssertionError(f"{exc}\nthe node's output:\n{nodes.log(index)}\nthe shell's:\n{shell.output()}\n"
                             f"Redis clients: {nodes.redis.client().client_list()}") from None


# ---------------------------------------------------------------- 1. discovery

def discovery(cluster: SimulatedCluster, redis: RedisServer, tmp: Path, starts: int) -> dict:
    listener = Listener(redis)
    nodes = Nodes(cluster, redis, tmp / "discovery")
    shell = open_shell(tmp, redis, "shell-discovery")
    rows = []
    try:
        for i in range(starts):
            index = i % len(cluster.hosts)
            address = nodes.address(index)
            mark = listener.mark()
            launched = time.time()
            nodes.start(index)
            _, listed = wait_listed(listener, mark, nodes, index, shell)
            received, up = listener.wait(mark, "node", "node_up", address=address)
            rows.append({"address": address, "first": i < len(cluster.hosts),
                         "launch_up": up["timestamp"] - launched,
                         "up_received": received - up["timestamp"],
                         "up_listed": listed["timestamp"] - up["timestamp"],
                         "launch_listed": listed["timestamp"] - launched,
                         "reason": listed["details"]["reason"]})
            mark = listener.mark()
            nodes.stop(index)
            listener.wait(mark, "rpc_backend", "disconnect", address=address)
    finally:
        close_shell(shell)
        nodes.stop_all()
        listener.close()
    return {"rows": rows}


# ---------------------------------------------------------------- 2. idle traffic

MONITOR_LINE = re.compile(r'^\d+\.\d+ \[\d+ ([^\]]+)\] "([^"]+)"')


def client_list(admin) -> dict[str, dict]:
    """addr -> CLIENT LIST entry of every connection now."""
    return {c["addr"]: c for c in admin.client_list()}


def commandstats(admin) -> dict[str, int]:
    return {k: v["calls"] for k, v in admin.info("commandstats").items()}


def traffic(cluster: SimulatedCluster, redis: RedisServer, tmp: Path, idle: float) -> dict:
    listener = Listener(redis)
    nodes = Nodes(cluster, redis, tmp / "traffic")
    shell = None
    monitor = None
    admin = redis.client(client_name="bench-admin", single_connection_client=True)   # one connection throughout
    admin.ping()
    try:
        mark = listener.mark()
        for index in range(3):
            nodes.start(index)
        shell = open_shell(tmp, redis, "shell-traffic")
        for index in range(3):
            wait_listed(listener, mark, nodes, index, shell)
        time.sleep(2)           # the start-up transactions are over
        monitor = subprocess.Popen([shutil.which("redis-cli"), "-h", redis.bind, "-p", str(redis.port), "monitor"],
                                   stdout=subprocess.PIPE, text=True, errors="replace")
        lines: list[str] = []

        def read() -> None:
            for line in monitor.stdout:
                lines.append(line)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        wait_for(lambda: lines and lines[0].strip() == "OK", 10, what="MONITOR to start")
        clients = client_list(admin)
        stats0 = commandstats(admin)
        window = listener.mark()
        cpu0, t0 = cpu_seconds(shell.pid), time.monotonic()
        time.sleep(idle)
        cpu1, t1 = cpu_seconds(shell.pid), time.monotonic()
        published = [e for _, e in listener.received[window:]]
        stats1 = commandstats(admin)
        after = client_list(admin)
        monitor.terminate()
        monitor.wait(10)
        reader.join(5)
        elapsed = t1 - t0
    finally:
        if monitor is not None and monitor.poll() is None:
            monitor.kill()
            monitor.wait(10)
        if shell is not None:
            close_shell(shell)
        nodes.stop_all()
        listener.close()
        admin.close()

    host_of = {h.address: h.name for h in cluster.hosts}
    conns: dict[str, dict] = {}                   # addr -> who, commands
    for addr, c in {**clients, **after}.items():
        if c["name"].startswith("bench-") or "O" in c["flags"]:      # ours: admin, listener, MONITOR
            continue
        ip = addr.rsplit(":", 1)[0]
        owner = f"{host_of[ip]} node" if ip in host_of else "shell"
        role = ("subscribed to the node channel" if "P" in c["flags"] else
                "publisher" if c["name"] == "synapticllamas" else f"last command {c['cmd'].upper()}")
        conns[addr] = {"who": f"{owner}: `{c['name'] or '(no name)'}` ({role})", "shell": owner == "shell",
                       "commands": {}, "new": addr not in clients, "gone": addr not in after}
    lua = 0
    strangers = 0
    for line in lines[1:]:
        m = MONITOR_LINE.match(line)
        if not m:
            continue
        addr, command = m[1], m[2].upper()
        if addr == "lua":
            lua += 1
        elif addr in conns:
            counts = conns[addr]["commands"]
            counts[command] = counts.get(command, 0) + 1
        elif not (clients.get(addr) or after.get(addr) or {"name": ""})["name"].startswith("bench-"):
            strangers += 1
    # INFO commandstats: every command run, the scripts' own included; the bench's own taken out
    delta = {k: stats1.get(k, 0) - stats0.get(k, 0) for k in stats1}
    own = {"cmdstat_info": 1}       # the first INFO is counted in the second one's figures
    total_stats = sum(max(0, v - own.get(k, 0)) for k, v in delta.items())
    total_monitor = sum(sum(c["commands"].values()) for c in conns.values()) + lua + strangers
    shell_events: dict[str, int] = {}
    for e in published:
        if e["source"]["app"] == "synapticllamas":
            key = f"{e['component']}/{e['event_type']}"
            shell_events[key] = shell_events.get(key, 0) + 1
    node_events = sum(1 for e in published if e["component"] == "node")
    return {"elapsed": elapsed, "conns": list(conns.values()), "lua": lua, "strangers": strangers,
            "total_stats": total_stats, "total_monitor": total_monitor, "shell_cpu": (cpu1 - cpu0) / elapsed,
            "shell_events": shell_events, "node_events": node_events}


# ---------------------------------------------------------------- 3. cold vs warm loads

def rx_bytes(host) -> int:
    out = subprocess.run(["ip", "-n", host.netns, "-s", "-j", "link", "show", "eth0"], capture_output=True,
                         text=True, check=True).stdout
    return int(json.loads(out)[0]["stats64"]["rx"]["bytes"])


def cache_size(path: Path) -> tuple[int, int]:
    files = [p for p in (path / "rpc").glob("*") if p.is_file()] if (path / "rpc").is_dir() else []
    return len(files), sum(p.stat().st_size for p in files)


def one_load(shell: PipedShell, listener: Listener, cluster: SimulatedCluster, model: Path) -> dict:
    hosts = cluster.hosts[:3]
    rx0 = [rx_bytes(h) for h in hosts]
    mark = listener.mark()
    shell.send(f"coordinator start --model {model}")
    match, lines = shell.read_until(r"Coordinator running .*ready in ([\d.]+)s|^Error", timeout=600)
    if match.group(0).startswith("Error"):
        raise RuntimeError("coordinator start failed:\n" + "\n".join(lines))
    _, start = listener.wait(mark, "coordinator", "start")
    rx1 = [rx_bytes(h) for h in hosts]
    devices = start["details"].get("devices") or {}
    shell.send("coordinator stop")
    shell.read_until(r"Coordinator stopped|^Error", timeout=60)
    progress = [int(m[1]) for line in lines if (m := re.search(r"sending weights to .*, (\d+)% \(", line))]
    return {"load_s": start["details"]["load_s"], "ready_s": float(match.group(1)),
            "rx": [b - a for a, b in zip(rx0, rx1, strict=True)], "devices": devices, "progress": progress}


def loads(cluster: SimulatedCluster, redis: RedisServer, tmp: Path, models: list[tuple[str, Path, int]]) -> dict:
    for host in cluster.hosts[:3]:
        host.set_rate(LOAD_RATE_MBIT)
    listener = Listener(redis)
    nodes = Nodes(cluster, redis, tmp / "load")
    shell = open_shell(tmp, redis, "shell-load")
    results: dict[str, list[dict]] = {}
    try:
        for label, model, runs in models:
            for run in range(runs):
                caches = [tmp / "caches" / f"{label}-{run}-host{i}" for i in range(3)]
                mark = listener.mark()
                for i in range(3):
                    nodes.start(i, caches[i])
                for i in range(3):
                    wait_listed(listener, mark, nodes, i, shell)
                cold = one_load(shell, listener, cluster, model)
                cold["cache"] = [cache_size(c) for c in caches]
                warm = one_load(shell, listener, cluster, model)
                warm["cache"] = [cache_size(c) for c in caches]
                results.setdefault(label, []).append({"cold": cold, "warm": warm})
                print(f"  {label} run {run + 1}: cold {cold['load_s']:.1f} s, warm {warm['load_s']:.1f} s, "
                      f"received cold {sum(cold['rx']) / MIB:.1f} MiB, warm {sum(warm['rx']) / MIB:.1f} MiB",
                      file=sys.stderr)
                mark = listener.mark()
                nodes.stop_all()
                for i in range(3):
                    listener.wait(mark, "rpc_backend", "disconnect", address=nodes.address(i))
    finally:
        close_shell(shell)
        nodes.stop_all()
        listener.close()
        for host in cluster.hosts[:3]:
            host.set_rate(None)
    return results


# ---------------------------------------------------------------- machine load

class Load:
    """The machine's load while a part runs: load averages before and after, and the share of the
    two cores that was busy (all processes, ours included), from /proc/stat."""

    def __init__(self) -> None:
        self.before = os.getloadavg()[0]
        self.others = others()
        self._cpu0 = self._cpu()

    @staticmethod
    def _cpu() -> tuple[int, int]:
        with open("/proc/stat") as fh:
            values = [int(v) for v in fh.readline().split()[1:]]
        idle = values[3] + values[4]
        return sum(values) - idle, sum(values)

    def end(self) -> str:
        busy0, total0 = self._cpu0
        busy1, total1 = self._cpu()
        share = 100 * (busy1 - busy0) / max(1, total1 - total0)
        return (f"load average {self.before:.1f} -> {os.getloadavg()[0]:.1f}, CPUs {share:.0f} % busy "
                f"(everything on the machine); at the start {self.others}")


def others() -> str:
    """Other people's work on the machine now: test runs, llama.cpp processes and browsers that are
    not this bench's (not its descendants)."""
    parent: dict[int, int] = {}
    cmd: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmd[int(entry)] = fh.read().replace(b"\0", b" ").decode(errors="replace")
            parent[int(entry)] = int(stat[stat.rindex(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    mine = {os.getpid()}
    grew = True
    while grew:
        grew = False
        for pid, ppid in parent.items():
            if ppid in mine and pid not in mine:
                mine.add(pid)
                grew = True
    counts = {"pytest": 0, "llama-server": 0, "rpc-server": 0, "chromium": 0}
    for pid, line in cmd.items():
        if pid in mine:
            continue
        for key, needle in (("pytest", "pytest"), ("llama-server", "llama-server"), ("rpc-server", "rpc-server"),
                            ("chromium", "chrom")):
            if needle in line.split(" ", 1)[0] or (key == "pytest" and " -m pytest" in line):
                counts[key] += 1
    return "others running: " + ", ".join(f"{n} {k}" for k, n in counts.items())


# ---------------------------------------------------------------- report

def nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def ms(x: float) -> str:
    return f"{x * 1000:.1f} ms" if x < 0.01 else f"{x * 1000:.0f} ms"


def report_discovery(d: dict, load: str) -> None:
    rows = d["rows"]
    n = len(rows)
    print(f"\n### Discovery: {n} node starts (4 hosts in namespaces, taken in turn; {load})\n")
    print("| interval | median | p99 | max | median / baseline |")
    print("|---|---|---|---|---|")
    up_rx = statistics.median(r["up_received"] for r in rows)
    launch_up = statistics.median(r["launch_up"] for r in rows)
    for key, what, base, base_name in (
            ("up_received", "node_up -> raw subscriber receives it (baseline: Redis pub/sub)", None, ""),
            ("up_listed", "node_up -> shell lists it (`rpc_backend/connect`)", up_rx, "pub/sub"),
            ("launch_up", "launch -> node_up (baseline: the node's own start)", None, ""),
            ("launch_listed", "launch -> shell lists it", launch_up, "node start")):
        values = [r[key] for r in rows]
        med = statistics.median(values)
        ratio = "1.00x" if base is None else f"{med / base:.2f}x {base_name}"
        print(f"| {what} | {ms(med)} | {ms(nearest_rank(values, 0.99))} | {ms(max(values))} | {ratio} |")
    reasons = {r["reason"] for r in rows}
    first = [r["up_listed"] for r in rows if r["first"]]
    again = [r["up_listed"] for r in rows if not r["first"]]
    print(f"\np99 is the nearest rank (of {n}: the {math.ceil(0.99 * n)}th). node_up -> listed, first sight "
          f"(added, then up): median {ms(statistics.median(first))}; a node coming back: median "
          f"{ms(statistics.median(again)) if again else '-'}. Reasons of the connect events: {sorted(reasons)}")


def report_traffic(t: dict, load: str) -> None:
    el = t["elapsed"]
    print(f"\n### Idle: 3 nodes heartbeating every {NODE_HEARTBEAT:g} s, a shell with `redis on` (default settings), "
          f"{el:.0f} s ({load})\n")
    print("| connection | commands | per second | which |")
    print("|---|---|---|---|")
    for c in sorted(t["conns"], key=lambda c: (not c["shell"], c["who"])):
        total = sum(c["commands"].values())
        which = ", ".join(f"{n} {k}" for k, n in sorted(c["commands"].items(), key=lambda kv: (-kv[1], kv[0])))
        note = " (opened during the window)" if c["new"] else " (closed during the window)" if c["gone"] else ""
        print(f"| {c['who']}{note} | {total} | {total / el:.2f}/s | {which or 'none'} |")
    events = ", ".join(f"{n} {k}" for k, n in sorted(t["shell_events"].items())) or "none"
    print(f"\nThe shell published in the window: {events}. Node events delivered to its subscription: "
          f"{t['node_events']} ({t['node_events'] / el:.2f}/s). Commands run inside scripts (EVAL): {t['lua']}; "
          f"from connections not listed: {t['strangers']}. All commands by MONITOR: {t['total_monitor']}; by INFO "
          f"commandstats (the bench's own INFO taken out): {t['total_stats']}. Shell CPU: "
          f"{100 * t['shell_cpu']:.2f} % of a core.")


def report_loads(results: dict, load: str, infos: dict) -> None:
    print(f"\n### Model load over three {LOAD_RATE_MBIT} Mbit/s links ({load})\n")
    print("| model | cold (empty caches) | cold's bytes at the link rate (floor) | cold / floor | warm (second start) "
          "| warm / cold | received by the nodes, cold -> warm | cache per node after (files, MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for label, runs in results.items():
        cold = [r["cold"]["load_s"] for r in runs]
        warm = [r["warm"]["load_s"] for r in runs]
        rx_c = statistics.median(sum(r["cold"]["rx"]) for r in runs)
        rx_w = statistics.median(sum(r["warm"]["rx"]) for r in runs)
        floor = rx_c * 8 / (LOAD_RATE_MBIT * 1e6)      # one link at a time: llama-server sends tensor after tensor
        caches = runs[-1]["warm"]["cache"]
        cache_text = " / ".join(f"{n}, {b / MIB:.0f}" for n, b in caches)
        c_med, w_med = statistics.median(cold), statistics.median(warm)
        print(f"| {label} ({len(runs)} run{'s' if len(runs) > 1 else ''}) | {c_med:.1f} s "
              f"({', '.join(f'{c:.1f}' for c in cold)}) | {floor:.1f} s | {c_med / floor:.2f}x | {w_med:.1f} s "
              f"({', '.join(f'{w:.1f}' for w in warm)}) | {w_med / c_med:.2f}x | "
              f"{rx_c / MIB:.1f} -> {rx_w / MIB:.1f} MiB | {cache_text} |")
    for label, runs in results.items():
        r = runs[-1]
        per = ", ".join(f"host{i}: {b / MIB:.1f} -> {w / MIB:.1f} MiB"
                        for i, (b, w) in enumerate(zip(r["cold"]["rx"], r["warm"]["rx"], strict=True)))
        print(f"\n{label}: {infos.get(label, '')}. Last run, received per host, cold -> warm: {per}; "
              f"`ready in` (the command, pre-flight included) cold {r['cold']['ready_s']:.1f} s, warm "
              f"{r['warm']['ready_s']:.1f} s; the progress line's `sending weights` percentages: cold "
              f"{r['cold']['progress'] or '-'}, warm {r['warm']['progress'] or '-'}")


def gguf_summary(path: Path) -> str:
    """Tensors of a GGUF and how many of them rpc-server would cache."""
    import gguf

    tensors = [(t.name, int(t.n_bytes)) for t in gguf.GGUFReader(path).tensors]
    big = [(n, b) for n, b in tensors if b > RPC_CACHE_THRESHOLD]
    small = max((b for _, b in tensors if b <= RPC_CACHE_THRESHOLD), default=0)
    return (f"{path.name}: {len(tensors)} tensors, {sum(b for _, b in tensors) / MIB:.1f} MiB; "
            f"{len(big)} above {RPC_CACHE_THRESHOLD // MIB} MiB ({', '.join(f'{n} {b / MIB:.1f} MiB' for n, b in big)}), "
            f"the largest of the others {small / MIB:.2f} MiB")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--starts", type=int, default=20, help="node starts for the discovery latency")
    ap.add_argument("--idle", type=float, default=30.0, help="seconds of idle traffic measured")
    ap.add_argument("--demo-runs", type=int, default=3)
    ap.add_argument("--big-runs", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="--starts 10 --demo-runs 1 --big-runs 1 (about 2 minutes)")
    ap.add_argument("--parts", default="discovery,traffic,load")
    args = ap.parse_args()
    if args.quick:
        args.starts, args.demo_runs, args.big_runs = 10, 1, 1     # idle stays one shell heartbeat interval
    parts = set(args.parts.split(","))
    if os.geteuid() != 0:
        print("bench/nodes.py needs root (network namespaces and tc)", file=sys.stderr)
        return 2
    from synapticllamas.llama import binaries

    began = time.monotonic()
    print(f"bench/nodes.py {' '.join(sys.argv[1:])}; {time.strftime('%Y-%m-%d %H:%M')}; {others()}")
    with tempfile.TemporaryDirectory(prefix="bench-nodes-") as tmp_name, SimulatedCluster(4) as cluster:
        tmp = Path(tmp_name)
        redis = RedisServer(tmp / "redis", bind=cluster.root_address).start()
        try:
            if "discovery" in parts:
                load = Load()
                d = discovery(cluster, redis, tmp, args.starts)
                report_discovery(d, load.end())
            if "traffic" in parts:
                load = Load()
                t = traffic(cluster, redis, tmp, args.idle)
                report_traffic(t, load.end())
            if "load" in parts:
                t0 = time.monotonic()
                big = write_model(tmp / "big.gguf")
                demo = binaries.demo_model()
                infos = {"big": f"{big.summary().split(': ', 1)[1]}; written in {time.monotonic() - t0:.0f} s",
                         "demo": gguf_summary(demo)}
                load = Load()
                results = loads(cluster, redis, tmp, [("big", big.path, args.big_runs),
                                                      ("demo", demo, args.demo_runs)])
                report_loads(results, load.end(), infos)
        finally:
            redis.kill()
    print(f"\n(total {time.monotonic() - began:.0f} s; at the end {others()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
