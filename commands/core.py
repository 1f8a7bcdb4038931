"""help, exit/quit, status, config and the deprecated dashboard command."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from synapticllamas.commands.formatting import duration
from synapticllamas.commands.registry import REGISTRY, ExitShell, Result, UsageError, command, lookup, suggest
from synapticllamas.config import SPECS
from synapticllamas.util.text import shown

if TYPE_CHECKING:
    from synapticllamas.app import App


@command("help", "List the commands, or show one command's usage", "help [COMMAND]")
async def help_command(app: App, args: list[str]) -> Result:
    if len(args) > 1:
        raise UsageError("help takes at most one command name")
    if not args:
        rows = [(cmd.name, cmd.summary) for cmd in REGISTRY.values()]
        return Result.table("Commands", ("command", "what it does"), rows,
                            footer="Type 'help COMMAND' for its usage. Ctrl-D or 'exit' leaves the shell.")
    cmd = lookup(args[0])
    if cmd is None:
        hint = suggest(args[0])
        raise UsageError(f"no command '{args[0]}'" + (f"; did you mean '{hint}'?" if hint else ""))
    lines = [f"{cmd.name}: {cmd.summary}", f"Usage: {cmd.usage}"]
    if cmd.aliases:
        lines.append("Also: " + ", ".join(cmd.aliases))
    if cmd.details:
        lines.append(cmd.details)
    if cmd.subcommands:
        return Result.table(None, ("subcommand", "what it does"), list(cmd.subcommands.items()),
                            message="\n".join(lines))
    return Result.text("\n".join(lines))


@command("exit", "Leave the shell (stops what it started, flushes events)", "exit", aliases=("quit",))
async def exit_command(app: App, args: list[str]) -> Result:
    if args:
        raise UsageError("exit takes no arguments")
    raise ExitShell()


def redis_summary(redis: dict[str, Any]) -> str:
    if not redis.get("enabled"):
        return "off (type 'redis on' to publish events)"
    where = redis.get("url", "")
    if redis.get("connected"):
        return f"on, connected to {where}; {redis.get('published', 0)} published"
    if redis.get("state") == "connecting":
        return f"on, connecting to {where}; {redis.get('buffered', 0)} buffered"
    return (f"on, {where} unreachable; {redis.get('buffered', 0)} buffered, "
            f"{redis.get('dropped', 0)} dropped")


def discovery_summary(d: dict[str, Any]) -> str:
    """Node discovery in one line, with what it skipped: a shell that stopped hearing nodes says so."""
    n = d.get("nodes", 0)
    where = "following" if d.get("connected") else f"not connected ({d.get('last_error') or 'connecting'})"
    parts = [f"{where}; {n} node{'s' if n != 1 else ''} announced"]
    if d.get("invalid"):
        parts.append(f"{d['invalid']} invalid message{'s' if d['invalid'] != 1 else ''} skipped "
                     f"(last: {shown(d.get('last_invalid') or '', 100)})")
    if d.get("failures"):
        parts.append(f"{d['failures']} messages failed (see the log file)")
    if d.get("enabled") and "keyed" in d:
        parts.append(ignored_summary(d))
    return "; ".join(parts)


def ignored_summary(d: dict[str, Any]) -> str:
    """Whether node announcements are checked against the cluster key, and what was ignored."""
    ignored = {k: n for k, n in (d.get("ignored") or {}).items() if k != "older"}   # older: not news, not a threat
    checked = "announcements checked with the cluster key" if d.get("keyed") else \
        "no cluster key: announcements not checked"
    if not ignored:
        return checked
    total = sum(ignored.values())
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(ignored.items(), key=lambda kv: -kv[1]))
    return f"{checked}, {total} ignored ({kinds})"


def coordinator_summary(coord: dict[str, Any]) -> str:
    state = coord.get("state", "stopped")
    parts = [state]
    if coord.get("pid"):
        parts.append(f"pid {coord['pid']}")
    if coord.get("url"):
        parts.append(coord["url"])
    if coord.get("model"):
        parts.append(f"model {coord['model']}")
    if coord.get("restarts"):
        parts.append(f"{coord['restarts']} restarts")
    return ", ".join(parts)


def gateway_summary(app: App, gw: dict[str, Any]) -> str:
    line = app.api_line() or ""
    if gw.get("requests"):
        line += (f"; {gw['requests']} requests ({gw['ok']} ok, {gw['resumed']} resumed, {gw['unavailable']} "
                 f"unavailable, {gw['failed']} failed); {gw['in_flight']} in flight, {gw['waiting']} waiting")
    return line


@command("status", "Mode, Redis, coordinator, backends and event counters in one table", "status")
async def status_command(app: App, args: list[str]) -> Result:
    if args:
        raise UsageError("status takes no arguments")
    s = app.status()
    backends, ev = s["backends"], s["events"]
    rows = [
        ("mode", s["mode"]),
        ("redis", redis_summary(s["redis"])),
        ("coordinator", coordinator_summary(s["coordinator"])),
        *([("gateway", gateway_summary(app, s["gateway"]))] if app.api_line() else []),
        ("backends", f"{backends.get('up', 0)} up of {backends.get('configured', 0)} configured"
                     + (f", {backends['down']} down" if backends.get("down") else "")),
        *([("nodes", discovery_summary(s["discovery"]))] if s["discovery"].get("enabled") else []),
        ("events", f"{ev['emitted']} emitted, {ev['kept']} kept, {ev['sampled_out']} sampled out"),
        ("uptime", duration(time.time() - app.started_at)),
    ]
    return Result.table("Status", ("item", "state"), rows)


@command("config", "Show the effective settings and where each came from", "config")
async def config_command(app: App, args: list[str]) -> Result:
    if args:
        raise UsageError("config takes no arguments")
    settings = app.settings
    rows = [(spec.name, settings.display_value(spec.name), settings.source(spec.name),
             spec.env[0] if spec.env else "-") for spec in SPECS]
    footer = f"Config file: {settings.config_file}" if settings.config_file else \
        "Config file: none (precedence: defaults < config file < environment < flags)"
    key = app.cluster_key
    footer += (f"\nCluster key: id {key.id}, from {key.path} ({settings.source('cluster_key_file')})" if key else
               f"\nCluster key: none ({settings.cluster_key_file} does not exist): node announcements are not "
               "checked and nodes behind encrypted links cannot be used; `cluster init` makes one")
    return Result.table("Settings", ("setting", "value", "from", "variable"), rows, footer=footer)


@command("dashboard", "Deprecated: how to use the unified dashboard instead", "dashboard")
async def dashboard_command(app: App, args: list[str]) -> Result:
    if args:
        raise UsageError("dashboard takes no arguments (it only explains the unified dashboard)")
    url = app.settings.dashboard_url
    return Result.warning(
        "The built-in dashboard is deprecated: it polled this app's own APIs, which is what the\n"
        "unified dashboard replaces. Nothing was started. Instead:\n"
        "  1. here:              redis on   (this shell pushes its events to Redis)\n"
        "  2. another terminal:  synapticllamas-dashboard --port 8080   (or: python3 main.py dashboard-server)\n"
        f"  3. a browser:         {url}\n"
        "The dashboard subscribes to synapticllamas:llama_cpp:* and shows every app that pushes events.")
