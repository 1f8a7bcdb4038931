#!/usr/bin/env python3
"""Events and publishing figures for docs/PERFORMANCE.md, all measured in one run.

    .venv/bin/python bench/publish.py [--events 50000] [--runs 3] [--idle 65]

Everything is real: a redis-server started here on a free port, subscribers in their own processes
(so they do not share our GIL), the App with its real publisher, and for the idle figure the real
shell (`python3 main.py --redis`). Figures:

1. emit() cost on the caller with `redis on` (per call, median/p99) vs one synchronous
   redis-py `publish()` per event.
2. sustained delivery of ~300-byte events to a subscriber and the journal, zero loss, vs raw loops
   sending the same PUBLISH + XADD commands in pipelines of 100 with redis-py sync and redis.asyncio.
3. emit -> subscriber latency at 1000 events/s (p50/p99).
4. idle: commands Redis receives from a `--redis` shell over --idle seconds (INFO commandstats), and
   the shell's CPU use.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
from support import RedisServer, cpu_seconds, until  # noqa: E402

from synapticllamas.app import App  # noqa: E402
from synapticllamas.config import load_settings  # noqa: E402
from synapticllamas.events.contract import CHANNEL_PATTERN, JOURNAL_FIELD, JOURNAL_STREAM, Event  # noqa: E402
from synapticllamas.ui import PlainUI  # noqa: E402

MESSAGE = "llama_model_loader: - kv  19: tokenizer.ggml.eos_token_id u32 = 2 " + "x" * 40
DETAILS = {"stream": "stderr", "line_no": 0}

# A subscriber process: counts pmessage frames on a raw socket (cheap enough to keep up with any
# publisher here) and answers "wait N" on stdin with the time it had received N messages in total.
COUNTER = r"""
import selectors, socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(b"*2\r\n$10\r\nPSUBSCRIBE\r\n$%d\r\n%s\r\n" % (len(sys.argv[2]), sys.argv[2].encode()))
buf = b""
while b"psubscribe" not in buf:
    buf += s.recv(65536)
print("ready", flush=True)
mark = b"$8\r\npmessage\r\n"
count, tail, target = 0, b"", None
sel = selectors.DefaultSelector()
sel.register(s, selectors.EVENT_READ, "redis")
sel.register(sys.stdin, selectors.EVENT_READ, "stdin")
while True:
    for key, _ in sel.select():
        if key.data == "stdin":
            words = sys.stdin.readline().split()
            if not words:
                sys.exit(0)
            if words[0] == "count":
                print(count, flush=True)
            else:
                target = int(words[1])
        else:
            data = s.recv(1 << 20)
            if not data:
                sys.exit(1)
            chunk = tail + data
            count += chunk.count(mark)
            tail = chunk[-(len(mark) - 1):]
    if target is not None and count >= target:
        print(time.time(), flush=True)
        target = None
"""

# A subscriber process for latency: parses each event and records now - event.timestamp.
LATENCY = r"""
import json, sys, time, redis
r = redis.Redis(host="127.0.0.1", port=int(sys.argv[1]))
p = r.pubsub(ignore_subscribe_messages=True)
p.psubscribe(sys.argv[2])
while p.get_message(timeout=1) is None and not p.subscribed:
    pass
print("ready", flush=True)
lat, n = [], int(sys.argv[3])
while len(lat) < n:
    m = p.get_message(timeout=5)
    if m is None:
        break
    if m["type"] == "pmessage":
        lat.append(time.time() - json.loads(m["data"])["timestamp"])
print(json.dumps(lat), flush=True)
"""


class Server(RedisServer):
    """support.RedisServer, started, with `db`: one client that returns bytes, as the figures read them."""

    def __init__(self, workdir: Path) -> None:
        import redis

        super().__init__(workdir)
        self.start()
        self.db = redis.Redis(host="127.0.0.1", port=self.port)


class Counter:
    def __init__(self, port: int) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", COUNTER, str(port), CHANNEL_PATTERN],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"
        self.total = 0

    def expect(self, n: int) -> None:
        self.total += n
        self.proc.stdin.write(f"wait {self.total}\n")
        self.proc.stdin.flush()

    def reached(self, timeout: float = 120) -> float:
        import select

        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            raise SystemExit(f"the subscriber did not receive {self.total} messages within {timeout:g} s: loss")
        return float(self.proc.stdout.readline())

    def count(self) -> int:
        self.proc.stdin.write("count\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(5)


def make_app(tmp: Path, url: str, max_events: int) -> App:
    env = {"XDG_CONFIG_HOME": str(tmp), "XDG_STATE_HOME": str(tmp), "SOLLOL_REDIS_URL": url,
           "SOLLOL_OBSERVER_SAMPLING": "false", "SOLLOL_OBSERVER_MAX_EVENTS": str(max_events),
           "SOLLOL_RPC_BACKEND_HEARTBEAT": "false"}
    return App(load_settings(env=env), ui=PlainUI(out=io.StringIO(), err=io.StringIO()))


def sample_payload() -> str:
    event = Event(time.time(), "raw", "log", MESSAGE, DETAILS, "info",
                  {"app": "synapticllamas", "instance": f"{socket.gethostname()}:{os.getpid()}",
                   "host": socket.gethostname()}, 123456)
    return event.to_json()


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


# ---------------------------------------------------------------- 1. emit cost

async def emit_cost(tmp: Path, server: Server, n: int) -> dict:
    app = make_app(tmp, server.url, 200000)
    _, outcome = await app.redis_on()
    assert outcome == (True, None), outcome
    emit, clock = app.observer.emit, time.perf_counter_ns
    costs = []
    for _burst in range(n // 100):
        for _ in range(100):
            t0 = clock()
            emit("raw", "log", MESSAGE, DETAILS, sample=True)
            costs.append(clock() - t0)
        await asyncio.sleep(0.0005)     # let the sender run, as real traffic would
    await app.close()
    publish = server.db.publish
    payload = sample_payload()
    sync = []
    for _ in range(min(n, 5000)):
        t0 = clock()
        publish("synapticllamas:llama_cpp:raw", payload)
        sync.append(clock() - t0)
    return {"emit_median_us": statistics.median(costs) / 1000, "emit_p99_us": pct(costs, 0.99) / 1000,
            "publish_median_us": statistics.median(sync) / 1000, "publish_p99_us": pct(sync, 0.99) / 1000}


# ---------------------------------------------------------------- 2. throughput

def raw_pipelines(client, payload: bytes, n: int, maxlen: int):
    """The raw loops' pipelines, each of 100 XADD + PUBLISH pairs, filled for the caller to execute
    (redis-py sync and redis.asyncio queue commands the same way; only execute() differs)."""
    for _ in range(n // 100):
        pipe = client.pipeline(transaction=False)
        for _ in range(100):
            pipe.xadd(JOURNAL_STREAM, {JOURNAL_FIELD: payload}, maxlen=maxlen, approximate=True)
            pipe.publish("synapticllamas:llama_cpp:raw", payload)
        yield pipe


def raw_sync_loop(server: Server, payload: bytes, n: int, maxlen: int) -> None:
    import redis

    client = redis.Redis(host="127.0.0.1", port=server.port)
    for pipe in raw_pipelines(client, payload, n, maxlen):
        pipe.execute()
    client.close()


async def raw_async_loop(server: Server, payload: bytes, n: int, maxlen: int) -> None:
    import redis.asyncio as aredis

    client = aredis.Redis(host="127.0.0.1", port=server.port)
    for pipe in raw_pipelines(client, payload, n, maxlen):
        await pipe.execute()
    await client.aclose()


async def through_publisher(tmp: Path, server: Server, n: int) -> None:
    app = make_app(tmp, server.url, n)
    await app.redis_on()
    emit = app.observer.emit
    for _chunk in range(n // 1000):      # emit in chunks, yielding to the loop like real work does
        for _ in range(1000):
            emit("raw", "log", MESSAGE, DETAILS, sample=True)
        await asyncio.sleep(0)
    await until(lambda: not app.publisher.status()["buffered"], 120, "the publisher to send its buffer", 0.001)
    app.publisher._remove_sink()
    app.publisher.enabled = False
    await app.publisher.close(2.0)


def throughput(tmp: Path, server: Server, n: int, runs: int) -> dict:
    counter = Counter(server.port)
    payload = sample_payload().encode()
    results: dict[str, list[float]] = {"sync": [], "asyncio": [], "publisher": []}
    losses = []
    for _ in range(runs):
        for name in ("sync", "publisher", "asyncio"):
            server.db.delete(JOURNAL_STREAM)
            extra = 2 if name == "publisher" else 0   # + its redis_on and redis_connected events
            counter.expect(n + extra)
            t0 = time.time()
            if name == "sync":
                raw_sync_loop(server, payload, n, n)
            elif name == "asyncio":
                asyncio.run(raw_async_loop(server, payload, n, n))
            else:
                asyncio.run(through_publisher(tmp, server, n))
            reached = counter.reached()
            journal = server.db.xlen(JOURNAL_STREAM)
            results[name].append(n / (reached - t0))
            losses.append((name, n + extra - journal))
    time.sleep(0.3)
    delivered, expected = counter.count(), counter.total
    counter.close()
    return {"rates": {k: statistics.median(v) for k, v in results.items()},
            "all": results, "journal_missing": [x for x in losses if x[1]],
            "subscriber_extra": delivered - expected}


# ---------------------------------------------------------------- 3. latency

async def latency(tmp: Path, server: Server, seconds: float, rate: int) -> dict:
    n = int(seconds * rate)
    # its one line of results holds n latencies: a larger line limit than asyncio's 64 KiB
    sub = await asyncio.create_subprocess_exec(sys.executable, "-c", LATENCY, str(server.port),
                                               "synapticllamas:llama_cpp:raw", str(n), stdout=subprocess.PIPE,
                                               limit=1 << 24)
    assert (await sub.stdout.readline()).strip() == b"ready"
    app = make_app(tmp, server.url, 10000)
    await app.redis_on()
    await asyncio.sleep(0.2)
    loop = asyncio.get_running_loop()
    start, sent = loop.time(), 0
    while sent < n:
        due = min(n, int((loop.time() - start) * rate) + 1)
        while sent < due:
            app.observer.emit("raw", "log", MESSAGE, DETAILS, sample=True)
            sent += 1
        await asyncio.sleep(0.001)
    lat = json.loads(await sub.stdout.readline())
    await app.close()
    await asyncio.wait_for(sub.wait(), 5)
    ms = [x * 1000 for x in lat]
    return {"count": len(ms), "expected": n, "p50_ms": pct(ms, 0.5), "p99_ms": pct(ms, 0.99), "max_ms": max(ms)}


# ---------------------------------------------------------------- 4. idle

def idle(tmp: Path, server: Server, seconds: float) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SOLLOL_", "SYNAPTICLLAMAS_"))}
    env.update(XDG_CONFIG_HOME=str(tmp / "cfg"), XDG_STATE_HOME=str(tmp / "state"), SOLLOL_REDIS_URL=server.url)
    shell = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "--redis"], stdin=subprocess.PIPE,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, env=env)
    time.sleep(3.0)                                   # start-up and its first events are not idle time
    start_id = server.db.xrevrange(JOURNAL_STREAM, count=1)[0][0]
    server.db.config_resetstat()
    cpu0, t0 = cpu_seconds(shell.pid), time.monotonic()
    time.sleep(seconds)
    cpu1, t1 = cpu_seconds(shell.pid), time.monotonic()
    stats = server.db.info("commandstats")
    sent = [json.loads(f[JOURNAL_FIELD.encode()]) for _, f in
            server.db.xrange(JOURNAL_STREAM, min=b"(" + start_id)]
    shell.stdin.close()
    shell.wait(10)
    ours = {k.removeprefix("cmdstat_"): v["calls"] for k, v in stats.items()
            if k not in ("cmdstat_config|resetstat", "cmdstat_info")}
    return {"commands": ours, "events": [f"{e['component']}/{e['event_type']}" for e in sent],
            "cpu_percent": 100 * (cpu1 - cpu0) / (t1 - t0), "seconds": t1 - t0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=50000, help="events per throughput run")
    ap.add_argument("--runs", type=int, default=3, help="throughput runs per variant")
    ap.add_argument("--idle", type=float, default=65.0, help="seconds of idle measurement")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    server = Server(tmp)
    try:
        print(f"load average before: {os.getloadavg()}", flush=True)
        e = asyncio.run(emit_cost(tmp, server, 20000))
        print(f"emit: median {e['emit_median_us']:.2f} us, p99 {e['emit_p99_us']:.2f} us | sync publish(): "
              f"median {e['publish_median_us']:.1f} us, p99 {e['publish_p99_us']:.1f} us | ratio "
              f"{e['publish_median_us'] / e['emit_median_us']:.1f}x", flush=True)
        t = throughput(tmp, server, args.events, args.runs)
        r = t["rates"]
        print(f"throughput (events/s, median of {args.runs}): sync pipelines of 100 {r['sync']:.0f}, "
              f"redis.asyncio pipelines of 100 {r['asyncio']:.0f}, publisher {r['publisher']:.0f} "
              f"= {r['publisher'] / r['sync']:.2f}x sync, {r['publisher'] / r['asyncio']:.2f}x asyncio; "
              f"journal missing {t['journal_missing']}, subscriber extra {t['subscriber_extra']}; "
              f"all runs {json.dumps({k: [round(x) for x in v] for k, v in t['all'].items()})}", flush=True)
        lat = asyncio.run(latency(tmp, server, 10.0, 1000))
        print(f"latency at 1000/s: {lat['count']}/{lat['expected']} received, p50 {lat['p50_ms']:.2f} ms, "
              f"p99 {lat['p99_ms']:.2f} ms, max {lat['max_ms']:.2f} ms", flush=True)
        i = idle(tmp, server, args.idle)
        print(f"idle {i['seconds']:.0f} s: commands {i['commands']}; events {i['events']}; "
              f"shell CPU {i['cpu_percent']:.2f} % of a core", flush=True)
        print(f"load average after: {os.getloadavg()}", flush=True)
    finally:
        server.kill()


if __name__ == "__main__":
    main()
