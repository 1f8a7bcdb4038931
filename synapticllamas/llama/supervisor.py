"""CoordinatorManager: a supervised llama-server (the llama.cpp coordinator) over the RPC backends.

States follow supervisord: stopped, starting, running, backoff, stopping, exited, fatal.
`_change_state()` is the one place a state changes, and every lifecycle event leaves through it
(with from_state, pid, tries, reason, exit code or signal). The manager knows nothing of Redis or
the shell: whoever wants its events subscribes to `hooks`; `observe()` at the bottom of this module
turns them into observer events.

Nothing here polls a running server. The child's exit is awaited (so a crash is seen at once), its
stdout/stderr are read line by line, /health is asked during start-up only, when the log says the
server is up (plus a slow fallback probe), and then once per heartbeat.
"""
from __future__ import annotations

import asyncio
import os
import shlex
import signal
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from synapticllamas.llama import args as llama_args
from synapticllamas.llama import http as llama_http
from synapticllamas.util.processes import spawn
from synapticllamas.util.text import shown
from synapticllamas.util.ticker import Ticker

if TYPE_CHECKING:   # llama_log (its patterns) and binaries load with the first start, not at start-up
    from synapticllamas.llama.log import LoadReport, LogLine

STATES = ("stopped", "starting", "running", "backoff", "stopping", "exited", "fatal")
ACTIVE = ("starting", "running", "backoff", "stopping")
EVENT_TYPE = {"starting": "starting", "running": "start", "stopping": "stopping", "stopped": "stop",
              "exited": "stop", "backoff": "backoff", "fatal": "fatal"}
GGUF_MAGIC = b"GGUF"
BACKOFF_CAP = 60.0
LOG_LINES = 2000           # raw lines kept for `coordinator logs`
LINE_LIMIT = 1 << 20       # longest output line read whole
DRAIN_TIMEOUT = 0.3        # after the exit, wait this long for the last lines (the error) to arrive
FALLBACK_PROBE = 0.5       # start-up /health probe interval before the log says "listening"
LISTENING_PROBE = 0.1      # ... and after it (a server that listens before loading answers 503)
HEALTH_FAILURES = 2        # failed heartbeat /health requests in a row before a restart
HEALTH_TIMEOUT = 5.0       # a heartbeat's or attach check's /health; the ticks it outlasts are skipped


class CoordinatorError(Exception):
    """A coordinator action failed; the message is one line for the user."""


@dataclass(slots=True)
class StateChange:
    state: str
    from_state: str
    event_type: str
    message: str
    level: str
    details: dict[str, Any]


@dataclass(slots=True)
class Notice:
    """A non-lifecycle happening: model progress, heartbeat, request/response."""
    event_type: str
    message: str
    details: dict[str, Any]
    level: str = "info"


class Hooks:
    """Subscriber lists. A failing subscriber is counted, never allowed to break supervision."""

    def __init__(self) -> None:
        self.on_state_change: list[Callable[[StateChange], None]] = []
        self.on_log: list[Callable[[LogLine, dict[str, Any]], None]] = []
        self.on_model_progress: list[Callable[[Notice], None]] = []
        self.on_heartbeat: list[Callable[[Notice], None]] = []
        self.on_request: list[Callable[[Notice], None]] = []
        self.errors = 0

    def call(self, name: str, *args: Any) -> None:
        for fn in list(getattr(self, name)):
            try:
                fn(*args)
            except Exception:
                self.errors += 1

    def subscribe(self, name: str, fn: Callable[..., None]) -> Callable[[], None]:
        subscribers = getattr(self, name)
        subscribers.append(fn)
        return lambda: fn in subscribers and subscribers.remove(fn)


@dataclass
class Plan:
    """What one launch will run; built by the pre-flight checks."""
    binary: Path
    model: Path
    host: str
    port: int
    backends: list[str]
    left_out: dict[str, str] = field(default_factory=dict)   # backend -> why it is not used

    def argv(self, ctx_size: int, extra: str) -> list[str]:
        argv = [str(self.binary), "--model", str(self.model), "--host", self.host, "--port", str(self.port),
                "-ngl", "99", "-c", str(ctx_size), "-lv", "4", "--no-webui"]
        if self.backends:
            argv += ["--rpc", ",".join(self.backends)]
        return argv + shlex.split(extra)


@dataclass(eq=False)
class Run:
    """One llama-server process."""
    plan: Plan
    proc: asyncio.subprocess.Process
    auto: bool                                   # an automatic restart, not a user's start
    report: LoadReport                           # devices and buffers, from its load log
    started: float = field(default_factory=time.monotonic)
    failures: list[LogLine] = field(default_factory=list)
    lines: deque = field(default_factory=lambda: deque(maxlen=12))
    hint: asyncio.Event = field(default_factory=asyncio.Event)   # the log says: try /health now
    listening: bool = False
    ready: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    stop_reason: str | None = None
    error: str | None = None                                     # the manager's own reason to stop it
    tasks: list[asyncio.Task] = field(default_factory=list)      # readers, then the start-up prober
    watcher: asyncio.Task | None = None
    hidden: list[str] = field(default_factory=list)   # secrets of its argv, kept out of logs and events
    api_key: str | None = None                        # sent with each request to it

    @property
    def pid(self) -> int:
        return self.proc.pid


def exit_details(returncode: int) -> dict[str, Any]:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return {"signal": name, "exit_code": None}
    return {"exit_code": returncode}


def check_model(path: Path) -> None:
    """Raise CoordinatorError unless `path` is a readable file that starts with the GGUF magic."""
    name = shown(str(path), 200)
    try:
        if not path.exists():
            raise CoordinatorError(f"model {name} does not exist; give a GGUF file with --model PATH")
        if not path.is_file():
            raise CoordinatorError(f"model {name} is not a file; give a GGUF file with --model PATH")
        with path.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:       # a name too long, a directory we may not search, ...
        raise CoordinatorError(f"model {name} cannot be read ({exc.strerror})") from None
    if magic != GGUF_MAGIC:
        raise CoordinatorError(f"model {name} is not a GGUF file (it starts with {magic!r}, a GGUF file with "
                               f"b'GGUF'); llama-server needs a .gguf model")


def port_in_use(host: str, port: int) -> bool:
    """Would llama-server fail to bind? (SO_REUSEADDR like llama-server, so TIME_WAIT is no conflict.)"""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False  # llama-server will report the bad host itself
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError:
            return True
    return False


class CoordinatorManager:
    def __init__(self, settings: Any, observer: Any = None, registry: Any = None) -> None:
        self.settings = settings
        self.registry = registry
        self.hooks = Hooks()
        self.state = "stopped"
        self.run: Run | None = None
        self.tries = 0                    # automatic restarts since the last time it was running
        self.restarts = 0                 # automatic restarts in total
        self.running_since: float | None = None
        self.last_exit: dict[str, Any] | None = None
        self.logs: deque[tuple[float, int, str, str]] = deque(maxlen=LOG_LINES)
        self.target: tuple[Path | None, int | None] = (None, None)   # the user's --model / --port
        self.last_plan: Plan | None = None
        self.suspects: set[str] = set()   # backends an RPC failure pointed at: not in the next --rpc
        self.attached: tuple[str, str, int] | None = None           # (url, host, port)
        self._backoff_task: asyncio.Task | None = None
        self._heartbeat_task: asyncio.Task | None = None
        self._attach_task: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()
        if observer is not None:
            observe(self, observer)

    # ------------------------------------------------------------ the one state-change function

    def _change_state(self, to: str, message: str, reason: str | None = None, level: str | None = None,
                      **details: Any) -> StateChange:
        """Change state and emit the lifecycle event. Nothing else changes self.state."""
        assert to in STATES, to
        from_state, self.state = self.state, to
        run = self.run
        base: dict[str, Any] = {"state": to, "from_state": from_state,
                                "pid": details.pop("pid", run.pid if run else None), "tries": self.tries}
        if reason:
            base["reason"] = reason
        if level is None:
            level = {"fatal": "critical", "backoff": "warning"}.get(to, "info")
            if to == "exited" and reason in ("crash", "startup_failed", "health"):
                level = "error"
        change = StateChange(to, from_state, EVENT_TYPE[to], message, level, {**base, **details})
        if to == "running":
            self.running_since = time.monotonic()
            if run is not None:
                self._heartbeat_task = self._spawn_task(self._heartbeat(run))
        elif from_state == "running":
            self.running_since = None
            if self._heartbeat_task is not None:
                self._heartbeat_task.cancel()
                self._heartbeat_task = None
        self.hooks.call("on_state_change", change)
        return change

    # ------------------------------------------------------------ status

    @property
    def url(self) -> str | None:
        if self.attached:
            return self.attached[0]
        plan = self.run.plan if self.run else None
        return f"http://{plan.host}:{plan.port}" if plan else None

    def status(self) -> dict[str, Any]:
        run = self.run
        plan = run.plan if run else None
        return {
            "state": self.state,
            "pid": run.pid if run else None,
            "url": self.url,
            "model": str(plan.model) if plan else None,
            "backends": list(plan.backends) if plan else [],
            "uptime_s": round(time.monotonic() - self.running_since, 1) if self.running_since else None,
            "restarts": self.restarts,
            "tries": self.tries,
            "attached": bool(self.attached),
            "last_exit": self.last_exit,
        }

    # ------------------------------------------------------------ pre-flight

    async def _plan(self, model: Path | None, port: int | None, auto: bool) -> Plan:
        """Every check that can fail before anything is started; raises CoordinatorError."""
        from synapticllamas.llama import binaries

        s = self.settings
        try:
            binary = binaries.llama_server(s.llama_server)
            model_path = model or (Path(s.model) if s.model else binaries.demo_model())
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
                    + " in distributed mode; start two local ones with `backends spawn 2`, or add one with `backends add HOST:PORT`")
        return Plan(binary, model_path, host, port, backends, left_out)

    # ------------------------------------------------------------ start

    async def start(self, model: Path | str | None = None, port: int | None = None) -> dict[str, Any]:
        """Start llama-server and return once /health says ok; raise CoordinatorError otherwise.

        Cancelling the caller (Ctrl-C) kills the child before the cancellation goes on."""
        if self.attached:
            raise CoordinatorError(f"watching the external coordinator {self.attached[0]}; "
                                   "`coordinator detach` first")
        if self.state in ACTIVE:
            raise CoordinatorError(f"the coordinator is already {self.state}"
                                   + (f" at {self.url} (pid {self.run.pid})" if self.run else "")
                                   + "; use `coordinator stop` or `coordinator restart`")
        model_path = Path(model).expanduser() if model else None
        self.suspects.clear()      # the user's own start trusts the registry again
        plan = await self._plan(model_path, port, auto=False)
        self.target = (model_path, port)
        self.tries = 0
        run = await self._launch(plan, auto=False)
        try:
            await asyncio.shield(run.ready)
        except asyncio.CancelledError:
            await asyncio.shield(self._abort_start(run))
            raise
        return self.status()

    async def _launch(self, plan: Plan, auto: bool) -> Run:
        argv = plan.argv(self.settings.coordinator_ctx_size, self.settings.coordinator_args)
        try:
            proc = await spawn(
                argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, limit=LINE_LIMIT)
        except OSError as exc:
            raise CoordinatorError(f"cannot run {plan.binary}: {exc.strerror or exc}") from None
        from synapticllamas.llama.log import LoadReport

        keys = llama_args.api_keys(argv)
        run = Run(plan, proc, auto, LoadReport(), hidden=llama_args.secrets(argv),
                  api_key=keys[0] if keys else None)
        self.run = run
        self.last_plan = plan
        n = len(plan.backends)
        where = f"{n} RPC backend{'s' if n != 1 else ''}" if self.settings.distributed else "standard mode"
        left = "; left out " + ", ".join(f"{k} ({why})" for k, why in plan.left_out.items()) if plan.left_out else ""
        self._change_state(
            "starting", f"starting llama.cpp coordinator on {plan.host}:{plan.port} ({where}){left}",
            reason="restart" if auto else "user", port=plan.port, host=plan.host, rpc_backends=plan.backends,
            left_out=plan.left_out, model_path=str(plan.model), argv=llama_args.redact_args(argv))
        run.tasks = [self._spawn_task(self._read(run, proc.stdout, "stdout")),
                     self._spawn_task(self._read(run, proc.stderr, "stderr"))]
        run.tasks.append(self._spawn_task(self._wait_healthy(run)))
        run.watcher = self._spawn_task(self._watch(run))
        return run

    async def _abort_start(self, run: Run) -> None:
        """Ctrl-C during start: nothing is worth saving in a half-loaded server, so SIGKILL."""
        if run.watcher is None or run.watcher.done():
            return
        run.stop_reason = "user"
        self._signal(run, signal.SIGKILL)
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
        if rec.is_failure:
            if rec.kind == "model_failed" and not any(f.kind == "model_failed" for f in run.failures):
                self.hooks.call("on_model_progress", Notice(
                    "model_load_failed", f"model {run.plan.model.name} failed to load: "
                    f"{rec.message.split(': ', 1)[-1]}", {"model_path": str(run.plan.model), "pid": run.pid},
                    "error"))
            run.failures.append(rec)
        elif rec.kind == "load_step":
            d = rec.details
            self.hooks.call("on_model_progress", Notice(
                "model_loading", f"loading model {run.plan.model.name}: {d['stage']} ({d['step']}/{d['steps']})",
                {"model_path": str(run.plan.model), "pid": run.pid, **d}))
        elif rec.kind == "model_loaded":
            load_s = round(time.monotonic() - run.started, 3)
            self.hooks.call("on_model_progress", Notice(
                "model_load", f"model {run.plan.model.name} loaded in {load_s:g}s",
                {"model_path": str(run.plan.model), "pid": run.pid, "load_s": load_s,
                 "rpc_backends": run.plan.backends, **rec.details, **run.report.summary()}))
            run.hint.set()
        elif rec.kind == "listening":
            run.listening = True
            run.hint.set()

    # ------------------------------------------------------------ waiting for /health

    async def _wait_healthy(self, run: Run) -> None:
        """Start-up only: probe /health when the log says the server is up (and slowly before)."""
        host, port = run.plan.host, run.plan.port
        try:
            async with asyncio.timeout(self.settings.coordinator_start_timeout):
                while True:
                    try:
                        await asyncio.wait_for(run.hint.wait(),
                                               LISTENING_PROBE if run.listening else FALLBACK_PROBE)
                    except TimeoutError:
                        pass
                    run.hint.clear()
                    ok, _ = await llama_http.health(host, port, timeout=2.0)
                    if ok:
                        break
        except TimeoutError:
            run.stop_reason = "startup_failed"
            run.error = f"/health did not report ok within {self.settings.coordinator_start_timeout:g}s"
            self._spawn_task(self._terminate(run))
            return
        if self.run is run and self.state == "starting":
            self.tries = 0
            load_s = round(time.monotonic() - run.started, 3)
            plan = run.plan
            self._change_state("running", "llama.cpp coordinator started", port=plan.port, host=plan.host,
                               url=f"http://{plan.host}:{plan.port}", rpc_backends=plan.backends,
                               model_path=str(plan.model), load_s=load_s, restarts=self.restarts,
                               **run.report.summary())
            if not run.ready.done():
                run.ready.set_result(None)

    # ------------------------------------------------------------ the exit

    async def _watch(self, run: Run) -> None:
        returncode = await run.proc.wait()
        # the last lines (the reason it died) may still be in the pipes: read them, bounded
        await asyncio.wait(run.tasks[:2], timeout=DRAIN_TIMEOUT)
        for task in run.tasks:
            task.cancel()
        self._signal(run, signal.SIGKILL)   # anything it left in its process group
        await self._on_exit(run, returncode)

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

    async def _on_exit(self, run: Run, returncode: int) -> None:
        if self.run is not run:
            return
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
        details = {**code, "pid": run.pid, "port": run.plan.port, "rpc_backends": run.plan.backends,
                   "model_path": str(run.plan.model), "last_lines": list(run.lines)}
        if why:
            details["error"] = why
        if dead:
            details["failed_backends"] = dead
        self.run = None
        reason = run.stop_reason
        was = self.state
        if reason in ("user", "exit"):
            message = f"llama.cpp coordinator stopped ({reason})"
            change = self._change_state("stopped", message, reason=reason, **details)
        else:
            if reason is None:
                reason = "startup_failed" if was == "starting" else "crash"
            verb = {"crash": "crashed", "startup_failed": "failed to start",
                    "health": "stopped answering /health and was stopped"}[reason]
            message = f"llama.cpp coordinator {verb} ({how})" + (f": {why}" if why else "")
            change = self._change_state("exited", message, reason=reason, **details)
        self.last_exit = {"reason": reason, "message": change.message, **code, "failed_backends": dead}
        if not run.ready.done():
            run.ready.set_exception(CoordinatorError(change.message))
            run.ready.exception()   # retrieved: a cancelled start() must not log "never retrieved"
        if reason in ("crash", "health") or (reason == "startup_failed" and run.auto):
            self._schedule_restart(change.message)

    # ------------------------------------------------------------ restart policy

    def _schedule_restart(self, cause: str) -> None:
        limit = self.settings.coordinator_max_restarts
        if self.tries >= limit:
            self._change_state("fatal", f"llama.cpp coordinator gave up after {self.tries} restart"
                               f"{'s' if self.tries != 1 else ''}: {cause}", reason="max_restarts",
                               max_restarts=limit, cause=cause)
            return
        self.tries += 1
        delay = min(self.settings.coordinator_backoff * 2 ** (self.tries - 1), BACKOFF_CAP)
        self._change_state("backoff", f"restarting llama.cpp coordinator in {delay:g}s "
                           f"(try {self.tries} of {limit})", delay_s=delay, max_restarts=limit, cause=cause)
        self._backoff_task = self._spawn_task(self._restart_after(delay))

    async def _restart_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        if self.state != "backoff":
            return
        model, port = self.target
        try:
            plan = await self._plan(model, port, auto=True)
            self.restarts += 1
            await self._launch(plan, auto=True)
        except CoordinatorError as exc:
            if self.state == "backoff":
                self._schedule_restart(str(exc))

    # ------------------------------------------------------------ stop

    def _signal(self, run: Run, sig: int) -> None:
        try:
            os.killpg(run.pid, sig)   # its own session: the group id is its pid
        except (ProcessLookupError, PermissionError):
            pass

    async def _terminate(self, run: Run) -> None:
        """SIGTERM to the process group, SIGKILL after the stop timeout; returns when it is gone."""
        self._signal(run, signal.SIGTERM)
        done, _ = await asyncio.wait({run.watcher}, timeout=self.settings.coordinator_stop_timeout)
        if not done:
            self._signal(run, signal.SIGKILL)
            await asyncio.wait({run.watcher}, timeout=5.0)

    async def stop(self, reason: str = "user") -> None:
        if self.attached:
            raise CoordinatorError(f"watching the external coordinator {self.attached[0]}; it is not ours "
                                   "to stop (`coordinator detach` stops watching)")
        if self.state == "backoff":
            if self._backoff_task is not None:
                self._backoff_task.cancel()
            self._change_state("stopped", f"llama.cpp coordinator restart cancelled ({reason})", reason=reason)
            return
        run = self.run
        if run is None or self.state not in ACTIVE:
            raise CoordinatorError(f"the coordinator is not running (state: {self.state})")
        run.stop_reason = reason
        if self.state != "stopping":
            self._change_state("stopping", f"stopping llama.cpp coordinator ({reason})", reason=reason)
        await asyncio.shield(self._terminate(run))

    async def restart(self) -> dict[str, Any]:
        model, port = self.target
        if self.state in ACTIVE:
            await self.stop("user")
        return await self.start(model, port)

    async def close(self) -> None:
        """App exit: stop what we started, end every timer. Bounded by the stop timeout."""
        if self._attach_task is not None:
            self._attach_task.cancel()
        if self.state in ACTIVE and not self.attached:
            try:
                await self.stop("exit")
            except CoordinatorError:
                pass
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
            if self.run is not run or self.state != "running":
                return
            ok, detail = await llama_http.health(plan.host, plan.port, timeout=HEALTH_TIMEOUT)
            if self.run is not run or self.state != "running":
                return
            failures = 0 if ok else failures + 1
            self.hooks.call("on_heartbeat", Notice(
                "heartbeat", f"rpc_backend_connect on {plan.host}:{plan.port}",
                {"host": plan.host, "port": plan.port, "backends": plan.backends,
                 "total_backends": len(plan.backends), "pid": run.pid, "model_path": str(plan.model),
                 "uptime_s": round(time.monotonic() - (self.running_since or run.started), 1),
                 "restarts": self.restarts, "health": detail, "interval_s": interval},
                "info" if ok else "warning"))
            if failures >= HEALTH_FAILURES:
                run.stop_reason = "health"
                # its own task: leaving `running` cancels this heartbeat task
                self._spawn_task(self._terminate(run))
                return

    # ------------------------------------------------------------ attach an external coordinator

    async def attach(self, url: str) -> tuple[bool, str]:
        if self.state in ACTIVE and not self.attached:
            raise CoordinatorError(f"this shell runs its own coordinator ({self.state}); `coordinator stop` first")
        if self.attached:
            raise CoordinatorError(f"already watching {self.attached[0]}; `coordinator detach` first")
        try:
            host, port = llama_http.parse_base_url(url)
        except ValueError as exc:
            raise CoordinatorError(str(exc)) from None
        self.attached = (url.strip().rstrip("/"), host, port)
        ok, detail = await self._check_attached()
        self._attach_task = self._spawn_task(self._attach_loop())
        return ok, detail

    async def _attach_loop(self) -> None:
        ticker = Ticker(self.settings.attach_check_interval)
        while True:
            await ticker.next()
            await self._check_attached()

    async def _check_attached(self) -> tuple[bool, str]:
        """The state check: one /health request; an up/down change is a start/stop event."""
        url, host, port = self.attached
        ok, detail = await llama_http.health(host, port, timeout=HEALTH_TIMEOUT)
        common = {"url": url, "host": host, "port": port, "attached": True}
        if ok and self.state != "running":
            self._change_state("running", "llama.cpp coordinator started", reason="attached", **common)
        elif not ok and self.state == "running":
            self._change_state("exited", f"llama.cpp coordinator at {url} stopped answering: {detail}",
                               reason="health", error=detail, **common)
        return ok, detail

    async def detach(self) -> str:
        if not self.attached:
            raise CoordinatorError("not watching an external coordinator (`coordinator attach URL` does)")
        url = self.attached[0]
        if self._attach_task is not None:
            self._attach_task.cancel()
            self._attach_task = None
        if self.state != "stopped":
            self._change_state("stopped", f"stopped watching llama.cpp coordinator {url}", reason="detached",
                               url=url, attached=True)
        self.attached = None
        return url

    # ------------------------------------------------------------ one completion

    def require_running(self) -> None:
        """Raise CoordinatorError unless there is a coordinator to ask."""
        if self.state != "running":
            raise CoordinatorError(f"no running coordinator (state: {self.state}); `coordinator start` first")

    async def ask(self, prompt: str, n_predict: int, on_token: Callable[[str], None]) -> dict[str, Any]:
        """Stream one /completion; returns counts and timings. Raises CoordinatorError (one line)."""
        self.require_running()
        run = self.run
        if self.attached:
            _, host, port = self.attached
        else:
            host, port = run.plan.host, run.plan.port
        url = f"http://{host}:{port}"
        self.hooks.call("on_request", Notice("request", f"completion request to {url} ({n_predict} tokens)",
                                             {"url": url, "prompt_chars": len(prompt), "n_predict": n_predict}))
        started = time.monotonic()
        tokens, final = 0, None
        try:
            # an attached coordinator has no run: our key goes to our own llama-server only
            async for event in llama_http.sse(host, port, "/completion",
                                              {"prompt": prompt, "n_predict": n_predict, "stream": True},
                                              bearer=run.api_key if run else None):
                if event.get("content"):
                    tokens += 1
                    on_token(event["content"])
                if event.get("stop"):
                    final = event
                    break
        except (TimeoutError, OSError, EOFError, ValueError) as exc:
            final = None
            error = str(exc) or type(exc).__name__
        else:
            error = "the stream ended before the last token"
        if final is None:
            if run is not None and run.watcher is not None:
                # it probably died under us: wait (bounded) for the exit, whose diagnosis says why
                await asyncio.wait({run.watcher}, timeout=3.0)
                if run.watcher.done() and self.last_exit:
                    error = self.last_exit["message"]
            self.hooks.call("on_request", Notice("response", f"completion failed: {error}",
                                                 {"url": url, "tokens": tokens, "error": error}, "error"))
            raise CoordinatorError(f"the completion failed: {error}")
        seconds = round(time.monotonic() - started, 3)
        timings = final.get("timings", {})
        result = {"tokens": tokens, "seconds": seconds, "stop_type": final.get("stop_type"),
                  "tokens_per_s": round(timings.get("predicted_per_second", 0.0), 1),
                  "prompt_tokens": final.get("tokens_evaluated")}
        self.hooks.call("on_request", Notice("response", f"completion: {tokens} tokens in {seconds:g}s",
                                             {"url": url, **result}))
        return result

    # ------------------------------------------------------------ helpers

    def _spawn_task(self, coro: Any) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task


def observe(manager: CoordinatorManager, observer: Any) -> None:
    """Subscribe an Observer to the manager's hooks: this is where coordinator events are made."""
    hooks = manager.hooks
    hooks.subscribe("on_state_change", lambda c: observer.emit("coordinator", c.event_type, c.message,
                                                               c.details, c.level))
    hooks.subscribe("on_log", lambda rec, ctx: observer.emit(
        "raw", "log", rec.text, {"source": "llama-server", "kind": rec.kind, **ctx}, rec.level, sample=True))
    hooks.subscribe("on_model_progress", lambda n: observer.emit("model", n.event_type, n.message, n.details,
                                                                 n.level))
    hooks.subscribe("on_heartbeat", lambda n: observer.emit("coordinator", n.event_type, n.message, n.details,
                                                            n.level))
    hooks.subscribe("on_request", lambda n: observer.emit("coordinator", n.event_type, n.message, n.details,
                                                          n.level, sample=True))
