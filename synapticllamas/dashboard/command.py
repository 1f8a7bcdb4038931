"""`synapticllamas-dashboard` and `python3 main.py dashboard-server`: options, checked, then serve.

Imports only click and the settings module: the shell's start-up imports this file, the web
server is imported when the command runs. The import goes one way: server.py never imports this.
"""
from __future__ import annotations

import sys

import click

from synapticllamas.config import ConfigError, Settings, int_at_least, load_settings, parse_redis_url, port, redact_url


def checked(parse, flag: str, value: str, secret: bool = False):
    try:
        return parse(value)
    except ValueError as exc:
        shown = redact_url(str(value)) if secret else value
        click.echo(f"Error: {flag}={shown!r} is not valid: {exc}", err=True)
        sys.exit(2)


@click.command("dashboard-server", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (anything but loopback exposes the dashboard to the network).")
@click.option("--port", "port_", default="8080", show_default=True, metavar="N", help="Port to listen on.")
@click.option("--redis-url", metavar="URL",
              help="Redis the shells publish to (default: SOLLOL_REDIS_URL, else redis://localhost:6379).")
@click.option("--token", metavar="T", envvar="SYNAPTICLLAMAS_DASHBOARD_TOKEN", show_envvar=True,
              help="Require this token on every route (Authorization: Bearer T, or ?token=T).")
@click.option("--replay", default="1000", show_default=True, metavar="N",
              help="Events from the journal a newly opened page starts with.")
@click.pass_context
def dashboard_server(ctx: click.Context, host: str, port_: str, redis_url: str | None, token: str | None,
                     replay: str) -> None:
    """The unified dashboard: live events from every shell that publishes to this Redis."""
    number = checked(port, "--port", port_)
    replay_n = checked(int_at_least(0), "--replay", replay)
    if replay_n > 100000:
        click.echo(f"Error: --replay={replay!r} is not valid: expected an integer from 0 to 100000", err=True)
        sys.exit(2)
    if redis_url is not None:
        redis_url = checked(parse_redis_url, "--redis-url", redis_url, secret=True)
    else:   # the shell's own settings: env SOLLOL_REDIS_URL, config file, default
        settings = ctx.find_object(Settings)
        if settings is None:
            try:
                settings = load_settings()
            except ConfigError as exc:
                click.echo(f"Error: {exc}", err=True)
                sys.exit(2)
        redis_url = settings.redis_url
    if token is not None and not token.strip():
        click.echo("Error: --token='' is not valid: expected a non-empty token", err=True)
        sys.exit(2)
    from synapticllamas.dashboard.server import serve

    sys.exit(serve(host, number, redis_url, token, replay_n))


def main() -> None:
    """The `synapticllamas-dashboard` console script."""
    dashboard_server.main(prog_name="synapticllamas-dashboard")
