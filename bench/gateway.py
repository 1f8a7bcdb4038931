#!/usr/bin/env python3
"""The gateway's figures for docs/PERFORMANCE.md (issue 16): what it costs, and what a failover costs its clients.

    .venv/bin/python bench/gateway.py [--parts overhead,concurrency,failover] [--cluster] [--kills 10] [--quick]

About 14 minutes with --cluster (about 8 without it; --quick: about 2.5 without it). Needs root: the packet
capture of the overhead part, and --cluster (network namespaces, tc). Run it under `flock /work/heavy.lock`.

Real parts only: the project's App (registry, supervisor, the gateway's core and its HTTP endpoint on the
App's loop, as the shell runs it), the real llama-server with the demo model over three real
ggml-rpc-servers (`backends spawn 3`), and the clients in a process of their own (this script with
--client): httpx for the overhead and concurrency parts, the real `openai` and `ollama` packages for
the failover part. Every ratio is against a baseline measured in the same run.

- overhead: the same kind of request (a chat, greedy, streamed, `--tokens` tokens, a new nonce in each
  prompt so that no answer comes from the prompt cache) straight to llama-server's own
  /v1/chat/completions and through the gateway's, one at a time, the two sides alternating run by run.
  Time to first token and tokens/s as the client sees them (medians). What the gateway adds, on the
  wire: a packet capture on loopback (this script with --capture: AF_PACKET with a BPF filter on the
  two ports, kernel timestamps) gives when the client's request arrived, when the gateway sent its
  /apply-template and /completion on, when llama-server sent each chunk with text to the gateway and
  when the gateway sent it on to the client; and llama-server's own `timings`. Also the shell
  process's CPU and its time waiting for a CPU (/proc schedstat).
- concurrency: 8 clients streaming at once, straight and through the gateway, and one client alone,
  for each -np in --parallel (a new App with coordinator_parallel=N for each): aggregate tokens/s,
  llama-server's own per-request tokens/s (its log). At -np 4 a control: the 8 straight again while
  another process burns the CPU the gateway's process took more, at the gateway's pace.
- failover: 8 clients looping through the gateway (OpenAI and Ollama APIs, chat and completion,
  streamed and not, greedy and sampled) while a backend the coordinator holds is SIGKILLed --kills
  times: the failover to the two survivors, then the clients pause (a rebalance is refused while a
  request runs), a new backend is spawned, `coordinator rebalance`, the clients go on, the next
  kill. Then the baseline: the same with one streaming client alone (greedy, then sampled),
  --alone-kills each. With --cluster the same again over three nodes (`main.py node`) on simulated
  hosts behind 100 Mbit/s links (tests/cluster.py), killing a node's rpc-server (the node restarts
  it). Each request carries its own model name, so the gateway's `gateway/request` event says
  whether it was resumed. Reported: failed requests, streams resumed, the longest pause inside a
  resumed stream against that failover's own downtime (the `failover` event's downtime_s), greedy
  and sampled apart, and checks of the resumed text (nothing sent twice; greedy answers against the
  uninterrupted answers to the same prompt).
"""
from __future__ import annotations

import argparse
import asyncio
import ctypes
import io
import itertools
import json
import os
import random
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

SYSTEM = "You are a helpful assistant who tells long, detailed stories."
TOPICS = ["a dragon and a knight", "a lighthouse keeper", "a robot learning to paint", "two rival chefs",
          "a lost city under the sea", "a clockmaker's apprentice", "a storm at a mountain inn", "a talking fox"]
HEARTBEAT = 1.0


def story(nonce: str, topic: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"[{nonce}] Tell me a long story about {topic}."}]


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


# ================================================================ the client process (--client)

class Clients:
    """Everything the clients do, driven by JSON lines on stdin (one answer line each on stdout)."""

    def __init__(self) -> None:
        import httpx

        self.http = httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=300.0),
                                      limits=httpx.Limits(max_connections=64, max_keepalive_connections=64))
        self.records: list[dict[str, Any]] = []
        self.loops: list[asyncio.Task] = []
        self.running = asyncio.Event()
        self.active = 0
        self.idle = asyncio.Event()
        self.stopping = False

    # -------------------------------------------------------- overhead and concurrency: raw SSE over httpx

    async def chat_stream(self, base: str, messages: list[dict[str, str]], tokens: int) -> dict[str, Any]:
        body = {"model": "bench", "messages": messages, "temperature": 0, "max_tokens": tokens, "stream": True}
        chunks: list[float] = []
        text: list[str] = []
        t0 = time.time()
        async with self.http.stream("POST", base + "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"{base}: {response.status_code} {(await response.aread())[:200]!r}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                obj = json.loads(line[6:])
                if "error" in obj:
                    raise RuntimeError(f"{base}: {obj['error']}")
                content = obj["choices"][0]["delta"].get("content") if obj.get("choices") else None
                if content:
                    chunks.append(time.time())
                    text.append(content)
        return {"t0": t0, "end": time.time(), "chunks": chunks, "text": "".join(text)}

    async def burst(self, base: str, prompts: list[list[dict[str, str]]], tokens: int) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(self.chat_stream(base, p, tokens) for p in prompts)))

    # -------------------------------------------------------- failover: the real openai and ollama clients

    async def load(self, url: str, specs: list[dict[str, Any]], tokens: int) -> None:
        import ollama
        import openai

        oa = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300.0)
        ol = ollama.AsyncClient(host=url, timeout=300.0)
        self.running.set()
        for i, spec in enumerate(specs):
            self.loops.append(asyncio.ensure_future(self._loop(i, spec, oa, ol, tokens)))

    async def _loop(self, i: int, spec: dict[str, Any], oa: Any, ol: Any, tokens: int) -> None:
        seq = 0
        while True:
            await self.running.wait()
            if self.stopping:
                return
            seq += 1
            topic = TOPICS[(i + seq) % 3 + (i % 2) * 3]     # greedy clients come back to the same prompts
            rec: dict[str, Any] = {"client": i, **spec, "tag": f"bench-{i}-{seq}", "topic": topic, "t0": time.time(),
                                   "chunks": [], "ok": False}
            self.active += 1
            self.idle.clear()
            try:
                rec["text"] = await self._one(spec, rec, topic, oa, ol, tokens)
                rec["ok"] = True
            except Exception as exc:  # every failure is a figure: kept with its record
                rec["error"] = f"{type(exc).__name__}: {exc}"[:300]
            finally:
                rec["end"] = time.time()
                self.active -= 1
                self.records.append(rec)
                if not self.active:
                    self.idle.set()

    async def _one(self, spec: dict[str, Any], rec: dict[str, Any], topic: str, oa: Any, ol: Any, tokens: int) -> str:
        temperature = 0.0 if spec["greedy"] else 0.8
        stream, tag, out = spec["stream"], rec["tag"], []
        messages = [{"role": "user", "content": f"Tell me a long story about {topic}."}]
        prompt = f"Once upon a time, {topic}"

        def got(text: str | None) -> None:
            if text:
                rec["chunks"].append(time.time())
                out.append(text)
                rec["pieces"] = out

        if spec["api"] == "openai" and spec["route"] == "chat":
            answer = await oa.chat.completions.create(model=tag, messages=messages, temperature=temperature,
                                                      max_tokens=tokens, stream=stream)
            if not stream:
                return answer.choices[0].message.content or ""
            async for chunk in answer:
                if chunk.choices:
                    got(chunk.choices[0].delta.content)
        elif spec["api"] == "openai":
            answer = await oa.completions.create(model=tag, prompt=prompt, temperature=temperature, max_tokens=tokens,
                                                 stream=stream)
            if not stream:
                return answer.choices[0].text
            async for chunk in answer:
                if chunk.choices:
                    got(chunk.choices[0].text)
        else:
            options = {"temperature": temperature, "num_predict": tokens}
            if spec["route"] == "chat":
                answer = await ol.chat(model=tag, messages=messages, stream=stream, options=options)
                if not stream:
                    return answer.message.content or ""
                async for part in answer:
                    got(part.message.content)
            else:
                answer = await ol.generate(model=tag, prompt=prompt, stream=stream, options=options)
                if not stream:
                    return answer.response
                async for part in answer:
                    got(part.response)
        return "".join(out)

    async def pause(self) -> None:
        self.running.clear()
        if self.active:
            await self.idle.wait()

    async def handle(self, msg: dict[str, Any]) -> Any:
        op = msg["op"]
        if op == "stream":
            return await self.chat_stream(msg["base"], msg["messages"], msg["tokens"])
        if op == "burst":
            return await self.burst(msg["base"], msg["prompts"], msg["tokens"])
        if op == "load":
            await self.load(msg["url"], msg["specs"], msg["tokens"])
            return True
        if op == "pause":
            t0 = time.time()
            await self.pause()
            return {"paused_s": time.time() - t0}
        if op == "resume":
            self.running.set()
            return True
        if op == "finish":
            self.stopping = True
            await self.pause()
            self.running.set()
            await asyncio.gather(*self.loops)
            records, self.records, self.loops, self.stopping = self.records, [], [], False
            return records
        raise ValueError(op)


async def client_main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    clients = Clients()
    while line := await reader.readline():
        msg = json.loads(line)
        try:
            answer = {"ok": await clients.handle(msg)}
        except Exception as exc:  # the bench says what went wrong
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
    await clients.http.aclose()


SCRIPT = str(Path(__file__).resolve())


class ClientProcess:
    """The bench's end of the client process."""

    async def start(self) -> ClientProcess:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, SCRIPT, "--client", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            limit=2**26)
        return self

    async def call(self, **msg: Any) -> Any:
        self.proc.stdin.write(json.dumps(msg).encode() + b"\n")
        await self.proc.stdin.drain()
        line = await self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the client process ended")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"client: {answer['error']}")
        return answer["ok"]

    async def close(self) -> None:
        self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


# ================================================================ the packet capture (--capture)

def capture_main(ports: list[int]) -> None:
    """Every TCP segment with data from or to one of `ports`, as sent on loopback, with the kernel's
    timestamp. Until stdin closes; then one JSON list on stdout of (ts, sport, dport, request line
    or "", chunks with text in it, llama-server's predicted_per_second if the segment has its timings)."""
    import threading

    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    # BPF: IPv4, TCP, source or destination port in ports, with data (the kernel drops the rest: the
    # RPC traffic, the ACKs), so that the capture wakes only for what it records
    p1, p2 = (ports + ports)[:2]
    prog = [(0x28, 0, 0, 12), (0x15, 0, 19, 0x800),            # 0: ethertype IPv4, else drop (21)
            (0x30, 0, 0, 23), (0x15, 0, 17, 6),                # 2: protocol TCP
            (0xb1, 0, 0, 14),                                  # 4: X = IP header length
            (0x48, 0, 0, 14), (0x15, 4, 0, p1), (0x15, 3, 0, p2),   # 5: source port -> 11
            (0x48, 0, 0, 16), (0x15, 1, 0, p1), (0x15, 0, 10, p2),  # 8: destination port -> 11, else drop
            (0x28, 0, 0, 16), (0x02, 0, 0, 0),                 # 11: M[0] = IP total length
            (0x50, 0, 0, 26), (0x54, 0, 0, 0xF0), (0x74, 0, 0, 2),  # 13: A = TCP header length
            (0x0C, 0, 0, 0), (0x07, 0, 0, 0), (0x60, 0, 0, 0),  # 16: X = A + X; A = M[0]
            (0x2D, 0, 1, 0),                                   # 19: data (total > headers)? else drop
            (0x06, 0, 0, 0xFFFF), (0x06, 0, 0, 0)]
    buf = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *ins) for ins in prog))
    sock.setsockopt(socket.SOL_SOCKET, 26, struct.pack("HL", len(prog), ctypes.addressof(buf)))  # SO_ATTACH_FILTER
    sock.bind(("lo", 0))
    sock.setsockopt(socket.SOL_SOCKET, 35, 1)                                                     # SO_TIMESTAMPNS
    sock.settimeout(0.2)
    done = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    print("ready", flush=True)
    out = []
    while not done.is_set():
        try:
            data, anc, _flags, addr = sock.recvmsg(65536, 256)
        except TimeoutError:
            continue
        if addr[2] != 4:             # loopback shows each packet twice: keep the outgoing copy
            continue
        ip = data[14:]
        tcp = ip[(ip[0] & 15) * 4:]
        payload = tcp[(tcp[12] >> 4) * 4:]
        if not payload:
            continue
        sport, dport = struct.unpack("!HH", tcp[:4])
        if sport not in ports and dport not in ports:     # seen before the filter was attached
            continue
        sec, nsec = next(struct.unpack("qq", v[:16]) for _level, kind, v in anc if kind == 35)
        head = payload.split(b"\r\n", 1)[0].decode("latin-1") if payload.startswith(b"POST ") else ""
        n, speed = sse_events(payload)
        out.append((sec + nsec / 1e9, sport, dport, head, n, speed))
    sys.stdout.write(json.dumps(out) + "\n")


def sse_events(payload: bytes) -> tuple[int, float | None]:
    """SSE events with text in a segment (llama-server's /completion chunks: "content"; OpenAI chat
    chunks: choices[0].delta.content), and llama-server's own generation speed if its timings are there."""
    n, speed = 0, None
    for part in payload.split(b"data: ")[1:]:
        try:
            obj = json.loads(part.split(b"\n", 1)[0])
        except ValueError:
            continue
        if not isinstance(obj, dict):
            continue
        choices = obj.get("choices")
        n += bool((choices[0].get("delta") or {}).get("content") if choices else obj.get("content"))
        if isinstance(obj.get("timings"), dict) and obj["timings"].get("predicted_per_second"):
            speed = obj["timings"]["predicted_per_second"]
    return n, speed


class Capture:
    def __init__(self, ports: list[int]) -> None:
        self.proc = subprocess.Popen([sys.executable, SCRIPT, "--capture",
                                      ",".join(map(str, ports))], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdout.readline().strip() == b"ready"

    def stop(self) -> list[list]:
        out, _ = self.proc.communicate(b"", timeout=30)
        return json.loads(out)


# ================================================================ the App

def make_app(tmp: Path, parallel: int = 4, **values):
    from support import free_port

    from synapticllamas.app import App
    from synapticllamas.config import load_settings
    from synapticllamas.ui import PlainUI

    tmp.mkdir(parents=True, exist_ok=True)
    config = tmp / "config.toml"
    config.write_text("")
    settings = load_settings({}, env={}, config_path=str(config)).replace(
        distributed=True, backends_file=str(tmp / "backends.conf"), coordinator_args="-t 1",
        rpc_backend_heartbeat=False, coordinator_backoff=0.1, placement="memory", history_file=str(tmp / "history"),
        log_file=str(tmp / "log"), gateway_port=free_port(), coordinator_parallel=parallel, **values)
    return App(settings, PlainUI(io.StringIO()))


async def local_app(tmp: Path, parallel: int):
    app = make_app(tmp, parallel)
    await app.start()
    await app.local_backends.spawn(3)
    await app.coordinator.start()
    problem = app.open_gateway()
    assert problem is None, problem
    return app


async def warm(clients: ClientProcess, app, tokens: int) -> None:
    for base in (app.coordinator.status()["url"], app.gateway_url):
        for k in range(2):
            await clients.call(op="stream", base=base, messages=story(f"warm{k}", TOPICS[k]), tokens=tokens)


# ================================================================ part 1: overhead

def run_queue_wait() -> float:
    """Seconds this process's threads have waited for a CPU, runnable (/proc schedstat)."""
    total = 0
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/schedstat") as fh:
                total += int(fh.read().split()[1])
        except (OSError, IndexError, ValueError):
            pass
    return total / 1e9


def tps(r: dict[str, Any]) -> float:
    c = r["chunks"]
    return (len(c) - 1) / (c[-1] - c[0])


async def overhead(tmp: Path, runs: int, tokens: int) -> dict[str, Any]:
    clients = await ClientProcess().start()
    app = await local_app(tmp / "overhead", 4)
    try:
        direct, gw = app.coordinator.status()["url"], app.gateway_url
        llama_port, gw_port = int(direct.rsplit(":", 1)[1]), int(gw.rsplit(":", 1)[1])
        await warm(clients, app, tokens)
        capture = Capture([gw_port, llama_port])
        results: dict[str, list[dict]] = {"direct": [], "gateway": []}
        try:
            for run in range(runs):
                order = ("direct", "gateway") if run % 2 == 0 else ("gateway", "direct")
                for side in order:
                    cpu, wait = time.process_time(), run_queue_wait()   # this process: the App and its gateway
                    r = await clients.call(op="stream", base=direct if side == "direct" else gw,
                                           messages=story(f"{side[0]}{run}", TOPICS[run % len(TOPICS)]), tokens=tokens)
                    r["app_cpu_s"], r["app_wait_s"] = time.process_time() - cpu, run_queue_wait() - wait
                    results[side].append(r)
        finally:
            packets = capture.stop()
        wire(results, packets, llama_port, gw_port)
        return {"results": results, "packets": len(packets)}
    finally:
        await app.close()
        await clients.close()


def wire(results: dict[str, list[dict]], packets: list[list], llama_port: int, gw_port: int) -> None:
    """Per run, from the capture: when the request reached the server (the client's POST), when the
    gateway sent its /completion on, when the first chunk with text left llama-server and when it
    left the gateway; the time each chunk spent in the gateway; llama-server's own tokens/s."""
    for side, rs in results.items():
        port = gw_port if side == "gateway" else llama_port
        for r in rs:
            lo, hi = r["t0"] - 0.001, r["end"] + 0.05
            seg = [p for p in packets if lo <= p[0] <= hi]
            r["t_in"] = next((p[0] for p in seg if p[2] == port and p[3].startswith("POST ")), None)
            up = [p[0] for p in seg if p[1] == llama_port for _ in range(p[4])]
            speeds = [p[5] for p in seg if p[1] == llama_port and p[5]]
            r["server_tps"] = speeds[-1] if speeds else None
            if side == "direct":
                r["first_out"] = up[0] if up else None
                continue
            down = [p[0] for p in seg if p[1] == gw_port for _ in range(p[4])]
            r["t_send"] = next((p[0] for p in seg if p[2] == llama_port and p[3].startswith("POST /completion")), None)
            tmpl = next((p[0] for p in seg if p[2] == llama_port and p[3].startswith("POST /apply-template")), None)
            back = next((p[0] for p in seg if tmpl and p[1] == llama_port and p[0] > tmpl), None)
            r["template_s"] = back - tmpl if tmpl and back else None
            r["to_template_s"] = tmpl - r["t_in"] if tmpl and r["t_in"] else None
            r["template_to_send_s"] = r["t_send"] - back if back and r["t_send"] else None
            r["first_up"] = up[0] if up else None
            r["first_out"] = down[0] if down else None
            r["added"] = [d - u for u, d in zip(up, down, strict=False)]
            r["unpaired"] = abs(len(up) - len(down)) + abs(len(down) - len(r["chunks"]))


def report_overhead(o: dict[str, Any], tokens: int) -> None:
    d, g = o["results"]["direct"], o["results"]["gateway"]

    def med(rs: list[dict], f) -> float:
        return statistics.median(f(r) for r in rs)

    ttft_d, ttft_g = med(d, lambda r: r["chunks"][0] - r["t0"]), med(g, lambda r: r["chunks"][0] - r["t0"])
    tps_d, tps_g = med(d, tps), med(g, tps)
    gaps_d = [b - a for r in d for a, b in itertools.pairwise(r["chunks"])]
    gaps_g = [b - a for r in g for a, b in itertools.pairwise(r["chunks"])]
    gap99_d, gap99_g = pct(gaps_d, 99), pct(gaps_g, 99)
    gapmed_d, gapmed_g = statistics.median(gaps_d), statistics.median(gaps_g)
    chunks = statistics.median(len(r["chunks"]) for r in d + g)
    a = [1000 * x for r in g for x in r.get("added", [])]
    print(f"\nOverhead: {len(d)} runs per side, alternating; greedy chat, {tokens} tokens asked ({chunks:g} chunks "
          "with text, median); medians over the runs\n")
    print("| what | straight to llama-server | through the gateway | gateway / straight | target |")
    print("|---|---|---|---|---|")
    print(f"| time to first token | {1000 * ttft_d:.1f} ms | {1000 * ttft_g:.1f} ms | {ttft_g / ttft_d:.3f}x "
          f"(+{1000 * (ttft_g - ttft_d):.1f} ms) | speed >= 0.97x, i.e. <= {1 / 0.97:.3f}x |")
    print(f"| tokens/s (client: chunks 2..n over their time) | {tps_d:.1f} | {tps_g:.1f} | {tps_g / tps_d:.3f}x | "
          ">= 0.97x |")
    print(f"| gap between chunks at the client, median | {1000 * gapmed_d:.2f} ms | {1000 * gapmed_g:.2f} ms | "
          f"{1000 * (gapmed_g - gapmed_d):+.2f} ms | |")
    print(f"| gap between chunks at the client, p99 (all {len(gaps_d)} / {len(gaps_g)} gaps) | {1000 * gap99_d:.2f} ms | "
          f"{1000 * gap99_g:.2f} ms | {1000 * (gap99_g - gap99_d):+.2f} ms | <= +2 ms |")
    if a:
        print(f"| time in the gateway per chunk with text (on the wire: llama-server sends it -> the gateway "
              f"sends it on), {len(a)} chunks | | median {statistics.median(a):.2f} ms, p99 {pct(a, 99):.2f} ms, "
              f"max {max(a):.2f} ms | | p99 <= 2 ms |")
    wired = [r for r in g if r.get("t_in") and r.get("t_send") and r.get("first_up") and r.get("first_out")]
    if wired:
        before = med(wired, lambda r: r["t_send"] - r["t_in"])
        tmpl = med([r for r in wired if r.get("template_s")], lambda r: r["template_s"])
        after = med(wired, lambda r: r["first_out"] - r["first_up"])
        srv_d = med([r for r in d if r.get("t_in") and r.get("first_out")], lambda r: r["first_out"] - r["t_in"])
        srv_g = med(wired, lambda r: r["first_out"] - r["t_in"])
        print(f"| time to first token on the wire (request in -> first chunk with text out of the server) | "
              f"{1000 * srv_d:.1f} ms | {1000 * srv_g:.1f} ms | {srv_g / srv_d:.3f}x | |")
        to_t = med([r for r in wired if r.get("to_template_s")], lambda r: r["to_template_s"])
        t_to = med([r for r in wired if r.get("template_to_send_s")], lambda r: r["template_to_send_s"])
        print(f"| of which in the gateway (on the wire): request in -> its /completion out; + first chunk in -> "
              f"out | | {1000 * before:.2f} ms + {1000 * after:.2f} ms = {1000 * (before + after):.2f} ms | | |")
        print(f"| the first part: request in -> /apply-template out; its round trip (llama-server renders the "
              f"chat); answer in -> /completion out | | {1000 * to_t:.2f} ms; {1000 * tmpl:.2f} ms; {1000 * t_to:.2f} "
              "ms | | |")
    sd = [r["server_tps"] for r in d if r.get("server_tps")]
    sg = [r["server_tps"] for r in g if r.get("server_tps")]
    if sd and sg:
        print(f"| llama-server's own generation tokens/s (its `timings`) | {statistics.median(sd):.1f} | "
              f"{statistics.median(sg):.1f} | {statistics.median(sg) / statistics.median(sd):.3f}x | |")
    cpu_d = med(d, lambda r: r["app_cpu_s"] / len(r["chunks"]))
    cpu_g = med(g, lambda r: r["app_cpu_s"] / len(r["chunks"]))
    wait_d = med(d, lambda r: r["app_wait_s"] / len(r["chunks"]))
    wait_g = med(g, lambda r: r["app_wait_s"] / len(r["chunks"]))
    print(f"| CPU of the shell's process (the App; the gateway on its loop) per chunk | {1000 * cpu_d:.2f} ms | "
          f"{1000 * cpu_g:.2f} ms | +{1000 * (cpu_g - cpu_d):.2f} ms | |")
    print(f"| the shell's process runnable but waiting for a CPU (run queue, /proc schedstat) per chunk | "
          f"{1000 * wait_d:.2f} ms | {1000 * wait_g:.2f} ms | +{1000 * (wait_g - wait_d):.2f} ms | |")
    unpaired = sum(r.get("unpaired", 0) for r in g)
    if unpaired:
        print(f"  ({unpaired} chunks could not be paired on the wire)")


# ================================================================ part 2: concurrency

CONTROL_NP = 4
BURNER = """
import sys, time
spin, rest = float(sys.argv[1]), float(sys.argv[2])
while True:
    t = time.perf_counter()
    while time.perf_counter() - t < spin:
        pass
    time.sleep(rest)
"""


async def concurrency(tmp: Path, parallels: list[int], runs: int, tokens: int, n: int) -> dict[int, dict]:
    clients = await ClientProcess().start()
    out: dict[int, dict] = {}
    try:
        for np_ in parallels:
            app = await local_app(tmp / f"np{np_}", np_)
            try:
                direct, gw = app.coordinator.status()["url"], app.gateway_url
                await warm(clients, app, 16)
                seen: list[tuple[float, float]] = []      # llama-server's own per-request tokens/s (its log)
                app.observer.add_sink(lambda e, seen=seen: seen.append((e.timestamp, e.details.get(
                    "tokens_per_second") or 0)) if (e.component, e.event_type) == ("coordinator", "inference") else None)
                res: dict[str, list[float]] = {"direct": [], "gateway": [], "direct1": [], "gateway1": [],
                                               "direct1b": [], "gateway1b": [], "burn": []}
                own: dict[str, list[float]] = {k: [] for k in res}
                cpu: dict[str, list[float]] = {k: [] for k in res}
                for run in range(runs):
                    # each side: its burst, then one client alone twice (the first right after the burst,
                    # the second after it); every burst follows a lone request, every lone one its side's burst
                    # and at the default -np the control: straight again, with a process burning the CPU the
                    # gateway's process took more than when straight, at the gateway's pace
                    first, second = ("direct", "gateway") if run % 2 == 0 else ("gateway", "direct")
                    control = ["burn"] if np_ == CONTROL_NP else []
                    for side in (first, first + "1", first + "1b", second, second + "1", second + "1b", *control):
                        base = gw if side.startswith("gateway") else direct
                        k = 1 if side[-1] in "1b" else n
                        prompts = [story(f"{side}{run}-{i}", TOPICS[i % len(TOPICS)]) for i in range(k)]
                        burner = None
                        if side == "burn":
                            spin = max(0.0, cpu["gateway"][-1] - cpu["direct"][-1])
                            burner = await asyncio.create_subprocess_exec(
                                sys.executable, "-c", BURNER, str(spin), str(max(0.0, 1 / res["gateway"][-1] - spin)))
                        c0 = time.process_time()
                        try:
                            rs = await clients.call(op="burst", base=base, prompts=prompts, tokens=tokens)
                        finally:
                            if burner is not None:
                                burner.kill()
                                await burner.wait()
                        total = sum(len(r["chunks"]) for r in rs)
                        t0, t1 = min(r["t0"] for r in rs), max(r["chunks"][-1] for r in rs)
                        res[side].append(total / (t1 - t0))
                        cpu[side].append((time.process_time() - c0) / total)
                        await asyncio.sleep(0.05)           # its last log line
                        own[side] += [v for ts, v in seen if t0 <= ts <= t1 + 0.05 and v]
                out[np_] = {"aggregate": res, "own": own, "cpu": cpu}
                print(f"  -np {np_}: " + ", ".join(f"{k} {statistics.median(v):.1f}" for k, v in res.items() if v)
                      + "; llama-server's own per request: " + ", ".join(
                          f"{k} {statistics.median(v):.1f}" for k, v in own.items() if v), file=sys.stderr, flush=True)
            finally:
                await app.close()
    finally:
        await clients.close()
    return out


def report_concurrency(c: dict[int, dict], n: int, tokens: int, runs: int) -> None:
    print(f"\nConcurrency: {n} clients streaming at once ({tokens} tokens each, greedy), aggregate tokens/s = all "
          f"chunks with text / (last chunk - first request); one client alone for comparison; {runs} runs each, "
          "medians\n")
    print(f"| -np (coordinator_parallel) | {n} straight to llama-server | {n} through the gateway | gateway / "
          f"straight | 1 client alone, straight | 1 client alone, gateway | {n} through the gateway / 1 alone "
          f"through it | 1 alone right after a burst: straight / gateway |")
    print("|---|---|---|---|---|---|---|---|")
    for np_, r in c.items():
        m = {k: statistics.median(v) for k, v in r["aggregate"].items() if v}
        print(f"| {np_}{' (default)' if np_ == 4 else ''} | {m['direct']:.1f} | {m['gateway']:.1f} | "
              f"{m['gateway'] / m['direct']:.3f}x | {m['direct1b']:.1f} | {m['gateway1b']:.1f} | "
              f"{m['gateway'] / m['gateway1b']:.2f}x | {m['direct1']:.1f} / {m['gateway1']:.1f} |")
    for np_, r in c.items():
        if r["aggregate"].get("burn"):
            m = {k: statistics.median(v) for k, v in r["aggregate"].items() if v}
            extra = statistics.median(a - b for a, b in zip(r["cpu"]["gateway"], r["cpu"]["direct"], strict=True))
            print(f"\nControl at -np {np_}, same runs: {n} straight to llama-server while another process burns "
                  f"the CPU the gateway's process took more ({1000 * extra:.2f} ms per chunk at the gateway's "
                  f"pace): {m['burn']:.1f} tokens/s, {m['burn'] / m['direct']:.3f}x straight (the gateway: "
                  f"{m['gateway'] / m['direct']:.3f}x)")
    print("\nThe same bursts: llama-server's own generation tokens/s per request (its log's timings, median), "
          "and the CPU of the shell's process (the App and the gateway) per chunk\n")
    print(f"| -np | own tokens/s per request, {n} straight | {n} through the gateway | gateway / straight | "
          f"CPU per chunk, {n} straight | {n} through the gateway |")
    print("|---|---|---|---|---|---|")
    for np_, r in c.items():
        o = {k: statistics.median(v) if v else float("nan") for k, v in r["own"].items()}
        u = {k: 1000 * statistics.median(v) for k, v in r["cpu"].items() if v}
        print(f"| {np_} | {o['direct']:.1f} | {o['gateway']:.1f} | {o['gateway'] / o['direct']:.3f}x | "
              f"{u['direct']:.2f} ms | {u['gateway']:.2f} ms |")


# ================================================================ part 3: failover under load

SPECS = [  # 8 clients: 6 streamed (3 greedy, 3 sampled), 2 not; OpenAI and Ollama, chat and completion
    {"api": "openai", "route": "chat", "stream": True, "greedy": True},
    {"api": "openai", "route": "chat", "stream": True, "greedy": False},
    {"api": "ollama", "route": "chat", "stream": True, "greedy": True},
    {"api": "ollama", "route": "chat", "stream": True, "greedy": False},
    {"api": "openai", "route": "completion", "stream": True, "greedy": True},
    {"api": "ollama", "route": "generate", "stream": True, "greedy": False},
    {"api": "openai", "route": "chat", "stream": False, "greedy": False},
    {"api": "ollama", "route": "chat", "stream": False, "greedy": True},
]


async def kill_loop(app, clients: ClientProcess, kills: int, kill, bring_back, timeout: float, tokens: int,
                    seed: int, specs: list[dict[str, Any]]) -> dict[str, Any]:
    from support import until

    rng = random.Random(seed)
    events: list[dict[str, Any]] = []
    remove = app.observer.add_sink(lambda e: events.append(e.details) if (e.component, e.event_type) == (
        "gateway", "request") else None)
    failovers, pauses, rebalances = [], [], []
    totals = dict(app.gateway.totals)
    try:
        await clients.call(op="load", url=app.gateway_url, specs=specs, tokens=tokens)
        for i in range(kills):
            await asyncio.sleep(rng.uniform(1.0, 2.5))           # the streams are under way
            before = app.coordinator.last_failover
            victim = app.coordinator.run.plan.backends[i % len(app.coordinator.run.plan.backends)]
            at = time.time()
            kill(victim)
            try:
                await until(lambda b=before: app.coordinator.last_failover is not b
                            and str(app.coordinator.state) == "running", timeout, "the failover")
            except AssertionError:
                for e in [e for e in app.observer.buffer if e.component != "raw"][-30:]:
                    print("   ", e.component, e.event_type, e.message[:160], file=sys.stderr)
                raise
            failovers.append({**app.coordinator.last_failover, "kill_at": at})
            pauses.append((await clients.call(op="pause"))["paused_s"])
            await until(lambda: app.gateway.in_flight == 0, 60, "no request in flight")
            await bring_back()
            t0 = time.perf_counter()
            await app.coordinator.rebalance()
            rebalances.append(time.perf_counter() - t0)
            await clients.call(op="resume")
            print(f"  kill {i + 1}: downtime {failovers[-1]['downtime_s']:.2f} s, clients paused "
                  f"{pauses[-1]:.1f} s for the rebalance ({rebalances[-1]:.1f} s)", file=sys.stderr, flush=True)
        await asyncio.sleep(rng.uniform(1.0, 2.5))
        records = await clients.call(op="finish")
    finally:
        remove()
    return {"records": records, "events": events, "failovers": failovers, "pauses": pauses, "rebalances": rebalances,
            "gateway": {k: v - totals[k] for k, v in app.gateway.totals.items()}}


async def load_then_alone(app, clients, kills: int, alone_kills: int, kill, bring_back, timeout: float, tokens: int,
                          seeds: tuple[int, int], specs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """The kills under the full load, then (the baseline, with `alone_kills`) under one streaming
    client alone, greedy and sampled. `seeds`: the load's, and the first alone run's."""
    out = [(f"{len(specs)} clients", await kill_loop(app, clients, kills, kill, bring_back, timeout, tokens, seeds[0],
                                                      specs))]
    for i in (0, 1) if alone_kills else ():
        out.append((f"one client alone ({'greedy' if SPECS[i]['greedy'] else 'sampled'}, baseline)",
                    await kill_loop(app, clients, alone_kills, kill, bring_back, timeout, tokens, seeds[1] + i,
                                    [SPECS[i]])))
    return out


async def failover_local(tmp: Path, kills: int, tokens: int, specs: list[dict[str, Any]],
                         alone_kills: int) -> list[tuple[str, dict[str, Any]]]:
    """The kills under the full load, then (the baseline) under one streaming client alone, greedy and
    sampled: same App, same backends."""
    clients = await ClientProcess().start()
    app = await local_app(tmp / "failover", 4)
    try:
        async def bring_back() -> None:
            await app.local_backends.spawn(1)

        def kill(b: str) -> None:
            os.kill(app.local_backends.get(b).pid, signal.SIGKILL)

        return await load_then_alone(app, clients, kills, alone_kills, kill, bring_back, 60, tokens, (1, 3), specs)
    finally:
        await app.close()
        await clients.close()


async def failover_cluster(tmp: Path, kills: int, tokens: int, specs: list[dict[str, Any]],
                           alone_kills: int) -> list[tuple[str, dict[str, Any]]]:
    from cluster import SimulatedCluster
    from failover import insecure_nodes, kill_rpc_server
    from support import until

    with SimulatedCluster(3, rate_mbit=100) as cluster, insecure_nodes(cluster, tmp) as redis:
        clients = await ClientProcess().start()
        try:
            app = make_app(tmp / "cluster-app", redis_url=redis.url, rpc_backend_heartbeat_interval=HEARTBEAT)
            await app.start()
            try:
                await app.redis_on()
                await until(lambda: len(app.registry.healthy()) == 3, 60, "three nodes")
                await app.coordinator.start()
                assert app.open_gateway() is None

                def kill(address: str) -> None:     # the node's rpc-server: the node restarts it
                    kill_rpc_server(cluster, address)

                async def bring_back() -> None:
                    await until(lambda: len(app.registry.healthy()) == 3, 60, "the node's rpc-server back")

                return await load_then_alone(app, clients, kills, alone_kills, kill, bring_back, 120, tokens, (2, 5),
                                             specs)
            finally:
                await app.close()
        finally:
            await clients.close()


def analyse_failover(f: dict[str, Any]) -> dict[str, Any]:
    """Per request: its client's record and the gateway's event (by the model name it carried)."""
    by_tag = {e.get("model"): e for e in f["events"]}
    kills = [(fo["kill_at"], fo["downtime_s"], fo["at"]) for fo in f["failovers"]]
    rows = []
    for r in f["records"]:
        e = by_tag.get(r["tag"], {})
        row = {**r, "resumed": e.get("resumed", 0), "held": e.get("held", 0), "status": e.get("status"),
               "tokens": e.get("tokens")}
        hit = [k for k in kills if r["t0"] <= k[0] <= r["end"]]
        row["kill"] = hit[-1] if hit else None
        c = r["chunks"]
        if row["kill"] and c and c[0] < row["kill"][0]:
            # the longest gap ending after the kill (the client may still be reading chunks sent before it)
            at = row["kill"][0]
            pairs = [(a, b) for a, b in itertools.pairwise(c) if b >= at]
            row["delivered"] = sum(t < at for t in c)
            if pairs:
                a, b = max(pairs, key=lambda p: p[1] - p[0])
                row["pause"], row["after_serving"] = b - a, b - row["kill"][2]
                seam = c.index(b)
                head, rest = "".join(r["pieces"][:seam]), "".join(r["pieces"][seam:])
                row["restarted"] = len(head) >= 12 and rest.startswith(head)   # all of it sent again
        rows.append(row)
    return {"rows": rows}


def report_failover(where: str, f: dict[str, Any], tokens: int) -> None:
    rows = analyse_failover(f)["rows"]
    downs = [fo["downtime_s"] for fo in f["failovers"]]
    failed = [r for r in rows if not r["ok"]]
    print(f"\nFailover under load, {where}: {len(downs)} kills, {len({r['client'] for r in rows})} clients "
          f"({tokens} tokens each), "
          f"{len(rows)} requests, {len(failed)} failed; the gateway counted {f['gateway']}")
    print(f"failover downtime (the `failover` event's downtime_s): median {statistics.median(downs):.2f} s, max "
          f"{max(downs):.2f} s; clients paused for each rebalance: median {statistics.median(f['pauses']):.1f} s "
          f"(rebalance {statistics.median(f['rebalances']):.2f} s)\n")
    print("| requests | count | failed | resumed (gateway event) | of them cut mid-stream | longest pause in a "
          "stream (median / max) | pause - that failover's downtime (median / max) | of the pause: serving again "
          "-> next chunk (median / max) | chunks delivered before the cut (median) | pause <= downtime + 0.5 s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, pick in (("streamed, greedy (temperature 0)", lambda r: r["stream"] and r["greedy"]),
                        ("streamed, sampled (temperature 0.8)", lambda r: r["stream"] and not r["greedy"]),
                        ("not streamed", lambda r: not r["stream"])):
        rs = [r for r in rows if pick(r)]
        resumed = [r for r in rs if r["resumed"]]
        mid = [r for r in rs if r.get("pause") is not None]
        if mid:
            p = [r["pause"] for r in mid]
            over = [r["pause"] - r["kill"][1] for r in mid]
            within = sum(o <= 0.5 for o in over)
            after = [r["after_serving"] for r in mid]
            pause = f"{statistics.median(p):.2f} s / {max(p):.2f} s"
            extra = f"{statistics.median(over):+.2f} s / {max(over):+.2f} s"
            tail = f"{statistics.median(after):.2f} s / {max(after):.2f} s"
            delivered = f"{statistics.median(r['delivered'] for r in mid):g}"
            ok = f"{within} of {len(mid)}"
        else:
            pause = extra = tail = delivered = ok = "-"
        print(f"| {label} | {len(rs)} | {sum(not r['ok'] for r in rs)} | {len(resumed)} | "
              f"{len(mid) if rs and rs[0]['stream'] else '-'} | {pause} | {extra} | {tail} | {delivered} | {ok} |")
    # greedy answers: a resumed one against the uninterrupted answers to the same prompt
    greedy = [r for r in rows if r["greedy"] and r["ok"]]
    same = differ = 0
    for r in greedy:
        if not r["resumed"]:
            continue
        refs = {x["text"] for x in greedy if not x["resumed"] and x["client"] == r["client"] and x["topic"] == r["topic"]}
        if refs:
            same += r["text"] in refs
            differ += r["text"] not in refs
    plain = {}
    for r in greedy:
        if not r["resumed"]:
            plain.setdefault((r["client"], r["topic"]), set()).add(r["text"])
    # the resume's own doing: against uninterrupted answers that match what was delivered before the cut
    agreed = kept = 0
    for r in greedy:
        if r.get("pieces") and r.get("pause") is not None:
            head = "".join(r["pieces"][:r["delivered"]])
            refs = [t for t in plain.get((r["client"], r["topic"]), ()) if t.startswith(head)]
            agreed += bool(refs)
            kept += r["text"] in refs
    print(f"\ngreedy answers after a resume identical to an uninterrupted answer to the same prompt: {same} of "
          f"{same + differ}; prompts whose uninterrupted greedy answers were all identical: "
          f"{sum(len(v) == 1 for v in plain.values())} of {len(plain)}; greedy streams cut mid-stream whose text "
          f"before the cut matched an uninterrupted answer: {agreed}, of which identical to it after the cut "
          f"too: {kept}")
    mid = [r for r in rows if r.get("pause") is not None]
    print(f"resumed streams whose text after the cut repeats all the text before it (sent twice): "
          f"{sum(r['restarted'] for r in mid)} of {len(mid)}")
    over_budget = [r for r in rows if r["ok"] and r["stream"] and len(r["chunks"]) > tokens]
    if over_budget:
        print(f"streams with more chunks than the {tokens} tokens allowed: {len(over_budget)}")
    for r in failed[:5]:
        print(f"  failed: {r['tag']} {r['api']} {r['route']} stream={r['stream']}: {r.get('error')}")


# ================================================================ main

def dump(path: str, what: Any) -> None:
    with open(path, "w") as fh:
        json.dump(what, fh)


async def main_async(args: argparse.Namespace, tmp: Path) -> None:
    parts = args.parts.split(",")
    started = time.monotonic()
    stamp = time.strftime("%Y-%m-%d %H:%M")
    print(f"{stamp}; load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} cores")
    if "overhead" in parts:
        o = await overhead(tmp, args.runs, args.tokens)
        if args.dump:
            dump(args.dump + ".overhead.json", o)
        report_overhead(o, args.tokens)
        print(f"(load average now {os.getloadavg()[0]:.2f}; {time.monotonic() - started:.0f} s so far)")
    if "concurrency" in parts:
        parallels = [int(x) for x in args.parallel.split(",")]
        c = await concurrency(tmp, parallels, args.conc_runs, args.conc_tokens, 8)
        if args.dump:
            dump(args.dump + ".concurrency.json", c)
        report_concurrency(c, 8, args.conc_tokens, args.conc_runs)
        print(f"(load average now {os.getloadavg()[0]:.2f}; {time.monotonic() - started:.0f} s so far)")
    if "failover" in parts:
        specs = [SPECS[int(i)] for i in args.clients.split(",")]

        def failed_over(fs: list[tuple[str, dict[str, Any]]], suffix: str, where: str) -> None:
            if args.dump:
                dump(f"{args.dump}.{suffix}.json", fs)
            for label, f in fs:
                report_failover(f"{where}, {label}", f, args.fail_tokens)
            print(f"(load average now {os.getloadavg()[0]:.2f}; {time.monotonic() - started:.0f} s so far)")

        failed_over(await failover_local(tmp, args.kills, args.fail_tokens, specs, args.alone_kills),
                    "local", "three local backends")
        if args.cluster:
            failed_over(await failover_cluster(tmp, args.kills, args.fail_tokens, specs, args.cluster_alone_kills),
                        "cluster", "three nodes behind 100 Mbit/s links")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        asyncio.run(client_main())
        return
    if len(sys.argv) > 2 and sys.argv[1] == "--capture":
        capture_main([int(p) for p in sys.argv[2].split(",")])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="overhead,concurrency,failover")
    ap.add_argument("--cluster", action="store_true", help="the failover part also over three nodes at 100 Mbit/s")
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--runs", type=int, default=30, help="overhead: requests per side")
    ap.add_argument("--tokens", type=int, default=128, help="overhead: tokens per request")
    ap.add_argument("--parallel", default="1,2,4,8", help="concurrency: the -np values to try")
    ap.add_argument("--conc-runs", type=int, default=3)
    ap.add_argument("--conc-tokens", type=int, default=96)
    ap.add_argument("--fail-tokens", type=int, default=64)
    ap.add_argument("--clients", default="0,1,2,3,4,5,6,7", help="failover: which of the 8 clients (SPECS) run")
    ap.add_argument("--alone-kills", type=int, default=2, help="failover: kills under one client alone (baseline)")
    ap.add_argument("--cluster-alone-kills", type=int, default=0, help="the same over the cluster (about 20 s each)")
    ap.add_argument("--dump", help="failover: write the records and events to DUMP.local.json (.cluster.json)")
    ap.add_argument("--quick", action="store_true", help="6 runs, -np 4 only, 1 concurrency run, 3 kills")
    args = ap.parse_args()
    if args.quick:
        args.runs, args.parallel, args.conc_runs, args.kills, args.alone_kills = 6, "4", 1, 3, 2
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["XDG_CACHE_HOME"] = str(Path(tmp) / "cache")
        asyncio.run(main_async(args, Path(tmp)))


if __name__ == "__main__":
    main()
