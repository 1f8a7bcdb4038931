#!/usr/bin/env python3
"""How far apart the device-speed benchmark (llama/speed.py) comes out when it is run again and
again on one machine, with the runs per model of before (2 tokens x 2 runs) and of now (runs_for:
20 single-token runs on a full core), in one run, alternating.

    .venv/bin/python bench/speed_noise.py [--times 6]

Real llama-bench from the project's llama.cpp build, this machine's CPU, no quota, one thread.
For each tensor type (and the per-layer cost): the smallest and largest of the `times` figures and
how far apart they are; and the seconds each benchmark took.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from synapticllamas.llama import binaries, speed  # noqa: E402
from synapticllamas.node.speed import bench_binary  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--times", type=int, default=6)
    args = ap.parse_args()
    bench = bench_binary(str(binaries.rpc_server()))
    if bench is None:
        sys.exit("no llama-bench beside ggml-rpc-server: scripts/test installs it")
    ways = {"before: 2 tokens x 2 runs": (2, 2), f"now: 1 token x {speed.runs_for(1.0, 1)} runs": None}
    found: dict[str, dict[str, list[float]]] = {name: {} for name in ways}
    for _ in range(args.times):
        for name, runs in ways.items():
            s = asyncio.run(speed.measure(bench, 1, False, 1.0, runs=runs))
            for key, value in [*s.ns_per_byte.items(), ("per layer (ns)", s.layer_ns), ("seconds", s.seconds)]:
                found[name].setdefault(key, []).append(value)
    print(f"{args.times} benchmarks each, alternating; min / max / max over min\n")
    print("| figure | " + " | ".join(ways) + " |")
    print("|---|" + "---|" * len(ways))
    for key in found[next(iter(ways))]:
        cells = []
        for name in ways:
            values = found[name][key]
            lo, hi = min(values), max(values)
            apart = f"{100 * (hi / lo - 1):.0f} %" if lo > 0 else "from 0"
            cells.append(f"{lo:.4g} / {hi:.4g} / {apart}")
        print(f"| {key} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
