"""Ending a background task: cancel it and wait until it has finished its clean-up."""
from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def cancel(task: asyncio.Task[Any] | None) -> None:
    """Cancel `task` (if any) and wait for it to finish. Its CancelledError ends here: callers are
    clean-up paths (close(), a viewer leaving), often running while their own task is being
    cancelled, and what follows the wait must still run."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
