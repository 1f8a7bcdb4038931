"""The one renderer: a command Result becomes rich output on a terminal, plain text otherwise.

Part of the shell layer (with shell.py and cli.py): the engine modules never import rich. rich is
imported on first use so that piped runs and the first prompt stay fast.
"""
from __future__ import annotations

import os
from typing import Any, TextIO

from synapticllamas.commands.registry import Result
from synapticllamas.ui import PlainUI, Streams
from synapticllamas.util.text import safe

_STYLES = {"info": "", "success": "green", "warning": "yellow", "error": "bold red"}


def cell(value: Any) -> str:
    """One table cell as text. Cells show what others sent (node announcements, backend reasons,
    llama.cpp lines): control characters are escaped, so none can move the cursor or recolour."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return safe(str(value))


def plain_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        for i, value in enumerate(row[: len(widths)]):
            widths[i] = max(widths[i], len(value))

    def line(values: list[str]) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(values, widths, strict=False)).rstrip()   # cells past the headers are dropped

    out = [line(headers), line(["-" * w for w in widths])]
    out.extend(line(row) for row in rows)
    return "\n".join(out)


def render_plain(result: Result) -> str:
    parts: list[str] = []
    if result.message:
        prefix = "Error: " if result.style == "error" and not result.message.startswith("Error") else ""
        parts.append(prefix + result.message)
    if result.headers is not None:
        if result.title:
            parts.append(result.title)
        rows = [[cell(v) for v in row] for row in (result.rows or [])]
        parts.append(plain_table(list(result.headers), rows) if rows or result.headers else "")
    if result.footer:
        parts.append(result.footer)
    return "\n".join(parts)


class Renderer(Streams):
    """Prints Results. `rich_output` is decided once: a TTY that is not TERM=dumb and no NO_COLOR."""

    def __init__(self, out: TextIO | None = None, err: TextIO | None = None, rich_output: bool | None = None):
        super().__init__(out, err)
        if rich_output is None:
            rich_output = (self.out.isatty() and os.environ.get("TERM", "") != "dumb"
                           and "NO_COLOR" not in os.environ)
        self.rich_output = rich_output
        self._console: Any = None

    @property
    def console(self) -> Any:
        if self._console is None:
            from rich.console import Console

            self._console = Console(file=self._out, highlight=False, soft_wrap=False,
                                    force_terminal=self.rich_output or None)
        return self._console

    def show(self, result: Result | None) -> None:
        if result is None:
            return
        if not self.rich_output:
            text = render_plain(result)
            stream = self.err if not result.ok else self.out
            if text:
                stream.write(text + "\n")
                stream.flush()
            return
        self._show_rich(result)

    def _show_rich(self, result: Result) -> None:
        from rich.table import Table
        from rich.text import Text

        console = self.console
        if result.message:
            message = result.message
            if result.style == "error" and not message.startswith("Error"):
                message = "Error: " + message
            console.print(Text(message, style=_STYLES.get(result.style, "")))
        if result.headers is not None:
            table = Table(title=result.title, title_justify="left", header_style="bold", box=None,
                          pad_edge=False)
            for header in result.headers:
                table.add_column(header, overflow="fold")
            for row in result.rows or []:
                table.add_row(*(Text(cell(v)) for v in row))  # Text(): never interpret markup
            console.print(table)
        if result.footer:
            console.print(Text(result.footer, style="dim"))

    def error(self, message: str) -> None:
        self.show(Result.error(message))


class TerminalUI(PlainUI):
    """PlainUI plus an in-place progress line when stdout is an interactive terminal."""

    def __init__(self, renderer: Renderer) -> None:
        super().__init__(renderer._out, renderer._err)
        self.renderer = renderer
        self._progress_shown = False

    def progress(self, text: str) -> None:
        if not self.renderer.rich_output:
            return super().progress(text)
        self.out.write("\r\x1b[2K" + text)
        self.out.flush()
        self._progress_shown = True

    def end_progress(self) -> None:
        if self._progress_shown:
            self.out.write("\n")
            self.out.flush()
            self._progress_shown = False
        super().end_progress()

    def notice(self, text: str, level: str = "info") -> None:
        if not self.renderer.rich_output:
            return super().notice(text, level)
        from rich.text import Text

        style = {"warning": "yellow", "error": "bold red", "critical": "bold red"}.get(level, "cyan")
        self.renderer.console.print(Text(text, style=style))
