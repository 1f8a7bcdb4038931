"""CoordinatorManager: the app's llama.cpp coordinator, ours or one we only watch, behind one interface.

Ours is the Supervisor (supervisor.py: launches llama-server over the backends and keeps it
running); `coordinator attach URL` swaps in an ExternalWatcher (attach.py: a llama-server this
shell did not start, checked once a minute). Both answer the `Coordinator` protocol, which is all
that requests need (the gateway, through which the shell's `ask` and `chat` go too): the state, whether a restart is
under way to wait for, and where to send. Commands that only make sense for ours (start, stop,
rebalance) are refused in one line while attached.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from synapticllamas.llama import http as llama_http
from synapticllamas.llama.attach import ExternalWatcher
from synapticllamas.llama.hooks import Hooks, observe
from synapticllamas.llama.lifecycle import ACTIVE, State
from synapticllamas.llama.planner import Planner
from synapticllamas.llama.preflight import CoordinatorError
from synapticllamas.llama.process import ChildOps
from synapticllamas.llama.supervisor import Run, Supervisor

if TYPE_CHECKING:
    from synapticllamas.events.observer import Observer
    from synapticllamas.llama.placement import Offer
    from synapticllamas.llama.preflight import Plan, Target
    from synapticllamas.rpc.registry import RpcRegistry


class Coordinator(Protocol):
    """What a request needs of a coordinator, ours or attached."""

    @property
    def state(self) -> State: ...

    @property
    def url(self) -> str | None: ...

    @property
    def recovering(self) -> bool: ...

    def recovery_reason(self) -> str: ...

    async def wait_running(self, timeout: float) -> None: ...

    def serving_endpoint(self) -> tuple[llama_http.Endpoint, Run | None]: ...

    def status(self) -> dict[str, Any]: ...


class CoordinatorManager:
    def __init__(self, settings: Any, observer: Observer | None = None, registry: RpcRegistry | None = None,
                 ops: ChildOps | None = None) -> None:
        self.settings = settings
        self.registry = registry
        self.hooks = Hooks()
        self.planner = Planner(settings, registry, self.hooks)
        self.supervisor = Supervisor(settings, self.hooks, registry, self.planner, ops,
                                     in_flight=lambda: self.in_flight())
        self.external: ExternalWatcher | None = None                 # `coordinator attach`
        # requests in flight, every client's (the gateway sets it): an auto rebalance waits for none
        self.in_flight: Callable[[], int] = lambda: 0
        if registry is not None:
            registry.on_change.append(self._backend_changed)
        if observer is not None:
            observe(self.hooks, observer)

    @property
    def active(self) -> Coordinator:
        return self.external if self.external is not None else self.supervisor

    # ------------------------------------------------------------ what everyone reads

    @property
    def state(self) -> State:
        return self.active.state

    @property
    def url(self) -> str | None:
        return self.active.url

    @property
    def attached(self) -> str | None:
        """The URL of the external coordinator being watched, if any."""
        return self.external.url if self.external else None

    def status(self) -> dict[str, Any]:
        return self.active.status()

    @property
    def recovering(self) -> bool:
        return self.active.recovering

    def recovery_reason(self) -> str:
        return self.active.recovery_reason()

    async def wait_running(self, timeout: float) -> None:
        await self.active.wait_running(timeout)

    def serving_endpoint(self) -> tuple[llama_http.Endpoint, Run | None]:
        return self.active.serving_endpoint()

    def require_running(self) -> None:
        """Raise CoordinatorError unless a request can be sent (now, or once a recovery is done)."""
        if self.state != State.RUNNING and not self.recovering:
            raise CoordinatorError(f"no running coordinator (state: {self.state}); `coordinator start` first")

    # ------------------------------------------------------------ ours: start, stop, rebalance

    def _ours(self, action: str) -> Supervisor:
        if self.external is not None:
            hint = ("`coordinator detach` first" if action == "start" else
                    "it is not ours to stop (`coordinator detach` stops watching)" if action == "stop" else
                    "it is not ours")
            raise CoordinatorError(f"watching the external coordinator {self.external.url}; {hint}")
        return self.supervisor

    async def start(self, model: Path | str | None = None, port: int | None = None,
                    force: bool = False, spread: bool = False) -> dict[str, Any]:
        return await self._ours("start").start(model, port, force, spread)

    async def stop(self, reason: str = "user") -> None:
        await self._ours("stop").stop(reason)

    async def restart(self) -> dict[str, Any]:
        return await self._ours("start").restart()

    async def rebalance(self, auto: bool = False) -> dict[str, Any]:
        return await self._ours("rebalance").rebalance(auto)

    def _backend_changed(self, address: str, old: str, new: str, reason: str) -> None:
        if self.external is None:
            self.supervisor.backend_changed(address, old, new, reason)

    async def close(self) -> None:
        """App exit: stop what we started (or stop watching), end every timer."""
        if self.external is not None:
            self.external.close()
            self.external = None
        await self.supervisor.close()

    # ------------------------------------------------------------ attach an external coordinator

    async def attach(self, url: str, api_key: str | None = None) -> tuple[bool, str]:
        if self.external:
            raise CoordinatorError(f"already watching {self.external.url}; `coordinator detach` first")
        if self.supervisor.state in ACTIVE:
            raise CoordinatorError(f"this shell runs its own coordinator ({self.supervisor.state}); "
                                   "`coordinator stop` first")
        try:
            endpoint = llama_http.parse_base_url(url, api_key)
        except ValueError as exc:
            raise CoordinatorError(str(exc)) from None
        self.external = ExternalWatcher(endpoint, self.settings.attach_check_interval,
                                        lambda change: self.hooks.call("on_state_change", change),
                                        self.supervisor._internal_error)
        return await self.external.start()

    async def detach(self) -> str:
        if not self.external:
            raise CoordinatorError("not watching an external coordinator (`coordinator attach URL` does)")
        url = self.external.url
        self.external.close()
        self.external = None
        return url

    # ------------------------------------------------------------ ours, as the commands and benches read it

    @property
    def run(self) -> Run | None:
        return self.supervisor.run

    @property
    def logs(self) -> Any:
        return self.supervisor.logs

    @property
    def last_plan(self) -> Plan | None:
        return self.supervisor.last_plan

    @property
    def last_failover(self) -> dict[str, Any] | None:
        return self.supervisor.last_failover

    @property
    def last_exit(self) -> dict[str, Any] | None:
        return self.supervisor.last_exit

    @property
    def tries(self) -> int:
        return self.supervisor.tries

    @property
    def restarts(self) -> int:
        return self.supervisor.restarts

    @property
    def target(self) -> Target:
        return self.supervisor.target

    @property
    def offers_for(self) -> Callable[[list[str]], dict[str, Offer]] | None:
        return self.planner.offers_for

    @offers_for.setter
    def offers_for(self, fn: Callable[[list[str]], dict[str, Offer]] | None) -> None:
        self.planner.offers_for = fn

    @property
    def dial_for(self) -> Callable[[list[str]], Awaitable[dict[str, str]]] | None:
        return self.planner.dial_for

    @dial_for.setter
    def dial_for(self, fn: Callable[[list[str]], Awaitable[dict[str, str]]] | None) -> None:
        self.planner.dial_for = fn
