"""Fit first, then speed: which devices serve a model, with how many layers each.

The devices are this host's CPU (llama-server's own, no network in between) and the healthy RPC
backends. Among the plans whose every device, and every host counted once, can hold its part,
the chosen one has the lowest predicted time per token (llama/cost.py), and it may use fewer
devices than are up: each RPC device costs a round trip per token, and a slow one makes every
token wait for it. So a model that fits on this host is served there by default.

How plans are found (all of it arithmetic, well under the 0.2 s a `coordinator plan` may take):
for every set of RPC devices (all subsets up to 8 of them; beyond that, the k fastest for each k),
with and without this host's CPU, and with each member of the set as the last device (the one that
holds the output layer), layers go to the devices with the lowest cost per layer first, as many as
each device's memory, its host's memory and its CPU quota allow; for a device under a CPU quota the
layers it may take are bounded by a time B, and B is tried at each value where that bound changes.
The best few plans by this estimate are then placed exactly (llama/placement.py's memory model)
and predicted exactly (llama/cost.py).

Modes: `speed` (the default) as above; `spread`: every healthy backend holds at least one layer
(`coordinator start --spread`); `memory`: the split in proportion to the offers over every backend
(before this module, the only one).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

from synapticllamas.llama.cost import DeviceInfo, Link, Prediction, predict
from synapticllamas.llama.gguf_layout import ModelLayout
from synapticllamas.llama.placement import (
    LOCAL,
    MARGIN_MIB,
    MARGIN_SHARE,
    HostOffer,
    MiB,
    Offer,
    Placement,
    compute_mib,
    place,
    plan,
)

MODES = ("speed", "spread", "memory")
EXHAUSTIVE = 8          # RPC devices up to which every subset is tried
EXACT = 4               # plans per device set placed and predicted exactly


@dataclass
class Candidate:
    name: str                          # "this host", "spread", "by memory", "3 devices", ...
    devices: list[str]                 # in pipeline order: LOCAL first, then --rpc order
    placement: Placement
    prediction: Prediction | None

    @property
    def backends(self) -> list[str]:
        return [b.address for b in self.placement.backends]

    @property
    def ms(self) -> float:
        return self.prediction.ms_per_token if self.prediction else math.inf

    @property
    def fits(self) -> bool:
        return self.placement.fits

    def layers(self) -> dict[str, int]:
        return {b.address: (b.layers[1] - b.layers[0] + 1) if b.layers else 0 for b in self.placement.devices}

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "devices": list(self.devices), "layers": self.layers(), "fits": self.fits,
                "tensor_split": self.placement.tensor_split(), "cpu_layers": self.placement.cpu_layers,
                "prediction": self.prediction.summary() if self.prediction else None}


@dataclass
class Choice:
    mode: str
    chosen: Candidate | None           # None: nothing fits
    candidates: list[Candidate]
    idle: list[str]                    # healthy backends the chosen plan leaves out
    reason: str                        # one line for `coordinator start`
    notes: list[str] = field(default_factory=list)

    def summary(self, brief: bool = False) -> dict[str, Any]:
        """brief: the chosen plan and the reason only (what `starting` events and status carry)."""
        out: dict[str, Any] = {"mode": self.mode, "chosen": self.chosen.summary() if self.chosen else None,
               "idle": list(self.idle), "reason": self.reason, "notes": list(self.notes)}
        if not brief:
            out["candidates"] = [c.summary() for c in self.candidates]
        return out


@dataclass
class World:
    """What the chooser knows: the model, the devices, their memory, hosts and speeds."""
    layout: ModelLayout
    n_ctx: int
    devices: dict[str, DeviceInfo]             # LOCAL (if this host may hold layers) and the healthy backends
    offers: dict[str, Offer]                   # per device: its own limit (a node's --memory ...)
    hosts: dict[str, HostOffer]                # per host id: its memory, counted once
    backends: list[str]                        # the healthy backends, in the registry's order

    @property
    def host_of(self) -> dict[str, str]:
        return {k: d.host for k, d in self.devices.items()}

    @property
    def local(self) -> bool:
        return LOCAL in self.devices


# ---------------------------------------------------------------- the quick estimate

@dataclass
class _Dev:
    key: str
    host: str
    per_layer_ms: float
    output_ms: float
    link_ms: float                     # per token, if it holds anything (LOCAL: 0)
    logits_ms: float                   # more, when it holds the output layer and is the last device
    quota: float                       # threads / cpus when above 1, else 1
    cap_layers: float                  # by its own offer


def _quick(world: World, key: str) -> _Dev:
    """Per-device costs for the estimate, from the exact model applied to one average layer."""
    layout, info = world.layout, world.devices[key]
    speed = info.speed
    n = layout.n_layer
    avg_types: dict[str, int] = {}
    for types in layout.layer_types:
        for kind, b in types.items():
            avg_types[kind] = avg_types.get(kind, 0) + b
    avg_types = {k: v // max(1, n) for k, v in avg_types.items()} or {"F16": layout.layer_bytes[0] if n else 0}
    fallback = _slowest(world)
    s = speed or fallback
    if s is not None:
        per_layer = s.seconds_for(avg_types, 1) * 1000
        output = s.seconds_for(layout.output_types or {"F16": layout.output_bytes}, 0) * 1000
        quota = s.threads / s.cpus if s.cpus + 1e-9 < s.threads else 1.0
    else:
        per_layer = sum(avg_types.values()) * 1e-7
        output = layout.output_bytes * 1e-7
        quota = 1.0
    link = info.link or Link()
    link_ms = 0.0 if key == LOCAL else link.rtt + (8 * layout.n_embd + 2048) * 8 / (link.mbit * 1e3)
    logits_ms = 0.0 if key == LOCAL else 4 * (layout.n_vocab - layout.n_embd) * 8 / (link.mbit * 1e3)
    offer = world.offers.get(key)
    return _Dev(key, info.host, per_layer, output, link_ms, logits_ms, quota,
                _layers_in(world, offer.mib if offer else None, first=False, output=False))


def _slowest(world: World) -> Any:
    known = [d.speed for d in world.devices.values() if d.speed is not None]
    return max(known, key=lambda s: s.per_byte("F16")) if known else None


def _layer_mib(world: World) -> float:
    layout = world.layout
    return (sum(layout.layer_bytes) / max(1, layout.n_layer) + layout.kv_bytes_per_layer(world.n_ctx)) / MiB


def _fixed_mib(world: World, first: bool, output: bool) -> float:
    out = compute_mib(world.layout, world.n_ctx, first=first, has_layers=True)
    if output:
        out += world.layout.output_bytes / MiB
    return out


def _layers_in(world: World, mib: float | None, first: bool, output: bool) -> float:
    """How many layers fit in `mib` (the margin taken off), or inf when unknown."""
    if mib is None:
        return math.inf
    room = (mib - MARGIN_MIB) / (1 + MARGIN_SHARE) - _fixed_mib(world, first, output)
    return max(0.0, math.floor(room / _layer_mib(world)))


def _fill(world: World, order: list[_Dev], last: _Dev | None, local: _Dev | None, bound: float,
          at_least_one: bool) -> dict[str, int] | None:
    """Layer counts: cheapest per layer first, within memory (own, host) and the time bound."""
    n = world.layout.n_layer
    devs = ([local] if local else []) + order
    host_left: dict[str, float] = {}
    for d in devs:
        h = world.hosts.get(d.host)
        if h is not None and h.mib is not None and d.host not in host_left:
            host_left[d.host] = (h.mib - MARGIN_MIB) / (1 + MARGIN_SHARE)
            if world.host_of.get(LOCAL) == d.host:
                host_left[d.host] -= world.layout.embd_bytes / MiB
    first_rpc = order[0].key if order else None

    def limit(d: _Dev, base: int) -> int:
        is_last = last is not None and d.key == last.key
        output = is_last or (not order and d.key == LOCAL)
        own = world.offers.get(d.key)
        cap = _layers_in(world, own.mib if own else None, d.key == first_rpc or d.key == LOCAL, output)
        if d.host in host_left:
            fixed = _fixed_mib(world, d.key == first_rpc or d.key == LOCAL, output) if base == 0 else 0.0
            cap = min(cap, math.floor(max(0.0, host_left[d.host] - fixed) / _layer_mib(world)) + base)
        extra = d.output_ms + (d.logits_ms if is_last else 0.0) if output else 0.0
        by_time = math.floor((bound / d.quota - extra) / d.per_layer_ms) \
            if d.quota > 1 and d.per_layer_ms > 0 and bound < math.inf else math.inf
        return int(min(cap, by_time, n))

    counts = dict.fromkeys((d.key for d in devs), 0)

    def take(d: _Dev, k: int) -> None:
        if k <= 0:
            return
        if d.host in host_left:
            fixed = _fixed_mib(world, d.key == first_rpc or d.key == LOCAL,
                               (last is not None and d.key == last.key) or (not order and d.key == LOCAL))
            host_left[d.host] -= k * _layer_mib(world) + (fixed if counts[d.key] == 0 else 0.0)
        counts[d.key] += k

    if at_least_one:
        for d in order:
            if limit(d, 0) < 1:
                return None
            take(d, 1)
    for d in sorted(devs, key=lambda d: d.per_layer_ms):
        left = n - sum(counts.values())
        if left <= 0:
            break
        room = limit(d, counts[d.key]) - counts[d.key]
        take(d, min(left, room))
    if sum(counts.values()) != n:
        return None
    if last is not None and counts[last.key] == 0 and not world.layout.n_layer:
        return None
    return counts


def _estimate(counts: dict[str, int], devs: dict[str, _Dev], last: str | None, host_ms: float) -> float:
    total, worst = host_ms, 0.0
    for key, k in counts.items():
        d = devs[key]
        holds_output = key == last
        if k == 0 and not holds_output:
            continue
        ms = k * d.per_layer_ms + (d.output_ms if holds_output else 0.0)
        total += ms + d.link_ms + (d.logits_ms if holds_output else 0.0)
        worst = max(worst, ms * d.quota)
    return max(total, worst)


# ---------------------------------------------------------------- exact plans

def _exact(world: World, name: str, local_layers: int, backends: list[str], counts: list[int]) -> Candidate:
    placed = place(world.layout, backends, world.offers, world.n_ctx, counts, local_layers,
                   world.offers.get(LOCAL), world.host_of, world.hosts)
    devices = ([LOCAL] if placed.local is not None else []) + backends
    return Candidate(name, devices, placed, predict(world.layout, placed, world.devices))


def memory_split(world: World) -> Candidate | None:
    """Today's rule: every healthy backend, in proportion to what it offers."""
    if not world.backends:
        return None
    placed = plan(world.layout, world.backends, world.offers, world.n_ctx, world.host_of, world.hosts)
    return Candidate("by memory", list(world.backends), placed, predict(world.layout, placed, world.devices))


def _sets(world: World, remote: list[str]) -> list[tuple[str, ...]]:
    if len(remote) <= EXHAUSTIVE:
        return [s for k in range(len(remote) + 1) for s in itertools.combinations(remote, k)]
    fastest = sorted(remote, key=lambda k: _quick(world, k).per_layer_ms)
    return [tuple(fastest[:k]) for k in range(len(remote) + 1)]


def candidates(world: World, spread: bool = False) -> list[Candidate]:
    """The best plan found for each set of devices (estimated), placed and predicted exactly."""
    remote = [b for b in world.backends if b in world.devices]
    quick = {k: _quick(world, k) for k in world.devices}
    host_ms = 0.0
    rough: list[tuple[float, bool, tuple[str, ...], str | None, dict[str, int]]] = []
    for subset in ([tuple(remote)] if spread else _sets(world, remote)):
        for use_local in ([True, False] if world.local else [False]):
            if not subset and not use_local:
                continue
            local = quick[LOCAL] if use_local else None
            for last in subset or (None,):
                order = [quick[k] for k in subset if k != last] + ([quick[last]] if last else [])
                # the time bounds worth trying: where a quota-limited device's allowance changes
                bounds = {math.inf}
                for d in ([local] if local else []) + order:
                    if d.quota > 1:
                        bounds.update(d.quota * (k * d.per_layer_ms + d.output_ms) for k in range(world.layout.n_layer + 1))
                best: tuple[float, dict[str, int]] | None = None
                for bound in sorted(bounds):
                    counts = _fill(world, order, quick[last] if last else None, local, bound, spread)
                    if counts is None:
                        continue
                    est = _estimate(counts, quick, last or (LOCAL if local else None), host_ms)
                    if best is None or est < best[0]:
                        best = (est, counts)
                if best is not None:
                    rough.append((best[0], use_local, tuple(d.key for d in order), last, best[1]))
    rough.sort(key=lambda r: r[0])
    out: list[Candidate] = []
    seen: set[tuple[Any, ...]] = set()
    for _, use_local, order_keys, _last, counts in rough:
        # a device given no layers is dropped from the plan (the last keeps the output layer)
        keys = [k for k in order_keys if counts[k] > 0 or k == order_keys[-1]]
        local_layers = counts.get(LOCAL, 0) if use_local else 0
        sig = (local_layers, tuple(keys), tuple(counts[k] for k in keys))
        if sig in seen:
            continue
        seen.add(sig)
        if not keys and local_layers != world.layout.n_layer:
            continue
        try:
            cand = _exact(world, "", local_layers, keys, [counts[k] for k in keys])
        except ValueError:
            continue
        out.append(cand)
        if len(out) >= EXACT * 8:
            break
    return out


def _name(c: Candidate) -> str:
    n = len(c.backends)
    if not n:
        return "this host"
    where = f"{n} backend{'s' if n != 1 else ''}"
    return f"this host + {where}" if c.placement.local is not None else where


# predictions this close are the same plan speed (see _simplest): bench/speed_placement.py found
# predictions up to 10-12 % off what the plans then ran at, and one device's benchmark comes out up
# to ~25 % apart from run to run (bench/speed_noise.py; before: a CI run spread a model over a host
# at 20 % of a core for a predicted 3 %, its fast host measured 40 % slow on a busy machine)
SAME_WITHIN = 0.10


def choose(world: World, mode: str = "speed") -> Choice:
    """The plan to start, the others worth showing, and the one line that says why."""
    notes: list[str] = []
    unmeasured = [k for k, d in world.devices.items() if d.speed is None]
    if unmeasured:
        notes.append(f"speed not measured for {', '.join(_short(k) for k in unmeasured)}: taken as the slowest "
                     "measured device" if len(unmeasured) < len(world.devices) else
                     "no device speed measured (no llama-bench?): plans are ranked by memory alone")
    by_memory = memory_split(world)
    found = [c for c in candidates(world) if c.fits]
    spread = [c for c in candidates(world, spread=True) if c.fits] if world.backends else []
    for c in found + spread:
        c.name = _name(c)
    best = _simplest(found)
    best_spread = min(spread, key=lambda c: c.ms, default=None)
    local_only = min((c for c in found if not c.backends), key=lambda c: c.ms, default=None)
    if best_spread is not None:
        best_spread.name = "spread"
    if local_only is not None:
        local_only.name = "this host"
    shown: list[Candidate] = []
    ranked: list[Candidate | None] = [best, local_only, best_spread, by_memory, *sorted(found, key=lambda c: c.ms)]
    for option in ranked:
        if option is not None and all(option is not s and not _same(option, s) for s in shown):
            shown.append(option)
        if len(shown) >= 6:
            break
    if mode == "memory":
        chosen = by_memory if by_memory is not None and by_memory.fits else None
    elif mode == "spread":
        chosen = best_spread
    else:
        chosen = best
    idle = [b for b in world.backends if chosen is None or b not in chosen.backends]
    return Choice(mode, chosen, shown, idle, _reason(mode, chosen, best, best_spread, idle, world), notes)


def _simplest(found: list[Candidate]) -> Candidate | None:
    """The fastest plan, except that one with fewer RPC devices predicted within SAME_WITHIN of it
    wins: each device's speed is measured on its own, with its own noise (two local backends and
    this host's CPU, one processor, came out 0.5 % apart on a quiet machine, up to 40 % on a busy
    one), and a plan that is not measurably faster is not worth a device more (nor `coordinator
    plan` and `start` disagreeing on it)."""
    fastest = min(found, key=lambda c: c.ms, default=None)
    if fastest is None:
        return None
    close = [c for c in found if c.ms <= fastest.ms * (1 + SAME_WITHIN)]
    return min(close, key=lambda c: (len(c.backends), c.ms))


def _same(a: Candidate, b: Candidate) -> bool:
    return a.layers() == b.layers() and a.devices == b.devices


def _short(key: str) -> str:
    return "this host's CPU" if key == LOCAL else key


def _ms(c: Candidate | None) -> str:
    return f"{c.ms:.1f}" if c is not None and c.prediction is not None else "?"


def _reason(mode: str, chosen: Candidate | None, best: Candidate | None, spread: Candidate | None,
            idle: list[str], world: World) -> str:
    if chosen is None:
        return "nothing fits"
    n = len(world.backends)
    rate = f"predicted {_ms(chosen)} ms/token"
    if mode == "memory":
        return f"split by memory over all {n} backends as set (SYNAPTICLLAMAS_PLACEMENT=memory); {rate}" + (
            f" vs {_ms(best)} for the fastest plan" if best is not None and best is not chosen else "")
    if mode == "spread":
        return f"spread over all {n} backends as asked; {rate}" + (
            f" vs {_ms(best)} for the fastest plan" if best is not None and _ms(best) != _ms(chosen) else "")
    vs = f" vs {_ms(spread)} spread; `--spread` to use them all" if spread is not None and idle else ""
    left = f"{len(idle)} backend{'s' if len(idle) != 1 else ''} left idle; " if idle else ""
    if not chosen.backends:
        return f"fits on this host: {left}{rate}{vs}"
    if not idle:
        return f"spread over all {n} backends{' and this host' if chosen.placement.local else ''}: {rate}"
    used = ", ".join(chosen.backends)
    return f"fastest on {used}{' and this host' if chosen.placement.local else ''}: {left}{rate}{vs}"
