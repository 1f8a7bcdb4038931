"""The command registry: the single source for dispatch, `help`, `help <cmd>` and tab completion.

A command module registers its handler with the @command decorator:

    @command("redis", "Toggle Redis event publishing", "redis on|off|status",
             subcommands={"on": "start publishing", "off": "stop publishing", "status": "..."})
    async def redis_command(app, args: list[str]) -> Result: ...

Handlers raise UsageError for wrong arguments (the shell adds the usage line) and CommandError for
a failure the user should read as one line. Anything else is an internal error.
"""
from __future__ import annotations

import argparse
import difflib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:   # the engine's App: only for the type checker, commands import no engine module at load
    from synapticllamas.app import App


class CommandError(Exception):
    """A command failed in a way the user can act on; the message is shown as one line."""


class UsageError(CommandError):
    """The arguments were wrong; the shell prints the message and the command's usage line."""


class ExitShell(Exception):
    """Raised by `exit` / `quit`: the shell's one way out besides EOF and signals."""


@dataclass
class Result:
    """What a command returns; the shell's renderer turns it into rich or plain output."""
    ok: bool = True
    message: str | None = None           # text shown before the table
    title: str | None = None
    headers: Sequence[str] | None = None
    rows: Sequence[Sequence[Any]] | None = None
    footer: str | None = None            # text shown after the table
    style: str = "info"                  # info | success | warning | error

    @classmethod
    def text(cls, message: str, style: str = "info") -> Result:
        return cls(message=message, style=style)

    @classmethod
    def success(cls, message: str) -> Result:
        return cls(message=message, style="success")

    @classmethod
    def warning(cls, message: str) -> Result:
        return cls(message=message, style="warning")

    @classmethod
    def error(cls, message: str) -> Result:
        return cls(ok=False, message=message, style="error")

    @classmethod
    def table(cls, title: str | None, headers: Sequence[str], rows: Sequence[Sequence[Any]],
              message: str | None = None, footer: str | None = None) -> Result:
        return cls(message=message, title=title, headers=headers, rows=rows, footer=footer)


Handler = Callable[["App", list[str]], Awaitable["Result | None"]]


@dataclass
class Command:
    name: str
    summary: str
    usage: str
    handler: Handler
    subcommands: dict[str, str] = field(default_factory=dict)   # name -> one-line summary
    options: tuple[str, ...] = ()                                # completed after the subcommand
    aliases: tuple[str, ...] = ()
    details: str = ""                                            # extra text for `help <cmd>`


REGISTRY: dict[str, Command] = {}
_ALIASES: dict[str, str] = {}


def command(name: str, summary: str, usage: str, *, subcommands: dict[str, str] | None = None,
            options: Sequence[str] = (), aliases: Sequence[str] = (), details: str = ""
            ) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        REGISTRY[name] = Command(name, summary, usage, handler, dict(subcommands or {}),
                                 tuple(options), tuple(aliases), details)
        for alias in aliases:
            _ALIASES[alias] = name
        return handler

    return register


def lookup(name: str) -> Command | None:
    return REGISTRY.get(name) or REGISTRY.get(_ALIASES.get(name, ""))


def suggest(name: str) -> str | None:
    """The closest command name, for `Unknown command 'stauts'. Did you mean 'status'?`."""
    names = list(REGISTRY) + list(_ALIASES)
    matches = difflib.get_close_matches(name.lower(), names, n=1, cutoff=0.6)
    if not matches:
        matches = [n for n in names if n.startswith(name.lower())][:1] if name else []
    return matches[0] if matches else None


def names() -> list[str]:
    return sorted(REGISTRY)


# ---------------------------------------------------------------- argument parsing for handlers

class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse would print and sys.exit; we raise instead
        raise UsageError(message)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        raise UsageError(message or "invalid arguments")


def parser(prog: str) -> argparse.ArgumentParser:
    """An argparse parser that raises UsageError instead of exiting (and has no -h)."""
    return _Parser(prog=prog, add_help=False, allow_abbrev=False, exit_on_error=False)


def parse_args(p: argparse.ArgumentParser, args: list[str]) -> argparse.Namespace:
    try:
        return p.parse_args(args)
    except argparse.ArgumentError as exc:
        raise UsageError(str(exc)) from None


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 in ASCII digits (int() would take ' 3' and '٣')."""
    if not (text.isascii() and text.isdecimal()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be 1 or more")
    return value
