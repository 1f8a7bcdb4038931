"""`backends`: placeholder until its issue lands (it says so plainly)."""
from __future__ import annotations

from typing import Any

from .registry import Result, command


@command("backends", "The RPC backend registry (not available yet)", "backends [list|add HOST", subcommands={"PORT|remove HOST:PORT|check|spawn N|stop-local]:list": "not available yet", "add": "not available yet", "remove": "not available yet", "check": "not available yet", "spawn": "not available yet", "stop-local": "not available yet"})
async def backends_command(app: Any, args: list[str]) -> Result:
    return Result.error("'backends' is not available yet in this build")
