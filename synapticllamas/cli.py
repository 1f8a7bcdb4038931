"""Command line: click options -> Settings -> App -> Shell (interactive, piped, or -c commands).

`python3 main.py` with no subcommand opens the shell; subcommands add other entry points
(`events --follow`, `dashboard-server`). Heavy modules are imported only when needed, so the
prompt appears fast.
"""
from __future__ import annotations

import asyncio
import sys
from typing import Any, ClassVar

import click

from synapticllamas import __version__
from synapticllamas.config import ConfigError, load_settings

# click option name -> Settings name. Values are passed as given and validated by config.py, so a
# flag and its environment variable produce the same error message.
FLAG_SETTINGS = {
    "distributed": "distributed",
    "redis_url": "redis_url",
    "redis": "redis_enabled",
    "rpc_backend": "rpc_backends",
    "backends_file": "backends_file",
    "coordinator_port": "coordinator_port",
    "gateway_port": "gateway_port",
    "model": "model",
    "llama_server": "llama_server",
    "rpc_server": "rpc_server",
    "cluster_key_file": "cluster_key_file",
}


def settings_from(params: dict[str, Any], config_path: str | None) -> Any:
    flags = {FLAG_SETTINGS[k]: v for k, v in params.items() if k in FLAG_SETTINGS}
    try:
        return load_settings(flags, config_path=config_path)
    except ConfigError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2)


class LazyGroup(click.Group):
    """Subcommands imported when they are asked for: the shell's own start (no subcommand) does
    not pay for the dashboard's, the node's and the viewer's option definitions."""

    lazy: ClassVar[dict[str, str]] = {"dashboard-server": "synapticllamas.dashboard.command:dashboard_server",
            "events": "synapticllamas.events.viewer:events_viewer",
            "node": "synapticllamas.node.command:node",
            "cluster": "synapticllamas.trust.command:cluster"}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self.lazy))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy and name not in self.commands:
            import importlib

            module, attr = self.lazy[name].split(":")
            self.add_command(getattr(importlib.import_module(module), attr), name)
        return super().get_command(ctx, name)


@click.group(cls=LazyGroup, invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--distributed", is_flag=True, default=None,
              help="Distributed mode: the coordinator shards the model over the RPC backends.")
@click.option("--redis-url", metavar="URL", help="Redis to publish events to (SOLLOL_REDIS_URL).")
@click.option("--redis/--no-redis", default=None, help="Start with Redis publishing on (default off).")
@click.option("--rpc-backend", multiple=True, metavar="HOST:PORT", help="An RPC backend (repeatable).")
@click.option("--backends-file", metavar="PATH", help="The backends file (one HOST:PORT per line).")
@click.option("--coordinator-port", metavar="N",
              help="llama-server's own HTTP port (default 0: a free loopback port; clients use the gateway).")
@click.option("--gateway-port", metavar="N",
              help="The OpenAI- and Ollama-compatible endpoint's port (default 11434; 0: off).")
@click.option("--model", metavar="PATH", help="GGUF model for the coordinator (default: the demo model).")
@click.option("--llama-server", metavar="PATH", help="Path of the llama-server binary.")
@click.option("--rpc-server", metavar="PATH", help="Path of the ggml-rpc-server / rpc-server binary.")
@click.option("--cluster-key-file", metavar="PATH",
              help="The cluster key (default: $XDG_CONFIG_HOME/synapticllamas/cluster.key; `cluster init` makes it).")
@click.option("--config", "config_path", metavar="PATH", help="Settings file (TOML).")
@click.option("-c", "--command", "commands", multiple=True, metavar="CMD",
              help="Run this shell command and exit (repeatable; run in order).")
@click.option("--exit-on-error", is_flag=True, help="Piped or -c mode: stop at the first failing command.")
@click.version_option(__version__, "--version", prog_name="synapticllamas")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, commands: tuple[str, ...], exit_on_error: bool,
        **params: Any) -> None:
    """SynapticLlamas: run llama.cpp distributed inference and push its events to Redis.

    With no subcommand, opens the interactive shell; with piped input or -c, runs those commands.
    """
    settings = settings_from(params, config_path)
    ctx.obj = settings
    if ctx.invoked_subcommand is not None:
        return
    from synapticllamas.trust.key import ClusterKeyError, from_settings

    try:
        from_settings(settings)        # a key file that cannot be used stops the shell here, in one line
    except ClusterKeyError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2)
    problem = gateway_refusal(settings)
    if problem:
        click.echo(f"Error: {problem}", err=True)
        sys.exit(2)
    sys.exit(run_shell(settings, commands, exit_on_error))


def gateway_refusal(settings: Any) -> str | None:
    """The gateway's settings that stop the shell at start: a keys file it cannot read, or an
    endpoint beyond loopback that anyone on the network could use (no API key)."""
    if settings.gateway_port == 0:
        return None
    from synapticllamas.gateway.keys import ApiKeys, KeysError
    from synapticllamas.node.address import is_loopback

    try:
        keys = ApiKeys.from_settings(settings)
    except KeysError as exc:
        return str(exc)
    host = settings.gateway_host
    if not keys and not is_loopback(host):
        return (f"SYNAPTICLLAMAS_GATEWAY_HOST={host} is not a loopback address and no API key is set: anyone who "
                "reaches it could use the model; set SYNAPTICLLAMAS_GATEWAY_API_KEYS or "
                "SYNAPTICLLAMAS_GATEWAY_API_KEYS_FILE, or bind 127.0.0.1")
    return None


def run_shell(settings: Any, commands: tuple[str, ...] = (), exit_on_error: bool = False) -> int:
    from synapticllamas.app import App
    from synapticllamas.shell.render import Renderer
    from synapticllamas.shell.repl import Shell

    app = App(settings)
    shell = Shell(app, Renderer(), exit_on_error=exit_on_error)
    interactive = not commands and sys.stdin.isatty() and sys.stdout.isatty()

    async def run() -> int:
        await app.start()
        if commands:
            return await shell.run_lines(commands)
        if interactive:
            return await shell.run_interactive()
        return await shell.run_lines()

    return asyncio.run(run())


def main() -> None:
    cli(prog_name="synapticllamas")


if __name__ == "__main__":
    main()
