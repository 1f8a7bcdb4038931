"""The shell: a prompt_toolkit session on a terminal, a line runner when stdin is piped.

Both modes dispatch through commands.registry and print through one Renderer. A command runs as
its own task so Ctrl-C (SIGINT) can cancel it without touching the shell; SIGTERM and SIGHUP end
the shell through the same clean-up path as `exit`, EOF and Ctrl-D.
"""
from __future__ import annotations

import asyncio
import logging
import shlex
import signal
import sys
import threading
import unicodedata
from pathlib import Path
from typing import Any, Iterable

from commands import load_all
from commands.registry import CommandError, ExitShell, Result, UsageError, lookup, suggest

from .events import Event
from .render import Renderer, TerminalUI

PROMPT = "SynapticLlamas> "
CLOSE_TIMEOUT = 30.0   # app.close() stops children (SIGTERM, then SIGKILL) and flushes events

# Background events worth interrupting the person at the prompt for.
NOTABLE = {
    ("coordinator", "start"), ("coordinator", "stop"), ("coordinator", "backoff"), ("coordinator", "fatal"),
    ("rpc_backend", "connect"), ("rpc_backend", "disconnect"),
    ("system", "redis_connected"), ("system", "redis_disconnected"), ("system", "events_dropped"),
}

log = logging.getLogger("synapticllamas")


def shown(text: str, limit: int = 60) -> str:
    """Quote user input for an error message: control characters escaped, long input cut."""
    safe = "".join(ch if unicodedata.category(ch)[0] != "C" else ch.encode("unicode_escape").decode()
                   for ch in text)
    return safe if len(safe) <= limit else safe[: limit - 3] + "..."


class Shell:
    def __init__(self, app: Any, renderer: Renderer | None = None, exit_on_error: bool = False) -> None:
        self.app = app
        self.renderer = renderer or Renderer()
        self.app.ui = TerminalUI(self.renderer)
        self.exit_on_error = exit_on_error
        self.current: asyncio.Task | None = None      # the running command
        self.terminating: int | None = None           # the signal that asked us to end
        self.failures = 0
        self._prompt_app: Any = None                  # prompt_toolkit Application while prompting
        self._lines: asyncio.Queue | None = None      # piped mode's input lines (None = end)
        self._log_ready = False
        load_all()
        app.observer.add_sink(self._on_event)

    # ------------------------------------------------------------ one command line

    async def run_line(self, line: str) -> bool:
        """Run one command line and print its result. Returns False when the command failed."""
        try:
            argv = shlex.split(line)
        except ValueError as exc:
            self.renderer.error(f"cannot read the line: {exc} (quote arguments with ' or \")")
            return False
        if not argv:
            return True
        name, args = argv[0], argv[1:]
        cmd = lookup(name) or lookup(name.lower())
        if cmd is None:
            hint = suggest(name)
            did_you_mean = f" Did you mean '{hint}'?" if hint else ""
            self.renderer.error(f"Unknown command '{shown(name)}'.{did_you_mean} Type 'help' for the list.")
            return False
        try:
            result = await cmd.handler(self.app, args)
        except ExitShell:
            raise
        except UsageError as exc:
            self.renderer.error(f"{exc}\nUsage: {cmd.usage}")
            return False
        except CommandError as exc:
            self.renderer.error(str(exc))
            return False
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug of ours: one line for the user, the traceback in the log
            where = self._log_internal_error(name, exc)
            self.renderer.error(f"internal error in '{cmd.name}': {type(exc).__name__}: {shown(str(exc), 200)}"
                                f" (traceback in {where})")
            return False
        self.renderer.show(result)
        return result is None or result.ok

    async def execute(self, line: str) -> bool:
        """run_line as a cancellable task; Ctrl-C cancels it and the shell carries on."""
        self.current = asyncio.ensure_future(self.run_line(line))
        try:
            return await self.current
        except asyncio.CancelledError:
            if self.current.cancelled():
                self.app.ui.end_progress()
                if self.terminating is None:
                    self.renderer.show(Result.warning("Cancelled."))
                return False
            raise
        finally:
            self.current = None

    # ------------------------------------------------------------ modes

    async def run_lines(self, lines: Iterable[str] | None = None) -> int:
        """Piped mode (stdin not a TTY) or `-c` commands: run each line, exit at the end.

        Exit status 0 if every command succeeded, 1 if one failed."""
        self._install_signals(interactive=False)
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        self._lines = queue
        if lines is None:
            self._start_stdin_reader(queue)
        else:
            for line in lines:
                queue.put_nowait(line)
            queue.put_nowait(None)
        try:
            while self.terminating is None:
                line = await queue.get()
                if line is None:
                    break
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                try:
                    ok = await self.execute(line)
                except ExitShell:
                    break
                if not ok:
                    self.failures += 1
                    if self.exit_on_error or self.terminating is not None:
                        break
        finally:
            await self._close()
        return self._exit_status()

    async def run_interactive(self) -> int:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.auto_suggest import AutoSuggestFromHistory
        from prompt_toolkit.patch_stdout import patch_stdout

        from .completion import RegistryCompleter

        session: PromptSession = PromptSession(
            history=self._history(), auto_suggest=AutoSuggestFromHistory(), completer=RegistryCompleter(),
            bottom_toolbar=self.toolbar, complete_while_typing=False, enable_history_search=False)
        self._install_signals(interactive=True)
        try:
            while self.terminating is None:
                try:
                    with patch_stdout(raw=True):
                        self._prompt_app = session.app
                        line = await session.prompt_async(PROMPT)
                except KeyboardInterrupt:
                    continue          # Ctrl-C clears the line, never exits
                except EOFError:
                    break             # Ctrl-D
                finally:
                    self._prompt_app = None
                if self.terminating is not None:
                    break
                # prompt_toolkit replaces our SIGINT handler while it prompts; put it back
                self._install_sigint()
                try:
                    await self.execute(line)
                except ExitShell:
                    break
        finally:
            await self._close()
        return self._exit_status()

    # ------------------------------------------------------------ pieces

    def toolbar(self) -> str:
        try:
            s = self.app.status()
        except Exception:  # the toolbar must never break the prompt
            return " SynapticLlamas"
        redis = s["redis"]
        if not redis.get("enabled"):
            redis_text = "off"
        else:
            redis_text = "on" if redis.get("connected") else \
                "on (connecting)" if redis.get("state") == "connecting" else "on (unreachable, buffering)"
        backends = s["backends"]
        return (f" mode: {s['mode']} | redis: {redis_text} | coordinator: {s['coordinator'].get('state')}"
                f" | backends: {backends.get('up', 0)}/{backends.get('configured', 0)} up")

    def _on_event(self, event: Event) -> None:
        """Observer sink: tell the person at the prompt about background happenings."""
        if self.current is not None:
            return  # the running command reports for itself; `events` shows the rest
        notable = (event.component, event.event_type) in NOTABLE or event.level in ("error", "critical")
        if not notable:
            return
        self.app.ui.notice(f"[{event.component}] {event.message}", event.level)
        if self._prompt_app is not None:
            self._prompt_app.invalidate()

    def _history(self) -> Any:
        from prompt_toolkit.history import FileHistory, InMemoryHistory

        path = Path(self.app.settings.history_file)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch(exist_ok=True)
            return FileHistory(str(path))
        except OSError as exc:
            self.renderer.show(Result.warning(f"history file {path} is not writable ({exc.strerror});"
                                              " history is kept for this session only"))
            return InMemoryHistory()

    def _start_stdin_reader(self, queue: asyncio.Queue) -> None:
        """Read stdin on a daemon thread: a blocking read must never hold up the loop or exit."""
        loop = asyncio.get_running_loop()

        def read() -> None:
            try:
                for line in sys.stdin:
                    loop.call_soon_threadsafe(queue.put_nowait, line)
            except (OSError, ValueError, UnicodeDecodeError) as exc:
                loop.call_soon_threadsafe(self.renderer.error, f"cannot read standard input: {exc}")
            finally:
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, None)
                except RuntimeError:
                    pass  # the loop is already closed: we are exiting anyway

        threading.Thread(target=read, name="stdin-reader", daemon=True).start()

    def _install_signals(self, interactive: bool) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(signum, self._terminate, signum)
        self._interactive = interactive
        self._install_sigint()

    def _install_sigint(self) -> None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGINT, self._on_sigint)

    def _on_sigint(self) -> None:
        if self.current is not None:
            self.current.cancel()
        elif not self._interactive:
            self._terminate(signal.SIGINT)

    def _terminate(self, signum: int) -> None:
        self.terminating = signum
        if self.current is not None:
            self.current.cancel()
        if self._prompt_app is not None and self._prompt_app.is_running:
            self._prompt_app.exit(exception=EOFError)
        if self._lines is not None:
            self._lines.put_nowait(None)     # piped mode may be waiting for a line that never comes

    async def _close(self) -> None:
        reason = "exit" if self.terminating is None else signal.Signals(self.terminating).name
        try:
            await asyncio.wait_for(self.app.close(reason), CLOSE_TIMEOUT)
        except Exception as exc:
            where = self._log_internal_error("close", exc)
            self.renderer.error(f"clean-up did not finish: {type(exc).__name__}: {exc} (details in {where})")

    def _exit_status(self) -> int:
        if self.terminating is not None:
            return 128 + self.terminating
        return 1 if self.failures else 0

    def _log_internal_error(self, what: str, exc: BaseException) -> str:
        path = Path(self.app.settings.log_file)
        if not self._log_ready:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                handler = logging.FileHandler(path, encoding="utf-8")
                handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
                log.addHandler(handler)
            except OSError:
                log.addHandler(logging.StreamHandler(sys.stderr))
                path = Path("standard error")
            self._log_ready = True
        log.error("internal error in %r", what, exc_info=exc)
        return str(path)
