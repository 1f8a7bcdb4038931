#!/usr/bin/env python3
"""Backend probe figures for docs/PERFORMANCE.md: how long one health round takes.

    .venv/bin/python bench/backends.py [--timeout 1.0] [--runs 5]

50 configured backends: 40 real TCP listeners on 127.0.0.1 and 10 unreachable addresses that drop
packets (a black hole in a network namespace, tests/netns.py; needs root). The baseline is one
probe of one black-holed address in the same run: one probe timeout. The registry probes all
backends at once, so its round should cost about one timeout; probing one after another (measured
too, once, for comparison) costs one timeout per unreachable backend.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
from netns import Blackhole  # noqa: E402

from synapticllamas.config import load_settings  # noqa: E402
from synapticllamas.events.observer import Observer  # noqa: E402
from synapticllamas.rpc.probe import ProbeFailure, probe  # noqa: E402
from synapticllamas.rpc.registry import RpcRegistry  # noqa: E402


def settings(tmp: Path, backends: list[str], timeout: float):
    (tmp / "config.toml").touch()
    s = load_settings(flags={"backends_file": str(tmp / "rpc_backends.conf"), "rpc_backends": backends},
                      env={"SYNAPTICLLAMAS_CONFIG": str(tmp / "config.toml")})
    return s.replace(rpc_backend_heartbeat=False, probe_timeout=timeout)


async def measure(hole: Blackhole, timeout: float, runs: int) -> dict[str, list[float]]:
    servers = [await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0) for _ in range(40)]
    alive = [f"127.0.0.1:{s.sockets[0].getsockname()[1]}" for s in servers]
    dead = [f"{hole.address(i)}:50052" for i in range(100, 110)]
    tmp = Path(tempfile.mkdtemp())
    out: dict[str, list[float]] = {"one probe (black hole)": [], "round: 40 up": [],
                                   "round: 40 up + 10 black-holed": []}
    for _ in range(runs):
        t0 = time.perf_counter()
        try:
            await probe(hole.address(99), 50052, timeout)
        except ProbeFailure:
            pass
        out["one probe (black hole)"].append(time.perf_counter() - t0)
        for name, backends in (("round: 40 up", alive), ("round: 40 up + 10 black-holed", alive + dead)):
            registry = RpcRegistry(settings(tmp, backends, timeout), Observer())
            await registry.start()
            t0 = time.perf_counter()
            await registry.check()
            out[name].append(time.perf_counter() - t0)
    # the design the registry avoids: one probe after another (once: it is slow by construction)
    t0 = time.perf_counter()
    for address in alive + dead:
        host, port = address.rsplit(":", 1)
        try:
            await probe(host, int(port), timeout)
        except ProbeFailure:
            pass
    out["sequential probes (for comparison)"] = [time.perf_counter() - t0]
    for s in servers:
        s.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--timeout", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    with Blackhole() as hole:
        results = asyncio.run(measure(hole, args.timeout, args.runs))
    base = statistics.median(results["one probe (black hole)"])
    print(f"probe timeout {args.timeout:g} s, {args.runs} runs; 50 backends = 40 listeners + 10 black-holed")
    print("| what | median | max | median / one probe timeout |")
    print("|---|---|---|---|")
    for name, values in results.items():
        med = statistics.median(values)
        print(f"| {name} | {med * 1000:.0f} ms | {max(values) * 1000:.0f} ms | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
