"""The pre-flight: everything that can fail before a llama-server is started, and the plan it runs.

Every start goes through `Planner.plan()`: the user's, a restart after a crash, a failover, a
rebalance. It finds the binary and the model (exists, is a GGUF file), checks the port, takes the
healthy backends from one registry round (minus the ones the last failure pointed at, for an
automatic start), and sizes the model on them (placement.py): a model that cannot fit is refused
(NoFit) before anything starts. Each failure is CoordinatorError with one line for the user.

Which devices, with how many layers: with `inputs` (llama/devices.py: hosts, speeds, links; App
wires it in), the chooser's fastest plan that fits (llama/chooser.py), which may keep layers on
this host's CPU and leave backends idle (`Plan.idle`); `Target.spread` or
SYNAPTICLLAMAS_PLACEMENT=spread makes every healthy backend hold layers, =memory splits by the
offers alone. Without `inputs`, the split by the offers.
"""
from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from synapticllamas.events.contract import SystemEvent
from synapticllamas.llama.hooks import Hooks, Notice
from synapticllamas.llama.preflight import (
    CoordinatorError,
    NoBackend,
    NoFit,
    Plan,
    Target,
    check_model,
    free_port,
    port_in_use,
)

if TYPE_CHECKING:
    from synapticllamas.llama.devices import PlacementInputs
    from synapticllamas.llama.placement import Offer
    from synapticllamas.rpc.registry import RpcRegistry


class Planner:
    def __init__(self, settings: Any, registry: RpcRegistry | None, hooks: Hooks) -> None:
        self.settings = settings
        self.registry = registry
        self.hooks = hooks
        # what each backend offers to placements (App wires nodes and local backends in), and the
        # free memory llama-server reported for plain rpc-servers at its last load
        self.offers_for: Callable[[list[str]], dict[str, Offer]] | None = None
        self.reported_free: dict[str, int] = {}
        # the address llama-server dials for each backend (secured links); None: the backends themselves
        self.dial_for: Callable[[list[str]], Awaitable[dict[str, str]]] | None = None
        # what the speed-aware choice knows of each device (llama/devices.py); None: split by memory
        self.inputs: PlacementInputs | None = None

    async def plan(self, target: Target, auto: bool, suspects: set[str] | frozenset[str] = frozenset(),
                   own_port: bool = False) -> Plan:
        """Raises CoordinatorError (NoFit when the model does not fit on the backends there are,
        NoBackend when none is healthy). `own_port`: the port is held by the llama-server this plan
        replaces (a rebalance), so it is not checked."""
        from synapticllamas.llama import binaries

        s = self.settings
        try:
            binary = binaries.llama_server(s.llama_server)
            model_path = target.model or (Path(s.model) if s.model else binaries.demo_model())
        except binaries.NotFound as exc:
            raise CoordinatorError(str(exc)) from None
        check_model(model_path)
        host, port = s.coordinator_host, target.port or s.coordinator_port
        if port == 0:
            port = free_port(host)    # private: clients use the gateway, whose port never changes
        elif not own_port and port_in_use(host, port):
            raise CoordinatorError(f"port {port} on {host} is already in use; choose another with "
                                   f"`coordinator start --port N` (or SYNAPTICLLAMAS_COORDINATOR_PORT)")
        backends: list[str] = []
        left_out: dict[str, str] = {}
        if s.distributed:
            if self.registry is None:
                raise CoordinatorError("distributed mode needs the backend registry, which is not available")
            await self.registry.check()
            healthy = self.registry.healthy()
            for key in self.registry.addresses():
                if key not in healthy:
                    left_out[key] = "down"
                elif auto and key in suspects:
                    left_out[key] = "unreachable after the last failure"
                else:
                    backends.append(key)
            if not backends:
                known = ", ".join(f"{k} ({why})" for k, why in left_out.items())
                raise NoBackend(
                    (f"no healthy RPC backend ({known})" if known else "no RPC backend is configured")
                    + " in distributed mode; start two local ones with `backends spawn 2`, or add one with "
                    "`backends add HOST:PORT`")
        plan = Plan(binary, model_path, host, port, backends, left_out)
        if backends:
            await self._placed(plan, target)
        if plan.backends and self.dial_for is not None:
            # the ones the plan holds (the chooser may leave some idle): llama-server dials only those
            await self._dial(plan, target)
        return plan

    async def _placed(self, plan: Plan, target: Target) -> None:
        if self.inputs is not None:
            await self._choose(plan, target)
        else:
            await self._place(plan, target.force)

    async def _dial(self, plan: Plan, target: Target) -> None:
        """What llama-server dials for each backend the plan holds. A backend whose secured link
        cannot be used (another cluster key, nobody there: trust/links.py raises LinkError naming
        it, and says so in a `link_failed` event) is left out with that line, and the placement is
        made again without it (the chooser may then take an idle backend, or this host alone)."""
        from synapticllamas.trust.stunnel import LinkError

        assert self.dial_for is not None
        while plan.backends:
            try:
                plan.dial = await self.dial_for(list(plan.backends))
                return
            except LinkError as exc:
                if exc.backend is None or exc.backend not in plan.backends:
                    raise CoordinatorError(str(exc)) from None
                plan.left_out[exc.backend] = str(exc)
                candidates = [b for b in (*plan.backends, *plan.idle) if b != exc.backend]
                if not candidates:
                    raise NoBackend(f"{exc}; no other healthy RPC backend") from None
                plan.backends, plan.idle, plan.placement, plan.choice = candidates, [], None, None
                await self._placed(plan, target)

    async def _place(self, plan: Plan, force: bool) -> None:
        """Work out what the model needs on each backend; refuse (NoFit) what cannot fit."""
        from synapticllamas.llama import placement
        from synapticllamas.llama.gguf_layout import GGUFError, read_layout
        from synapticllamas.llama.preflight import supports_flag

        try:
            layout = await asyncio.to_thread(read_layout, plan.model)
        except (GGUFError, OSError) as exc:
            # llama.cpp may still load what we cannot size: start without a plan, and say so
            self.hooks.call("on_error", Notice(SystemEvent.ERROR, f"placement skipped: {exc}",
                                               {"model_path": str(plan.model)}, "warning"))
            return
        offers = self.offers_for(plan.backends) if self.offers_for else {}
        for address in plan.backends:
            if (address not in offers or offers[address].mib is None) and address in self.reported_free:
                offers[address] = placement.Offer(self.reported_free[address], "free at the last load")
        placed = placement.plan(layout, plan.backends, offers, self.settings.coordinator_ctx_size)
        if not placed.fits and not force:
            raise NoFit(placed.refusal())
        if not placed.fits:
            placed.notes.append("it does not fit by the plan; started anyway (--force)")
        plan.placement = placed
        plan.fit_flag = await asyncio.to_thread(supports_flag, plan.binary, "--fit")

    async def _choose(self, plan: Plan, target: Target) -> None:
        """The fastest placement that fits (or every backend, or by memory, as asked): it sets the
        plan's backends, the idle ones, llama-server's threads and flags."""
        from synapticllamas.llama.devices import choose_for
        from synapticllamas.llama.gguf_layout import GGUFError
        from synapticllamas.llama.placement import LOCAL
        from synapticllamas.llama.preflight import supports_flag
        from synapticllamas.rpc.launch import SPIN_COUNT
        from synapticllamas.util.host import threads_for

        assert self.inputs is not None
        self.inputs.reported_free = self.reported_free
        mode = "spread" if target.spread else self.settings.placement
        try:
            _, choice = await choose_for(self.inputs, plan.model, self.settings.coordinator_ctx_size,
                                         list(plan.backends), mode)
        except (GGUFError, OSError) as exc:
            self.hooks.call("on_error", Notice(SystemEvent.ERROR, f"placement skipped: {exc}",
                                               {"model_path": str(plan.model)}, "warning"))
            return
        chosen = choice.chosen
        if chosen is None:
            # nothing fits: say so with the split that uses everything (hosts counted once)
            fallback = next((c for c in choice.candidates if c.name == "by memory"), None)
            if fallback is None or not target.force:
                raise NoFit(fallback.placement.refusal() if fallback is not None else "the model does not fit")
            fallback.placement.notes.append("it does not fit by the plan; started anyway (--force)")
            chosen = fallback
        plan.choice = choice
        plan.placement = chosen.placement
        plan.idle = [b for b in plan.backends if b not in chosen.backends]
        plan.backends = list(chosen.backends)
        local = self.inputs.host()
        plan.threads = threads_for(local.cpus) if chosen.placement.local is not None else 1
        speed = self.inputs.speed_of(LOCAL)
        plan.no_repack = bool(chosen.placement.local is not None and speed is not None and speed.repack_failed)
        plan.env = {"GOMP_SPINCOUNT": SPIN_COUNT} if "GOMP_SPINCOUNT" not in os.environ else {}
        plan.fit_flag = await asyncio.to_thread(supports_flag, plan.binary, "--fit")

    def learned(self, plan: Plan, devices: dict[str, dict[str, Any]]) -> None:
        """A run came up: keep the free memory llama-server reported for each of its backends, for
        the next plan when nothing else says what a backend offers."""
        for address, device in devices.items():
            if address in plan.backends and device.get("free_mib") is not None:
                self.reported_free[address] = device["free_mib"]
