"""Internal errors (bugs of ours): the traceback goes to the log file, the user gets one line.

Left alone, Python prints a traceback on stderr for an error nobody handled in the background: a
task's ("Task exception was never retrieved"), a callback's, or any record logged while logging
has no handler (its last resort). None of that may reach the user's terminal. `install()` gives
the `synapticllamas` logger a file handler (the file is opened at the first record, so start-up
does no I/O for it), stops its records from reaching the root logger's last resort, hands each
error to `report` as one line (the app emits it as a system/error event, which the shell prints
above the prompt), and makes the loop's exception handler log there.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

LOGGER = "synapticllamas"
REPORTED = "reported"      # a record whose one line went out already (extra={REPORTED: True})


class _LazyFile(logging.FileHandler):
    """A FileHandler that creates the directory and opens the file at the first record, and
    never prints its own failure (a read-only home must not put a traceback on the terminal)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, encoding="utf-8", delay=True)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        except OSError:
            return
        super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        pass


class _OneLine(logging.Handler):
    def __init__(self, report: Callable[[str], object], where: str) -> None:
        super().__init__(logging.ERROR)
        self.report = report
        self.where = where

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, REPORTED, False):
            return
        try:
            text = record.getMessage().splitlines()[0] if record.getMessage() else "internal error"
            exc = record.exc_info[1] if record.exc_info else None
            if exc is not None and str(exc) not in text:
                text += f": {type(exc).__name__}: {exc}"
            self.report(f"{text[:300]} (traceback in {self.where})")
        except Exception:
            pass


def install(log_file: str, report: Callable[[str], object],
            loop: asyncio.AbstractEventLoop | None = None) -> logging.Logger:
    """Route internal errors as the module docstring says; safe to call again (handlers are replaced)."""
    logger = logging.getLogger(LOGGER)
    for handler in list(logger.handlers):
        if isinstance(handler, (_LazyFile, _OneLine)):
            logger.removeHandler(handler)
            handler.close()
    logger.addHandler(_LazyFile(Path(log_file)))
    logger.addHandler(_OneLine(report, log_file))
    logger.setLevel(logging.INFO)
    logger.propagate = False
    # asyncio's own logger reports the background failures the loop sees
    logging.getLogger("asyncio").propagate = False
    if loop is not None:
        loop.set_exception_handler(lambda lp, context: _loop_error(logger, context))
    return logger


def _loop_error(logger: logging.Logger, context: dict[str, Any]) -> None:
    exc = context.get("exception")
    message = str(context.get("message") or "background error")
    task = context.get("task") or context.get("future")
    where = f" ({task.get_name()})" if isinstance(task, asyncio.Task) else ""
    logger.error("internal error in the background%s: %s", where, message,
                 exc_info=(type(exc), exc, exc.__traceback__) if isinstance(exc, BaseException) else None)
