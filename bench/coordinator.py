#!/usr/bin/env python3
"""Coordinator figures for docs/PERFORMANCE.md.

    .venv/bin/python bench/coordinator.py [--runs 5] [--kills 20]

Everything is real: 2 local ggml-rpc-servers started by LocalBackends.spawn(2) (what `backends
spawn 2` runs), llama-server and the demo model, a redis-server on a free port, a Redis subscriber.

1. Start: `coordinator start` (the command handler, pre-flight included) until the `start` event,
   against the baseline of running llama-server by hand with the same command line and asking
   /health every 10 ms until it is 200 {"status":"ok"}. Alternated, same run, same backends.
2. Crash detection: SIGKILL llama-server, time until a Redis subscriber receives the `stop` event
   (reason crash); the coordinator restarts it (backoff 0.05 s) and the next kill follows.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
from support import RedisServer, free_port, until  # noqa: E402

from synapticllamas.app import App  # noqa: E402
from synapticllamas.commands import load_all  # noqa: E402
from synapticllamas.commands.registry import lookup  # noqa: E402
from synapticllamas.config import load_settings  # noqa: E402
from synapticllamas.events.contract import CHANNEL_PATTERN  # noqa: E402
from synapticllamas.ui import PlainUI  # noqa: E402


def by_hand(argv: list[str], port: int) -> float:
    """Seconds from Popen to /health = 200 {"status":"ok"}, asking every 10 ms."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if r.status == 200 and json.loads(r.read()).get("status") == "ok":
                        return time.perf_counter() - t0
            except OSError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {proc.returncode}")
            time.sleep(0.01)
    finally:
        proc.terminate()
        proc.wait(30)


class Listener:
    """A Redis subscriber on its own thread: the receive time of every coordinator event."""

    def __init__(self, redis: RedisServer) -> None:
        self.pubsub = redis.client().pubsub()
        self.pubsub.psubscribe(CHANNEL_PATTERN)
        self.received: list[tuple[float, dict]] = []
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        for message in self.pubsub.listen():
            if message["type"] == "pmessage":
                self.received.append((time.time(), json.loads(message["data"])))

    def first(self, after: float, event_type: str, **details) -> tuple[float, dict] | None:
        for at, event in list(self.received):
            if at >= after and event["component"] == "coordinator" and event["event_type"] == event_type and \
                    all(event["details"].get(k) == v for k, v in details.items()):
                return at, event
        return None


async def measure(runs: int, kills: int, redis: RedisServer, tmp: Path) -> dict[str, list[float]]:
    (tmp / "config.toml").touch()
    settings = load_settings(flags={"backends_file": str(tmp / "rpc_backends.conf"), "distributed": True},
                             env={"SYNAPTICLLAMAS_CONFIG": str(tmp / "config.toml"), "SOLLOL_REDIS_URL": redis.url})
    settings = settings.replace(coordinator_port=free_port(), coordinator_args="-t 1", coordinator_backoff=0.05,
                                placement="memory",
                                history_file=str(tmp / "history"), log_file=str(tmp / "log"))
    load_all()
    app = App(settings, ui=PlainUI(out=io.StringIO()))   # the progress lines are not the figures
    coordinator = lookup("coordinator")
    listener = Listener(redis)
    out: dict[str, list[float]] = {"by hand": [], "coordinator start": [], "crash": []}
    try:
        await app.start()
        await app.redis_on()
        await app.local_backends.spawn(2)
        for i in range(runs * 2):
            if i % 2 == 0:
                t0 = time.time()
                await coordinator.handler(app, ["start"])
                start = await until(lambda t0=t0: listener.first(t0, "start"), 60, "the start event", 0.005)
                out["coordinator start"].append(start[1]["timestamp"] - t0)
                await coordinator.handler(app, ["stop"])
            else:
                plan = app.coordinator.last_plan
                argv = plan.argv(settings.coordinator_ctx_size, settings.coordinator_args)
                out["by hand"].append(await asyncio.get_running_loop().run_in_executor(None, by_hand, argv,
                                                                                       plan.port))
        await coordinator.handler(app, ["start"])
        for _ in range(kills):
            pid = app.coordinator.run.pid
            await asyncio.sleep(0.2)
            killed = time.time()
            os.kill(pid, signal.SIGKILL)
            at, _ = await until(lambda killed=killed: listener.first(killed, "stop", reason="crash"), 60, "the crash",
                                0.005)
            out["crash"].append(at - killed)
            await until(lambda killed=killed: listener.first(killed, "start"), 60, "the restart", 0.005)
    finally:
        await app.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--kills", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        redis = RedisServer(Path(tmp) / "redis").start()
        try:
            r = asyncio.run(measure(args.runs, args.kills, redis, Path(tmp)))
        finally:
            redis.kill()
    hand, ours = statistics.median(r["by hand"]), statistics.median(r["coordinator start"])
    print(f"{args.runs} runs each, alternated; demo model, 2 local backends")
    print("| what | median | max | median / by hand |")
    print("|---|---|---|---|")
    print(f"| llama-server by hand until /health ok (10 ms polling) | {hand * 1000:.0f} ms | "
          f"{max(r['by hand']) * 1000:.0f} ms | 1.00x |")
    print(f"| `coordinator start` -> `start` event | {ours * 1000:.0f} ms | "
          f"{max(r['coordinator start']) * 1000:.0f} ms | {ours / hand:.2f}x |")
    crash = sorted(r["crash"])
    p99 = crash[min(len(crash) - 1, round(0.99 * (len(crash) - 1)))]
    print(f"\ncrash detection, SIGKILL -> `stop` at a Redis subscriber, {len(crash)} kills: "
          f"median {statistics.median(crash) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, max {crash[-1] * 1000:.0f} ms")


if __name__ == "__main__":
    main()
