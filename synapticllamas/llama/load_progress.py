"""How far a model upload to the RPC backends has got, while llama-server is silent about it.

llama-server prints each backend's model buffer size (`RPC0[HOST:PORT] model buffer size = 92.1
MiB`) and then sends every weight over the network without a word: over a 100 Mbit/s link that is
tens of seconds of silence. The kernel knows how many bytes went out on llama-server's connection
to each backend (TCP_INFO bytes_acked, read with iproute2's `ss`); compared with the buffer sizes
that is the upload's progress. It is read once a second, only while a start is loading, and only
when there are RPC backends: a bounded look at our own child's sockets, not a poll of any service.
"""
from __future__ import annotations

import asyncio
import re
import shutil
from collections.abc import Iterable

_ACKED = re.compile(r"\bbytes_acked:(\d+)")
_MINRTT = re.compile(r"\bminrtt:([\d.]+)")
SAMPLE_EVERY = 1.0


def available() -> bool:
    return shutil.which("ss") is not None


def _dst_filter(backends: Iterable[str]) -> list[str]:
    terms: list[str] = []
    for address in backends:
        terms += (["or"] if terms else []) + ["dst", address]
    return ["(", *terms, ")"]


async def connections(backends: list[str]) -> dict[str, tuple[int, float | None]] | None:
    """Per backend: bytes acknowledged and the kernel's smallest round trip (ms) on the established
    TCP connections to it (rpc-server serves one client, so while we hold it, they are
    llama-server's), or None if they cannot be read."""
    ss = shutil.which("ss")
    if ss is None or not backends:
        return None
    try:
        proc = await asyncio.create_subprocess_exec(
            ss, "-tinH", "state", "established", *_dst_filter(backends),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        out, _ = await proc.communicate()
    except OSError:
        return None
    if proc.returncode != 0:
        return None
    found: dict[str, tuple[int, float | None]] = {}
    peer = None
    for line in out.decode("ascii", "replace").splitlines():
        if not line.startswith((" ", "\t")):          # the socket's line: Recv-Q Send-Q local peer
            words = line.split()
            peer = words[-1] if len(words) >= 4 else None
            continue
        acked, rtt = _ACKED.search(line), _MINRTT.search(line)
        if peer is not None and acked:
            old = found.get(peer, (0, None))
            rtts = [r for r in (old[1], float(rtt.group(1)) if rtt else None) if r is not None]
            found[peer] = (old[0] + int(acked.group(1)), min(rtts) if rtts else None)
    return found


async def bytes_sent(backends: list[str]) -> int | None:
    """Bytes acknowledged on the established TCP connections to these backends, or None."""
    found = await connections(backends)
    return None if found is None else sum(n for n, _ in found.values())


class Upload:
    """Progress of one upload: bytes sent since it began, against the expected total."""

    def __init__(self, backends: list[str], expected_bytes: int, baseline: int) -> None:
        self.backends = backends
        self.expected = max(1, expected_bytes)
        self.baseline = baseline
        self.reported = -1             # the last percent step an event was made for

    def percent(self, sent_now: int) -> int:
        return max(0, min(100, int(100 * (sent_now - self.baseline) / self.expected)))

    def step(self, percent: int, every: int = 5) -> bool:
        """True when `percent` reached a new `every`% step (at most one event per step)."""
        mark = percent // every * every
        if mark > self.reported:
            self.reported = mark
            return True
        return False
