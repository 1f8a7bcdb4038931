"""What placement knows about each device, gathered for the chooser (llama/chooser.World).

The devices: this host's CPU (llama-server's own), the local backends, the nodes announced on
Redis and plain backends added by address. For each: the host it runs on (its memory and CPUs
are shared with every other device on that host), what it offers, how fast it computes and how
far it is.

- This host: util/host.this_host() (boot id, CPU share, free memory). Its CPU offers
  SYNAPTICLLAMAS_COORDINATOR_MEMORY MiB (default: the host's free memory; 0: no layers here).
- Speeds: measured here with llama-bench (llama/speed.py, cached): llama-server's CPU with weight
  repacking, local backends (plain rpc-servers on this host) without; a node measures its own and
  announces it (`speed` in its registration). A plain backend on a loopback address is a
  rpc-server on this host and computes like a local backend; any other plain backend is a host of
  its own whose speed is not known.
- Hosts: a local backend is on this host; a node says which host it is on (`host.id`); a plain
  backend is on this host if its address is loopback, else on a host of its own.
- Links: rpc/links.LinkTable (probe round trips, load bandwidth).
"""
from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from synapticllamas.llama.cost import DeviceInfo
from synapticllamas.llama.placement import LOCAL, HostOffer, Offer

if TYPE_CHECKING:
    from synapticllamas.llama.chooser import World
    from synapticllamas.llama.gguf_layout import ModelLayout
    from synapticllamas.llama.speed import DeviceSpeed
    from synapticllamas.rpc.links import LinkTable
    from synapticllamas.util.host import HostInfo


@dataclass(frozen=True)
class Announced:
    """What a node said about itself, checked (discovery's registration is untrusted input)."""
    host_id: str | None
    host_name: str | None
    mem_available_mib: int | None
    speed: DeviceSpeed | None
    offer_mib: int | None


def announced(registration: dict[str, Any]) -> Announced:
    from synapticllamas.llama.speed import DeviceSpeed

    host = registration.get("host")
    host = host if isinstance(host, dict) else {}
    ident = host.get("id")
    name = host.get("name")
    mem = host.get("mem_available_mib")
    offer = registration.get("memory_offered_mib")
    return Announced(
        ident[:80] if isinstance(ident, str) and ident.isprintable() and ident else None,
        name[:80] if isinstance(name, str) and name.isprintable() else None,
        mem if isinstance(mem, int) and not isinstance(mem, bool) and 0 <= mem < 1 << 40 else None,
        DeviceSpeed.from_summary(registration.get("speed")),
        offer if isinstance(offer, int) and not isinstance(offer, bool) and 0 < offer < 1 << 40 else None)


def is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def cache_file() -> Path:
    import os

    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "synapticllamas" / "speed.json"


class PlacementInputs:
    """Builds the chooser's World. `local_backend(address)` and `node(address)` answer None for an
    address that is not one (App's local_backend() and announced_node())."""

    def __init__(self, settings: Any, links: LinkTable, local_backend: Callable[[str], Any],
                 node: Callable[[str], Any], offers: Callable[[list[str]], dict[str, Offer]],
                 latency: Callable[[str], float | None] = lambda _: None) -> None:
        self.settings = settings
        self.links = links
        self.local_backend = local_backend
        self.node = node
        self.offers = offers
        self.latency = latency          # the registry's last probe of a backend (ms)
        self.notes: list[str] = []
        # the free memory llama-server reported for a backend at its last load (the planner's):
        # the offer of a plain backend nothing else speaks for
        self.reported_free: dict[str, int] = {}
        self.measure = True              # off: speeds only from the cache (a split by memory needs none)
        self._speeds: dict[str, DeviceSpeed | None] = {}

    def host(self) -> HostInfo:
        from synapticllamas.util.host import this_host

        return this_host(self.settings.host_id)

    def host_of_backend(self, address: str, here: HostInfo | None = None) -> tuple[str, str, int | None]:
        """(host id, its name, its free memory if known) of a backend: this host for a local backend,
        a plain one on loopback or a node that says so; a node's own host; else a host of its own."""
        here = here or self.host()
        node = self.node(address)
        if self.local_backend(address) is not None or (node is None and is_loopback(address)):
            return here.id, f"{here.name} (this host)", here.mem_available_mib
        if node is not None:
            said = announced(node.registration)
            if said.host_id == here.id:
                return here.id, f"{here.name} (this host)", here.mem_available_mib
            return (said.host_id or f"node {address}", said.host_name or address, said.mem_available_mib)
        return f"backend {address}", address, None

    def speed_of(self, key: str) -> DeviceSpeed | None:
        """The speed measured for this host's CPU (key LOCAL: with repacking) in the last world()."""
        from synapticllamas.llama.placement import LOCAL

        wanted = "True:" if key == LOCAL else "False:"
        return next((s for k, s in self._speeds.items() if k.startswith(wanted)), None)

    async def local_speed(self, repack: bool, threads: int | None = None) -> DeviceSpeed | None:
        """This host's speed: llama-server's CPU (repack) or a local rpc-server's (not); cached on
        disk. With `measure` off (placement by memory), only what the cache holds."""
        from synapticllamas.llama import binaries, speed
        from synapticllamas.util.host import threads_for

        host = self.host()
        threads = threads or threads_for(host.cpus)
        key = f"{repack}:{threads}"
        if key in self._speeds:
            return self._speeds[key]
        try:
            bench = binaries.llama_bench(self.settings.llama_server)
        except binaries.NotFound as exc:
            self.notes.append(f"device speed not measured: {exc}")
            self._speeds[key] = None
            return None
        if not self.measure:
            hit = speed.cached(cache_file(), speed.cache_key(bench, threads, repack, host.cpus, host.id,
                                                             speed.DEFAULT_TYPES))
            self._speeds[key] = hit
            return hit
        try:
            measured, _ = await speed.speed_of(bench, cache_file(), threads, repack, host.cpus, host.id)
        except speed.SpeedError as exc:
            self.notes.append(f"device speed not measured: {exc}")
            measured = None
        self._speeds[key] = measured
        return measured

    async def world(self, layout: ModelLayout, n_ctx: int, backends: Sequence[str]) -> World:
        from synapticllamas.llama.chooser import World

        host = self.host()
        devices: dict[str, DeviceInfo] = {}
        hosts: dict[str, HostOffer] = {host.id: HostOffer(host.id, f"{host.name} (this host)", host.mem_available_mib,
                                                          "its free memory")}
        offers = dict(self.offers(list(backends)))
        for address in backends:
            if (address not in offers or offers[address].mib is None) and address in self.reported_free:
                offers[address] = Offer(self.reported_free[address], "free at the last load")
        local_mib = self.settings.coordinator_memory
        if local_mib != 0:
            devices[LOCAL] = DeviceInfo(LOCAL, host.id, await self.local_speed(repack=True), None, host.name)
            offers[LOCAL] = Offer(local_mib, "SYNAPTICLLAMAS_COORDINATOR_MEMORY") if local_mib is not None \
                else Offer(host.mem_available_mib, "this host's free memory")
        for address in backends:
            self.links.rtt(address, self.latency(address))
            link = self.links.get(address)
            ident, name, free = self.host_of_backend(address, host)
            if ident not in hosts or (hosts[ident].mib is None and free is not None):
                hosts[ident] = HostOffer(ident, name, free, "its free memory, as the node announced"
                                         if self.node(address) is not None else "its free memory")
            elif free is not None and ident != host.id:       # two nodes of one host: the smaller figure
                old = hosts[ident]
                hosts[ident] = HostOffer(ident, old.name, min(old.mib or free, free), old.source)
            if ident == host.id and (self.local_backend(address) is not None or is_loopback(address)):
                local = self.local_backend(address)
                threads = local.threads if local is not None else None
                devices[address] = DeviceInfo(address, ident, await self.local_speed(False, threads), link, name)
            elif self.node(address) is not None:
                devices[address] = DeviceInfo(address, ident, announced(self.node(address).registration).speed,
                                              link, name)
            else:
                devices[address] = DeviceInfo(address, ident, None, link, name)
        return World(layout, n_ctx, devices, offers, hosts, list(backends))


async def choose_for(inputs: PlacementInputs, model: Path, n_ctx: int, backends: Sequence[str],
                     mode: str) -> tuple[ModelLayout, Any]:
    """Read the model's layout and choose: (layout, chooser.Choice). GGUFError/OSError if the
    model cannot be read."""
    import asyncio

    from synapticllamas.llama.chooser import choose
    from synapticllamas.llama.gguf_layout import read_layout

    layout = await asyncio.to_thread(read_layout, model)
    inputs.notes = []
    inputs.measure = mode != "memory"
    world = await inputs.world(layout, n_ctx or layout.n_ctx_train, backends)
    choice = choose(world, mode)
    choice.notes[:0] = inputs.notes
    return layout, choice
