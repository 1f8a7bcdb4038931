"""`backends`: list, add, remove and probe RPC backends; spawn and stop local ones."""
from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING, Any

from synapticllamas.commands.formatting import duration
from synapticllamas.commands.registry import CommandError, Result, UsageError, command, parse_args, parser, positive_int
from synapticllamas.util.text import safe, shown

if TYPE_CHECKING:
    from synapticllamas.app import App

USAGE = ("backends [list] | add HOST[:PORT] | remove HOST[:PORT] | check | spawn N [--port-base P] "
         "[--memory MiB[,MiB...]] | stop-local | discover")
SUBCOMMANDS = {
    "list": "the backends: address, state, last check, latency, failures, local/remote",
    "add": "add HOST[:PORT] (default port 50052) and save it to the backends file",
    "remove": "remove HOST[:PORT] and its line in the backends file",
    "check": "probe every backend now (a TCP connect each, all at once) and list them",
    "spawn": "start N local ggml-rpc-server processes on 127.0.0.1 (not saved); --memory: what each offers to "
             "placements",
    "stop-local": "stop the local backends this shell started",
    "discover": "the nodes announced on Redis (`main.py node`): age, version, devices, memory",
}
MAX_LOCAL = 32


def memory_list(text: str) -> list[int]:
    """argparse type: MiB, or MiB,MiB,... (ASCII digits, each 1 or more)."""
    values = []
    for part in text.split(","):
        part = part.strip()
        if not (part.isascii() and part.isdecimal()) or int(part) < 1:
            raise argparse.ArgumentTypeError(f"{text!r} is not valid; expected MiB (a whole number, 1 or more) "
                                             "or one per backend, comma-separated, e.g. 200,100,100")
        values.append(int(part))
    return values


def _kind(app: App, backend: Any) -> str:
    if backend.local:
        local = app.local_backend(backend.key)
        memory = f", offers {local.memory_mib} MiB" if local and local.memory_mib else ""
        return (f"local, pid {local.pid}" if local and local.running else "local") + memory
    node = app.announced_node(backend.key)
    if node is not None:
        version = f" rpc v{node.rpc_version}" if node.rpc_version else ""
        free = f", {node.free_mib} MiB free" if node.free_mib is not None else ""
        return f"node{version}{free}"
    return f"remote ({backend.source})"


def _note(app: App, backend: Any) -> str:
    if app.registry.held(backend.key):
        return "in use by the coordinator (not probed meanwhile)"
    if backend.duplicate_of:
        return f"same backend as {backend.duplicate_of}"
    if backend.state == "unknown" and backend.last_check is None:
        return "not probed yet"
    return backend.reason or ""


def _hosts_line(hosts: dict[str, tuple[str, int | None, list[str]]]) -> str:
    """`2 hosts: vm (this host) 16.2 GiB free, shared by 3 backends; pi 3.5 GiB free`: each counted once."""
    parts = []
    for name, free, on in hosts.values():
        memory = f" {free / 1024:.1f} GiB free" if free is not None else ""
        shared = f", shared by {len(on)} backends" if len(on) > 1 else ""
        parts.append(f"{name}{memory}{shared}")
    n = len(hosts)
    return f"{n} host{'s' if n != 1 else ''} (each machine's memory counted once): " + "; ".join(parts)


def backends_table(app: App, message: str | None = None) -> Result:
    registry = app.registry
    settings = app.settings
    now = time.monotonic()
    rows = []
    inputs = app.placement_inputs
    here = inputs.host()
    hosts: dict[str, tuple[str, int | None, list[str]]] = {}
    for b in registry.backends():
        checked = f"{duration(now - b.last_check)} ago" if b.last_check is not None else "never"
        ident, name, free = inputs.host_of_backend(b.key, here)
        hosts.setdefault(ident, (name, free, []))[2].append(b.key)
        rows.append((b.key, b.state, checked,
                     f"{b.latency_ms:.1f} ms" if b.latency_ms is not None else "-", b.failures,
                     _kind(app, b), shown(name, 60), _note(app, b)))
    if settings.rpc_backend_heartbeat:
        probing = f"probed every {settings.rpc_backend_heartbeat_interval:g}s"
    else:
        probing = "heartbeat off: probed only by 'backends check'"
    s = registry.status()
    footer = [f"{s['up']} up, {s['down']} down, {s['unknown']} unknown; {probing}. "
              f"Backends file: {settings.backends_file}"]
    if registry.file_errors:
        footer.append(f"{len(registry.file_errors)} bad line(s) in it, first: {registry.file_errors[0]}")
    if hosts:
        footer.append(_hosts_line(hosts))
    if not rows:
        intro = ("No RPC backends configured. Add one with 'backends add HOST:PORT', "
                 "or start local ones with 'backends spawn 2'.")
        return Result(message="\n".join(filter(None, [message, intro])), footer="\n".join(footer))
    return Result.table("RPC backends", ("address", "state", "last check", "latency", "failures", "kind", "host",
                                         "note"),
                        rows, message=message, footer="\n".join(footer))


def _one_address(args: list[str], sub: str) -> str:
    if len(args) != 1:
        raise UsageError(f"backends {sub} takes one address (HOST[:PORT]), got {len(args)} arguments")
    return args[0]


async def _add(app: App, args: list[str]) -> Result:
    try:
        key = await app.registry.add(_one_address(args, "add"))
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    await app.registry.check([key])        # the user asked about this backend: one probe
    backend = app.registry.get(key)
    saved = f"saved to {app.settings.backends_file}"
    if backend is None:
        return Result.success(f"Added {key} ({saved}).")
    if backend.state == "up":
        return Result.success(f"Added {key} ({saved}); it is up ({backend.latency_ms:.1f} ms).")
    return Result.warning(f"Added {key} ({saved}), but it is {backend.state}: {backend.reason}.")


async def _remove(app: App, args: list[str]) -> Result:
    address = _one_address(args, "remove")
    backend = app.registry.get(address)
    if backend is not None and backend.local and app.local_backends.owns(backend.key):
        raise CommandError(f"{backend.key} is a local backend started by this shell; "
                           "'backends stop-local' stops the local backends")
    try:
        key = await app.registry.remove(address)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    assert backend is not None    # remove() refuses an address that is not configured
    where = ""
    if backend.persisted:
        where = f" (and its line in {app.settings.backends_file})"
    elif backend.source in ("flag", "env", "config"):
        where = (f" for this session; it comes from the {backend.source} setting rpc_backends "
                 "(--rpc-backend / SYNAPTICLLAMAS_RPC_BACKENDS) and returns at the next start")
    return Result.success(f"Removed {key}{where}.")


async def _check(app: App, args: list[str]) -> Result:
    if args:
        raise UsageError("backends check takes no arguments")
    started = time.perf_counter()
    await app.registry.check()
    n = len(app.registry.addresses())
    took = (time.perf_counter() - started) * 1000
    return backends_table(app, f"Probed {n} backend{'s' if n != 1 else ''} in {took:.0f} ms.")


def port_arg(text: str) -> int:
    """argparse type for a port (`backends spawn --port-base`, `coordinator start --port`)."""
    from synapticllamas.rpc.addresses import parse_port

    try:
        return parse_port(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


async def _spawn(app: App, args: list[str]) -> Result:
    from synapticllamas.rpc.local import LocalBackendError

    p = parser("backends spawn")
    p.add_argument("n", type=positive_int, metavar="N")
    p.add_argument("--port-base", type=port_arg, metavar="P")
    p.add_argument("--memory", type=memory_list, metavar="MiB[,MiB...]")
    ns = parse_args(p, args)
    if ns.n > MAX_LOCAL:
        raise UsageError(f"N={ns.n} is too many; spawn starts 1 to {MAX_LOCAL} local backends")
    memory = ns.memory
    if memory is not None and len(memory) not in (1, ns.n):
        raise UsageError(f"--memory has {len(memory)} values for {ns.n} backends; give one for all, or one each")
    if memory is not None and len(memory) == 1:
        memory = memory * ns.n

    def starting(ports: list[int]) -> None:     # after the checks: no "Starting" for a refused spawn
        app.ui.progress(f"Starting {len(ports)} ggml-rpc-server on 127.0.0.1 ...")

    try:
        keys = await app.local_backends.spawn(ns.n, ns.port_base, starting, memory)
    except LocalBackendError as exc:
        raise CommandError(str(exc)) from None
    finally:
        app.ui.end_progress()
    return backends_table(app, f"Started {len(keys)} local backend{'s' if len(keys) != 1 else ''}: "
                               f"{', '.join(keys)} (not saved; stopped by 'backends stop-local' or on exit).")


async def _stop_local(app: App, args: list[str]) -> Result:
    if args:
        raise UsageError("backends stop-local takes no arguments")
    n = await app.local_backends.stop_all()
    if not n:
        return Result.text("No local backends are running.")
    return Result.success(f"Stopped {n} local backend{'s' if n != 1 else ''}.")


async def _discover(app: App, args: list[str]) -> Result:
    if args:
        raise UsageError("backends discover takes no arguments")
    directory = app.nodes
    status = directory.status()
    if not status["enabled"]:
        why = ("SYNAPTICLLAMAS_DISCOVERY=off" if app.settings.discovery == "off"
               else "publishing is off: 'redis on' also follows the nodes announced there")
        return Result.text(f"Node discovery is not running ({why}).")
    now = time.time()
    rows = []
    # every field was checked by the schema (events/schema.py); what is shown is escaped all the same
    for info in sorted(directory.nodes.values(), key=lambda n: n.address):
        reg = info.registration
        devices = ", ".join(f"{safe(str(d.get('name')))} {_n(d.get('free_mib'))}/{_n(d.get('total_mib'))} MiB"
                            for d in reg.get("devices") or [] if isinstance(d, dict)) or "-"
        backend = app.registry.get(info.address)
        rows.append((info.address, shown(str(reg.get("hostname") or "-")), safe(info.state),
                     backend.state if backend else "-",
                     f"{duration(now - info.last_heard)} ago" if info.last_heard else "-",
                     shown(info.rpc_version or "-"), devices,
                     f"{info.memory_offered_mib} MiB" if info.memory_offered_mib is not None else "-",
                     _mib(reg.get("cache", {}).get("bytes") if isinstance(reg.get("cache"), dict) else None),
                     "encrypted" if info.link == "tls-psk" else "plain"))
    where = f"announced on {app.publisher.shown_url}" if app.publisher else "announced on Redis"
    note = "connected" if status["connected"] else f"not connected ({status['last_error'] or 'connecting'})"
    if status.get("invalid"):
        note += (f"; {status['invalid']} invalid message{'s' if status['invalid'] != 1 else ''} skipped "
                 f"(last: {shown(status['last_invalid'] or '', 100)})")
    if "keyed" in status:
        from synapticllamas.commands.core import ignored_summary

        note += f"; {ignored_summary(status)}"
    if not rows:
        return Result.text(f"No nodes {where} yet ({note}). Start one on a worker with 'python3 main.py node'.")
    return Result.table("Nodes", ("address", "host", "node says", "backend", "last heard", "rpc version",
                                  "devices (free/total)", "offered", "cache", "link"), rows,
                        footer=f"{len(rows)} node{'s' if len(rows) != 1 else ''} {where}; discovery {note}.")


def _n(value: Any) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "?"


def _mib(value: Any) -> str:
    return f"{value / 2**20:.0f} MiB" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


async def _list(app: App, args: list[str]) -> Result:
    if args:
        raise UsageError("backends list takes no arguments")
    return backends_table(app)


HANDLERS = {"list": _list, "add": _add, "remove": _remove, "check": _check, "spawn": _spawn,
            "stop-local": _stop_local, "discover": _discover}


@command("backends", "The RPC backends: list, add, remove, check; spawn/stop local ones", USAGE,
         subcommands=SUBCOMMANDS, options=("--port-base", "--memory"))
async def backends_command(app: App, args: list[str]) -> Result:
    sub, rest = (args[0], args[1:]) if args else ("list", [])
    handler = HANDLERS.get(sub)
    if handler is None:
        raise UsageError(f"unknown subcommand '{shown(sub)}'; accepted: {', '.join(HANDLERS)}")
    return await handler(app, rest)
