#!/usr/bin/env python3
"""Placement for speed, figures for docs/PERFORMANCE.md: the tool's plan against hand-made ones.

    .venv/bin/python bench/speed_placement.py [--parts one,cluster] [--tokens 32] [--runs 3] [--rounds 3]

Everything is real: llama-server, ggml-rpc-server, llama-bench, the models, `python3 main.py node`
in simulated hosts, Redis. Every figure is the median of `runs` requests of `tokens` generated
tokens (prompt "Hi", so the context stays short), measured in this run.

1. One machine (`one`). The demo model; `backends spawn 2` + `coordinator start` (what the shell
   runs: the App, the command handlers) against llama-server alone by hand with -t 1 and -t 2 (the
   best of the two is the baseline), all on this machine, one after the other; generation and
   prompt tokens/s (a 220-token prompt for the prompt rate). Also `coordinator start --spread` and
   the split of before this work (SYNAPTICLLAMAS_PLACEMENT=memory: two rpc-servers by memory).
2. A heterogeneous cluster (`cluster`). Three simulated hosts (tests/cluster.py: one network
   namespace each behind a 100 Mbit/s link, each with a cgroup CPU quota of 20 %, 50 % and 100 % of
   a core, started in that order, so the slow host is the first backend), `main.py node --memory M`
   on each (M = 800, 430, 560 MiB: the model needs 834 MiB on one device, so at least two hosts,
   and the slow host offers the most), the 553 MiB model of bench/big_model.py, and a shell whose
   own CPU holds no layers (SYNAPTICLLAMAS_COORDINATOR_MEMORY=0: the cluster is the three hosts).
   - the tool's plan: `coordinator start`;
   - (a) the split of before: SYNAPTICLLAMAS_PLACEMENT=memory (in proportion to the offers);
   - (b) the best hand-made split: every --tensor-split of the three hosts in 10 % steps (a share
     of 0 drops a host), kept when it fits the offers by the memory model (llama/placement.py,
     within 0.1 % of llama-server's buffers), deduplicated by the layers each host gets, each run
     by hand with the same flags the tool uses (-ngl, --tensor-split, -t 1, --fit off).
   For each plan, its predicted time per token (llama/cost.py, from the speeds the nodes announced)
   against the measured one. Also: the time `coordinator plan` takes with the measurements cached,
   and how long each node's speed benchmark took (its announcement says).
   The three nodes share one rpc-server cache directory, so each plan loads in seconds, not in the
   46 s the first upload of 553 MiB over 100 Mbit/s takes.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import itertools
import json
import os
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
from support import PYTHON, RedisServer, free_port, wait_for  # noqa: E402

from synapticllamas.app import App  # noqa: E402
from synapticllamas.commands import load_all  # noqa: E402
from synapticllamas.commands.registry import lookup  # noqa: E402
from synapticllamas.config import load_settings  # noqa: E402
from synapticllamas.llama import binaries  # noqa: E402
from synapticllamas.ui import PlainUI  # noqa: E402

LONG_PROMPT = "The history of the city begins with a small settlement on the river, where " * 14


def complete(port: int, prompt: str, n: int) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/completion", headers={"Content-Type": "application/json"},
        data=json.dumps({"prompt": prompt, "n_predict": n, "cache_prompt": False, "ignore_eos": True}).encode())
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())["timings"]


def rates(port: int, tokens: int, runs: int, prompt_rate: bool = False) -> dict[str, float]:
    """Median generation ms/token and tokens/s (and prompt tokens/s) over `runs` requests."""
    complete(port, "Hi", 2)                                  # the first request pays for warm-up
    gen = [complete(port, "Hi", tokens)["predicted_per_second"] for _ in range(runs)]
    out = {"tokens_per_s": statistics.median(gen), "ms": 1000 / statistics.median(gen)}
    if prompt_rate:
        out["prompt_per_s"] = statistics.median(complete(port, LONG_PROMPT, 4)["prompt_per_second"]
                                                for _ in range(runs))
    return out


def health(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


class ByHand:
    """llama-server started by hand, as someone who knows llama.cpp runs it."""

    def __init__(self, model: Path, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        argv = [str(binaries.llama_server()), "-m", str(model), "--port", str(self.port), "-c", "2048",
                "--no-webui", *args]
        self.proc = subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        wait_for(lambda: self.proc.poll() is not None or health(self.port), 600, interval=0.1, what="llama-server")
        if self.proc.poll() is not None:
            raise RuntimeError(f"llama-server exited: {log.read_text()[-2000:]}")

    def __enter__(self) -> ByHand:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def settings_in(tmp: Path, **values):
    (tmp / "config.toml").write_text("")
    base = load_settings({}, env={}, config_path=str(tmp / "config.toml"))
    return base.replace(**{"distributed": True, "backends_file": str(tmp / "backends.conf"),
                           "coordinator_port": free_port(), "history_file": str(tmp / "history"),
                           "log_file": str(tmp / "log"), "rpc_backend_heartbeat": False, **values})


async def command(app: App, line: list[str]) -> str:
    from synapticllamas.shell.render import render_plain

    result = await lookup(line[0]).handler(app, line[1:])
    return render_plain(result) if result is not None else ""


# ---------------------------------------------------------------- one machine

async def tool_one(tmp: Path, tokens: int, runs: int, placement: str, spread: bool) -> tuple[dict, str]:
    app = App(settings_in(tmp, placement=placement), PlainUI(io.StringIO()))
    await app.start()
    try:
        await app.local_backends.spawn(2)
        status = await app.coordinator.start(spread=spread)
        port = int(status["url"].rsplit(":", 1)[1])
        measured = await asyncio.to_thread(rates, port, tokens, runs, True)
        choice = status.get("choice") or {}
        return measured, (choice.get("reason") or "") + f" [{' '.join(app.coordinator.run.plan.argv(2048, '')[7:])}]"
    finally:
        await app.close()


def part_one(tokens: int, runs: int, rounds: int) -> None:
    """Every configuration once per round, the rounds one after another; per configuration the best
    round is kept: other work on this shared machine only ever slows a run down."""
    model = binaries.demo_model()
    load_all()
    labels = ["llama-server alone, -t 1 (by hand)", "llama-server alone, -t 2 (by hand)",
              "`backends spawn 2` + `coordinator start`", "... `coordinator start --spread`",
              "... SYNAPTICLLAMAS_PLACEMENT=memory (the split of before)"]
    best: dict[str, dict] = {}
    how: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            measured: dict[str, dict] = {}
            for threads in (1, 2):
                with ByHand(model, ["-t", str(threads)], Path(tmp) / f"alone{threads}.log") as server:
                    measured[labels[threads - 1]] = rates(server.port, tokens, runs, True)
            for label, placement, spread in ((labels[2], "speed", False), (labels[3], "speed", True),
                                             (labels[4], "memory", False)):
                sub = Path(tmp) / f"{r}-{placement}-{spread}"
                sub.mkdir()
                measured[label], how[label] = asyncio.run(tool_one(sub, tokens, runs, placement, spread))
            for label, m in measured.items():
                old = best.setdefault(label, dict(m))
                old["tokens_per_s"] = max(old["tokens_per_s"], m["tokens_per_s"])
                old["prompt_per_s"] = max(old["prompt_per_s"], m["prompt_per_s"])
            print(f"  round {r + 1}: " + "; ".join(f"{k[:24]} {m['tokens_per_s']:.0f}/{m['prompt_per_s']:.0f}"
                                                  for k, m in measured.items()), flush=True)
    base = max((best[labels[0]], best[labels[1]]), key=lambda m: m["tokens_per_s"])
    base_prompt = max(best[labels[0]]["prompt_per_s"], best[labels[1]]["prompt_per_s"])
    print(f"\none machine, demo model, {tokens} tokens x {runs} (median), best of {rounds} rounds; baseline: "
          "llama-server alone with the best -t\n")
    print("| what | generation tokens/s | ratio | prompt tokens/s | ratio |")
    print("|---|---|---|---|---|")
    for label in labels:
        m = best[label]
        print(f"| {label} | {m['tokens_per_s']:.1f} | {m['tokens_per_s'] / base['tokens_per_s']:.2f}x | "
              f"{m['prompt_per_s']:.0f} | {m['prompt_per_s'] / base_prompt:.2f}x |")
    for label in labels[2:]:
        print(f"- {label}: {how[label]}")


# ---------------------------------------------------------------- the cluster

QUOTAS = (0.2, 0.5, 1.0)        # started in this order: the slow host is the first backend
OFFERS = (800, 430, 560)
NODE_PORT = 50052


def start_nodes(cluster, tmp: Path, redis: RedisServer) -> list[subprocess.Popen]:
    shared = tmp / "cache"            # one rpc-server cache for the three: loads take seconds
    procs = []
    for host, offer in zip(cluster.hosts, OFFERS, strict=True):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SOLLOL_", "SYNAPTICLLAMAS_"))}
        env.update({"XDG_CACHE_HOME": str(shared), "XDG_CONFIG_HOME": str(tmp / host.name),
                    "SOLLOL_RPC_BACKEND_HEARTBEAT_INTERVAL": "1", "PYTHONUNBUFFERED": "1"})
        log = (tmp / f"{host.name}.log").open("w")
        procs.append(host.popen([PYTHON, str(ROOT / "main.py"), "node", "--port", str(NODE_PORT), "--redis-url",
                                 redis.url, "--memory", str(offer)], env=env, stdout=log, stderr=log, cwd=str(ROOT)))
        # one at a time, so they are announced (and become backends) in this order
        wait_for(lambda host=host: f"serving on {host.address}" in (tmp / f"{host.name}.log").read_text(), 120,
                 interval=0.1, what=f"the node on {host.name}")
    return procs


def splits(n_hosts: int) -> list[tuple[int, ...]]:
    """Every split of 10 tenths among the hosts (0: the host is not used)."""
    return [s for s in itertools.product(range(11), repeat=n_hosts) if sum(s) == 10]


async def part_cluster_async(tmp: Path, big: Path, tokens: int, runs: int) -> None:
    from cluster import SimulatedCluster

    from synapticllamas.llama.chooser import World
    from synapticllamas.llama.cost import predict
    from synapticllamas.llama.gguf_layout import read_layout
    from synapticllamas.llama.placement import assign_layers, plan
    from synapticllamas.llama.placement import place as exact

    layout = read_layout(big)
    with SimulatedCluster(3, rate_mbit=100, cpu_quota=list(QUOTAS)) as cluster:
        redis = RedisServer(tmp / "redis", bind=cluster.root_address).start()
        try:
            settings = settings_in(tmp, redis_url=redis.url, coordinator_memory=0, coordinator_args="",
                                   model=str(big))
            app = App(settings, PlainUI(io.StringIO()))
            await app.start()
            await app.redis_on()
            # the nodes one at a time after the shell listens: the registry lists them in that order
            await asyncio.to_thread(start_nodes, cluster, tmp, redis)
            addresses = [f"{h.address}:{NODE_PORT}" for h in cluster.hosts]
            await asyncio.to_thread(wait_for, lambda: all(app.registry.get(a) and app.registry.get(a).state == "up"
                                                          for a in addresses), 60, 0.1, "the nodes as backends")
            try:
                bench_s = [app.announced_node(a).registration["speed"]["seconds"] for a in addresses]
                # time to plan, measurements cached (the first call warms the speed cache of this host)
                await command(app, ["coordinator", "plan"])
                started = time.perf_counter()
                plan_text = await command(app, ["coordinator", "plan"])
                plan_s = time.perf_counter() - started
                rows = []
                for label, placement in (("the tool's plan (`coordinator start`)", "speed"),
                                         ("(a) by memory (the split of before)", "memory")):
                    settings.values["placement"] = placement     # one Settings object, read by every part
                    status = await app.coordinator.start()
                    port = int(status["url"].rsplit(":", 1)[1])
                    measured = await asyncio.to_thread(rates, port, tokens, runs)
                    run_plan = app.coordinator.run.plan
                    predicted = run_plan.choice.chosen.ms if run_plan.choice and run_plan.choice.chosen else None
                    layers = {b.address: b.layers for b in run_plan.placement.backends}
                    rows.append((label, measured, predicted, layers, run_plan.placement.tensor_split()))
                    await app.coordinator.stop()
                # (b) every split in 10 % steps that fits
                world: World = await app.placement_inputs.world(layout, 2048, addresses)
                offers = world.offers
                tried: dict[tuple, tuple] = {}
                for shares in splits(3):
                    used = [a for a, s in zip(addresses, shares, strict=True) if s]
                    split = [float(s) for s in shares if s]
                    device_of, _ = assign_layers(layout.n_layer, split)
                    counts = [device_of.count(i) for i in range(len(used))]
                    key = tuple(zip(used, counts, strict=True))
                    if key in tried:
                        continue
                    placed = plan(layout, used, {a: offers[a] for a in used}, 2048)
                    placed = exact(layout, used, offers, 2048, counts, 0, None, world.host_of, world.hosts) \
                        if sum(counts) == layout.n_layer else placed
                    if not placed.fits:
                        continue
                    tried[key] = (shares, placed)
                best = None
                hand = []
                for key, (shares, placed) in tried.items():
                    used = [a for a, _ in key]
                    args = ["-ngl", str(layout.n_layer + 1), "-t", "1", "--fit", "off", "--rpc", ",".join(used)]
                    if len(used) > 1:
                        args += ["--tensor-split", ",".join(str(s) for s in shares if s)]
                    with ByHand(big, args, tmp / "hand.log", {"GOMP_SPINCOUNT": "3000"}) as server:
                        measured = await asyncio.to_thread(rates, server.port, tokens, runs)
                    predicted = predict(layout, placed, world.devices).ms_per_token
                    hand.append((shares, key, measured, predicted))
                    if best is None or measured["tokens_per_s"] > best[2]["tokens_per_s"]:
                        best = hand[-1]
                    print(f"  by hand {shares}: {dict(key)} {measured['ms']:.1f} ms/token (predicted {predicted:.1f})",
                          flush=True)
            finally:
                await app.close()
        finally:
            redis.kill()
    assert best is not None
    tool, memory = rows[0][1], rows[1][1]
    name = {a: f"host{i} ({int(q * 100)} %)" for i, (a, q) in enumerate(zip(addresses, QUOTAS, strict=True))}
    print(f"\nheterogeneous cluster: {layout.n_layer} layers of f16 ({layout.total_bytes / 2**20:.0f} MiB), three hosts "
          f"with {', '.join(f'{int(q * 100)} %' for q in QUOTAS)} of a core behind 100 Mbit/s, offers "
          f"{', '.join(map(str, OFFERS))} MiB; {tokens} tokens x {runs} (median)\n")
    print("| plan | layers per host | generation tokens/s | predicted ms/token | measured ms/token | measured / predicted |")
    print("|---|---|---|---|---|---|")
    for label, m, predicted, layers, _ in rows:
        per = ", ".join(f"{name[a]} {(b[1] - b[0] + 1) if b else 0}" for a, b in layers.items())
        print(f"| {label} | {per} | {m['tokens_per_s']:.2f} | {predicted:.1f} | {m['ms']:.1f} | {m['ms'] / predicted:.2f} |")
    shares, key, m, predicted = best
    per = ", ".join(f"{name[a]} {c}" for a, c in key)
    print(f"| (b) best of {len(hand)} hand-made splits ({'/'.join(str(s * 10) for s in shares)} %) | {per} | "
          f"{m['tokens_per_s']:.2f} | {predicted:.1f} | {m['ms']:.1f} | {m['ms'] / predicted:.2f} |")
    worst = max(abs(h[2]["ms"] / h[3] - 1) for h in hand)
    worst = max(worst, *(abs(r[1]["ms"] / r[2] - 1) for r in rows))
    print(f"\ntool / (b) best hand-made: {tool['tokens_per_s'] / m['tokens_per_s']:.2f}x; "
          f"tool / (a) by memory: {tool['tokens_per_s'] / memory['tokens_per_s']:.2f}x; largest |measured / predicted - 1| "
          f"over all {len(hand) + len(rows)} plans: {worst * 100:.0f} %")
    print(f"time to plan (`coordinator plan`, measurements cached): {plan_s * 1000:.0f} ms; node speed benchmarks: "
          f"{', '.join(f'{name[a]} {s:.1f} s' for a, s in zip(addresses, bench_s, strict=True))}")
    print("\n`coordinator plan`:\n" + plan_text)


def part_cluster(tokens: int, runs: int) -> None:
    from big_model import write_model

    load_all()
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "big.gguf"
        write_model(big)
        asyncio.run(part_cluster_async(Path(tmp), big, tokens, runs))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="one,cluster")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3, help="one machine: rounds of every configuration")
    args = ap.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    if "one" in args.parts:
        part_one(args.tokens, args.runs, args.rounds)
    if "cluster" in args.parts:
        part_cluster(args.tokens, args.runs)
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
