"""`events`: placeholder until its issue lands (it says so plainly)."""
from __future__ import annotations

from typing import Any

from .registry import Result, command


@command("events", "Recent events from the in-memory buffer (not available yet)", "events [N] [--component C] [--level L] [--follow]", subcommands={})
async def events_command(app: Any, args: list[str]) -> Result:
    return Result.error("'events' is not available yet in this build")
