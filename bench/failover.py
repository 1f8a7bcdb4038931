#!/usr/bin/env python3
"""Failover figures for docs/PERFORMANCE.md: requests lost and downtime when a backend dies.

    .venv/bin/python bench/failover.py [--kills 10] [--cluster]

Real: llama-server with the demo model over three ggml-rpc-servers, the project's App (the
registry, the supervisor, the gateway's request core). A loop of `ask` requests (8 tokens each) runs
while one backend is SIGKILLed; the supervisor fails over to the two survivors; then a new
backend is added and `coordinator rebalance` takes the coordinator back to three, and the next
kill follows. Reported: failed requests (target 0), downtime from the loss to serving again (the
`failover` event's downtime_s), against the baseline measured in the same run: a cold
`coordinator start` over two backends (target: downtime <= 1.5x it).

Without --cluster the backends are local (`backends spawn`, their exit is awaited). With
--cluster they are nodes (`main.py node`) in three network namespaces behind 100 Mbit/s links
(tests/cluster.py), announced on a Redis in the root namespace, and the kill is of a node's
rpc-server: the shell learns of it from the node's `rpc_server_exit` event; the node restarts
its rpc-server, which comes back as a backend, and rebalance takes it back.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
from support import PYTHON, RedisServer, free_port, until  # noqa: E402

from synapticllamas.app import App  # noqa: E402
from synapticllamas.config import load_settings  # noqa: E402
from synapticllamas.gateway.core import Failed, Request, Unavailable  # noqa: E402
from synapticllamas.llama.preflight import CoordinatorError  # noqa: E402
from synapticllamas.ui import PlainUI  # noqa: E402

HEARTBEAT = 1.0


def make_app(tmp: Path, **values) -> App:
    config = tmp / "config.toml"
    config.write_text("")
    settings = load_settings({}, env={}, config_path=str(config)).replace(
        distributed=True, backends_file=str(tmp / "backends.conf"), coordinator_port=free_port(),
        coordinator_args="-t 1", rpc_backend_heartbeat=False, coordinator_backoff=0.1, placement="memory",
        history_file=str(tmp / "history"), log_file=str(tmp / "log"), **values)
    return App(settings, PlainUI(io.StringIO()))


class Asker:
    """`ask` in a loop, as a user's script would; counts answers and failures."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.answered = self.failed = self.retried = 0
        self.errors: list[str] = []
        self.running = asyncio.Event()
        self.running.set()
        self.task = asyncio.ensure_future(self._loop())

    async def _loop(self) -> None:
        while True:
            await self.running.wait()
            said: list[str] = []
            try:
                await self.app.gateway.complete(Request("shell", "completion", {"n_predict": 8},
                                                        prompt="Once upon a time"), said.append)
                self.answered += 1
            except (CoordinatorError, Unavailable, Failed) as exc:
                self.failed += 1
                self.errors.append(str(exc))
            self.retried += bool(said)

    async def pause(self) -> None:
        self.running.clear()
        await until(lambda: self.app.gateway.in_flight == 0, 60, "the request in flight")


async def cold_start(app: App, backends: list[str]) -> float:
    """Seconds for `coordinator start` over just these backends (the others removed meanwhile)."""
    others = [b for b in app.registry.addresses() if b not in backends]
    kept = {b: app.registry.get(b) for b in others}
    for b in others:
        app.registry._backends.pop(b)       # the baseline: exactly the survivors' start
    try:
        t0 = time.perf_counter()
        await app.coordinator.start()
        took = time.perf_counter() - t0
        await app.coordinator.stop()
        return took
    finally:
        app.registry._backends.update(kept)


async def kill_loop(app: App, kills: int, kill, bring_back, timeout: float) -> dict:
    """The measurement, wherever the backends are: baseline cold starts, then `kills` times: an
    answer, kill(the backend), the failover, bring_back(), rebalance."""
    baseline = [await cold_start(app, app.registry.healthy()[:2]) for _ in range(3)]
    await app.coordinator.start()
    asker = Asker(app)
    downtimes = []
    for i in range(kills):
        await until(lambda n=asker.answered: asker.answered > n, timeout, "an answer before the kill")
        before = app.coordinator.last_failover
        kill(app.coordinator.run.plan.backends[i % 3])
        await until(lambda b=before: app.coordinator.last_failover is not b
                    and app.coordinator.state == "running", timeout, "the failover")
        downtimes.append(app.coordinator.last_failover["downtime_s"])
        await asker.pause()
        await bring_back()
        await app.coordinator.rebalance()
        asker.running.set()
    await asker.pause()
    asker.task.cancel()
    return {"baseline": baseline, "downtimes": downtimes, "answered": asker.answered, "failed": asker.failed,
            "retried": asker.retried, "errors": asker.errors}


async def run_local(tmp: Path, kills: int) -> dict:
    app = make_app(tmp)
    await app.start()
    try:
        await app.local_backends.spawn(3)

        async def bring_back() -> None:
            await app.local_backends.spawn(1)

        return await kill_loop(app, kills, lambda b: os.kill(app.local_backends.get(b).pid, signal.SIGKILL),
                               bring_back, 60)
    finally:
        await app.close()


@contextlib.contextmanager
def insecure_nodes(cluster, tmp: Path) -> Iterator[RedisServer]:
    """A Redis on the cluster's bridge and one node (`main.py node --insecure`) per simulated host,
    stopped on the way out: bench/gateway.py's cluster run starts the same."""
    redis = RedisServer(tmp / "redis", bind=cluster.root_address).start()
    nodes = []
    try:
        for host in cluster.hosts:
            env = {k: v for k, v in os.environ.items() if not k.startswith(("SOLLOL_", "SYNAPTICLLAMAS_"))}
            env.update({"XDG_CACHE_HOME": str(tmp / host.name), "SOLLOL_RPC_BACKEND_HEARTBEAT_INTERVAL":
                        str(HEARTBEAT)})
            nodes.append(host.popen([PYTHON, str(ROOT / "main.py"), "node", "--port", "50052", "--redis-url",
                                     redis.url, "--threads", "1", "--insecure"], env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL))
        yield redis
    finally:
        for proc in nodes:
            proc.terminate()
            proc.wait(20)
        redis.kill()


def kill_rpc_server(cluster, address: str) -> None:
    """SIGKILL the rpc-server of the node at `address` (the node restarts it)."""
    host = next(h for h in cluster.hosts if address.startswith(h.address + ":"))
    os.kill(next(p for p in host.pids() if is_rpc_server(p)), signal.SIGKILL)


async def run_cluster(tmp: Path, kills: int) -> dict:
    from cluster import SimulatedCluster

    with SimulatedCluster(3, rate_mbit=100) as cluster, insecure_nodes(cluster, tmp) as redis:
        app = make_app(tmp, redis_url=redis.url, rpc_backend_heartbeat_interval=HEARTBEAT)
        await app.start()
        try:
            await app.redis_on()
            await until(lambda: len(app.registry.healthy()) == 3, 60, "three nodes")

            async def bring_back() -> None:
                await until(lambda: len(app.registry.healthy()) == 3, 60, "the node's rpc-server back")

            return await kill_loop(app, kills, lambda address: kill_rpc_server(cluster, address), bring_back, 120)
        finally:
            await app.close()


def is_rpc_server(pid: int) -> bool:
    try:
        return b"ggml-rpc-server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def report(where: str, r: dict) -> None:
    base = statistics.median(r["baseline"])
    d = sorted(r["downtimes"])
    print(f"\n{where}: {len(d)} kills, {r['answered']} answers, {r['failed']} failed requests "
          f"({r['retried']} answered after one retry)")
    print("| what | median | max | median / cold start |")
    print("|---|---|---|---|")
    print(f"| cold `coordinator start` over 2 backends (baseline) | {base:.2f} s | {max(r['baseline']):.2f} s | 1.00x |")
    print(f"| downtime: loss -> serving again | {statistics.median(d):.2f} s | {d[-1]:.2f} s | "
          f"{statistics.median(d) / base:.2f}x (max {d[-1] / base:.2f}x) |")
    for e in r["errors"][:3]:
        print("  error:", e)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--cluster", action="store_true", help="nodes on three simulated hosts at 100 Mbit/s")
    args = ap.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}; 2 cores")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["XDG_CACHE_HOME"] = str(Path(tmp) / "cache")
        if args.cluster:
            report("three nodes, 100 Mbit/s links", asyncio.run(run_cluster(Path(tmp), args.kills)))
        else:
            report("three local backends", asyncio.run(run_local(Path(tmp), args.kills)))


if __name__ == "__main__":
    main()
