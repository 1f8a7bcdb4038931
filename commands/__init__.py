"""Shell commands, one module per command group, all registered in commands.registry."""
from synapticllamas.commands.registry import (
    REGISTRY,
    Command,
    CommandError,
    ExitShell,
    Result,
    UsageError,
    command,
    lookup,
)

# Each module registers its commands when imported; the order is the order of `help`.
COMMAND_MODULES = ("core", "publishing", "events", "backends", "coordinator", "chat")


def load_all() -> dict[str, Command]:
    import importlib

    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}")
    return REGISTRY


__all__ = ["REGISTRY", "Command", "CommandError", "ExitShell", "Result", "UsageError", "command",
           "load_all", "lookup"]
