"""`coordinator`: placeholder until its issue lands (it says so plainly)."""
from __future__ import annotations

from typing import Any

from .registry import Result, command


@command("coordinator", "Start and supervise the llama.cpp coordinator (not available yet)", "coordinator start|stop|restart|status|logs|attach|detach|ask", subcommands={"start": "not available yet", "stop": "not available yet", "restart": "not available yet", "status": "not available yet", "logs": "not available yet", "attach": "not available yet", "detach": "not available yet", "ask": "not available yet"})
async def coordinator_command(app: Any, args: list[str]) -> Result:
    return Result.error("'coordinator' is not available yet in this build")
