"""Small text formatters shared by the command modules."""
from __future__ import annotations


def duration(seconds: float | None) -> str:
    """12s, 3m05s, 2h07m; '-' when unknown."""
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
