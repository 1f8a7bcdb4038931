"""Text from outside (user input, llama.cpp output, other publishers) made safe to print.

Control characters are escaped so a log line or a typed argument can never move the cursor or
recolour the terminal; long input quoted back in an error is cut.
"""
from __future__ import annotations

import unicodedata


def safe(text: str) -> str:
    """Control characters (escape sequences, newlines) shown escaped, everything else as is."""
    if text.isprintable():
        return text
    return "".join(ch if unicodedata.category(ch)[0] != "C" else ch.encode("unicode_escape").decode()
                   for ch in text)


def shown(text: str, limit: int = 60) -> str:
    """User input quoted back in an error message: escaped like safe(), and cut when long."""
    text = safe(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."
