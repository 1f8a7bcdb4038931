"""Supervisor: our llama-server, supervised by one actor.

One task, the actor, drains a queue of intents (start, stop, abort, rebalance, healthy, start
timed out, unhealthy, exited, backend changed, retry due, close) and is the only caller of
`_change_state()`. Everything else only posts intents: the commands, the process's exit watcher,
the /health wait at start-up, the heartbeat, the backoff timer, the registry's callbacks. Two
decisions can therefore never interleave: two backends coming back at once while `waiting` are two
intents, the first launches, the second finds the state `starting` and does nothing.

The actor awaits only bounded work inline (a pre-flight: one probe round and the model's layout; a
spawn; the diagnosis of an exit: at most DRAIN_TIMEOUT for the last lines and one probe round), so
an intent waits at most about a probe timeout. A stop's SIGKILL after the stop timeout runs as a
task of its own: it only signals, the exit comes back as an intent.

What to do after an exit, a failed launch or a backend's change is the policy's (policy.py, pure
functions). The process is process.py, its output interpreter.py, the pre-flight planner.py; the
lifecycle table is lifecycle.py. Requests are not ours: they wait on `wait_running()` and use
`serving_endpoint()`.

The state is the truth: the instant llama-server has exited (the Exited intent is handled before
anything else that was posted after it) the state is `exited` (or `stopped`); the `stop` event
that carries the diagnosis follows within the drain and probe bounds.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from synapticllamas.events.contract import CoordinatorEvent, ModelEvent, SystemEvent
from synapticllamas.llama import args as llama_args
from synapticllamas.llama import http as llama_http
from synapticllamas.llama import policy
from synapticllamas.llama.hooks import Hooks, Notice
from synapticllamas.llama.lifecycle import (
    ACTIVE,
    EVENT_TYPE,
    SUPERVISED,
    IllegalTransition,
    Lifecycle,
    State,
    StateChange,
    default_level,
)
from synapticllamas.llama.policy import Action, Decision, Limits
from synapticllamas.llama.preflight import CoordinatorError, NoFit, Plan, Target
from synapticllamas.llama.process import ChildOps, LlamaProcess
from synapticllamas.util.internal_errors import REPORTED
from synapticllamas.util.processes import exit_details
from synapticllamas.util.ticker import Ticker

if TYPE_CHECKING:
    from synapticllamas.llama.interpreter import LogInterpreter
    from synapticllamas.llama.planner import Planner
    from synapticllamas.rpc.registry import RpcRegistry

LOG_LINES = 2000           # raw lines kept for `coordinator logs`
DRAIN_TIMEOUT = 0.3        # after the exit, wait this long for the last lines (the error) to arrive
FALLBACK_PROBE = 0.5       # start-up /health probe interval before the log says "listening"
LISTENING_PROBE = 0.1      # ... and after it (a server that listens before loading answers 503)
HEALTH_FAILURES = 2        # failed heartbeat /health requests in a row before a restart
HEALTH_TIMEOUT = 5.0       # a heartbeat's /health; the ticks it outlasts are skipped
# how a process we stopped ends: a clean exit after SIGTERM, or the signals we sent
STOPPED_BY_US = (0, -signal.SIGTERM, -signal.SIGKILL)

log = logging.getLogger("synapticllamas")


# ---------------------------------------------------------------- intents

@dataclass(eq=False)
class Intent:
    reply: asyncio.Future[Any] | None = field(default=None, kw_only=True)


@dataclass(eq=False)
class Start(Intent):
    target: Target
    run: Run | None = None           # what it launched, for an Abort


@dataclass(eq=False)
class Stop(Intent):
    reason: str


@dataclass(eq=False)
class Abort(Intent):
    """Ctrl-C during a user's start: kill what it launched."""
    start: Start


@dataclass(eq=False)
class Rebalance(Intent):
    auto: bool


@dataclass(eq=False)
class Healthy(Intent):
    run: Run


@dataclass(eq=False)
class StartTimedOut(Intent):
    run: Run


@dataclass(eq=False)
class Unhealthy(Intent):
    run: Run
    detail: str


@dataclass(eq=False)
class Exited(Intent):
    run: Run
    returncode: int


@dataclass(eq=False)
class BackendChanged(Intent):
    address: str
    old: str
    new: str
    reason: str


@dataclass(eq=False)
class RetryDue(Intent):
    token: int


@dataclass(eq=False)
class Close(Intent):
    pass


# ---------------------------------------------------------------- one llama-server run

@dataclass(eq=False)
class Run:
    plan: Plan
    process: LlamaProcess
    interp: LogInterpreter
    auto: bool                                   # an automatic restart, not a user's start
    hidden: list[str] = field(default_factory=list)   # secrets of its argv, kept out of logs and events
    api_key: str | None = None                        # sent with each request to it
    started: float = field(default_factory=time.monotonic)
    hint: asyncio.Event = field(default_factory=asyncio.Event)   # the log says: try /health now
    listening: bool = False
    stop_reason: str | None = None               # why we stopped it: user, exit, startup_failed, health, ...
    error: str | None = None                     # the supervisor's own reason to stop it
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)   # its health wait, heartbeat, upload watch
    heartbeat: asyncio.Task[Any] | None = None
    killer: asyncio.Task[Any] | None = None      # SIGKILL after the stop timeout
    waiters: list[asyncio.Future[Any]] = field(default_factory=list)   # user starts: running, or the error
    stopped: list[asyncio.Future[Any]] = field(default_factory=list)   # stops: the exit announced
    # done once its exit is announced, with the `stop` event's message (the diagnosis: why it died)
    ended: asyncio.Future[str] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def exited(self) -> asyncio.Task[int]:
        """Done the moment the process has been reaped (its return code); `ended` follows once the
        diagnosis is out."""
        return self.process.exited

    @property
    def endpoint(self) -> llama_http.Endpoint:
        return llama_http.Endpoint("http", self.plan.host, self.plan.port, self.api_key)

    @property
    def report(self) -> Any:
        return self.interp.report


def _resolve(fut: asyncio.Future[Any] | None, result: Any = None, error: BaseException | None = None) -> None:
    if fut is None or fut.done():
        return
    if error is None:
        fut.set_result(result)
    else:
        fut.set_exception(error)
        fut.exception()      # retrieved: a caller that was cancelled must not log "never retrieved"


class Supervisor:
    def __init__(self, settings: Any, hooks: Hooks, registry: RpcRegistry | None, planner: Planner,
                 ops: ChildOps | None = None, in_flight: Callable[[], int] = lambda: 0) -> None:
        self.settings = settings
        self.hooks = hooks
        self.registry = registry
        self.planner = planner
        self.ops = ops or ChildOps()
        self.in_flight = in_flight        # requests in flight, every client's (the gateway says)
        self.lifecycle = Lifecycle(SUPERVISED, "coordinator", self._internal_error)
        self.run: Run | None = None
        self.tries = 0                    # automatic restarts since the last time it was running
        self.restarts = 0                 # automatic restarts in total
        self.running_since: float | None = None
        self.last_exit: dict[str, Any] | None = None
        self.logs: deque[tuple[float, int, str, str]] = deque(maxlen=LOG_LINES)
        self.target = Target()            # the user's --model / --port / --force, kept by restarts
        self.last_plan: Plan | None = None
        self.last_failover: dict[str, Any] | None = None
        self.suspects: set[str] = set()   # backends an RPC failure pointed at: not in the next --rpc
        self._recovery: dict[str, Any] | None = None     # a failover under way: lost, survivors, since
        self._rebalance: dict[str, Any] | None = None    # a rebalance under way: its plan, before, reply
        self._exit_reason: str | None = None             # why the last run ended, from the instant it did
        self._state_changed = asyncio.Event()            # set (and replaced) at each change: wait_running()
        self._inbox: asyncio.Queue[Intent] = asyncio.Queue()
        self._actor: asyncio.Task[None] | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._retry_token = 0
        self._closed = False
        self.launches = 0                 # llama-servers spawned (tests count double launches)

    # ------------------------------------------------------------ the actor

    def post(self, intent: Intent) -> None:
        if self._closed and not isinstance(intent, Close):
            _resolve(intent.reply, error=CoordinatorError("the shell is closing"))
            return
        if self._actor is None or self._actor.done():
            self._actor = asyncio.get_running_loop().create_task(self._drain(), name="coordinator-supervisor")
        self._inbox.put_nowait(intent)

    async def _ask(self, intent: Intent) -> Any:
        intent.reply = asyncio.get_running_loop().create_future()
        self.post(intent)
        return await asyncio.shield(intent.reply)

    async def _drain(self) -> None:
        while True:
            intent = await self._inbox.get()
            try:
                await self._handle(intent)
            except asyncio.CancelledError:
                _resolve(intent.reply, error=CoordinatorError("the shell is closing"))
                raise
            except Exception as exc:     # a bug of ours: one line, the traceback in the log; go on
                message = f"internal error in the coordinator's supervisor ({type(intent).__name__}): " \
                          f"{type(exc).__name__}: {exc}"
                if not isinstance(exc, IllegalTransition):      # that one said so already
                    self._internal_error(message)
                    log.error(message, exc_info=exc, extra={REPORTED: True})
                _resolve(intent.reply, error=CoordinatorError(message))
            if isinstance(intent, Close):
                return

    async def _handle(self, intent: Intent) -> None:
        if isinstance(intent, Start):
            await self._on_start(intent)
        elif isinstance(intent, Stop):
            self._on_stop(intent)
        elif isinstance(intent, Abort):
            self._on_abort(intent)
        elif isinstance(intent, Rebalance):
            await self._on_rebalance(intent)
        elif isinstance(intent, Healthy):
            self._on_healthy(intent.run)
        elif isinstance(intent, StartTimedOut):
            self._on_start_timed_out(intent.run)
        elif isinstance(intent, Unhealthy):
            self._on_unhealthy(intent.run, intent.detail)
        elif isinstance(intent, Exited):
            await self._on_exited(intent.run, intent.returncode)
        elif isinstance(intent, BackendChanged):
            await self._on_backend_changed(intent)
        elif isinstance(intent, RetryDue):
            if intent.token == self._retry_token and self.state == State.BACKOFF:
                await self._relaunch("restart")
        elif isinstance(intent, Close):
            self._on_close(intent)

    # ------------------------------------------------------------ the one state-change function

    @property
    def state(self) -> State:
        return self.lifecycle.state

    def _change_state(self, to: State, message: str, reason: str | None = None, level: str | None = None,
                      announce: bool = True, **details: Any) -> StateChange:
        """Change state (the table in lifecycle.py must allow it) and emit the lifecycle event;
        with announce=False the caller completes the change's message and details, then emits it
        with _announce(). Only the actor calls this."""
        if asyncio.current_task() is not self._actor:
            message = f"internal error: coordinator state change to {to} outside the supervisor's task"
            self._internal_error(message)
            log.error(message, stack_info=True, extra={REPORTED: True})
            raise IllegalTransition(message)
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
                run.heartbeat = self._task(run, self._heartbeat(run))
        elif from_state == State.RUNNING:
            self.running_since = None
            if run is not None and run.heartbeat is not None:
                run.heartbeat.cancel()
                run.heartbeat = None
        changed, self._state_changed = self._state_changed, asyncio.Event()
        changed.set()
        if announce:
            self._announce(change)
        return change

    def _announce(self, change: StateChange) -> None:
        self.hooks.call("on_state_change", change)

    def _internal_error(self, message: str) -> None:
        self.hooks.call("on_error", Notice(SystemEvent.ERROR, message, {"error": message}, "error"))

    # ------------------------------------------------------------ public: commands

    async def start(self, model: Path | str | None = None, port: int | None = None,
                    force: bool = False, spread: bool = False) -> dict[str, Any]:
        """Start llama-server and return its status once /health says ok; CoordinatorError
        otherwise. `force`: start even when placement says the model does not fit; `spread`: every
        healthy backend holds layers.

        Cancelling the caller (Ctrl-C) kills the child before the cancellation goes on."""
        intent = Start(Target(user_path(model) if model else None, port, force, spread))
        intent.reply = asyncio.get_running_loop().create_future()
        self.post(intent)
        try:
            return await asyncio.shield(intent.reply)
        except asyncio.CancelledError:
            done = asyncio.get_running_loop().create_future()
            self.post(Abort(intent, reply=done))
            await asyncio.shield(asyncio.wait({done}, timeout=self.settings.coordinator_stop_timeout + 5))
            raise

    async def stop(self, reason: str = "user") -> None:
        await self._ask(Stop(reason))

    async def restart(self) -> dict[str, Any]:
        target = self.target
        if self.state in ACTIVE:
            await self.stop("user")
        return await self.start(target.model, target.port, target.force, target.spread)

    async def rebalance(self, auto: bool = False) -> dict[str, Any]:
        """Restart over every healthy backend (the lost ones are back). Refused while a request
        runs (any client's); `auto` is the SYNAPTICLLAMAS_COORDINATOR_REBALANCE=auto path."""
        result: dict[str, Any] = await self._ask(Rebalance(auto))
        return result

    async def close(self) -> None:
        """App exit: stop what we started, end every timer. Bounded by the stop timeout."""
        if self.state in ACTIVE:
            try:
                await self.stop("exit")
            except CoordinatorError:
                pass
        if self._actor is not None and not self._actor.done():
            await self._ask(Close())
        self._closed = True

    def backend_changed(self, address: str, old: str, new: str, reason: str) -> None:
        """Registry hook: a backend changed state (its process exited, its node said so or went
        silent, a probe failed, or it came back)."""
        if not self._closed:
            self.post(BackendChanged(address, old, new, reason))

    # ------------------------------------------------------------ start

    async def _on_start(self, intent: Start) -> None:
        if self.state in ACTIVE:
            run = self.run
            _resolve(intent.reply, error=CoordinatorError(
                f"the coordinator is already {self.state}"
                + (f" at http://{run.plan.host}:{run.plan.port} (pid {run.pid})" if run else "")
                + "; use `coordinator stop` or `coordinator restart`"))
            return
        self.suspects.clear()      # the user's own start trusts the registry again
        self._recovery = None
        try:
            plan = await self.planner.plan(intent.target, auto=False)
            self.target = intent.target
            self.tries = 0
            run = await self._launch(plan, auto=False, why="user")
        except CoordinatorError as exc:
            _resolve(intent.reply, error=exc)
            return
        intent.run = run
        if intent.reply is not None:
            run.waiters.append(intent.reply)

    def _on_abort(self, intent: Abort) -> None:
        run = intent.start.run
        if run is not None and self.run is run and self.state in (State.STARTING, State.RUNNING, State.STOPPING):
            # nothing is worth saving in a half-loaded server: SIGKILL
            self._stop_run(run, "user", "stopping llama.cpp coordinator (start cancelled)", signal.SIGKILL)
            if intent.reply is not None:
                run.stopped.append(intent.reply)
            return
        _resolve(intent.reply)

    async def _launch(self, plan: Plan, auto: bool, why: str) -> Run:
        from synapticllamas.llama.interpreter import LogInterpreter

        argv = plan.argv(self.settings.coordinator_ctx_size, self.settings.coordinator_args,
                         self.settings.coordinator_parallel)
        hidden = llama_args.secrets(argv)
        keys = llama_args.api_keys(argv)
        process = await LlamaProcess.start(self.ops, argv, plan.env)
        self.launches += 1
        interp = LogInterpreter(plan, process.pid, self.hooks, hidden, lambda *entry: self.logs.append(entry))
        run = Run(plan, process, interp, auto, hidden=hidden, api_key=keys[0] if keys else None)
        self.run = run
        self.last_plan = plan
        if self.registry is not None:
            self.registry.hold(plan.backends)      # rpc-server serves one client: no probes while we hold it
        n = len(plan.backends)
        where = f"{n} RPC backend{'s' if n != 1 else ''}" if self.settings.distributed else "standard mode"
        if plan.placement is not None and plan.placement.local is not None:
            where = "this host's CPU" + (f" and {where}" if n else "")
        if plan.choice is not None:
            where += f"; {plan.choice.reason}"
        left = "; left out " + ", ".join(f"{k} ({w})" for k, w in plan.left_out.items()) if plan.left_out else ""
        placed: dict[str, Any] = {"placement": plan.placement.summary()} if plan.placement else {}
        if plan.choice is not None:
            placed["choice"] = plan.choice.summary(brief=True)
        self._change_state(
            State.STARTING, f"starting llama.cpp coordinator on {plan.host}:{plan.port} ({where}){left}",
            reason=why, port=plan.port, host=plan.host, rpc_backends=plan.backends,
            left_out=plan.left_out, model_path=str(plan.model), argv=llama_args.redact_args(argv), **placed)
        # no await since the spawn: the readers have not run yet, so no line is missed
        process.on_line = lambda stream, text: self._on_line(run, stream, text)
        run.exited.add_done_callback(lambda task: self._exit_seen(run, task))
        self._task(run, self._wait_healthy(run))
        return run

    def _exit_seen(self, run: Run, task: asyncio.Task[int]) -> None:
        code = task.result() if not task.cancelled() and task.exception() is None else -signal.SIGKILL
        self.post(Exited(run, code))

    def _on_line(self, run: Run, stream: str, text: str) -> None:
        from synapticllamas.llama.interpreter import Seen

        seen = run.interp.feed(stream, text)
        if seen is Seen.LOADED:
            run.hint.set()
        elif seen is Seen.LISTENING:
            run.listening = True
            run.hint.set()
        elif seen is Seen.UPLOADING:
            self._task(run, self._watch_upload(run))

    async def _wait_healthy(self, run: Run) -> None:
        """Start-up only: probe /health when the log says the server is up (and slowly before)."""
        endpoint = run.endpoint
        try:
            async with asyncio.timeout(self.settings.coordinator_start_timeout):
                while True:
                    try:
                        await asyncio.wait_for(run.hint.wait(), LISTENING_PROBE if run.listening else FALLBACK_PROBE)
                    except TimeoutError:
                        pass
                    run.hint.clear()
                    ok, _ = await self.ops.health(endpoint, 2.0)
                    if ok:
                        break
        except TimeoutError:
            self.post(StartTimedOut(run))
            return
        self.post(Healthy(run))

    def _on_healthy(self, run: Run) -> None:
        if self.run is not run or self.state != State.STARTING:
            return
        self.tries = 0
        plan = run.plan
        self.planner.learned(plan, run.report.devices)
        extra: dict[str, Any] = {"placement": self.placement_status(plan)} if plan.placement else {}
        self._change_state(State.RUNNING, "llama.cpp coordinator started", port=plan.port, host=plan.host,
                           url=f"http://{plan.host}:{plan.port}", rpc_backends=plan.backends,
                           model_path=str(plan.model), load_s=round(time.monotonic() - run.started, 3),
                           restarts=self.restarts, **run.interp.summary(), **extra)
        self._recovered(run)
        status = self.status()
        for waiter in run.waiters:
            _resolve(waiter, status)
        run.waiters.clear()
        rebalance, self._rebalance = self._rebalance, None
        if rebalance is not None:
            before, after = rebalance["before"], list(plan.backends)
            self.hooks.call("on_recovery", Notice(
                CoordinatorEvent.REBALANCE, f"llama.cpp coordinator rebalanced over {len(after)} backends "
                f"({', '.join(after)}; before: {', '.join(before)})",
                {"before": before, "after": after, "added": [b for b in after if b not in before],
                 "auto": rebalance["auto"]}))
            _resolve(rebalance["reply"], status)

    def _on_start_timed_out(self, run: Run) -> None:
        if self.run is run and self.state == State.STARTING:
            run.error = f"/health did not report ok within {self.settings.coordinator_start_timeout:g}s"
            self._stop_run(run, "startup_failed", f"stopping llama.cpp coordinator: {run.error}")

    # ------------------------------------------------------------ while running

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
                self.post(Unhealthy(run, detail))
                return

    def _on_unhealthy(self, run: Run, detail: str) -> None:
        if self.run is run and self.state == State.RUNNING:
            self._stop_run(run, "health", f"stopping llama.cpp coordinator: {detail} "
                           f"({HEALTH_FAILURES} heartbeats in a row)")

    async def _watch_upload(self, run: Run) -> None:
        """While the weights go to the RPC backends: progress from the kernel's byte counters
        (llama/load_progress.py), on the progress line every sample, and as a model_loading event
        at most once per 5 %."""
        from synapticllamas.llama import load_progress

        backends = list(run.plan.backends)
        dialled = [run.plan.dialled(b) for b in backends]
        first = await load_progress.connections(dialled)
        if first is None:
            return
        baseline = sum(n for n, _ in first.values())
        # per backend: when its counter first and last moved, what it had sent (the link's bandwidth)
        moved: dict[str, list[float]] = {}
        before = {peer: n for peer, (n, _) in first.items()}
        # the model buffer lines of all backends arrive in one burst: sum them at each sample
        upload = load_progress.Upload(dialled, 1, baseline)
        model = run.plan.model
        while self.run is run and self.state == State.STARTING:
            await asyncio.sleep(load_progress.SAMPLE_EVERY)
            now = await load_progress.connections(dialled)
            # loaded meanwhile (the sample was taken before): a progress line after "loaded" misleads
            if now is None or self.run is not run or self.state != State.STARTING or run.interp.loaded:
                return
            sent = sum(n for n, _ in now.values())
            self._note_links(run, now, before, moved)
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

    def _note_links(self, run: Run, now: dict[str, tuple[int, float | None]], before: dict[str, int],
                    moved: dict[str, list[float]]) -> None:
        """Tell the planner's link table what the upload showed per backend: the kernel's round trip
        on llama-server's connection, and the rate while its bytes went out (rpc/links.py)."""
        links = self.planner.inputs.links if self.planner.inputs is not None else None
        if links is None:
            return
        at = time.monotonic()
        for backend in run.plan.backends:
            n, rtt = now.get(run.plan.dialled(backend), (0, None))
            if run.plan.dialled(backend) == backend:
                # behind a secured link llama-server's connection ends at the link's local end: its
                # round trip is loopback's (the registry's probes measure the wire's); its bytes are
                # the ones stunnel took, ahead of the wire by at most its socket buffers
                links.rtt(backend, rtt)
            if n > before.get(run.plan.dialled(backend), 0):
                span = moved.setdefault(backend, [at - load_progress_sample(), at])
                span[1] = at
                links.upload(backend, n - before.get(run.plan.dialled(backend), 0), span[1] - span[0])

    # ------------------------------------------------------------ stop

    def _stop_run(self, run: Run, reason: str, message: str, sig: int = signal.SIGTERM) -> None:
        """Signal it, saying why first (every signal we send goes through `stopping`); after a
        SIGTERM, a SIGKILL follows if it has not exited within the stop timeout."""
        run.stop_reason = reason
        if self.state != State.STOPPING:
            self._change_state(State.STOPPING, message, reason=reason)
        run.process.signal(sig)
        if sig != signal.SIGKILL and run.killer is None:
            run.killer = self._task(run, run.process.stop_within(self.settings.coordinator_stop_timeout),
                                    keep=True)

    def _on_stop(self, intent: Stop) -> None:
        reason = intent.reason
        if self.state in (State.BACKOFF, State.WAITING):
            self._cancel_retry()
            self._recovery = None
            self._change_state(State.STOPPED, f"llama.cpp coordinator restart cancelled ({reason})", reason=reason)
            _resolve(intent.reply)
            return
        run = self.run
        if run is None or self.state not in (State.STARTING, State.RUNNING, State.STOPPING):
            _resolve(intent.reply, error=CoordinatorError(f"the coordinator is not running (state: {self.state})"))
            return
        self._fail_rebalance(f"stopped ({reason})")
        self._stop_run(run, reason, f"stopping llama.cpp coordinator ({reason})")
        if intent.reply is not None:
            run.stopped.append(intent.reply)

    def _on_close(self, intent: Close) -> None:
        self._cancel_retry()
        self._closed = True
        _resolve(intent.reply)

    # ------------------------------------------------------------ the exit

    async def _on_exited(self, run: Run, returncode: int) -> None:
        if self.run is not run:
            return
        change = self._exited(run, returncode)            # the state is the truth from this instant
        await run.process.drain(DRAIN_TIMEOUT)            # the last lines (the reason it died)
        for task in run.tasks:
            task.cancel()
        run.process.kill_group()                          # anything it left in its process group
        await self._settle_exit(run, returncode, change)
        reason = change.details["reason"]
        if self.state == State.STOPPED and reason != "rebalance":
            return
        if self._rebalance is not None and reason != "rebalance":
            self._fail_rebalance(change.message)
        await self._carry_out(policy.after_exit(reason, run.auto, self.tries, Limits.of(self.settings)),
                              change.message, "rebalance" if reason == "rebalance" else "failover")

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

    async def _settle_exit(self, run: Run, returncode: int, change: StateChange) -> None:
        """Name the cause (the log; for an RPC crash, one probe of the backends it used) and
        announce the exit; answer whoever waited on this run."""
        interp = run.interp
        dead = interp.dead_named()
        if not dead and interp.rpc_crashed and run.plan.backends and self.registry is not None:
            # llama.cpp does not say which backend failed: one probe round of the ones it used does
            await self.registry.check(run.plan.backends)
            healthy = self.registry.healthy()
            dead = [b for b in run.plan.backends if b not in healthy]
        self.suspects.update(dead)
        why = interp.diagnosis(dead, run.error)
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
                              model_path=str(run.plan.model), last_lines=list(interp.lines))
        if why:
            change.details["error"] = why
        if dead:
            change.details["failed_backends"] = dead
        self.last_exit = {"reason": reason, "message": change.message, **code, "failed_backends": dead}
        self._announce(change)
        _resolve(run.ended, change.message)
        for waiter in run.waiters:
            _resolve(waiter, error=CoordinatorError(change.message))
        for waiter in run.stopped:
            _resolve(waiter)
        run.waiters.clear()
        run.stopped.clear()

    # ------------------------------------------------------------ carrying out the policy

    async def _carry_out(self, decision: Decision, cause: str, why: str = "failover") -> None:
        self.tries = decision.tries
        if decision.action == Action.FATAL:
            limit = self.settings.coordinator_max_restarts
            self._change_state(State.FATAL, f"llama.cpp coordinator gave up after {self.tries} restart"
                               f"{'s' if self.tries != 1 else ''}: {cause}", reason="max_restarts",
                               max_restarts=limit, cause=cause)
        elif decision.action == Action.RESTART:
            limit = self.settings.coordinator_max_restarts
            self._change_state(State.BACKOFF, f"restarting llama.cpp coordinator in {decision.delay:g}s "
                               f"(try {self.tries} of {limit})", delay_s=decision.delay, max_restarts=limit,
                               cause=cause)
            self._schedule_retry(decision.delay)
        elif decision.action == Action.RECOVER:
            await self._relaunch(why)
        elif decision.action == Action.WAIT:
            self._wait_for_memory(cause)

    async def _relaunch(self, why: str) -> None:
        """An automatic start: after a crash's backoff, a failover, a rebalance, or memory back."""
        rebalance = self._rebalance
        try:
            plan = rebalance["plan"] if rebalance else await self.planner.plan(self.target, True, self.suspects)
            if rebalance:
                rebalance["plan"] = None            # a retry after a failure plans anew
            self.restarts += 1
            run = await self._launch(plan, auto=True, why=why)
        except CoordinatorError as exc:
            self._fail_rebalance(str(exc))
            await self._carry_out(policy.after_failed_launch(isinstance(exc, NoFit), self.tries,
                                                             Limits.of(self.settings)), str(exc))
            return
        del run

    def _schedule_retry(self, delay: float) -> None:
        self._cancel_retry()
        self._retry_token += 1
        token = self._retry_token
        self._retry = asyncio.get_running_loop().call_later(delay, lambda: self.post(RetryDue(token)))

    def _cancel_retry(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self._retry_token += 1

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

    # ------------------------------------------------------------ backends: failover, recovery, rebalance

    async def _on_backend_changed(self, intent: BackendChanged) -> None:
        run = self.run
        held = run is not None and intent.address in run.plan.backends
        decision = policy.on_backend_change(self.state, intent.new, held, self.in_flight(),
                                            bool(self.unused_backends()), Limits.of(self.settings))
        if decision.action == Action.FAILOVER and run is not None:
            self._begin_failover(run, intent.address, intent.reason)
        elif decision.action == Action.RECOVER:
            await self._relaunch("failover")
        elif decision.action == Action.REBALANCE:
            await self._on_rebalance(Rebalance(True))

    def _begin_failover(self, run: Run, lost: str, reason: str) -> None:
        """A backend llama-server holds is gone: do not wait for the next request to crash it.
        Stop it now; the exit's policy restarts it on the survivors (or waits for memory)."""
        rec = self._recovery or {"lost": [], "since": time.monotonic(), "before": list(run.plan.backends)}
        if lost not in rec["lost"]:
            rec["lost"].append(lost)
        rec["reason"] = reason
        self._recovery = rec
        # SIGKILL, not SIGTERM: a llama-server blocked sending to the dead backend would sit out the
        # whole stop timeout, and nothing in it is worth a graceful shutdown (the model reloads anyway)
        self._stop_run(run, "failover", f"stopping llama.cpp coordinator: RPC backend {lost} lost ({reason}); "
                       "restarting it on the others", signal.SIGKILL)

    async def _on_rebalance(self, intent: Rebalance) -> None:
        """Plan over every healthy backend first, and stop the running server only if that plan is
        good: a model that would not fit leaves it running where it is."""
        run = self.run
        busy = self.in_flight()
        refusal = None
        if self.state != State.RUNNING or run is None:
            refusal = f"the coordinator is not running (state: {self.state})"
        elif not self.unused_backends():
            refusal = (f"the coordinator already uses every healthy backend "
                       f"({', '.join(run.plan.backends) or 'none'})" if not run.plan.idle else
                       f"no backend came up since it started ({', '.join(run.plan.idle)} left idle by its "
                       f"plan: {run.plan.choice.reason if run.plan.choice else 'faster without them'})")
        elif busy:
            refusal = f"{busy} request{'s are' if busy != 1 else ' is'} running; rebalance when it is done"
        elif self._rebalance is not None:
            refusal = "a rebalance is already under way"
        if refusal is not None or run is None:
            _resolve(intent.reply, error=CoordinatorError(refusal or "not running"))
            return
        before = list(run.plan.backends)
        try:
            plan = await self.planner.plan(self.target, auto=False, own_port=True)
        except CoordinatorError as exc:
            _resolve(intent.reply, error=CoordinatorError(f"not rebalanced, it keeps running on {len(before)} "
                                                          f"backends: {exc}"))
            if intent.auto:
                self._internal_notice(f"automatic rebalance skipped: {exc}")
            return
        if self.run is not run or self.state != State.RUNNING or not set(plan.backends) - set(before):
            # the fastest plan leaves them idle: they are not "unused" any more (no rebalance again)
            run.plan.idle = [b for b in dict.fromkeys([*run.plan.idle, *plan.idle]) if b not in before]
            why = plan.choice.reason if plan.choice is not None else ""
            _resolve(intent.reply, error=CoordinatorError(
                f"the coordinator already uses every healthy backend ({', '.join(before) or 'none'})" if not why
                else f"the fastest plan adds no backend, it keeps running on {', '.join(before) or 'this host'}: {why}"))
            return
        self.suspects.clear()
        self._rebalance = {"plan": plan, "before": before, "auto": intent.auto, "reply": intent.reply}
        self._stop_run(run, "rebalance", f"stopping llama.cpp coordinator to rebalance over {len(plan.backends)} "
                       f"backends ({', '.join(plan.backends)})")

    def _fail_rebalance(self, why: str) -> None:
        rebalance, self._rebalance = self._rebalance, None
        if rebalance is not None:
            _resolve(rebalance["reply"], error=CoordinatorError(f"the rebalance did not complete: {why}"))

    def _internal_notice(self, message: str) -> None:
        self.hooks.call("on_error", Notice(SystemEvent.ERROR, message, {"error": message}, "warning"))

    # ------------------------------------------------------------ status

    @property
    def url(self) -> str | None:
        plan = self.run.plan if self.run else None
        return f"http://{plan.host}:{plan.port}" if plan else None

    def status(self) -> dict[str, Any]:
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
            "placement": self.placement_status(plan),
            "choice": plan.choice.summary(brief=True) if plan and plan.choice is not None else None,
            "measured_ms_per_token": round(run.interp.measured_ms, 2) if run and run.interp.measured_ms else None,
            "idle_backends": list(plan.idle) if plan else [],
            "unused_backends": self.unused_backends(),
            "last_failover": self.last_failover,
            "waiting": self._recovery.get("waiting") if self._recovery and self.state == State.WAITING else None,
        }

    def placement_status(self, plan: Plan | None) -> list[dict[str, Any]] | None:
        """Per backend: the plan, and what llama-server really allocated (once it loaded)."""
        if plan is None or plan.placement is None:
            return None
        actual = self.run.report.devices if self.run else {}
        out = []
        for b in plan.placement.devices:
            used = actual.get(b.address, {}) if b.address != "local" else _local_use(actual)
            out.append({**b.summary(), "model_mib": used.get("model_mib"), "kv_mib": used.get("kv_mib"),
                        "compute_mib": used.get("compute_mib"), "host": plan.placement.host_of.get(b.address)})
        return out

    def unused_backends(self) -> list[str]:
        """Healthy backends the running coordinator does not use (lost earlier, back now), besides
        the ones its plan left idle on purpose (it was faster without them)."""
        if self.registry is None or not self.settings.distributed or self.state != State.RUNNING or not self.run:
            return []
        used = set(self.run.plan.backends) | set(self.run.plan.idle)
        return [b for b in self.registry.healthy() if b not in used]

    # ------------------------------------------------------------ serving requests

    @property
    def recovering(self) -> bool:
        """Is a restart under way that a request may wait for (crash, health, failover, waiting)?"""
        state, run = self.state, self.run
        if state in (State.BACKOFF, State.WAITING):
            return True
        if state == State.STARTING:
            return run is not None and run.auto
        if state == State.STOPPING:
            return run is not None and run.stop_reason in ("failover", "health", "rebalance")
        if state == State.EXITED:
            return self._exit_reason in ("crash", "health", "failover", "auto_startup_failed")
        if state == State.STOPPED:
            return self._rebalance is not None
        return False

    def recovery_reason(self) -> str:
        if self._recovery and self._recovery.get("waiting"):
            return f"waiting for memory: {self._recovery['waiting']}"
        if self._recovery and self._recovery.get("lost"):
            return f"failing over: lost {', '.join(self._recovery['lost'])}"
        if self._rebalance is not None:
            return "rebalancing"
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
        if self.run is None or self.state != State.RUNNING:
            raise CoordinatorError(f"no running coordinator (state: {self.state}); `coordinator start` first")
        return self.run.endpoint, self.run

    # ------------------------------------------------------------ helpers

    def _task(self, run: Run, coro: Coroutine[Any, Any, Any], keep: bool = False) -> asyncio.Task[Any]:
        """A task of this run: cancelled when it has exited (unless `keep`: the SIGKILL timer)."""
        task = asyncio.get_running_loop().create_task(coro)
        if not keep:
            run.tasks.append(task)
        task.add_done_callback(_report_failure)
        return task


def user_path(text: Path | str) -> Path:
    """A path as the user typed it (~ expanded): a local lookup, never I/O worth a thread."""
    return Path(text).expanduser()


def _report_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        # a bug of ours: the traceback goes to the log file, the user sees one line (App's handler)
        log.error("coordinator task %s failed: %s", task.get_name(), task.exception(), exc_info=task.exception())


def load_progress_sample() -> float:
    from synapticllamas.llama.load_progress import SAMPLE_EVERY

    return SAMPLE_EVERY


def _local_use(devices: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What llama-server allocated on its own CPU: its `CPU` and `CPU_Mapped` buffers together."""
    out: dict[str, Any] = {}
    for name in ("CPU", "CPU_Mapped", "CPU_REPACK"):
        for kind, mib in devices.get(name, {}).items():
            if kind.endswith("_mib") and isinstance(mib, (int, float)):
                out[kind] = round(out.get(kind, 0.0) + mib, 2)
    return out
