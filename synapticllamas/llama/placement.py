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


@dataclass(frozen=True)
class Offer:
    mib: int | None
    source: str               # "node --memory", "node free memory", "local --memory", ...


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
        return {"address": self.address, "offered_mib": self.offered_mib, "offer_source": self.source,
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

    @property
    def split(self) -> list[float]:
        return [b.split for b in self.backends]

    @property
    def need_mib(self) -> float:
        return sum(b.need_mib for b in self.backends)

    def tensor_split(self) -> str:
        return ",".join(f"{s:g}" for s in self.split)

    def refusal(self) -> str:
        """One line: what the model needs and what each backend offers."""
        known = [b for b in self.backends if b.offered_mib is not None]
        offered = ", ".join(f"{b.address} {b.offered_mib} MiB ({b.source})" for b in known)
        short = ", ".join(f"{b.address} needs {b.need_mib:.0f}" for b in self.backends if not b.fits)
        weights = sum(b.weights_mib for b in self.backends)
        kv = sum(b.kv_mib for b in self.backends)
        compute = sum(b.compute_mib for b in self.backends)
        return (f"the model does not fit: it needs {self.need_mib:.0f} MiB on the RPC backends (weights {weights:.0f}"
                f" + KV cache {kv:.0f} for {self.n_ctx} tokens + compute {compute:.0f} + margin) but they offer "
                f"{sum(b.offered_mib or 0 for b in known)} MiB: {offered}; short: {short}. Add backends or memory, "
                "lower SYNAPTICLLAMAS_COORDINATOR_CTX_SIZE, or `coordinator start --force` to try anyway")

    def summary(self) -> dict[str, Any]:
        return {"n_ctx": self.n_ctx, "ngl": self.ngl, "even_split": self.even, "fits": self.fits,
                "tensor_split": self.tensor_split(), "host_mib": round(self.host_mib, 2),
                "need_mib": round(self.need_mib, 1), "backends": [b.summary() for b in self.backends],
                "notes": list(self.notes)}


def assign_layers(n_layer: int, split: list[float]) -> tuple[list[int], int]:
    """llama.cpp's assignment: the device of each repeating layer, and of the output layer."""
    total = sum(split)
    cumulative, acc = [], 0.0
    for s in split:
        acc += s
        cumulative.append(acc / total)
    gpu_layers = n_layer + 1

    def device(x: float) -> int:
        return min(bisect.bisect_right(cumulative, x), len(split) - 1)

    return [device(i / gpu_layers) for i in range(n_layer)], device((gpu_layers - 1) / gpu_layers)


def compute_mib(layout: ModelLayout, n_ctx: int, first: bool, has_layers: bool) -> float:
    """The estimated compute buffer of one device (see the module docstring)."""
    if not has_layers:
        return 0.5
    base = N_UBATCH * 4 * 15 * layout.n_embd + N_UBATCH * 8 * n_ctx
    if first:
        base += N_UBATCH * 4 * 9 * layout.n_embd
    return base / MiB


def _plan_split(layout: ModelLayout, backends: list[str], offers: dict[str, Offer], n_ctx: int,
                split: list[float]) -> list[BackendPlan]:
    device_of, output_dev = assign_layers(layout.n_layer, split)
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


def plan(layout: ModelLayout, backends: list[str], offers: dict[str, Offer], n_ctx: int) -> Placement:
    """Split in proportion to what each backend offers (evenly when one offer is unknown), and
    say whether every backend can hold its part."""
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
    fits = all(p.fits for p in plans)
    return Placement(plans, n_ctx, layout.n_layer + 1, even, fits, layout.embd_bytes / MiB, notes)
