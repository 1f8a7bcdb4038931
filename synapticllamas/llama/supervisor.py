"""CoordinatorManager: a supervised llama-server (the llama.cpp coordinator) over the RPC backends.

States and the transitions allowed between them are the table in lifecycle.py (supervisord's
states). `_change_state()` is the one place a state changes, and every lifecycle event leaves
through it (with from_state, pid, tries, reason, exit code or signal). The manager knows nothing of
Redis or the shell: whoever wants its events subscribes to `hooks`; `observe()` at the bottom of
this module turns them into observer events.

Nothing here polls a running server. The child's exit is awaited (so a crash is seen at once), its
stdout/stderr are read line by line, /health is asked during start-up only, when the log says the
server is up (plus a slow fallback probe), and then once per heartbeat.

The state is the truth: the instant llama-server has exited the state is `exited` (or `stopped`),
before its last output is drained and a probe names a dead backend; the `stop` event that carries
that diagnosis follows within the drain and probe bounds.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from synapticllamas.events.contract import Component, CoordinatorEvent, ModelEvent, RawEvent, SystemEvent
from synapticllamas.llama import args as llama_args
from synapticllamas.llama import http as llama_http
from synapticllamas.llama.attach import ExternalWatcher
from synapticllamas.llama.lifecycle import (
    ACTIVE,
    EVENT_TYPE,
    SUPERVISED,
    Lifecycle,
    State,
    StateChange,
    default_level,
)
from synapticllamas.llama.preflight import CoordinatorError, NoFit, Plan, Target, check_model, port_in_use
from synapticllamas.util.processes import exit_details, signal_group, spawn, terminate
from synapticllamas.util.ticker import Ticker

if TYPE_CHECKING:   # llama.log (its patterns) and binaries load with the first start, not at start-up
    from synapticllamas.events.observer import Observer
    from synapticllamas.llama.log import LoadReport, LogLine, RequestTimings
    from synapticllamas.llama.placement import Offer
    from synapticllamas.rpc.registry import RpcRegistry

__all__ = ["ACTIVE", "CoordinatorError", "CoordinatorManager", "Notice", "Plan", "State", "StateChange",
           "check_model", "port_in_use"]

BACKOFF_CAP = 60.0
LOG_LINES = 2000           # raw lines kept for `coordinator logs`
LINE_LIMIT = 1 << 20       # longest output line read whole
DRAIN_TIMEOUT = 0.3        # after the exit, wait this long for the last lines (the error) to arrive
SETTLE_TIMEOUT = 3.0       # how long close() waits for a pending exit's event
FALLBACK_PROBE = 0.5       # start-up /health probe interval before the log says "listening"
LISTENING_PROBE = 0.1      # ... and after it (a server that listens before loading answers 503)
HEALTH_FAILURES = 2        # failed heartbeat /health requests in a row before a restart
HEALTH_TIMEOUT = 5.0       # a heartbeat's /health; the ticks it outlasts are skipped
# how a process we stopped ends: a clean exit after SIGTERM, or the signals we sent
STOPPED_BY_US = (0, -signal.SIGTERM, -signal.SIGKILL)

log = logging.getLogger("synapticllamas")


@dataclass(slots=True)
class Notice:
    """A non-lifecycle happening: model progress, heartbeat, request/response, an internal error."""
    event_type: str
    message: str
    details: dict[str, Any]
    level: str = "info"


@dataclass
class ChildOps:
    """How the manager starts, signals and asks llama-server: the real things by default; the
    lifecycle unit tests pass fakes (tests/unit/test_lifecycle.py) and run in milliseconds."""
    spawn: Callable[..., Awaitable[Any]] = spawn
    signal: Callable[[int, int], bool] = signal_group
    health: Callable[[llama_http.Endpoint, float], Awaitable[tuple[bool, str]]] = llama_http.health


class Hooks:
    """Subscriber lists. A failing subscriber is counted, never allowed to break supervision."""

    def __init__(self) -> None:
        # what a subscriber returns is ignored
        self.on_state_change: list[Callable[[StateChange], object]] = []
        self.on_log: list[Callable[[LogLine, dict[str, Any]], object]] = []
        self.on_model_progress: list[Callable[[Notice], object]] = []
        self.on_load_progress: list[Callable[[Notice], object]] = []   # every upload sample (a UI's line)
        self.on_heartbeat: list[Callable[[Notice], object]] = []
        self.on_request: list[Callable[[Notice], object]] = []
        self.on_inference: list[Callable[[Notice], object]] = []
        self.on_recovery: list[Callable[[Notice], object]] = []    # failover and rebalance
        self.on_error: list[Callable[[Notice], object]] = []
        self.errors = 0

    def call(self, name: str, *args: Any) -> None:
        for fn in list(getattr(self, name)):
            try:
                fn(*args)
            except Exception:
                self.errors += 1

    def subscribe(self, name: str, fn: Callable[..., object]) -> Callable[[], None]:
        subscribers = getattr(self, name)
        subscribers.append(fn)

        def unsubscribe() -> None:
            if fn in subscribers:
                subscribers.remove(fn)

        return unsubscribe


@dataclass(eq=False)
class Run:
    """One llama-server process."""
    plan: Plan
    proc: asyncio.subprocess.Process
    auto: bool                                   # an automatic restart, not a user's start
    report: LoadReport                           # devices and buffers, from its load log
    timings: RequestTimings                      # per-request figures, from its print_timing lines
    started: float = field(default_factory=time.monotonic)
    failures: list[LogLine] = field(default_factory=list)
    lines: deque[str] = field(default_factory=lambda: deque(maxlen=12))
    hint: asyncio.Event = field(default_factory=asyncio.Event)   # the log says: try /health now
    listening: bool = False
    uploading: asyncio.Task[None] | None = None       # watches the weights go to the RPC backends
    ready: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    stop_reason: str | None = None               # why we stopped it: user, exit, startup_failed, health
    error: str | None = None                     # the manager's own reason to stop it
    tasks: list[asyncio.Task[None]] = field(default_factory=list)   # readers, then the start-up prober
    watcher: asyncio.Task[None] | None = None
    hidden: list[str] = field(default_factory=list)   # secrets of its argv, kept out of logs and events
    api_key: str | None = None                        # sent with each request to it

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def endpoint(self) -> llama_http.Endpoint:
        return llama_http.Endpoint("http", self.plan.host, self.plan.port, self.api_key)


class CoordinatorManager:
    def __init__(self, settings: Any, observer: Observer | None = None, registry: RpcRegistry | None = None,
                 ops: ChildOps | None = None) -> None:
        self.settings = settings
        self.registry = registry
        self.ops = ops or ChildOps()
        self.hooks = Hooks()
        self.lifecycle = Lifecycle(SUPERVISED, "coordinator", self._internal_error)
        self.run: Run | None = None
        self.tries = 0                    # automatic restarts since the last time it was running
        self.restarts = 0                 # automatic restarts in total
        self.running_since: float | None = None
        self.last_exit: dict[str, Any] | None = None
        self.logs: deque[tuple[float, int, str, str]] = deque(maxlen=LOG_LINES)
        self.target = Target()            # the user's --model / --port / --force, kept by restarts
        self.last_plan: Plan | None = None
        # what each backend offers to placements (App wires nodes and local backends in), and the
        # free memory llama-server reported for plain rpc-servers at its last load
        self.offers_for: Callable[[list[str]], dict[str, Offer]] | None = None
        self.reported_free: dict[str, int] = {}
        self.last_failover: dict[str, Any] | None = None
        self._recovery: dict[str, Any] | None = None   # a failover under way: lost, survivors, since
        self.requests = 0                  # our own requests (ask, chat) in flight
        self._state_changed = asyncio.Event()        # set (and replaced) at each change: wait_running()
        self._exit_reason: str | None = None         # why the last run ended, from the instant it did
        from synapticllamas.llama.client import CoordinatorClient

        self.client = CoordinatorClient(self)
        self.suspects: set[str] = set()   # backends an RPC failure pointed at: not in the next --rpc
        self.external: ExternalWatcher | None = None                 # `coordinator attach`
        self._settling: asyncio.Task[None] | None = None            # the last run's exit handling
        self._backoff_task: asyncio.Task[None] | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        if registry is not None:
            registry.on_change.append(self._backend_changed)
        if observer is not None:
            observe(self, observer)

    # ------------------------------------------------------------ the one state-change function

    @property
    def state(self) -> State:
        return self.external.state if self.external else self.lifecycle.state

    def _change_state(self, to: State, message: str, reason: str | None = None, level: str | None = None,
                      announce: bool = True, **details: Any) -> StateChange:
        """Change state (the table in lifecycle.py must allow it) and emit the lifecycle event;
        with announce=False the caller completes the change's message and details, then emits it
        with _announce(). Nothing else changes the state."""
        run = self.run
        pid = details.pop("pid", run.pid if run else None)
        from_state = self.lifecycle.enter(to)
        base: dict[str, Any] = {"state": str(to), "from_state": str(from_state), "pid": pid, "tries": self.tries}
        if reason:
            base["reason"] = reason
        change = StateChange(to, from_state, EVENT_TYPE[to], message, level or default_level(to, reason),
                             {**base, **details})
        if to == State.RUNNING:
            self.running_since = time.monotonic()
            if run is not None:
                self._heartbeat_task = self._spawn_task(self._heartbeat(run))
        elif from_state == State.RUNNING:
            self.running_since = None
            if self._heartbeat_task is not None:
                self._heartbeat_task.cancel()
                self._heartbeat_task = None
        changed, self._state_changed = self._state_changed, asyncio.Event()
        changed.set()
        if announce:
            self._announce(change)
        return change

    def _announce(self, change: StateChange) -> None:
        self.hooks.call("on_state_change", change)

    def _internal_error(self, message: str) -> None:
        self.hooks.call("on_error", Notice(SystemEvent.ERROR, message, {"error": message}, "error"))

    # ------------------------------------------------------------ status

    @property
    def attached(self) -> str | None:
        """The URL of the external coordinator being watched, if any."""
        return self.external.url if self.external else None

    @property
    def url(self) -> str | None:
        if self.external:
            return self.external.url
        plan = self.run.plan if self.run else None
        return f"http://{plan.host}:{plan.port}" if plan else None

    def status(self) -> dict[str, Any]:
        if self.external:
            return self.external.status()
        run = self.run
        plan = run.plan if run else None
        return {
            "state": str(self.state),
            "pid": run.pid if run else None,
            "url": self.url,
            "model": str(plan.model) if plan else None,
            "backends": list(plan.backends) if plan else [],
            "uptime_s": round(time.monotonic() - self.running_since, 1) if self.running_since else None,
            "restarts": self.restarts,
            "tries": self.tries,
            "attached": False,
            "last_exit": self.last_exit,
            "placement": self._placement_status(plan),
            "unused_backends": self.unused_backends(),
            "last_failover": self.last_failover,
            "waiting": self._recovery.get("waiting") if self._recovery and self.state == State.WAITING else None,
        }

    def _placement_status(self, plan: Plan | None) -> list[dict[str, Any]] | None:
        """Per backend: the plan, and what llama-server really allocated (once it loaded)."""
        if plan is None or plan.placement is None:
            return None
        actual = self.run.report.devices if self.run else {}
        out = []
        for b in plan.placement.backends:
            used = actual.get(b.address, {})
            out.append({**b.summary(), "model_mib": used.get("model_mib"), "kv_mib": used.get("kv_mib"),
                        "compute_mib": used.get("compute_mib")})
        return out

    def unused_backends(self) -> list[str]:
        """Healthy backends the running coordinator does not use (lost earlier, back now)."""
        if self.registry is None or not self.settings.distributed or self.state != State.RUNNING or not self.run:
            return []
        used = set(self.run.plan.backends)
        return [b for b in self.registry.healthy() if b not in used]

    # ------------------------------------------------------------ pre-flight

    async def _plan(self, target: Target, auto: bool) -> Plan:
        """Every check that can fail before anything is started; raises CoordinatorError (NoFit
        when the model does not fit on the backends there are)."""
        from synapticllamas.llama import binaries

        s = self.settings
        port = target.port
        try:
            binary = binaries.llama_server(s.llama_server)
            model_path = target.model or (Path(s.model) if s.model else binaries.demo_model())
        except binaries.NotFound as exc:
            raise CoordinatorError(str(exc)) from None
        check_model(model_path)
        host, port = s.coordinator_host, port or s.coordinator_port
        if port_in_use(host, port):
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
                elif auto and key in self.suspects:
                    left_out[key] = "unreachable after the last failure"
                else:
                    backends.append(key)
            if not backends:
                known = ", ".join(f"{k} ({why})" for k, why in left_out.items())
                raise CoordinatorError(
                    (f"no healthy RPC backend ({known})" if known else "no RPC backend is configured")
                    + " in distributed mode; start two local ones with `backends spawn 2`, or add one with "
                    "`backends add HOST:PORT`")
        plan = Plan(binary, model_path, host, port, backends, left_out)
        if backends:
            await self._place(plan, target.force)
        return plan

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

    # ------------------------------------------------------------ start

    async def start(self, model: Path | str | None = None, port: int | None = None,
                    force: bool = False) -> dict[str, Any]:
        """Start llama-server and return once /health says ok; raise CoordinatorError otherwise.
        `force`: start even when placement says the model does not fit.

        Cancelling the caller (Ctrl-C) kills the child before the cancellation goes on."""
        if self.external:
            raise CoordinatorError(f"watching the external coordinator {self.external.url}; "
                                   "`coordinator detach` first")
        if self.state in ACTIVE:
            raise CoordinatorError(f"the coordinator is already {self.state}"
                                   + (f" at {self.url} (pid {self.run.pid})" if self.run else "")
                                   + "; use `coordinator stop` or `coordinator restart`")
        await self._settled()
        target = Target(user_path(model) if model else None, port, force)
        self.suspects.clear()      # the user's own start trusts the registry again
        self._recovery = None
        plan = await self._plan(target, auto=False)
        self.target = target
        self.tries = 0
        run = await self._launch(plan, auto=False)
        try:
            await asyncio.shield(run.ready)
        except asyncio.CancelledError:
            await asyncio.shield(self._abort_start(run))
            raise
        return self.status()

    async def _settled(self) -> None:
        """Wait until the last run's exit has been announced (its `stop` goes before a new `starting`)."""
        if self._settling is not None and not self._settling.done():
            await asyncio.wait({self._settling}, timeout=SETTLE_TIMEOUT)

    async def _launch(self, plan: Plan, auto: bool, why: str | None = None) -> Run:
        argv = plan.argv(self.settings.coordinator_ctx_size, self.settings.coordinator_args)
        try:
            proc = await self.ops.spawn(
                argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, limit=LINE_LIMIT)
        except OSError as exc:
            raise CoordinatorError(f"cannot run {plan.binary}: {exc.strerror or exc}") from None
        from synapticllamas.llama.log import LoadReport, RequestTimings

        keys = llama_args.api_keys(argv)
        run = Run(plan, proc, auto, LoadReport(), RequestTimings(), hidden=llama_args.secrets(argv),
                  api_key=keys[0] if keys else None)
        self.run = run
        self.last_plan = plan
        if self.registry is not None:
            self.registry.hold(plan.backends)      # rpc-server serves one client: no probes while we hold it
        n = len(plan.backends)
        where = f"{n} RPC backend{'s' if n != 1 else ''}" if self.settings.distributed else "standard mode"
        left = "; left out " + ", ".join(f"{k} ({why})" for k, why in plan.left_out.items()) if plan.left_out else ""
        placed: dict[str, Any] = {"placement": plan.placement.summary()} if plan.placement else {}
        self._change_state(
            State.STARTING, f"starting llama.cpp coordinator on {plan.host}:{plan.port} ({where}){left}",
            reason=why or ("restart" if auto else "user"), port=plan.port, host=plan.host, rpc_backends=plan.backends,
            left_out=plan.left_out, model_path=str(plan.model), argv=llama_args.redact_args(argv), **placed)
        assert proc.stdout is not None and proc.stderr is not None
        run.tasks = [self._spawn_task(self._read(run, proc.stdout, "stdout")),
                     self._spawn_task(self._read(run, proc.stderr, "stderr"))]
        run.tasks.append(self._spawn_task(self._wait_healthy(run)))
        run.watcher = self._settling = self._spawn_task(self._watch(run))
        return run

    async def _abort_start(self, run: Run) -> None:
        """Ctrl-C during start: nothing is worth saving in a half-loaded server, so SIGKILL."""
        if run.watcher is None or run.watcher.done():
            return
        if self.run is run and self.state in (State.STARTING, State.RUNNING, State.STOPPING):
            self._begin_stop(run, "user", "stopping llama.cpp coordinator (start cancelled)")
            self.ops.signal(run.pid, signal.SIGKILL)
        await asyncio.wait({run.watcher}, timeout=self.settings.coordinator_stop_timeout)

    # ------------------------------------------------------------ reading the output

    async def _read(self, run: Run, stream: asyncio.StreamReader, name: str) -> None:
        while True:
            try:
                raw = await stream.readline()
            except ValueError:        # one line over LINE_LIMIT: asyncio dropped it
                raw = b"[synapticllamas: an output line longer than 1 MiB was dropped]\n"
            if not raw:
                return
            self._on_line(run, name, raw.decode("utf-8", "replace").rstrip("\r\n"))

    def _on_line(self, run: Run, stream: str, text: str) -> None:
        from synapticllamas.llama.log import parse

        text = llama_args.scrub(text, run.hidden)   # it echoes a bad `--api-key=K` whole
        rec = parse(text)
        self.logs.append((time.time(), run.pid, stream, text))
        run.lines.append(text)
        run.report.feed(rec)
        self.hooks.call("on_log", rec, {"stream": stream, "pid": run.pid})
        model = run.plan.model
        if rec.is_failure:
            if rec.kind == "model_failed" and not any(f.kind == "model_failed" for f in run.failures):
                self.hooks.call("on_model_progress", Notice(
                    ModelEvent.LOAD_FAILED, f"model {model.name} failed to load: "
                    f"{rec.message.split(': ', 1)[-1]}", {"model_path": str(model), "pid": run.pid}, "error"))
            run.failures.append(rec)
        elif rec.kind == "load_step":
            d = rec.details
            self.hooks.call("on_model_progress", Notice(
                ModelEvent.LOADING, f"loading model {model.name}: {d['stage']} ({d['step']}/{d['steps']})",
                {"model_path": str(model), "pid": run.pid, **d}))
        elif (rec.kind == "buffer" and rec.details["what"] == "model" and rec.details["device"] in run.plan.backends
              and run.uploading is None):
            run.uploading = self._spawn_task(self._watch_upload(run))
        elif rec.kind == "model_loaded":
            load_s = round(time.monotonic() - run.started, 3)
            self.hooks.call("on_model_progress", Notice(
                ModelEvent.LOAD, f"model {model.name} loaded in {load_s:g}s",
                {"model_path": str(model), "pid": run.pid, "load_s": load_s,
                 "rpc_backends": run.plan.backends, **rec.details, **run.report.summary()}))
            run.hint.set()
        elif rec.kind == "listening":
            run.listening = True
            run.hint.set()
        elif rec.kind == "timing" and (done := run.timings.feed(rec)) is not None:
            rate = done["tokens_per_second"]
            self.hooks.call("on_inference", Notice(
                CoordinatorEvent.INFERENCE, f"request {done['task']} (slot {done['slot']}): {done['prompt_tokens']} "
                f"prompt + {done['generated_tokens']} generated tokens in {done['total_ms']:.0f} ms"
                + (f", {rate:g} tokens/s" if rate else ""),
                {**done, "pid": run.pid, "port": run.plan.port, "rpc_backends": run.plan.backends}))

    async def _watch_upload(self, run: Run) -> None:
        """While the weights go to the RPC backends: progress from the kernel's byte counters
        (llama/load_progress.py), on the progress line every sample, and as a model_loading event
        at most once per 5 %."""
        from synapticllamas.llama import load_progress

        backends = list(run.plan.backends)
        baseline = await load_progress.bytes_sent(backends)
        if baseline is None:
            return
        # the model buffer lines of all backends arrive in one burst: sum them at each sample
        upload = load_progress.Upload(backends, 1, baseline)
        model = run.plan.model
        while self.run is run and self.state == State.STARTING:
            await asyncio.sleep(load_progress.SAMPLE_EVERY)
            sent = await load_progress.bytes_sent(backends)
            if sent is None or self.run is not run or self.state != State.STARTING:
                return
            total = sum(d.get("model_mib", 0.0) for key, d in run.report.devices.items() if key in backends)
            upload.expected = max(1, int(total * 2**20))
            percent = upload.percent(sent)
            details = {"model_path": str(model), "pid": run.pid, "stage": "sending weights", "percent": percent,
                       "sent_mib": round((sent - baseline) / 2**20, 1), "total_mib": round(total, 1),
                       "rpc_backends": backends}
            message = (f"loading model {model.name}: sending weights to {len(backends)} RPC backend"
                       f"{'s' if len(backends) != 1 else ''}, {percent}% ({details['sent_mib']:g} of {total:g} MiB)")
            self.hooks.call("on_load_progress", Notice(ModelEvent.LOADING, message, details))
            if upload.step(percent):
                # the event's percent is the 5 % step reached (a multiple of 5, each once); the
                # message keeps the exact figure, the same text as the line, which the UI prints once
                self.hooks.call("on_model_progress", Notice(ModelEvent.LOADING, message,
                                                            {**details, "percent": upload.reported}))
            if percent >= 100:
                return

    # ------------------------------------------------------------ waiting for /health

    async def _wait_healthy(self, run: Run) -> None:
        """Start-up only: probe /health when the log says the server is up (and slowly before)."""
        endpoint = run.endpoint
        try:
            async with asyncio.timeout(self.settings.coordinator_start_timeout):
                while True:
                    try:
                        await asyncio.wait_for(run.hint.wait(),
                                               LISTENING_PROBE if run.listening else FALLBACK_PROBE)
                    except TimeoutError:
                        pass
                    run.hint.clear()
                    ok, _ = await self.ops.health(endpoint, 2.0)
                    if ok:
                        break
        except TimeoutError:
            if self.run is run and self.state == State.STARTING:
                run.error = f"/health did not report ok within {self.settings.coordinator_start_timeout:g}s"
                self._begin_stop(run, "startup_failed", f"stopping llama.cpp coordinator: {run.error}")
                self._spawn_task(self._terminate(run))
            return
        if self.run is run and self.state == State.STARTING:
            self.tries = 0
            load_s = round(time.monotonic() - run.started, 3)
            plan = run.plan
            for address, device in run.report.devices.items():
                if address in plan.backends and device.get("free_mib") is not None:
                    self.reported_free[address] = device["free_mib"]   # for the next plan, when nothing else says
            extra: dict[str, Any] = {"placement": self._placement_status(plan)} if plan.placement else {}
            self._change_state(State.RUNNING, "llama.cpp coordinator started", port=plan.port, host=plan.host,
                               url=f"http://{plan.host}:{plan.port}", rpc_backends=plan.backends,
                               model_path=str(plan.model), load_s=load_s, restarts=self.restarts,
                               **run.report.summary(), **extra)
            self._recovered(run)
            if not run.ready.done():
                run.ready.set_result(None)

    # ------------------------------------------------------------ the exit

    async def _watch(self, run: Run) -> None:
        returncode = await run.proc.wait()
        change = self._exited(run, returncode)            # the state is the truth from this instant
        # the last lines (the reason it died) may still be in the pipes: read them, bounded
        await asyncio.wait(run.tasks[:2], timeout=DRAIN_TIMEOUT)
        for task in run.tasks:
            task.cancel()
        self.ops.signal(run.pid, signal.SIGKILL)   # anything it left in its process group
        await self._settle_exit(run, returncode, change)

    def _exited(self, run: Run, returncode: int) -> StateChange:
        """The process is gone: change state at once; the event follows with the diagnosis."""
        self.run = None
        if self.registry is not None:
            self.registry.hold(())
        reason = run.stop_reason
        if reason in ("user", "exit", "rebalance"):
            self._exit_reason = reason
            return self._change_state(State.STOPPED, "", reason=reason, announce=False, pid=run.pid)
        if reason == "health" and returncode not in STOPPED_BY_US:
            reason = "crash"          # it died of something else while we were stopping it
        # (a failover stop stays a failover however it ended: the lost backend may abort it first)
        elif reason is None:
            reason = "startup_failed" if self.state == State.STARTING else "crash"
        self._exit_reason = "auto_startup_failed" if reason == "startup_failed" and run.auto else reason
        return self._change_state(State.EXITED, "", reason=reason, announce=False, pid=run.pid)

    def _diagnose(self, run: Run, dead: list[str]) -> str:
        """One line: why did it stop? The most specific failure the log printed."""
        order = ("rpc_connect_failed", "rpc_crashed", "bind_failed", "model_failed", "abort")
        failure = min(run.failures, key=lambda f: order.index(f.kind) if f.kind in order else len(order),
                      default=None)
        if failure is None:
            return run.error or ""
        if failure.kind == "rpc_connect_failed":
            return f"Failed to connect to RPC backend {failure.details['backend']}"
        # drop the source tag: "srv  load_model: ...", "ggml-rpc.cpp:566: ..."
        text = failure.message.split(": ", 1)[-1]
        if failure.kind == "rpc_crashed" and dead:
            text += f" (backend {', '.join(dead)} unreachable)"
        return text

    async def _settle_exit(self, run: Run, returncode: int, change: StateChange) -> None:
        """Name the cause (the log; for an RPC crash, one probe of the backends it used), announce
        the exit, and schedule the restart the policy asks for."""
        dead: list[str] = []
        kinds = {f.kind for f in run.failures}
        if "rpc_connect_failed" in kinds:
            dead = [f.details["backend"] for f in run.failures if f.kind == "rpc_connect_failed"]
        elif "rpc_crashed" in kinds and run.plan.backends and self.registry is not None:
            # llama.cpp does not say which backend failed: one probe round of the ones it used does
            await self.registry.check(run.plan.backends)
            healthy = self.registry.healthy()
            dead = [b for b in run.plan.backends if b not in healthy]
        self.suspects.update(dead)
        why = self._diagnose(run, dead)
        code = exit_details(returncode)
        how = code.get("signal") or f"exit code {returncode}"
        reason = change.details["reason"]
        if change.state == State.STOPPED:
            change.message = f"llama.cpp coordinator stopped ({reason})"
        else:
            verb = {"crash": "crashed", "startup_failed": "failed to start",
                    "health": "stopped answering /health and was stopped",
                    "failover": "was stopped: an RPC backend it used is lost"}[reason]
            change.message = f"llama.cpp coordinator {verb} ({how})" + (f": {why}" if why else "")
        change.details.update(code, port=run.plan.port, rpc_backends=run.plan.backends,
                              model_path=str(run.plan.model), last_lines=list(run.lines))
        if why:
            change.details["error"] = why
        if dead:
            change.details["failed_backends"] = dead
        self.last_exit = {"reason": reason, "message": change.message, **code, "failed_backends": dead}
        self._announce(change)
        if not run.ready.done():
            run.ready.set_exception(CoordinatorError(change.message))
            run.ready.exception()   # retrieved: a cancelled start() must not log "never retrieved"
        if self.state == State.EXITED and reason == "failover":
            self._spawn_task(self._recover())
        elif self.state == State.EXITED and (reason in ("crash", "health") or (reason == "startup_failed" and run.auto)):
            self._schedule_restart(change.message)

    # ------------------------------------------------------------ restart policy

    def _schedule_restart(self, cause: str) -> None:
        limit = self.settings.coordinator_max_restarts
        if self.tries >= limit:
            self._change_state(State.FATAL, f"llama.cpp coordinator gave up after {self.tries} restart"
                               f"{'s' if self.tries != 1 else ''}: {cause}", reason="max_restarts",
                               max_restarts=limit, cause=cause)
            return
        self.tries += 1
        delay = backoff_delay(self.settings.coordinator_backoff, self.tries)
        self._change_state(State.BACKOFF, f"restarting llama.cpp coordinator in {delay:g}s "
                           f"(try {self.tries} of {limit})", delay_s=delay, max_restarts=limit, cause=cause)
        self._backoff_task = self._spawn_task(self._restart_after(delay))

    async def _restart_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        if self.state != State.BACKOFF:
            return
        try:
            plan = await self._plan(self.target, auto=True)
            if self.state != State.BACKOFF:     # stopped while the pre-flight probed
                return
            self.restarts += 1
            await self._launch(plan, auto=True)
        except NoFit as exc:
            if self.state == State.BACKOFF:
                self._wait_for_memory(str(exc))
        except CoordinatorError as exc:
            if self.state == State.BACKOFF:
                self._schedule_restart(str(exc))

    # ------------------------------------------------------------ failover

    def _backend_changed(self, address: str, old: str, new: str, reason: str) -> None:
        """Registry hook: a backend changed state (its process exited, its node said so or went
        silent, a probe failed, or it came back)."""
        if self.external:
            return
        run = self.run
        if new == "down" and run is not None and address in run.plan.backends \
                and self.state in (State.STARTING, State.RUNNING):
            self._begin_failover(run, address, reason)
        elif new == "up" and self.state == State.WAITING:
            self._spawn_task(self._recover())
        elif new == "up" and self.state == State.RUNNING and self.settings.coordinator_rebalance == "auto" \
                and self.requests == 0 and self.unused_backends():
            self._spawn_task(self.rebalance(auto=True))

    def _begin_failover(self, run: Run, lost: str, reason: str) -> None:
        """A backend llama-server holds is gone: do not wait for the next request to crash it.
        Stop it now; _recover() restarts it on the survivors (or waits for memory)."""
        rec = self._recovery or {"lost": [], "since": time.monotonic(), "before": list(run.plan.backends)}
        if lost not in rec["lost"]:
            rec["lost"].append(lost)
        rec["reason"] = reason
        self._recovery = rec
        self._begin_stop(run, "failover", f"stopping llama.cpp coordinator: RPC backend {lost} lost ({reason}); "
                         "restarting it on the others")
        # SIGKILL, not SIGTERM: a llama-server blocked sending to the dead backend would sit out the
        # whole stop timeout, and nothing in it is worth a graceful shutdown (the model reloads anyway)
        self.ops.signal(run.pid, signal.SIGKILL)

    async def _recover(self) -> None:
        """After a failover stop, or in `waiting` when a backend came back: start again at once on
        what is healthy, or wait (state `waiting`) when that cannot hold the model."""
        if self.state not in (State.EXITED, State.WAITING):
            return
        try:
            plan = await self._plan(self.target, auto=True)
        except CoordinatorError as exc:           # NoFit, or no healthy backend left at all
            if self.state in (State.EXITED, State.WAITING):
                self._wait_for_memory(str(exc))
            return
        if self.state not in (State.EXITED, State.WAITING):    # stopped meanwhile
            return
        self.restarts += 1
        await self._launch(plan, auto=True, why="failover")

    def _wait_for_memory(self, why: str) -> None:
        rec = self._recovery or {"lost": [], "since": time.monotonic(), "before": []}
        rec["waiting"] = why
        self._recovery = rec
        if self.state != State.WAITING:
            self._change_state(State.WAITING, f"llama.cpp coordinator waiting: {why}; it starts again as soon "
                               "as enough backends are up", reason="no_fit", cause=why, lost=list(rec["lost"]))

    def _recovered(self, run: Run) -> None:
        """Serving again after a failover: say what it cost."""
        rec, self._recovery = self._recovery, None
        if not rec or not rec["lost"]:
            return
        downtime = round(time.monotonic() - rec["since"], 3)
        self.last_failover = {"lost": rec["lost"], "survivors": list(run.plan.backends), "before": rec["before"],
                              "downtime_s": downtime, "at": time.time()}
        self.hooks.call("on_recovery", Notice(
            CoordinatorEvent.FAILOVER, f"llama.cpp coordinator serving again on {', '.join(run.plan.backends)} "
            f"{downtime:g}s after losing {', '.join(rec['lost'])}",
            {**self.last_failover, "reason": rec.get("reason"), "pid": run.pid}, "warning"))

    async def rebalance(self, auto: bool = False) -> dict[str, Any]:
        """Restart over every healthy backend (the lost ones are back). Refused while one of our
        requests runs; `auto` is the SYNAPTICLLAMAS_COORDINATOR_REBALANCE=auto path."""
        if self.external:
            raise CoordinatorError(f"watching the external coordinator {self.external.url}; it is not ours")
        if self.state != State.RUNNING or self.run is None:
            raise CoordinatorError(f"the coordinator is not running (state: {self.state})")
        more = self.unused_backends()
        if not more:
            raise CoordinatorError(f"the coordinator already uses every healthy backend "
                                   f"({', '.join(self.run.plan.backends) or 'none'})")
        if self.requests:
            raise CoordinatorError(f"{self.requests} request{'s are' if self.requests != 1 else ' is'} running; "
                                   "rebalance when it is done")
        before = list(self.run.plan.backends)
        await self.stop("rebalance")
        status = await self.start(self.target.model, self.target.port, self.target.force)
        after = status["backends"]
        self.hooks.call("on_recovery", Notice(
            CoordinatorEvent.REBALANCE, f"llama.cpp coordinator rebalanced over {len(after)} backends "
            f"({', '.join(after)}; before: {', '.join(before)})",
            {"before": before, "after": after, "added": [b for b in after if b not in before], "auto": auto}))
        return status

    # ------------------------------------------------------------ stop

    def _begin_stop(self, run: Run, reason: str, message: str) -> None:
        """We are about to signal it: say why, once (every SIGTERM path goes through `stopping`)."""
        run.stop_reason = reason
        if self.state != State.STOPPING:
            self._change_state(State.STOPPING, message, reason=reason)

    async def _terminate(self, run: Run) -> None:
        """SIGTERM to the process group, SIGKILL after the stop timeout; returns when it is gone."""
        assert run.watcher is not None
        await terminate(run.pid, run.watcher, self.settings.coordinator_stop_timeout, send=self.ops.signal)

    async def stop(self, reason: str = "user") -> None:
        if self.external:
            raise CoordinatorError(f"watching the external coordinator {self.external.url}; it is not ours "
                                   "to stop (`coordinator detach` stops watching)")
        if self.state in (State.BACKOFF, State.WAITING):
            if self._backoff_task is not None:
                self._backoff_task.cancel()
            self._recovery = None
            self._change_state(State.STOPPED, f"llama.cpp coordinator restart cancelled ({reason})", reason=reason)
            return
        run = self.run
        if run is None or self.state not in ACTIVE:
            raise CoordinatorError(f"the coordinator is not running (state: {self.state})")
        self._begin_stop(run, reason, f"stopping llama.cpp coordinator ({reason})")
        await asyncio.shield(self._terminate(run))
        await self._settled()

    async def restart(self) -> dict[str, Any]:
        target = self.target
        if self.state in ACTIVE:
            await self.stop("user")
        return await self.start(target.model, target.port, target.force)

    async def close(self) -> None:
        """App exit: stop what we started, end every timer. Bounded by the stop timeout."""
        if self.external:
            self.external.close()
            self.external = None
        if self.state in ACTIVE:
            try:
                await self.stop("exit")
            except CoordinatorError:
                pass
        await self._settled()
        for task in list(self._background):
            task.cancel()

    # ------------------------------------------------------------ heartbeat

    async def _heartbeat(self, run: Run) -> None:
        """While running: one /health request and one heartbeat event per interval (fixed rate, one
        at a time: a slow answer skips ticks). Nothing else polls. The timeout does not shrink with
        the interval: a busy server that answers in 0.2 s is not dead for a 0.1 s interval."""
        interval = self.settings.rpc_heartbeat_interval
        ticker = Ticker(interval)
        plan = run.plan
        failures = 0
        while True:
            await ticker.next()
            if self.run is not run or self.state != State.RUNNING:
                return
            ok, detail = await self.ops.health(run.endpoint, HEALTH_TIMEOUT)
            if self.run is not run or self.state != State.RUNNING:
                return
            failures = 0 if ok else failures + 1
            self.hooks.call("on_heartbeat", Notice(
                CoordinatorEvent.HEARTBEAT, f"rpc_backend_connect on {plan.host}:{plan.port}",
                {"host": plan.host, "port": plan.port, "backends": plan.backends,
                 "total_backends": len(plan.backends), "pid": run.pid, "model_path": str(plan.model),
                 "uptime_s": round(time.monotonic() - (self.running_since or run.started), 1),
                 "restarts": self.restarts, "health": detail, "interval_s": interval},
                "info" if ok else "warning"))
            if failures >= HEALTH_FAILURES:
                # leaving `running` cancels this task: the stop runs as its own task
                self._begin_stop(run, "health", f"stopping llama.cpp coordinator: {detail} "
                                 f"({HEALTH_FAILURES} heartbeats in a row)")
                self._spawn_task(self._terminate(run))
                return

    # ------------------------------------------------------------ attach an external coordinator

    async def attach(self, url: str, api_key: str | None = None) -> tuple[bool, str]:
        if self.state in ACTIVE and not self.external:
            raise CoordinatorError(f"this shell runs its own coordinator ({self.state}); `coordinator stop` first")
        if self.external:
            raise CoordinatorError(f"already watching {self.external.url}; `coordinator detach` first")
        try:
            endpoint = llama_http.parse_base_url(url, api_key)
        except ValueError as exc:
            raise CoordinatorError(str(exc)) from None
        await self._settled()
        self.external = ExternalWatcher(endpoint, self.settings.attach_check_interval, self._announce,
                                        self._internal_error)
        return await self.external.start()

    async def detach(self) -> str:
        if not self.external:
            raise CoordinatorError("not watching an external coordinator (`coordinator attach URL` does)")
        url = self.external.url
        self.external.close()
        self.external = None
        return url

    # ------------------------------------------------------------ serving requests

    @property
    def recovering(self) -> bool:
        """Is a restart under way that a request may wait for (crash, health, failover, waiting)?"""
        if self.external:
            return False
        state, run = self.state, self.run
        if state in (State.BACKOFF, State.WAITING):
            return True
        if state == State.STARTING:
            return run is not None and run.auto
        if state == State.STOPPING:
            return run is not None and run.stop_reason in ("failover", "health", "rebalance")
        if state == State.EXITED:
            return self._exit_reason in ("crash", "health", "failover", "auto_startup_failed")
        return False

    def recovery_reason(self) -> str:
        if self._recovery and self._recovery.get("waiting"):
            return f"waiting for memory: {self._recovery['waiting']}"
        if self._recovery and self._recovery.get("lost"):
            return f"failing over: lost {', '.join(self._recovery['lost'])}"
        if self.last_exit:
            return f"restarting after: {self.last_exit['message']}"
        return "restarting"

    async def wait_running(self, timeout: float) -> None:
        """Until the coordinator runs again; CoordinatorError if it will not (stopped, fatal) or
        does not within `timeout` seconds."""
        try:
            async with asyncio.timeout(timeout):
                while self.state != State.RUNNING:
                    if not self.recovering:
                        raise CoordinatorError(f"the coordinator did not come back (state: {self.state})")
                    await self._state_changed.wait()
        except TimeoutError:
            raise CoordinatorError(f"the coordinator did not come back within {timeout:g}s "
                                   f"(state: {self.state}; {self.recovery_reason()})") from None

    def serving_endpoint(self) -> tuple[llama_http.Endpoint, Run | None]:
        if self.external:
            return self.external.endpoint, None
        if self.run is None or self.state != State.RUNNING:
            raise CoordinatorError(f"no running coordinator (state: {self.state}); `coordinator start` first")
        return self.run.endpoint, self.run

    def require_running(self) -> None:
        """Raise CoordinatorError unless a request can be sent (now, or once a recovery is done)."""
        self.client.check()

    async def ask(self, prompt: str, n_predict: int, on_token: Callable[[str], None],
                  say: Callable[[str], object] = lambda _: None) -> dict[str, Any]:
        """One streamed /completion; see llama/client.py (it waits for, and retries once after, a recovery)."""
        return await self.client.ask(prompt, n_predict, on_token, say)

    # ------------------------------------------------------------ helpers

    def _spawn_task(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # reported where it happened (IllegalTransition) or here: never "exception never retrieved"
            log.error("coordinator task failed", exc_info=task.exception())


def user_path(text: Path | str) -> Path:
    """A path as the user typed it (~ expanded): a local lookup, never I/O worth a thread."""
    return Path(text).expanduser()


def backoff_delay(first: float, tries: int) -> float:
    """Seconds before restart number `tries` (1, 2, ...): first, doubling each time, at most 60 s."""
    return float(min(first * 2 ** (tries - 1), BACKOFF_CAP))


def observe(manager: CoordinatorManager, observer: Observer) -> None:
    """Subscribe an Observer to the manager's hooks: this is where coordinator events are made."""
    hooks = manager.hooks
    hooks.subscribe("on_state_change", lambda c: observer.emit(Component.COORDINATOR, c.event_type, c.message,
                                                               c.details, c.level))
    hooks.subscribe("on_log", lambda rec, ctx: observer.emit(
        Component.RAW, RawEvent.LOG, rec.text, {"source": "llama-server", "kind": rec.kind, **ctx}, rec.level,
        sample=True))
    hooks.subscribe("on_model_progress", lambda n: observer.emit(Component.MODEL, n.event_type, n.message,
                                                                 n.details, n.level))
    hooks.subscribe("on_heartbeat", lambda n: observer.emit(Component.COORDINATOR, n.event_type, n.message,
                                                            n.details, n.level))
    hooks.subscribe("on_request", lambda n: observer.emit(Component.COORDINATOR, n.event_type, n.message,
                                                          n.details, n.level, sample=True))
    hooks.subscribe("on_recovery", lambda n: observer.emit(Component.COORDINATOR, n.event_type, n.message,
                                                           n.details, n.level))
    # one per request, whoever sent it: never sampled (a dashboard counts them)
    hooks.subscribe("on_inference", lambda n: observer.emit(Component.COORDINATOR, n.event_type, n.message,
                                                            n.details, n.level))
    hooks.subscribe("on_error", lambda n: observer.emit(Component.SYSTEM, n.event_type, n.message, n.details,
                                                        n.level))
