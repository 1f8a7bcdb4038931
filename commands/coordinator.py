"""`coordinator`: start, supervise and use llama-server (synapticllamas/coordinator.py does the work)."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from synapticllamas.commands.backends import port_arg
from synapticllamas.commands.formatting import duration
from synapticllamas.commands.registry import CommandError, Result, UsageError, command, parse_args, parser, positive_int
from synapticllamas.llama.preflight import CoordinatorError  # small: the supervisor loads on first use
from synapticllamas.util.text import shown

if TYPE_CHECKING:
    from synapticllamas.app import App
    from synapticllamas.llama.hooks import Notice
    from synapticllamas.llama.lifecycle import StateChange

USAGE = ('coordinator start [--model PATH] [--port N] [--force] [--spread] | plan [--model PATH] [--spread] | stop | '
         'restart | rebalance | status | logs [N] | attach URL [--api-key K] | detach | ask "PROMPT" [--n N]')
SUBCOMMANDS = {
    "start": "start llama-server on the fastest placement that fits (this host's CPU and the healthy backends, "
             "maybe fewer of them; --spread: every backend holds layers); a model that cannot fit is refused "
             "(--force tries anyway); returns when /health is ok (Ctrl-C aborts)",
    "plan": "the placements that fit, with predicted tokens/s, and the one `start` would choose; starts nothing",
    "stop": "stop it (SIGTERM to its process group, SIGKILL after the stop timeout)",
    "restart": "stop, then start again with the same model and port",
    "rebalance": "restart over every healthy backend, taking back the ones lost earlier (not while a request runs)",
    "status": "state, pid, URL, model, backends, uptime, restarts, last exit",
    "logs": "the last N raw llama-server lines (default 20)",
    "attach": "watch an external llama-server at URL (http or https; a /health check every 60 s); "
              "--api-key KEY (else $LLAMA_API_KEY) is sent with `ask`",
    "detach": "stop watching the external llama-server",
    "ask": "one completion through the running coordinator, streamed (--n tokens, default 32)",
}
DEFAULT_LOG_LINES = 20
DEFAULT_TOKENS = 32


def _running_line(status: dict[str, Any], note: str = "") -> str:
    choice = status.get("choice")
    backends = ", ".join(status["backends"]) or ("none, this host's CPU" if choice else "none (standard mode)")
    line = (f"Coordinator running at {status['url']} (pid {status['pid']}); model {status['model']}; "
            f"RPC backends: {backends}{note}")
    if choice:
        line += f"\nPlacement: {choice['reason']}"
    return line


async def _start(app: App, args: list[str], restart: bool = False) -> Result:
    mgr = app.coordinator
    model: str | None = None
    port: int | None = None
    force = spread = False
    if not restart:
        p = parser("coordinator start")
        p.add_argument("--model", metavar="PATH")
        p.add_argument("--port", type=port_arg)
        p.add_argument("--force", action="store_true")
        p.add_argument("--spread", action="store_true")
        ns = parse_args(p, args)
        model, port, force, spread = ns.model, ns.port, ns.force, ns.spread
        if model is None and not app.settings.model:
            from synapticllamas.llama import binaries

            try:
                model = str(binaries.demo_model())
            except binaries.NotFound as exc:
                raise CommandError(f"no model given (--model PATH or SYNAPTICLLAMAS_MODEL), and {exc}") from None
            app.ui.write(f"No model given: using the demo model {Path(model).name} ({model})")
    elif args:
        raise UsageError("coordinator restart takes no arguments")

    def on_state(change: StateChange) -> None:
        if change.state == "starting":
            app.ui.progress(f"Starting llama-server (pid {change.details['pid']}): {change.message}")

    def on_progress(notice: Notice) -> None:
        app.ui.progress(notice.message[:1].upper() + notice.message[1:])

    unsubscribe = [mgr.hooks.subscribe("on_state_change", on_state),
                   mgr.hooks.subscribe("on_model_progress", on_progress),
                   mgr.hooks.subscribe("on_load_progress", on_progress)]
    problem = app.open_gateway()        # before the start: requests that come meanwhile are held
    if problem:
        app.ui.notice(problem, "warning")
    started = time.monotonic()
    try:
        status = await (mgr.restart() if restart else mgr.start(model, port, force, spread))
    except CoordinatorError as exc:
        raise CommandError(str(exc)) from None
    finally:
        for undo in unsubscribe:
            undo()
        app.ui.end_progress()
    line = _running_line(status, f"; ready in {time.monotonic() - started:.1f}s")
    if app.gateway_url:
        line += "\n" + (app.api_line() or "")
    return Result.success(line)


def _model_arg(app: App, model: str | None) -> Path:
    from synapticllamas.llama import binaries
    from synapticllamas.llama.preflight import check_model

    if model is None and not app.settings.model:
        try:
            model = str(binaries.demo_model())
        except binaries.NotFound as exc:
            raise CommandError(f"no model given (--model PATH or SYNAPTICLLAMAS_MODEL), and {exc}") from None
    path = Path(model or app.settings.model).expanduser()
    try:
        check_model(path)
    except CoordinatorError as exc:
        raise CommandError(str(exc)) from None
    return path


def _devices_line(c: dict[str, Any]) -> str:
    parts = [f"{'this host' if d == 'local' else d} {n}" for d, n in c["layers"].items()]
    return ", ".join(parts)


async def _plan(app: App, args: list[str]) -> Result:
    from synapticllamas.llama.devices import choose_for
    from synapticllamas.llama.gguf_layout import GGUFError

    p = parser("coordinator plan")
    p.add_argument("--model", metavar="PATH")
    p.add_argument("--spread", action="store_true")
    ns = parse_args(p, args)
    model = _model_arg(app, ns.model)
    backends = app.registry.healthy() if app.settings.distributed else []
    mode = "spread" if ns.spread else app.settings.placement
    try:
        layout, choice = await choose_for(app.placement_inputs, model, app.settings.coordinator_ctx_size, backends,
                                          mode)
    except (GGUFError, OSError) as exc:
        raise CommandError(f"cannot read {shown(str(model), 200)}: {exc}") from None
    rows = []
    for c in choice.candidates:
        s = c.summary()
        pred = s["prediction"]
        chosen = c is choice.chosen
        rows.append(((">" if chosen else " ") + " " + c.name, _devices_line(s),
                     f"{pred['tokens_per_s']:.1f}" if pred else "-", f"{pred['ms_per_token']:.1f}" if pred else "-",
                     "yes" if c.fits else "no", s["tensor_split"] if c.backends else "-"))
    footer = [f"{model.name}, {layout.n_layer} layers, -c {app.settings.coordinator_ctx_size}: "
              + (choice.reason if choice.chosen else "no placement fits")]
    footer += choice.notes
    return Result.table("Placements (layers per device; > the one `coordinator start` chooses)",
                        ("plan", "layers", "tokens/s", "ms/token", "fits", "--tensor-split"), rows,
                        footer="\n".join(footer))


async def _stop(app: App, args: list[str]) -> Result:
    if args:
        raise UsageError("coordinator stop takes no arguments")
    try:
        await app.coordinator.stop("user")
    except CoordinatorError as exc:
        raise CommandError(str(exc)) from None
    return Result.success("Coordinator stopped.")


async def _status(app: App, args: list[str]) -> Result:
    if args:
        raise UsageError("coordinator status takes no arguments")
    s = app.coordinator.status()
    last = s["last_exit"]
    rows = [
        ("state", s["state"] + (" (external, attached)" if s["attached"] else "")),
        ("pid", s["pid"]),
        ("url", s["url"]),
        ("model", s["model"]),
        ("RPC backends", ", ".join(s["backends"]) or "-"),
        ("uptime", duration(s["uptime_s"])),
        ("restarts", f"{s['restarts']} in total, {s['tries']} since it last ran"),
        ("last exit", last["message"] if last else "-"),
    ]
    if s.get("waiting"):
        rows.append(("waiting for", s["waiting"]))
    failover = s.get("last_failover")
    if failover:
        rows.append(("last failover", f"lost {', '.join(failover['lost'])}; serving again on "
                     f"{', '.join(failover['survivors'])} after {failover['downtime_s']:g}s"))
    choice = s.get("choice")
    if choice:
        chosen = (choice.get("chosen") or {}).get("prediction") or {}
        measured = s.get("measured_ms_per_token")
        rows.append(("placement", f"{choice['reason']}" + (f"; last request {measured:g} ms/token (predicted "
                                                          f"{chosen.get('ms_per_token')})" if measured else "")))
    for b in s.get("placement") or []:
        rows.append(("this host's CPU" if b.get("local") else b["address"], _placement_line(b)))
    footer = None
    if s.get("unused_backends"):
        footer = (f"Running on {len(s['backends'])} backends while {len(s['backends']) + len(s['unused_backends'])} "
                  f"are up ({', '.join(s['unused_backends'])} came back): `coordinator rebalance` restarts it over all")
    return Result.table("Coordinator", ("item", "value"), rows, footer=footer)


def _placement_line(b: dict[str, Any]) -> str:
    """`layers 0-15 (+ output); model 33.8 / 33.8 MiB, KV 24 / 24, compute 35 / 35 (planned / actual); offers ...`"""
    def pair(planned: float, actual: float | None) -> str:
        return f"{planned:.1f} / {actual:.1f}" if actual is not None else f"{planned:.1f} / -"

    layers = f"layers {b['layers'][0]}-{b['layers'][1]}" if b["layers"] else "no layers"
    if b["output_layer"]:
        layers += " + output"
    offer = f"offers {b['offered_mib']} MiB ({b['offer_source']})" if b["offered_mib"] is not None else \
        "offer unknown"
    return (f"{layers}; model {pair(b['planned_model_mib'], b['model_mib'])} MiB, KV "
            f"{pair(b['planned_kv_mib'], b['kv_mib'])}, compute {pair(b['planned_compute_mib'], b['compute_mib'])} "
            f"(planned / actual); {offer}")


async def _rebalance(app: App, args: list[str]) -> Result:
    if args:
        raise UsageError("coordinator rebalance takes no arguments")
    before = list(app.coordinator.status()["backends"])
    try:
        status = await app.coordinator.rebalance()
    except CoordinatorError as exc:
        raise CommandError(str(exc)) from None
    return Result.success(f"Rebalanced: {len(before)} -> {len(status['backends'])} backends. "
                          + _running_line(status))


async def _logs(app: App, args: list[str]) -> Result:
    p = parser("coordinator logs")
    p.add_argument("n", metavar="N", nargs="?", type=positive_int, default=DEFAULT_LOG_LINES)
    ns = parse_args(p, args)
    lines = list(app.coordinator.logs)[-ns.n:]
    if not lines:
        return Result.text("No llama-server output yet (`coordinator start` starts it).")
    return Result.text("\n".join(text for _, _, _, text in lines))


async def _attach(app: App, args: list[str]) -> Result:
    p = parser("coordinator attach")
    p.add_argument("url", metavar="URL", nargs="?")
    p.add_argument("--api-key", metavar="KEY")
    ns = parse_args(p, args)
    if ns.url is None:
        raise UsageError("coordinator attach takes one URL, e.g. http://10.0.0.9:8080")
    # the key the server was started with: --api-key, else llama-server's own variable
    api_key = ns.api_key or os.environ.get("LLAMA_API_KEY") or None
    try:
        ok, detail = await app.coordinator.attach(ns.url, api_key)
    except CoordinatorError as exc:
        raise CommandError(str(exc)) from None
    every = f"{app.settings.attach_check_interval:g}s"
    url = app.coordinator.attached
    problem = app.open_gateway()
    if problem:
        app.ui.notice(problem, "warning")
    if app.gateway_url:
        app.ui.write(app.api_line() or "")
    if ok:
        return Result.success(f"Watching {url}: it is up (/health ok); its state is checked every {every}.")
    return Result.warning(f"Watching {url}: it is not up yet ({detail}); its state is checked every {every}.")


async def _detach(app: App, args: list[str]) -> Result:
    if args:
        raise UsageError("coordinator detach takes no arguments")
    try:
        url = await app.coordinator.detach()
    except CoordinatorError as exc:
        raise CommandError(str(exc)) from None
    return Result.success(f"Stopped watching {url}.")


class Stream:
    """Streamed text on the terminal, and the one-line notices (waiting, retrying) between it: a
    notice starts on a line of its own, the text goes on after it."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.inline = False

    def text(self, chunk: str) -> None:
        self.app.ui.write(chunk, end="")
        self.inline = True

    def say(self, line: str) -> None:
        if self.inline:
            self.app.ui.write("")
        self.app.ui.write(line)
        self.inline = False

    def end(self) -> None:
        if self.inline:
            self.app.ui.write("")
        self.inline = False


def failure(app: App, exc: CoordinatorError) -> CommandError:
    state = app.coordinator.state
    after = {"backoff": "; it is being restarted", "fatal": "; it will not be restarted (fatal)",
             "waiting": "; it waits for enough backends"}.get(state, "")
    return CommandError(f"{exc}{after}")


async def _ask(app: App, args: list[str]) -> Result:
    p = parser("coordinator ask")
    p.add_argument("prompt", nargs="+")
    p.add_argument("--n", metavar="N", type=positive_int, default=DEFAULT_TOKENS)
    ns = parse_args(p, args)
    prompt = " ".join(ns.prompt)
    try:
        app.coordinator.require_running()      # before the prompt is echoed
    except CoordinatorError as exc:
        raise CommandError(str(exc)) from None
    out = Stream(app)
    out.text(prompt)
    from synapticllamas.gateway.core import Request

    try:
        _, result = await app.gateway.complete(Request("shell", "completion", {"n_predict": ns.n}, prompt=prompt),
                                               out.say, out.text)
    except Exception as exc:
        out.end()
        raise request_failure(app, exc) from None
    out.end()
    return Result.text(figures(result))


def figures(result: Any) -> str:
    """`[8 tokens in 0.4s, first token after 0.1s, 61.2 tokens/s]`"""
    first = f", first token after {result.first_token_s:g}s" if result.first_token_s is not None else ""
    rate = f", {result.tokens_per_s:g} tokens/s" if result.tokens_per_s else ""
    resumed = f", resumed {result.resumed}x" if result.resumed else ""
    return f"[{result.tokens} tokens in {result.seconds:g}s{first}{rate}{resumed}]"


def request_failure(app: App, exc: Exception) -> Exception:
    """A request's failure as the shell's one line (anything else is an internal error: raised)."""
    from synapticllamas.gateway.core import Failed, Unavailable
    from synapticllamas.gateway.upstream import Refused

    if isinstance(exc, Unavailable):
        return failure(app, CoordinatorError(exc.message))
    if isinstance(exc, Failed):
        return failure(app, CoordinatorError(f"the request failed: {exc}"))
    if isinstance(exc, Refused):
        return CommandError(f"llama-server refused the request ({exc.status}): {exc.message}")
    return exc


HANDLERS = {"start": _start, "plan": _plan, "stop": _stop, "status": _status, "logs": _logs, "attach": _attach,
            "detach": _detach, "ask": _ask, "rebalance": _rebalance}


@command("coordinator", "Start and supervise the llama.cpp coordinator (llama-server)", USAGE,
         subcommands=SUBCOMMANDS, options=("--model", "--port", "--force", "--spread", "--n", "--api-key"))
async def coordinator_command(app: App, args: list[str]) -> Result:
    if not args:
        return await _status(app, [])
    sub, rest = args[0], args[1:]
    if sub == "restart":
        return await _start(app, rest, restart=True)
    handler = HANDLERS.get(sub)
    if handler is None:
        raise UsageError(f"unknown subcommand '{shown(sub)}'; expected one of: {', '.join(SUBCOMMANDS)}")
    return await handler(app, rest)
