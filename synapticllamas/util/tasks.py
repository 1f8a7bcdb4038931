"""Ending a background task: cancel it and wait until it has finished its clean-up."""
from __future__ import annotations

import asyncio
from typing import Any


async def cancel(task: asyncio.Task[Any] | None) -> None:
    """Cancel `task` (if any) and wait for it; its CancelledError ends here, nothing else does."""
    if task is None:
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise          # we are being cancelled ourselves: pass it on
