#!/usr/bin/env python3
"""Dashboard figures for docs/PERFORMANCE.md: 50 SSE viewers at 1,000 events/s, and idle cost.

    .venv/bin/python bench/dashboard.py [--duration 120] [--viewers 50] [--rate 1000] [--idle 30] [--scrape 5]

Everything is real and separate, as in use: a redis-server on a free port, the dashboard process
(`main.py dashboard-server`), and a pusher process that emits events through the project's own
Observer + RedisPublisher. In this process: N SSE viewers (raw HTTP/1.0 sockets, so parsing is
cheap and the figures are the dashboard's) and, as the baseline measured in the same run, one raw
Redis subscriber (PSUBSCRIBE synapticllamas:llama_cpp:*) - what a client gets without the dashboard.

Latency = the time a frame is read by the viewer minus the event's own timestamp (stamped by
emit() in the pusher; same machine, same clock). Loss = bench events emitted but not received.
Meanwhile a scraper GETs /metrics every --scrape seconds (the dashboard runs with --metrics-hold 5,
so the idle measurement after the load starts once the scrape's hold has ended).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from dashboard_support import healthz_answers  # noqa: E402
from support import PYTHON, RedisServer, cpu_seconds, free_port, shell_env, wait_for  # noqa: E402

BIN_MS = 0.1                      # latency histogram resolution
BINS = 20000                      # up to 2 s; slower goes in the last bin
# the pusher's events, as Event.to_json() writes them: timestamp first, seq and sampled last, one line
# each (a greedy [^\n]* backtracks from the line end to "seq": 5x faster than a lazy match)
EVENT = re.compile(rb'\{"timestamp":([0-9.e+-]+),"component":"raw","event_type":"bench"[^\n]*"seq":(\d+),"sampled":\d+\}')
METRICS_HOLD = 5.0

PUSHER = r"""
import asyncio, json, sys, time
from synapticllamas.config import load_settings
from synapticllamas.events.observer import Observer
from synapticllamas.events.publisher import RedisPublisher

async def main(url, rate, duration):
    settings = load_settings({"redis_url": url})
    observer = Observer(max_events=settings.observer_max_events, sampling=False,
                        source={"app": "bench", "instance": "bench:1", "host": "bench"})
    publisher = RedisPublisher(settings, observer, {"instance": "bench:1", "app": "bench"})
    publisher.start()
    await publisher.wait_first_attempt(2.0)
    print("ready", flush=True)
    sys.stdin.readline()                       # go
    text = "x" * 180                            # with the envelope: ~330-byte events
    ranges = []                                 # seqs of the bench events (the publisher's own notices
    start, n = time.monotonic(), 0              # may take a seq in between)
    while n < rate * duration:
        due = start + n / rate
        now = time.monotonic()
        if due > now:
            await asyncio.sleep(due - now)
        # emit everything due now (a 1 ms timer cannot fire 1000 times a second exactly)
        while n < rate * duration and start + n / rate <= time.monotonic():
            seq = observer.emit("raw", "bench", text, {"n": n}).seq
            if ranges and ranges[-1][1] == seq - 1:
                ranges[-1][1] = seq
            else:
                ranges.append([seq, seq])
            n += 1
    await publisher.close(timeout=5.0)
    print(json.dumps({"ranges": ranges, "emitted": n, "published": publisher.published,
                      "seconds": time.monotonic() - start}), flush=True)

asyncio.run(main(sys.argv[1], float(sys.argv[2]), float(sys.argv[3])))
"""


class Histogram:
    def __init__(self) -> None:
        self.bins = [0] * (BINS + 1)
        self.count = 0

    def merge(self, other: Histogram) -> None:
        self.bins = [a + b for a, b in zip(self.bins, other.bins, strict=True)]
        self.count += other.count

    def percentile(self, p: float) -> float:
        """Upper edge of the bin holding the p-th percentile, in ms."""
        target, seen = self.count * p / 100, 0
        for i, n in enumerate(self.bins):
            seen += n
            if seen >= target and n:
                return (i + 1) * BIN_MS
        return float("nan")


class FrameReader(asyncio.Protocol):
    """Counts bench events and their latency in a byte stream of SSE frames or RESP pmessages.
    One regex scan per chunk (C speed) keeps the reader's own cost, and so its queueing, small."""

    def __init__(self, sep: bytes) -> None:
        self.sep = sep
        self.buffer = b""
        self.hist = Histogram()
        self.seqs: set[int] = set()
        self.duplicates = 0
        self.closed = False
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.closed = True

    def data_received(self, data: bytes) -> None:
        now = time.time()
        buffer = self.buffer + data
        cut = buffer.rfind(self.sep)
        if cut < 0:
            self.buffer = buffer
            return
        complete, self.buffer = buffer[:cut], buffer[cut + len(self.sep):]
        bins, seqs, scale = self.hist.bins, self.seqs, 1000 / BIN_MS
        found = EVENT.findall(complete)
        for ts, seq in found:
            seq = int(seq)
            if seq in seqs:
                self.duplicates += 1
            seqs.add(seq)
            i = int((now - float(ts)) * scale)
            bins[i if 0 <= i < BINS else (BINS if i > 0 else 0)] += 1
        self.hist.count += len(found)


async def open_viewer(port: int) -> FrameReader:
    loop = asyncio.get_running_loop()
    _, reader = await loop.create_connection(lambda: FrameReader(b"\n\n"), "127.0.0.1", port)
    # HTTP/1.0: the body is not chunked, so frames arrive as they are
    reader.transport.write(b"GET /events?replay=0 HTTP/1.0\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n")
    return reader


async def open_subscriber(port: int) -> FrameReader:
    loop = asyncio.get_running_loop()
    # the pmessage's 4th element (the JSON) ends with \r\n; splitting on it yields whole events
    _, reader = await loop.create_connection(lambda: FrameReader(b"\r\n"), "127.0.0.1", port)
    reader.transport.write(b"PSUBSCRIBE synapticllamas:llama_cpp:*\r\n")
    return reader


async def scraper(port: int, every: float, stop: asyncio.Event) -> list[tuple[float, int, float]]:
    """GET /metrics every `every` seconds: (seconds it took, body bytes, events counted so far)."""
    out = []
    while not stop.is_set():
        t0 = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        body = await reader.read()
        writer.close()
        took = time.monotonic() - t0
        found = re.search(rb"^synapticllamas_dashboard_events_observed_total (\d+)", body, re.M)
        out.append((took, len(body.split(b"\r\n\r\n", 1)[-1]), float(found.group(1)) if found else -1))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), every)
    return out


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def redis_calls(client) -> int:
    return sum(s["calls"] for name, s in client.info("commandstats").items() if name != "cmdstat_info")


def idle(client, pid: int, seconds: float) -> tuple[float, float]:
    """Redis commands/s (not counting our INFO) and the dashboard's CPU share over `seconds`."""
    calls, cpu, t0 = redis_calls(client), cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - t0
    return (redis_calls(client) - calls) / elapsed, (cpu_seconds(pid) - cpu) / elapsed * 100


async def load(args, dash_port: int, redis_port: int, redis_url: str, dash_pid: int, tmp: Path) -> dict:
    viewers = [await open_viewer(dash_port) for _ in range(args.viewers)]
    baseline = await open_subscriber(redis_port)
    await asyncio.sleep(1.0)                      # every viewer attached, the hub subscribed
    pusher = await asyncio.create_subprocess_exec(
        PYTHON, "-c", PUSHER, redis_url, str(args.rate), str(args.duration), cwd=ROOT,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=shell_env(tmp))
    assert (await pusher.stdout.readline()).strip() == b"ready", "the pusher did not connect"
    rss, cpu0, t0 = [], cpu_seconds(dash_pid), time.monotonic()
    pusher.stdin.write(b"go\n")
    await pusher.stdin.drain()
    stop_scraping = asyncio.Event()
    scrapes = asyncio.ensure_future(scraper(dash_port, args.scrape, stop_scraping))
    done = asyncio.ensure_future(pusher.stdout.readline())
    while not done.done():
        rss.append((time.monotonic() - t0, rss_kib(dash_pid)))
        await asyncio.wait({done}, timeout=5.0)
    load_cpu = (cpu_seconds(dash_pid) - cpu0) / (time.monotonic() - t0) * 100
    stop_scraping.set()
    scraped = await scrapes
    report = json.loads(done.result())
    await pusher.wait()
    await asyncio.sleep(1.0)                      # the last frames in flight
    expected = {seq for a, b in report["ranges"] for seq in range(a, b + 1)}
    hist = Histogram()
    for v in viewers:
        hist.merge(v.hist)
    lost = sum(len(expected - v.seqs) for v in viewers)
    missing = sorted(set().union(*(expected - v.seqs for v in viewers)) | (expected - baseline.seqs))
    dups = sum(v.duplicates for v in viewers)
    for reader in [*viewers, baseline]:
        reader.transport.close()
    return {"report": report, "hist": hist, "baseline": baseline.hist, "lost": lost, "dups": dups,
            "baseline_lost": len(expected - baseline.seqs), "missing": missing, "rss": rss, "load_cpu": load_cpu,
            "scrapes": scraped,
            "viewers_closed_early": sum(v.closed for v in viewers)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of load (default 120)")
    parser.add_argument("--viewers", type=int, default=50)
    parser.add_argument("--rate", type=float, default=1000.0, help="events per second")
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of each idle measurement")
    parser.add_argument("--scrape", type=float, default=5.0, help="seconds between GET /metrics during the load")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        redis_server = RedisServer(tmp / "redis").start()
        dash_port = free_port()
        dash = subprocess.Popen([PYTHON, str(ROOT / "main.py"), "dashboard-server", "--port", str(dash_port),
                                 "--redis-url", redis_server.url, "--metrics-hold", str(METRICS_HOLD)],
                                cwd=ROOT, env=shell_env(tmp),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            client = redis_server.client()
            wait_for(lambda: healthz_answers(dash_port), 20, what="the dashboard")
            time.sleep(1.0)
            idle_before = idle(client, dash.pid, args.idle)
            result = asyncio.run(load(args, dash_port, redis_server.port, redis_server.url, dash.pid, tmp))
            wait_for(lambda: client.execute_command("PUBSUB", "NUMPAT") == 0, 10 + METRICS_HOLD,
                     what="the hub to close (viewers gone, the scrape's hold over)")
            time.sleep(1.0)
            idle_after = idle(client, dash.pid, args.idle)
        finally:
            dash.terminate()
            dash.wait(10)
            redis_server.kill()
    print_report(args, result, idle_before, idle_after)


def print_report(args, r, idle_before, idle_after) -> None:
    h, b, rep = r["hist"], r["baseline"], r["report"]
    rss = r["rss"]
    warm = [kib for t, kib in rss if t >= min(20.0, args.duration / 4)] or [rss[-1][1]]
    mb = lambda kib: f"{kib / 1024:.1f} MB"   # noqa: E731
    rate = rep["emitted"] / rep["seconds"]
    print(f"Command: .venv/bin/python bench/dashboard.py --duration {args.duration:g} --viewers {args.viewers} "
          f"--rate {args.rate:g} --idle {args.idle:g}\n")
    print(f"| what | {args.viewers} dashboard viewers | raw Redis subscriber (baseline, same run) | target |")
    print("|---|---|---|---|")
    print(f"| events pushed | {rep['emitted']} emitted in {rep['seconds']:.1f} s ({rate:.0f}/s), "
          f"{rep['published']} published by the real publisher | same events | 1,000/s |")
    print(f"| delivered | {h.count} to {args.viewers} viewers | {b.count} | |")
    print(f"| lost / duplicated | {r['lost']} / {r['dups']} | {r['baseline_lost']} / - | 0 |")
    for p in (50, 99, 99.9):
        print(f"| latency p{p:g} (publish -> reader) | {h.percentile(p):.1f} ms | {b.percentile(p):.1f} ms | "
              f"{'<= 100 ms' if p == 99 else ''} |")
    print(f"| dashboard CPU under load | {r['load_cpu']:.0f} % of a core | | |")
    took = sorted(t for t, _, _ in r["scrapes"])
    if took:
        print(f"| GET /metrics under load ({len(took)} scrapes, every {args.scrape:g} s) | median "
              f"{took[len(took) // 2] * 1000:.1f} ms, max {took[-1] * 1000:.1f} ms, {r['scrapes'][-1][1]} bytes; "
              f"events counted at the last: {r['scrapes'][-1][2]:.0f} | | |")
    print(f"| dashboard RSS (from {min(20.0, args.duration / 4):g} s to the end) | "
          f"{mb(warm[0])} -> {mb(warm[-1])}, max {mb(max(warm))} (start {mb(rss[0][1])}) | | flat |")
    print(f"| idle, before any viewer: Redis commands/s, dashboard CPU | {idle_before[0]:.2f}/s, "
          f"{idle_before[1]:.2f} % of a core | | 0/s, < 0.5 % |")
    print(f"| idle, after the viewers left | {idle_after[0]:.2f}/s, {idle_after[1]:.2f} % of a core | | 0/s, < 0.5 % |")
    if r["missing"]:
        print(f"\nmissing seqs (first 10): {r['missing'][:10]}")
    if r["viewers_closed_early"]:
        print(f"\nWARNING: {r['viewers_closed_early']} viewers were disconnected during the run")
    print("\nRSS samples (s, MB): " + ", ".join(f"{t:.0f}:{kib / 1024:.1f}" for t, kib in rss))


if __name__ == "__main__":
    main()
