#!/usr/bin/env python3
"""Which authenticated, encrypted link goes in front of rpc-server: the figures behind the choice in
docs/ARCHITECTURE.md ("RPC links").

    .venv/bin/python bench/links.py [--mib 256] [--slow-mib 24] [--trips 2000] [--only plain,stunnel]

About a minute and a half. Needs root for the 100 Mbit/s part (a simulated host, tests/cluster.py).

Candidates, each as the pair of processes a deployment would run (client end on the coordinator's
host, server end in front of the service):
- plain: no link, the baseline;
- spiped: Debian's spiped 1.6 (-e / -d, the key file as it is);
- stunnel: Debian's stunnel4 5.68, TLS 1.3 with a pre-shared key (OpenSSL; X25519 + AES-128-GCM);
- python-tls: an asyncio proxy at each end with Python's ssl (TLS 1.3, a pinned self-signed
  certificate: Python 3.11 has no PSK), standing for "TLS from Python's ssl".

The service behind the link is this script in a child process: a sink (reads and counts) for the
throughput, a ping-pong server for round trips. Measured per candidate, in one run:
- throughput: `mib` MiB sent through the link on loopback, `slow_mib` MiB over a 100 Mbit/s tbf link
  (the server end and the service in a simulated host, the client end in the root namespace);
- round trip: `trips` request/reply exchanges of 64 B / 64 B and of 4 KiB / 4 KiB (llama.cpp RPC does
  about one blocking exchange per remote stage per token, a few KiB of activations), on one
  connection with TCP_NODELAY: median and p99, and what the link adds to the plain median;
- connect: time from connect() to the first reply on a new connection (a coordinator start opens one
  per backend), median of 20;
- CPU: user + system seconds of the link's processes (both ends) per GiB moved, and per 1000 round trips.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from support import cpu_seconds, free_port, wait_for  # noqa: E402

MIB = 2 ** 20
CANDIDATES = ("plain", "spiped", "stunnel", "python-tls")


# ---------------------------------------------------------------- the service behind the link

def serve(kind: str, host: str, port: int) -> None:
    """sink: read what the client announced, answer b"ok". pong: echo fixed-size replies."""
    listener = socket.create_server((host, port))
    while True:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            if kind == "sink":              # a length, then that many bytes (TLS ends cannot half-close)
                head = _exactly(conn, 8)
                left = int.from_bytes(head, "big") if head else 0
                buf = bytearray(MIB)
                while left > 0:
                    n = conn.recv_into(buf, min(left, MIB))
                    if not n:
                        break
                    left -= n
                conn.sendall(b"ok")
            else:
                while True:
                    head = _exactly(conn, 4)
                    if head is None:
                        break
                    size = int.from_bytes(head, "big")
                    if _exactly(conn, size) is None:
                        break
                    conn.sendall(bytes(size))


def _exactly(conn: socket.socket, n: int) -> bytes | None:
    data = bytearray()
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data)


# ---------------------------------------------------------------- python-tls ends

def python_tls(role: str, listen: str, target: str, cert: str, key: str) -> None:
    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(256 * 1024):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    def context(side: int) -> ssl.SSLContext:
        ctx = ssl.SSLContext(side)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(cert, key)
        ctx.load_verify_locations(cert)         # the one certificate both ends hold: pinned
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.check_hostname = False
        return ctx

    client_ctx, server_ctx = context(ssl.PROTOCOL_TLS_CLIENT), context(ssl.PROTOCOL_TLS_SERVER)
    thost, tport = target.rsplit(":", 1)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        r2, w2 = await asyncio.open_connection(thost, int(tport), ssl=client_ctx if role == "client" else None)
        w2.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.gather(pump(reader, w2), pump(r2, writer))

    async def main() -> None:
        lhost, lport = listen.rsplit(":", 1)
        server = await asyncio.start_server(handle, lhost, int(lport), ssl=server_ctx if role == "server" else None)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


# ---------------------------------------------------------------- setting a candidate up

class Link:
    """One candidate between a client in this process and the service at (svc_host, svc_port)."""

    def __init__(self, kind: str, tmp: Path, run_server, server_host: str, svc_port: int) -> None:
        self.kind, self.tmp = kind, tmp
        self.procs: list[subprocess.Popen] = []
        self.run_server = run_server          # popen in the service's namespace
        if kind == "plain":
            self.address = (server_host, svc_port)
            return
        front, local = free_port(), free_port()
        self.address = ("127.0.0.1", local)
        key = tmp / "key"
        if kind == "spiped":
            self.procs.append(run_server(["spiped", "-F", "-d", "-s", f"[{server_host}]:{front}", "-t",
                                          f"[127.0.0.1]:{svc_port}", "-k", key]))
            self.procs.append(subprocess.Popen(["spiped", "-F", "-e", "-s", f"[127.0.0.1]:{local}", "-t",
                                                f"[{server_host}]:{front}", "-k", key]))
        elif kind == "stunnel":
            common = ("foreground = yes\npid =\ndebug = 3\nsslVersionMin = TLSv1.3\nsocket = l:TCP_NODELAY=1\n"
                      f"socket = r:TCP_NODELAY=1\nPSKsecrets = {tmp / 'psk'}\n")
            (tmp / "s.conf").write_text(common + f"[rpc]\naccept = {server_host}:{front}\n"
                                        f"connect = 127.0.0.1:{svc_port}\n")
            (tmp / "c.conf").write_text(common + f"[rpc]\nclient = yes\nPSKidentity = bench\n"
                                        f"accept = 127.0.0.1:{local}\nconnect = {server_host}:{front}\n")
            self.procs.append(run_server(["stunnel4", tmp / "s.conf"]))
            self.procs.append(subprocess.Popen(["stunnel4", tmp / "c.conf"]))
        elif kind == "python-tls":
            me = [sys.executable, __file__, "--python-tls"]
            certs = [str(tmp / "cert.pem"), str(tmp / "key.pem")]
            self.procs.append(run_server([*me, "server", f"{server_host}:{front}", f"127.0.0.1:{svc_port}", *certs]))
            self.procs.append(subprocess.Popen([*me, "client", f"127.0.0.1:{local}", f"{server_host}:{front}",
                                                *certs]))
        wait_for(lambda: _accepts((server_host, front)), 10, what=f"{kind}'s server end")
        wait_for(lambda: _accepts(self.address), 10, what=f"{kind}'s client end")

    def cpu(self) -> float:
        total = 0.0
        for proc in self.procs:
            for pid in [proc.pid, *_children(proc.pid)]:
                try:
                    total += cpu_seconds(pid)
                except OSError:
                    pass
        return total

    def close(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()


def _children(pid: int) -> list[int]:
    """Descendants (ip netns exec / unshare / sh exec into the program, so usually none)."""
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    except OSError:
        return []
    kids = [int(p) for p in out.split()]
    return kids + [g for k in kids for g in _children(k)]


def _accepts(address: tuple[str, int]) -> bool:
    try:
        socket.create_connection(address, timeout=0.5).close()
        return True
    except OSError:
        return False


def make_keys(tmp: Path) -> None:
    secret = os.urandom(32)
    (tmp / "key").write_bytes(secret)
    (tmp / "psk").write_text(f"bench:{secret.hex()}\n")
    for name in ("key", "psk"):
        os.chmod(tmp / name, 0o600)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-days", "2", "-subj", "/CN=bench", "-keyout", tmp / "key.pem", "-out", tmp / "cert.pem"],
                   check=True, capture_output=True)


# ---------------------------------------------------------------- measurements

def throughput(link: Link, mib: int, svc_port: int, sink_host: str) -> tuple[float, float]:
    """(MiB/s, link CPU seconds per GiB)."""
    chunk = bytes(MIB)
    cpu0 = link.cpu()
    start = time.perf_counter()
    with socket.create_connection(link.address) as s:
        s.sendall((mib * MIB).to_bytes(8, "big"))
        for _ in range(mib):
            s.sendall(chunk)
        assert _exactly(s, 2) == b"ok"
    seconds = time.perf_counter() - start
    return mib / seconds, (link.cpu() - cpu0) / (mib / 1024)


def round_trips(link: Link, size: int, trips: int) -> tuple[float, float, float]:
    """(median µs, p99 µs, link CPU µs per round trip)."""
    with socket.create_connection(link.address) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        request = size.to_bytes(4, "big") + bytes(size)
        for _ in range(50):                  # warm up: connection set-up, handshakes, caches
            s.sendall(request)
            _exactly(s, size)
        cpu0 = link.cpu()
        times = []
        for _ in range(trips):
            t0 = time.perf_counter()
            s.sendall(request)
            _exactly(s, size)
            times.append(time.perf_counter() - t0)
        cpu = link.cpu() - cpu0
    times.sort()
    return statistics.median(times) * 1e6, times[int(0.99 * (len(times) - 1))] * 1e6, cpu / trips * 1e6


def connect_time(link: Link, n: int = 20) -> float:
    """Median ms from connect() to the first reply on a fresh connection."""
    times = []
    request = (64).to_bytes(4, "big") + bytes(64)
    for _ in range(n):
        t0 = time.perf_counter()
        with socket.create_connection(link.address) as s:
            s.sendall(request)
            _exactly(s, 64)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def one_setting(kinds: list[str], tmp: Path, run_server, server_host: str, mib: int, trips: int,
                service) -> dict[str, dict]:
    results: dict[str, dict] = {}
    sink_port, pong_port = service
    for kind in kinds:
        row: dict[str, float] = {}
        sink = Link(kind, tmp, run_server, server_host, sink_port)
        try:
            row["mib_s"], row["cpu_per_gib"] = throughput(sink, mib, sink_port, server_host)
        finally:
            sink.close()
        pong = Link(kind, tmp, run_server, server_host, pong_port)
        try:
            row["rtt64"], row["rtt64_p99"], row["cpu64"] = round_trips(pong, 64, trips)
            row["rtt4k"], row["rtt4k_p99"], row["cpu4k"] = round_trips(pong, 4096, trips)
            row["connect_ms"] = connect_time(pong)
        finally:
            pong.close()
        results[kind] = row
        print(f"  {kind}: {row['mib_s']:.0f} MiB/s, rtt 4 KiB {row['rtt4k']:.0f} µs", file=sys.stderr, flush=True)
    return results


def report(title: str, results: dict[str, dict], mib: int, trips: int) -> None:
    base = results.get("plain")
    print(f"\n{title} ({mib} MiB; {trips} round trips per size)\n")
    print("| link | throughput MiB/s | vs plain | round trip 64 B median / p99 µs | added | 4 KiB median / p99 µs"
          " | added | connect ms | link CPU s per GiB | link CPU µs per 4 KiB round trip |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for kind, r in results.items():
        ratio = f"{r['mib_s'] / base['mib_s']:.2f}x" if base else ""
        add64 = f"+{r['rtt64'] - base['rtt64']:.0f}" if base else ""
        add4k = f"+{r['rtt4k'] - base['rtt4k']:.0f}" if base else ""
        print(f"| {kind} | {r['mib_s']:.0f} | {ratio} | {r['rtt64']:.0f} / {r['rtt64_p99']:.0f} | {add64} | "
              f"{r['rtt4k']:.0f} / {r['rtt4k_p99']:.0f} | {add4k} | {r['connect_ms']:.1f} | {r['cpu_per_gib']:.2f} |"
              f" {r['cpu4k']:.0f} |")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--python-tls":
        python_tls(*sys.argv[2:7])
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--slow-mib", type=int, default=24)
    parser.add_argument("--trips", type=int, default=2000)
    parser.add_argument("--only", default=",".join(CANDIDATES))
    parser.add_argument("--no-slow", action="store_true", help="skip the 100 Mbit/s part (no root needed)")
    args = parser.parse_args()
    kinds = [k for k in args.only.split(",") if k]
    for tool, package in (("spiped", "spiped"), ("stunnel4", "stunnel4"), ("openssl", "openssl")):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed: apt-get install {package}", file=sys.stderr)
            return 1
    me = [sys.executable, __file__, "--serve"]
    with tempfile.TemporaryDirectory(prefix="bench-links-") as name:
        tmp = Path(name)
        make_keys(tmp)
        print("loopback", file=sys.stderr)
        ports = free_port(), free_port()
        services = [subprocess.Popen([*me, "sink", "127.0.0.1", str(ports[0])]),
                    subprocess.Popen([*me, "pong", "127.0.0.1", str(ports[1])])]
        try:
            for p in ports:
                wait_for(lambda p=p: _accepts(("127.0.0.1", p)), 10, what="the bench service")
            loop = one_setting(kinds, tmp, lambda argv: subprocess.Popen(argv), "127.0.0.1", args.mib, args.trips,
                               ports)
        finally:
            for proc in services:
                proc.kill()
        report("Loopback", loop, args.mib, args.trips)
        if not args.no_slow:
            from cluster import SimulatedCluster

            print("100 Mbit/s", file=sys.stderr)
            with SimulatedCluster(1, rate_mbit=100) as cluster:
                host = cluster.hosts[0]
                for kind, p in zip(("sink", "pong"), ports, strict=True):     # plain reaches them directly
                    host.popen([*me, kind, "0.0.0.0", str(p)])
                for p in ports:
                    wait_for(lambda p=p: _accepts((host.address, p)), 10, what="the bench service in the host")
                slow = one_setting(kinds, tmp, lambda argv: host.popen(argv), host.address, args.slow_mib,
                                   args.trips // 4, ports)
            report("Over a 100 Mbit/s link (tbf both ways)", slow, args.slow_mib, args.trips // 4)
    return 0


if __name__ == "__main__":
    sys.exit(main())
