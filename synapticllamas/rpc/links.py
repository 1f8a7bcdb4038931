"""What the links from this coordinator to each backend are worth: round trip and bandwidth.

Measured without disturbing a backend in use (rpc-server serves one client, and never speaks to a
second while llama-server holds it):
- the round trip is the time of the TCP connect of the registry's probes (one SYN, one SYN-ACK),
  which only run while the coordinator does not hold the backend; the smallest of the last few is
  kept (a probe that waited for a busy event loop says nothing about the link);
- the bandwidth is what a model load reached: the kernel's byte counters of llama-server's own
  connection to the backend (llama/load_progress.py reads them during the upload), over the
  upload's duration. A backend never loaded to has no bandwidth yet (the cost model then assumes
  1 Gbit/s and the plan says so).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from synapticllamas.llama.cost import Link

KEEP = 8                       # round trips kept per backend
MIN_UPLOAD_BYTES = 4 << 20     # a smaller upload (a cache hit sends hashes) says nothing about bandwidth
MIN_UPLOAD_S = 0.2


@dataclass
class _Entry:
    rtts: deque[float] = field(default_factory=lambda: deque(maxlen=KEEP))
    mbit_s: float | None = None


class LinkTable:
    def __init__(self) -> None:
        self._links: dict[str, _Entry] = {}

    def rtt(self, address: str, ms: float | None) -> None:
        if ms is not None and 0 < ms < 60_000:
            self._links.setdefault(address, _Entry()).rtts.append(ms)

    def upload(self, address: str, nbytes: int, seconds: float) -> None:
        """One load's upload to `address`: nbytes acknowledged in `seconds`."""
        if nbytes >= MIN_UPLOAD_BYTES and seconds >= MIN_UPLOAD_S:
            self._links.setdefault(address, _Entry()).mbit_s = nbytes * 8 / seconds / 1e6

    def get(self, address: str) -> Link:
        entry = self._links.get(address)
        if entry is None:
            return Link(source="not measured")
        rtt = min(entry.rtts) if entry.rtts else None
        parts = ([f"round trip from {len(entry.rtts)} probes"] if rtt is not None else []) + \
            (["bandwidth from the last load"] if entry.mbit_s else [])
        return Link(rtt, entry.mbit_s, "; ".join(parts) or "not measured")
