"""Predicted time per generated token of a placement: the cost model the chooser ranks plans by.

A token goes through the devices one after another (llama.cpp's layer split is a pipeline; one
sequence is never on two devices at once), so its time is the sum of:

- each device's compute: for its layers, layers x layer_ns + the bytes of its weights x the device's
  ns per byte for their tensor types (llama/speed.py measures both; decoding reads every weight
  once per token); the output layer likewise on the device that holds it;
- each RPC device's link: one round trip (llama.cpp sends the stage's inputs, a 16-byte "compute
  the graph again" and reads the result: ggml-rpc reuses a device's graph while its slice is one
  contiguous range, which a layer split always is), plus the bytes: the hidden state in and out
  (n_embd floats each way), the attention mask, and the logits (n_vocab floats) from the device that
  holds the output layer;
- llama-server's own work per token (sampling over the vocabulary, scheduling).

A CPU quota (a container's or a cgroup's, `DeviceSpeed.cpus` below its threads) does not slow a
device that is idle most of the time, only one that would use more than its share: over many
tokens a device cannot compute faster than compute x threads / cpus per token. The prediction is
the larger of the sum and that bound for every device.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from synapticllamas.llama.placement import LOCAL

if TYPE_CHECKING:
    from synapticllamas.llama.gguf_layout import ModelLayout
    from synapticllamas.llama.placement import BackendPlan, Placement
    from synapticllamas.llama.speed import DeviceSpeed

DEFAULT_RTT_MS = 0.5           # a link never measured: a wired LAN's round trip with TCP's overheads
DEFAULT_MBIT = 1000.0
MASK_BYTES = 2048              # the attention mask one device gets per token (f16, a few hundred cells)
HOST_FIXED_MS = 0.3            # llama-server per token: scheduling, the HTTP stream (measured: bench/speed_placement.py)
SAMPLING_NS = 4.0              # ... and per vocabulary entry: the sampler chain looks at every logit
UNKNOWN_NS_PER_BYTE = 0.1      # a device never measured, when no device was: ranks plans by memory alone


@dataclass(frozen=True)
class Link:
    rtt_ms: float | None = None       # the coordinator's round trip to the backend
    mbit_s: float | None = None       # what a load's upload reached
    source: str = ""

    @property
    def rtt(self) -> float:
        return self.rtt_ms if self.rtt_ms is not None else DEFAULT_RTT_MS

    @property
    def mbit(self) -> float:
        return self.mbit_s if self.mbit_s else DEFAULT_MBIT


@dataclass(frozen=True)
class DeviceInfo:
    key: str                          # LOCAL or the backend's HOST:PORT
    host: str                         # host id: devices on one host share its memory
    speed: DeviceSpeed | None
    link: Link | None = None          # None: no network in between (this host's CPU)
    host_name: str = ""


@dataclass
class Prediction:
    ms_per_token: float
    compute_ms: dict[str, float] = field(default_factory=dict)   # per device
    link_ms: dict[str, float] = field(default_factory=dict)      # per RPC device
    host_ms: float = 0.0
    bound: str | None = None          # the device whose CPU quota sets the pace, if one does
    unknown: list[str] = field(default_factory=list)             # devices whose speed was not measured

    @property
    def tokens_per_s(self) -> float:
        return 1000.0 / self.ms_per_token if self.ms_per_token > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        return {"ms_per_token": round(self.ms_per_token, 2), "tokens_per_s": round(self.tokens_per_s, 1),
                "compute_ms": {k: round(v, 3) for k, v in self.compute_ms.items()},
                "link_ms": {k: round(v, 3) for k, v in self.link_ms.items()}, "host_ms": round(self.host_ms, 3),
                "bound": self.bound, "unknown_speed": list(self.unknown)}


def _stage_bytes(layout: ModelLayout, b: BackendPlan) -> tuple[dict[str, int], int]:
    """Bytes per tensor type and the number of layers a device computes per token."""
    by_type: dict[str, int] = {}
    layers = 0
    if b.layers is not None:
        first, last = b.layers
        layers = last - first + 1
        for i in range(first, last + 1):
            for kind, n in (layout.layer_types[i] if i < len(layout.layer_types) else {"F16": layout.layer_bytes[i]}
                            ).items():
                by_type[kind] = by_type.get(kind, 0) + n
    if b.output:
        for kind, n in (layout.output_types or {"F16": layout.output_bytes}).items():
            by_type[kind] = by_type.get(kind, 0) + n
    return by_type, layers


def _fallback(devices: dict[str, DeviceInfo]) -> DeviceSpeed | None:
    """The speed assumed for a device that was not measured: the slowest one that was."""
    known = [d.speed for d in devices.values() if d.speed is not None]
    return max(known, key=lambda s: s.per_byte("F16")) if known else None


def predict(layout: ModelLayout, placed: Placement, devices: dict[str, DeviceInfo]) -> Prediction:
    out = Prediction(0.0)
    fallback = _fallback(devices)
    total = 0.0
    bounds: list[tuple[float, str]] = []
    stages = placed.devices
    for index, b in enumerate(stages):
        by_type, layers = _stage_bytes(layout, b)
        if not by_type and not layers:
            continue
        info = devices.get(b.address)
        speed = info.speed if info is not None else None
        if speed is None:
            out.unknown.append(b.address)
            speed = fallback
        if speed is not None:
            ms = speed.seconds_for(by_type, layers) * 1000
            if speed.cpus + 1e-9 < speed.threads:
                bounds.append((ms * speed.threads / speed.cpus, b.address))
        else:
            ms = sum(by_type.values()) * UNKNOWN_NS_PER_BYTE / 1e6
        out.compute_ms[b.address] = ms
        total += ms
        if b.address != LOCAL:
            link = info.link if info is not None and info.link is not None else Link()
            last = b.output and index == len(stages) - 1
            nbytes = 4 * layout.n_embd + MASK_BYTES + 4 * (layout.n_vocab if last else layout.n_embd)
            link_ms = link.rtt + nbytes * 8 / (link.mbit * 1e3)
            out.link_ms[b.address] = link_ms
            total += link_ms
    out.host_ms = HOST_FIXED_MS + layout.n_vocab * SAMPLING_NS / 1e6
    total += out.host_ms
    out.ms_per_token = total
    if bounds:
        worst, who = max(bounds)
        if worst > total:
            out.ms_per_token, out.bound = worst, who
    return out
