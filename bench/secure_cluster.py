#!/usr/bin/env python3
"""What the encrypted RPC links cost a real cluster: secured against plain, same model, one run.

    .venv/bin/python bench/secure_cluster.py [--runs 3] [--parts loopback,cluster] [--tokens 64]

About six minutes with the defaults. Needs root (the cluster part: network namespaces, tc).

Real parts only: the project's App (registry, supervisor, planner, discovery, LinkManager), the real
llama-server with the demo model over three real ggml-rpc-servers, real stunnel at both ends.

- loopback: three rpc-servers on 127.0.0.1 started here (each with its tensor cache), added as
  backends; secured, each behind a LinkServer (the class a node uses) on 127.0.0.1 and dialled
  through the App's LinkManager, the pre-flight's dial_for; plain, dialled directly.
- cluster: three simulated hosts (tests/cluster.py) at 100 Mbit/s both ways, each running
  `python3 main.py node`: secured, with the cluster key copied to it (rpc-server on its loopback,
  stunnel on its address, announcements signed), the shell holding the key; plain, `--insecure`
  and a shell without a key. Discovery through a Redis in the root namespace, as a user runs it.

Per run and mode (the modes alternate within each run, so both see the same machine):
- cold load: fresh cache directories, `coordinator start` (its wall time: planning, dialling and
  checking links, spawning, the upload, /health);
- warm load: `coordinator stop`, `coordinator start` again (the caches now hold the tensors);
- prompt and generation tokens/s: three /completion requests straight to llama-server (a 200-token
  prompt, `--tokens` generated, no prompt cache), llama-server's own `timings`; the median;
- link CPU while generating: user + system seconds of the stunnel processes on the coordinator's
  side and on the backends' side during those requests, per generated token and as a share of a
  core;
- failover downtime: SIGKILL of one backend's rpc-server; the `failover` event's downtime_s (loss
  -> serving again on the other two). On loopback the bench tells the registry at once, as local
  backends' awaited exits do; in the cluster the node's rpc_server_exit event does.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
from failover import is_rpc_server, make_app  # noqa: E402
from support import PYTHON, RedisServer, cpu_seconds, free_port, until  # noqa: E402

from synapticllamas.trust import key as cluster_key  # noqa: E402

HEARTBEAT = 1.0
RATE_MBIT = 100
PROMPT = " ".join(["The quick brown fox jumps over the lazy dog near the river bank."] * 16)   # ~200 tokens
MODES = ("plain", "secured")


# ---------------------------------------------------------------- the measurement, wherever it runs

def complete(url: str, tokens: int) -> dict:
    body = json.dumps({"prompt": PROMPT, "n_predict": tokens, "cache_prompt": False, "ignore_eos": True}).encode()
    request = urllib.request.Request(url + "/completion", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())["timings"]


def cpu_of(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += cpu_seconds(pid)
        except OSError:
            pass
    return total


async def measure(app, tokens: int, near: callable, far: callable, kill: callable) -> dict:
    """near()/far(): pids of the link's processes on each side (none for plain); kill(backend)."""
    t0 = time.perf_counter()
    await app.coordinator.start()
    cold = time.perf_counter() - t0
    await app.coordinator.stop()
    t0 = time.perf_counter()
    await app.coordinator.start()
    warm = time.perf_counter() - t0
    url = app.coordinator.url
    await asyncio.to_thread(complete, url, 4)           # first request: graphs built, buffers touched
    near0, far0, wall0 = cpu_of(near()), cpu_of(far()), time.perf_counter()
    timings = [await asyncio.to_thread(complete, url, tokens) for _ in range(3)]
    wall = time.perf_counter() - wall0
    near_s, far_s = cpu_of(near()) - near0, cpu_of(far()) - far0
    generated = sum(t["predicted_n"] for t in timings)
    before = app.coordinator.last_failover
    victim = app.coordinator.run.plan.backends[-1]
    kill(victim)
    try:
        await until(lambda: app.coordinator.last_failover is not before and app.coordinator.state == "running", 180,
                    "the failover")
    except AssertionError:          # what happened instead, for whoever runs it
        for e in [e for e in app.observer.buffer if e.component != "raw"][-40:]:
            print("   ", e.component, e.event_type, e.message[:160], file=sys.stderr)
        raise
    downtime = app.coordinator.last_failover["downtime_s"]
    await app.coordinator.stop()
    return {"cold_s": cold, "warm_s": warm,
            "prompt_tps": statistics.median(t["prompt_per_second"] for t in timings),
            "gen_tps": statistics.median(t["predicted_per_second"] for t in timings),
            "near_ms_per_token": 1000 * near_s / generated, "far_ms_per_token": 1000 * far_s / generated,
            "near_core": near_s / wall, "far_core": far_s / wall, "failover_s": downtime}


# ---------------------------------------------------------------- loopback

class LoopbackBackends:
    """Three rpc-servers on 127.0.0.1 with fresh caches; secured: a LinkServer in front of each."""

    def __init__(self, tmp: Path, run: int, secured: bool, key) -> None:
        from synapticllamas.llama import binaries

        self.tmp, self.secured, self.key = tmp / f"loop-{run}-{int(secured)}", secured, key
        self.binary = str(binaries.rpc_server())
        self.procs: dict[str, subprocess.Popen] = {}
        self.servers: list = []
        self.ports = [free_port() for _ in range(3)]
        self.fronts = [free_port() for _ in range(3)] if secured else self.ports

    @property
    def backends(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.fronts]

    async def start(self) -> None:
        from synapticllamas.trust.link_server import LinkServer

        for i, port in enumerate(self.ports):
            env = dict(os.environ, LLAMA_CACHE=str(self.tmp / f"cache{i}"))
            proc = subprocess.Popen(  # noqa: ASYNC220 - started once, nothing to await
                [self.binary, "-H", "127.0.0.1", "-p", str(port), "-t", "1", "-c"], env=env,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.procs[self.backends[i]] = proc
        for port in self.ports:
            await until(lambda p=port: _accepts(p), 30, f"rpc-server on {port}")
        if self.secured:
            for port, front in zip(self.ports, self.fronts, strict=True):
                server = LinkServer(self.key.derive("link"), "127.0.0.1", front, port)
                await server.start()
                self.servers.append(server)

    def far(self) -> list[int]:
        return [s.process.pid for s in self.servers if s.running]

    def kill(self, backend: str) -> None:
        """rpc-server dies; its link's server end closes as a node's does (so probes see it down)."""
        os.kill(self.procs[backend].pid, signal.SIGKILL)
        if self.secured:
            server = self.servers[self.backends.index(backend)]
            if server.running:
                os.kill(server.process.pid, signal.SIGTERM)

    async def stop(self) -> None:
        for server in self.servers:
            await server.stop()
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


def _accepts(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


async def loopback_once(tmp: Path, run: int, secured: bool, key, tokens: int) -> dict:
    backends = LoopbackBackends(tmp, run, secured, key)
    await backends.start()
    (tmp / f"app-loop-{run}-{int(secured)}").mkdir(parents=True)
    app = make_app(tmp / f"app-loop-{run}-{int(secured)}")
    await app.start()
    try:
        for address in backends.backends:
            await app.registry.add(address, persist=False)
        if secured:
            from synapticllamas.trust.links import LinkManager

            links = LinkManager(key, app.observer)

            async def dial(addresses: list[str]) -> dict[str, str]:
                return await links.dial(addresses)

            app.coordinator.dial_for = dial
        else:
            links = None

        def near() -> list[int]:
            return [s["pid"] for s in links.status().values() if s["running"]] if links else []

        def kill(backend: str) -> None:
            backends.kill(backend)
            app.registry.report(backend, up=False, reason="rpc-server killed by the bench")

        return await measure(app, tokens, near, backends.far, kill)
    finally:
        await app.close()
        if secured and links is not None:
            await links.close()
        await backends.stop()


# ---------------------------------------------------------------- cluster

async def cluster_once(cluster, redis: RedisServer, tmp: Path, run: int, secured: bool, key_file: Path,
                       tokens: int) -> dict:
    where = tmp / f"cluster-{run}-{int(secured)}"
    nodes = []
    for host in cluster.hosts:
        home = where / host.name
        (home / "config" / "synapticllamas").mkdir(parents=True)
        if secured:
            shutil.copyfile(key_file, home / "config" / "synapticllamas" / "cluster.key")
            os.chmod(home / "config" / "synapticllamas" / "cluster.key", 0o600)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SOLLOL_", "SYNAPTICLLAMAS_"))}
        env.update({"XDG_CACHE_HOME": str(home / "cache"), "XDG_CONFIG_HOME": str(home / "config"),
                    "SOLLOL_RPC_BACKEND_HEARTBEAT_INTERVAL": str(HEARTBEAT)})
        nodes.append(host.popen([PYTHON, str(ROOT / "main.py"), "node", "--port", "50052", "--redis-url", redis.url,
                                 "--threads", "1", *([] if secured else ["--insecure"])], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    extra = {"cluster_key_file": str(key_file)} if secured else {}      # plain: no key at the default path
    (where / "app").mkdir(parents=True)
    app = make_app(where / "app", redis_url=redis.url, rpc_backend_heartbeat_interval=HEARTBEAT, **extra)
    await app.start()
    try:
        await app.redis_on()
        await until(lambda: len(app.registry.healthy()) == 3, 60, "three nodes")

        def near() -> list[int]:
            return [s["pid"] for s in app.links.status().values() if s["running"]] if app.links else []

        def far() -> list[int]:
            return [p for h in cluster.hosts for p in h.pids() if _is_stunnel(p)]

        def kill(backend: str) -> None:
            host = next(h for h in cluster.hosts if backend.startswith(h.address + ":"))
            os.kill(next(p for p in host.pids() if is_rpc_server(p)), signal.SIGKILL)

        return await measure(app, tokens, near, far, kill)
    finally:
        await app.close()
        for proc in nodes:
            proc.terminate()
            proc.wait(20)


def _is_stunnel(pid: int) -> bool:
    try:
        return b"stunnel" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        return False


# ---------------------------------------------------------------- report

ROWS = [("cold model load", "cold_s", "s", "<= 1.1x", False), ("warm load (from the cache)", "warm_s", "s", "<= 1.1x", False),
        ("prompt tokens/s", "prompt_tps", "", ">= 0.95x", True), ("generation tokens/s", "gen_tps", "", ">= 0.95x", True),
        ("failover downtime", "failover_s", "s", "<= 1.1x", False)]


def report(title: str, results: dict[str, list[dict]]) -> None:
    print(f"\n{title} ({len(results['plain'])} runs each; medians)\n")
    print("| what | plain | secured | secured / plain | target |")
    print("|---|---|---|---|---|")
    for label, field, unit, target, _ in ROWS:
        p = statistics.median(r[field] for r in results["plain"])
        s = statistics.median(r[field] for r in results["secured"])
        print(f"| {label} | {p:.2f}{unit and ' ' + unit} | {s:.2f}{unit and ' ' + unit} | {s / p:.2f}x | {target} |")
    near = statistics.median(r["near_ms_per_token"] for r in results["secured"])
    far = statistics.median(r["far_ms_per_token"] for r in results["secured"])
    near_core = statistics.median(r["near_core"] for r in results["secured"])
    far_core = statistics.median(r["far_core"] for r in results["secured"])
    print(f"| link CPU while generating, coordinator's side | - | {near:.2f} ms per token ({100 * near_core:.1f} % of a core) | | |")
    print(f"| link CPU while generating, backends' side (3 stunnels) | - | {far:.2f} ms per token ({100 * far_core:.1f} % of a core) | | |")


async def main_async(args: argparse.Namespace, tmp: Path) -> None:
    key_file = tmp / "cluster.key"
    key = cluster_key.create(key_file)
    parts = args.parts.split(",")
    if "loopback" in parts:
        results: dict[str, list[dict]] = {m: [] for m in MODES}
        for run in range(args.runs):
            for mode in MODES if run % 2 == 0 else reversed(MODES):
                r = await loopback_once(tmp, run, mode == "secured", key, args.tokens)
                results[mode].append(r)
                print(f"  loopback run {run + 1} {mode}: {r}", file=sys.stderr, flush=True)
        report("Loopback: three rpc-servers on 127.0.0.1", results)
    if "cluster" in parts:
        from cluster import SimulatedCluster

        results = {m: [] for m in MODES}
        with SimulatedCluster(3, rate_mbit=RATE_MBIT) as cluster:
            redis = RedisServer(tmp / "redis", bind=cluster.root_address).start()
            try:
                for run in range(args.runs):
                    for mode in MODES if run % 2 == 0 else reversed(MODES):
                        r = await cluster_once(cluster, redis, tmp, run, mode == "secured", key_file, args.tokens)
                        results[mode].append(r)
                        print(f"  cluster run {run + 1} {mode}: {r}", file=sys.stderr, flush=True)
            finally:
                redis.kill()
        report(f"Three simulated hosts at {RATE_MBIT} Mbit/s: nodes (`main.py node`), discovery on Redis", results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--parts", default="loopback,cluster")
    args = ap.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}; 2 cores", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="bench-secure-") as name:
        os.environ["XDG_CACHE_HOME"] = str(Path(name) / "cache")
        os.environ["XDG_CONFIG_HOME"] = str(Path(name) / "config")     # no key of this machine's in the way
        asyncio.run(main_async(args, Path(name)))


if __name__ == "__main__":
    main()
