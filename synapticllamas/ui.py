"""How the engine talks to the person at the shell while a command runs (streamed text, progress).

The engine only sees this small interface; the shell installs a terminal-aware one (render.py).
The default writes plain text to stdout, which is what piped mode and tests want.
"""
from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from typing import Protocol, TextIO


class UI(Protocol):
    """What the engine may do with the person at the shell while a command runs."""

    # a command that handles Ctrl-C itself (chat: stop the answer, keep the conversation) sets this
    # while it runs; the shell calls it instead of cancelling the command
    on_interrupt: Callable[[], None] | None

    def write(self, text: str = "", end: str = "\n") -> None: ...
    def progress(self, text: str) -> None: ...
    def end_progress(self) -> None: ...
    def notice(self, text: str, level: str = "info") -> None: ...
    def can_read_lines(self) -> bool: ...
    async def read_line(self, prompt: str) -> str: ...


class Streams:
    """stdout/stderr, or the streams given. Looked up at each write: prompt_toolkit swaps
    sys.stdout while the prompt is shown, and a notice must go through its proxy to print above it."""

    def __init__(self, out: TextIO | None = None, err: TextIO | None = None) -> None:
        self._out = out
        self._err = err

    @property
    def out(self) -> TextIO:
        return self._out or sys.stdout

    @property
    def err(self) -> TextIO:
        return self._err or sys.stderr


class PlainUI(Streams):
    def __init__(self, out: TextIO | None = None, err: TextIO | None = None) -> None:
        super().__init__(out, err)
        self._last_progress: str | None = None
        self.on_interrupt: Callable[[], None] | None = None
        # set by the interactive shell: reads one line at a prompt of the command's own (chat> )
        self.line_reader: Callable[[str], Awaitable[str]] | None = None

    def can_read_lines(self) -> bool:
        return self.line_reader is not None

    async def read_line(self, prompt: str) -> str:
        """One line typed at `prompt`; EOFError for Ctrl-D, KeyboardInterrupt for Ctrl-C."""
        if self.line_reader is None:
            raise EOFError
        return await self.line_reader(prompt)

    def write(self, text: str = "", end: str = "\n") -> None:
        """Streamed output of the running command (a generated token, a line of a live view)."""
        self.out.write(text + end)
        self.out.flush()

    def progress(self, text: str) -> None:
        """A progress line (`Loading model ... 40%`). Plain mode prints each distinct line once."""
        if text != self._last_progress:
            self._last_progress = text
            self.write(text)

    def end_progress(self) -> None:
        self._last_progress = None

    def notice(self, text: str, level: str = "info") -> None:
        """Something that happened in the background (a crash, a lost backend)."""
        stream = self.err if level in ("warning", "error", "critical") else self.out
        stream.write(text + "\n")
        stream.flush()
