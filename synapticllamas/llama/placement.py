"""Placement: will the model fit on these RPC backends, and how to split it (`--tensor-split`).

What a backend holds is modelled on what llama.cpp does (measured on this build, see
docs/ARCHITECTURE.md), because counting weights only is wrong by 2x on small models:

- Layers. With `-ngl n_layer+1` and split proportions s_0..s_k, llama.cpp gives repeating layer i
  to the first device d with i / (n_layer + 1) < (s_0 + ... + s_d) / sum(s), and the output layer
  to the device of (n_layer) / (n_layer + 1) (the last one, in practice). `token_embd` stays on the
  host CPU; a model without `output.weight` (tied embeddings) puts a copy of it on the output device.
- KV cache: f16 K and V for each of the device's layers, `n_ctx` cells.
- Compute buffer: an estimate fitted on two models (the demo SmolLM2-135M and a 1024-wide llama):
  n_ubatch * 4 bytes * 15 * n_embd, plus 8 bytes per context cell per ubatch row, and the first
  device about 9 * n_embd * n_ubatch * 4 bytes more. It is the least exact part; the margin
  (5 % + 16 MiB per backend) is for it.

Offers: what each backend can give, in MiB, with where the figure came from (a node's
`--memory` or free memory, a local backend's `--memory` or its banner, what llama-server reported
at its last load), or None when unknown: then the split is even and the plan says so.

This host's CPU (llama-server's own, key LOCAL) can hold layers too: with `-ngl G` llama.cpp
offloads the last G of the n_layer + 1 slots (the output layer is the last slot) and keeps the
first n_layer + 1 - G repeating layers on the CPU, with their KV cache; the RPC devices share the G
slots by --tensor-split exactly as above, counted from the first offloaded layer. `place()` builds
a plan from explicit layer counts (llama/chooser.py picks them for speed); `plan()` is the split in
proportion to the offers, as before.

Hosts are counted once: backends on one machine (and this host's CPU) share its memory, so besides
each backend's own offer, the sum of what a host's devices need must fit what the host offers
(`hosts`: host id -> HostOffer; `host_of`: device -> host id).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

from synapticllamas.llama.gguf_layout import ModelLayout

MiB = 2**20
N_UBATCH = 512                # llama-server's default micro-batch
MARGIN_SHARE = 0.05
MARGIN_MIB = 16.0
LOCAL = "local"               # llama-server's own CPU, as a device of a placement


@dataclass(frozen=True)
class Offer:
    mib: int | None
    source: str               # "node --memory", "node free memory", "local --memory", ...


@dataclass(frozen=True)
class HostOffer:
    """What one machine can give to everything placed on it (its memory, counted once)."""
    id: str
    name: str
    mib: int | None
    source: str


@dataclass
class BackendPlan:
    address: str
    offered_mib: int | None
    source: str
    split: float
    layers: tuple[int, int] | None          # first and last layer index, or None
    output: bool
    weights_mib: float
    kv_mib: float
    compute_mib: float

    @property
    def need_mib(self) -> float:
        raw = self.weights_mib + self.kv_mib + self.compute_mib
        return raw * (1 + MARGIN_SHARE) + MARGIN_MIB if raw else 0.0

    @property
    def fits(self) -> bool:
        return self.offered_mib is None or self.need_mib <= self.offered_mib

    def summary(self) -> dict[str, Any]:
        return {"address": self.address, "local": self.address == LOCAL, "offered_mib": self.offered_mib,
                "offer_source": self.source,
                "split": round(self.split, 4),
                "layers": list(self.layers) if self.layers else None, "output_layer": self.output,
                "planned_model_mib": round(self.weights_mib, 2), "planned_kv_mib": round(self.kv_mib, 2),
                "planned_compute_mib": round(self.compute_mib, 2), "planned_need_mib": round(self.need_mib, 1)}


@dataclass
class Placement:
    backends: list[BackendPlan]
    n_ctx: int
    ngl: int
    even: bool                 # some offer unknown: even split
    fits: bool
    host_mib: float            # what stays on the coordinator's CPU (token_embd)
    notes: list[str] = field(default_factory=list)
    local: BackendPlan | None = None          # this host's CPU, when it holds layers
    cpu_layers: int = 0                       # the first repeating layers, kept on this host's CPU
    host_of: dict[str, str] = field(default_factory=dict)          # device -> host id
    hosts: dict[str, HostOffer] = field(default_factory=dict)
    short_hosts: list[str] = field(default_factory=list)           # hosts whose devices need more than they offer

    @property
    def split(self) -> list[float]:
        return [b.split for b in self.backends]

    @property
    def devices(self) -> list[BackendPlan]:
        """Every device that holds something, in pipeline order: this host's CPU first."""
        return ([self.local] if self.local is not None else []) + list(self.backends)

    @property
    def need_mib(self) -> float:
        return sum(b.need_mib for b in self.backends)

    def host_need_mib(self, host: str) -> float:
        need = sum(b.need_mib for b in self.devices if self.host_of.get(b.address) == host)
        if self.local is None and self.host_of.get(LOCAL) == host:
            need += self.host_mib          # token_embd stays with llama-server whatever the split
        return need

    def tensor_split(self) -> str:
        return ",".join(f"{s:g}" for s in self.split)

    def refusal(self) -> str:
        """One line: what the model needs and what each backend (and each shared host) offers."""
        known = [b for b in self.devices if b.offered_mib is not None]
        offered = ", ".join(f"{_label(b.address)} {b.offered_mib} MiB ({b.source})" for b in known)
        short = [f"{_label(b.address)} needs {b.need_mib:.0f}" for b in self.devices if not b.fits]
        for host in self.short_hosts:
            h = self.hosts[host]
            on = [_label(d) for d, where in self.host_of.items() if where == host
                  and any(b.address == d for b in self.devices)]
            short.append(f"host {h.name} needs {self.host_need_mib(host):.0f} for {' + '.join(on)} but offers "
                         f"{h.mib} MiB ({h.source}), counted once")
        devices = self.devices
        weights = sum(b.weights_mib for b in devices)
        kv = sum(b.kv_mib for b in devices)
        compute = sum(b.compute_mib for b in devices)
        need = sum(b.need_mib for b in devices)
        where = "on the RPC backends" if self.local is None else "on this host and the RPC backends"
        return (f"the model does not fit: it needs {need:.0f} MiB {where} (weights {weights:.0f}"
                f" + KV cache {kv:.0f} for {self.n_ctx} tokens + compute {compute:.0f} + margin) but they offer "
                f"{self.offered_total():.0f} MiB: {offered}; short: {', '.join(short)}. Add backends or memory, "
                "lower SYNAPTICLLAMAS_COORDINATOR_CTX_SIZE, or `coordinator start --force` to try anyway")

    def offered_total(self) -> float:
        """What the devices offer, each host counted once."""
        total, seen = 0.0, set()
        for b in self.devices:
            host = self.host_of.get(b.address)
            offer = self.hosts.get(host) if host else None
            if offer is not None and offer.mib is not None:
                if host not in seen:
                    seen.add(host)
                    on_host = sum(d.offered_mib or 0 for d in self.devices if self.host_of.get(d.address) == host)
                    total += min(offer.mib, on_host) if on_host else offer.mib
            elif b.offered_mib is not None:
                total += b.offered_mib
        return total

    def summary(self) -> dict[str, Any]:
        out = {"n_ctx": self.n_ctx, "ngl": self.ngl, "even_split": self.even, "fits": self.fits,
               "tensor_split": self.tensor_split(), "host_mib": round(self.host_mib, 2),
               "need_mib": round(self.need_mib, 1), "backends": [b.summary() for b in self.backends],
               "notes": list(self.notes), "cpu_layers": self.cpu_layers}
        if self.local is not None:
            out["local"] = self.local.summary()
        if self.hosts:
            out["hosts"] = {h: {"name": o.name, "offered_mib": o.mib, "offer_source": o.source,
                                "need_mib": round(self.host_need_mib(h), 1),
                                "devices": [d for d, where in self.host_of.items() if where == h]}
                            for h, o in self.hosts.items()}
        return out


def _label(address: str) -> str:
    return "this host's CPU" if address == LOCAL else address


def assign_layers(n_layer: int, split: list[float], cpu_layers: int = 0) -> tuple[list[int], int]:
    """llama.cpp's assignment: the device of each repeating layer (-1: this host's CPU, the first
    `cpu_layers`), and of the output layer."""
    total = sum(split)
    cumulative, acc = [], 0.0
    for s in split:
        acc += s
        cumulative.append(acc / total)
    gpu_layers = n_layer + 1 - cpu_layers

    def device(i: int) -> int:
        if i < cpu_layers:
            return -1
        return min(bisect.bisect_right(cumulative, (i - cpu_layers) / gpu_layers), len(split) - 1)

    return [device(i) for i in range(n_layer)], device(n_layer)


def split_for(counts: list[int]) -> list[float]:
    """--tensor-split values that give each RPC device exactly `counts[d]` repeating layers (the
    output layer's slot goes to the last device): each device's share of the slots."""
    return [float(c) for c in counts[:-1]] + [float(counts[-1] + 1)]


def compute_mib(layout: ModelLayout, n_ctx: int, first: bool, has_layers: bool) -> float:
    """The estimated compute buffer of one device (see the module docstring)."""
    if not has_layers:
        return 0.5
    base = N_UBATCH * 4 * 15 * layout.n_embd + N_UBATCH * 8 * n_ctx
    if first:
        base += N_UBATCH * 4 * 9 * layout.n_embd
    return base / MiB


def _plan_split(layout: ModelLayout, backends: list[str], offers: dict[str, Offer], n_ctx: int,
                split: list[float], cpu_layers: int = 0) -> list[BackendPlan]:
    device_of, output_dev = assign_layers(layout.n_layer, split, cpu_layers)
    kv_layer = layout.kv_bytes_per_layer(n_ctx)
    plans = []
    for d, address in enumerate(backends):
        mine = [i for i, dev in enumerate(device_of) if dev == d]
        weights = sum(layout.layer_bytes[i] for i in mine) + (layout.output_bytes if d == output_dev else 0)
        offer = offers.get(address, Offer(None, "unknown"))
        plans.append(BackendPlan(
            address, offer.mib, offer.source, split[d], (mine[0], mine[-1]) if mine else None, d == output_dev,
            weights / MiB, len(mine) * kv_layer / MiB,
            compute_mib(layout, n_ctx, first=d == 0, has_layers=bool(mine))))
    return plans


def _local_plan(layout: ModelLayout, n_ctx: int, cpu_layers: int, output: bool, offer: Offer) -> BackendPlan:
    """This host's CPU: token_embd, its first layers (and the output layer when nothing is
    offloaded), their KV cache and a compute buffer."""
    weights = layout.embd_bytes + sum(layout.layer_bytes[:cpu_layers]) + (layout.output_bytes if output else 0)
    if output and layout.tied_output:
        weights -= layout.output_bytes         # a tied output uses token_embd itself: no copy on the CPU
    return BackendPlan(LOCAL, offer.mib, offer.source, 0.0, (0, cpu_layers - 1) if cpu_layers else None, output,
                       weights / MiB, cpu_layers * layout.kv_bytes_per_layer(n_ctx) / MiB,
                       compute_mib(layout, n_ctx, first=True, has_layers=True))


def check_hosts(placed: Placement) -> None:
    """Mark the hosts whose devices together need more than the host offers (counted once)."""
    placed.short_hosts = [h for h, offer in placed.hosts.items()
                          if offer.mib is not None and placed.host_need_mib(h) > offer.mib]
    placed.fits = all(b.fits for b in placed.devices) and not placed.short_hosts


def place(layout: ModelLayout, backends: list[str], offers: dict[str, Offer], n_ctx: int, counts: list[int],
          cpu_layers: int = 0, local_offer: Offer | None = None, host_of: dict[str, str] | None = None,
          hosts: dict[str, HostOffer] | None = None) -> Placement:
    """The plan for explicit layer counts: `cpu_layers` on this host's CPU, then counts[d] on
    backends[d] in --rpc order, the output layer on the last backend (or on this host's CPU when
    there is no backend)."""
    n_ctx = n_ctx or layout.n_ctx_train
    if cpu_layers + sum(counts) != layout.n_layer or len(counts) != len(backends):
        raise ValueError(f"{cpu_layers} + {counts} layers for a model of {layout.n_layer}")
    local_offer = local_offer or Offer(None, "unknown")
    if backends:
        split = split_for(counts)
        plans = _plan_split(layout, backends, offers, n_ctx, split, cpu_layers)
        local = _local_plan(layout, n_ctx, cpu_layers, False, local_offer) if cpu_layers else None
        ngl = layout.n_layer + 1 - cpu_layers
    else:
        plans, ngl = [], 0
        local = _local_plan(layout, n_ctx, layout.n_layer, True, local_offer)
    placed = Placement(plans, n_ctx, ngl, False, True, layout.embd_bytes / MiB, [], local, cpu_layers if backends
                       else layout.n_layer, dict(host_of or {}), dict(hosts or {}))
    check_hosts(placed)
    return placed


def plan(layout: ModelLayout, backends: list[str], offers: dict[str, Offer], n_ctx: int,
         host_of: dict[str, str] | None = None, hosts: dict[str, HostOffer] | None = None) -> Placement:
    """Split in proportion to what each backend offers (evenly when one offer is unknown), and
    say whether every backend can hold its part (and every host what its backends hold together)."""
    n_ctx = n_ctx or layout.n_ctx_train
    known = [offers[b].mib for b in backends if b in offers and offers[b].mib is not None]
    even = len(known) != len(backends) or not all(known)
    notes = []
    if even:
        unknown = [b for b in backends if b not in offers or offers[b].mib is None]
        notes.append(f"memory of {', '.join(unknown)} unknown: the model is split evenly")
        split = [1.0] * len(backends)
    else:
        split = [float(offers[b].mib or 0) for b in backends]
    plans = _plan_split(layout, backends, offers, n_ctx, split)
    if not even and not all(p.fits for p in plans):
        # the output layer and the first device's compute buffer are fixed costs: shrink the
        # share of each device that overflows by its excess, a few times, and keep what fits
        trial, trial_split = plans, split
        for _ in range(8):
            over = {p.address: p.need_mib / p.offered_mib for p in trial if p.offered_mib and not p.fits}
            if not over:
                plans, split = trial, trial_split
                break
            trial_split = [s / over.get(b, 1.0) for s, b in zip(trial_split, backends, strict=True)]
            trial = _plan_split(layout, backends, offers, n_ctx, trial_split)
        else:
            if all(p.fits for p in trial):
                plans = trial
    placed = Placement(plans, n_ctx, layout.n_layer + 1, even, True, layout.embd_bytes / MiB, notes,
                       host_of=dict(host_of or {}), hosts=dict(hosts or {}))
    check_hosts(placed)
    return placed
