"""`redis`: placeholder until its issue lands (it says so plainly)."""
from __future__ import annotations

from typing import Any

from .registry import Result, command


@command("redis", "Toggle Redis event publishing (not available yet)", "redis on|off|status", subcommands={"on": "not available yet", "off": "not available yet", "status": "not available yet"})
async def redis_command(app: Any, args: list[str]) -> Result:
    return Result.error("'redis' is not available yet in this build")
