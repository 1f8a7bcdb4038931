"""`python3 main.py cluster init`: make the cluster key, and say how to put it on the other machines.

Imports only click and the settings at load time (cli.py loads this module when `cluster` is asked for).
"""
from __future__ import annotations

import shlex
import sys

import click

from synapticllamas.config import ConfigError, Settings, load_settings


def _settings(ctx: click.Context) -> Settings:
    settings = ctx.find_object(Settings)
    if settings is not None:
        return settings
    try:
        return load_settings()
    except ConfigError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2)


@click.group("cluster", context_settings={"help_option_names": ["-h", "--help"]})
def cluster() -> None:
    """The cluster key that secures nodes, their announcements and their RPC links."""


@cluster.command("init")
@click.option("--force", is_flag=True, help="Replace an existing key (every machine then needs the new one).")
@click.pass_context
def init(ctx: click.Context, force: bool) -> None:
    """Create the cluster key (256 random bits, mode 0600) where every part of SynapticLlamas looks for it."""
    from pathlib import Path

    from synapticllamas.trust import key

    settings = _settings(ctx)
    path = Path(settings.cluster_key_file)
    try:
        made = key.create(path, force=force)
    except key.ClusterKeyError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:
        click.echo(f"Error: cluster key {path}: cannot write it ({exc.strerror})", err=True)
        sys.exit(1)
    home = Path.home()
    remote = f"~/{path.relative_to(home)}" if path.is_relative_to(home) else str(path)
    remote_dir = remote.rsplit("/", 1)[0]
    click.echo(f"Created the cluster key {path} (id {made.id}, mode 0600).")
    click.echo("Copy it to every other machine of the cluster (each node, shell and dashboard), to the same place, "
               "readable only by its user:")
    click.echo(f"  ssh WORKER 'mkdir -p -m 700 {remote_dir} && umask 077 && cat > {remote}' < {shlex.quote(str(path))}")
    click.echo("Nodes then sign their announcements and serve rpc-server only through an encrypted link that needs "
               "this key; shells ignore announcements not signed with it. `config` shows the key's id on each "
               "machine (the key itself is never shown).")
