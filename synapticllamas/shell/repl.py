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
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from synapticllamas.commands import load_all
from synapticllamas.commands.registry import CommandError, ExitShell, Result, UsageError, lookup, suggest
from synapticllamas.events.contract import (
    BackendEvent,
    Component,
    CoordinatorEvent,
    Event,
    RegistryEvent,
    SystemEvent,
)
from synapticllamas.shell.render import Renderer, TerminalUI
from synapticllamas.util.processes import kill_children
from synapticllamas.util.text import safe, shown

PROMPT = "SynapticLlamas> "
PIPED_AHEAD = 1000     # lines of piped input read ahead of the command that runs (bounded memory)

# Background events worth interrupting the person at the prompt for.
NOTABLE = {
    (Component.COORDINATOR, CoordinatorEvent.START), (Component.COORDINATOR, CoordinatorEvent.STOP),
    (Component.COORDINATOR, CoordinatorEvent.BACKOFF), (Component.COORDINATOR, CoordinatorEvent.FATAL),
    (Component.RPC_BACKEND, BackendEvent.CONNECT), (Component.RPC_BACKEND, BackendEvent.DISCONNECT),
    (Component.SYSTEM, SystemEvent.REDIS_CONNECTED), (Component.SYSTEM, SystemEvent.REDIS_DISCONNECTED),
    (Component.SYSTEM, SystemEvent.EVENTS_DROPPED),
    (Component.RPC_REGISTRY, RegistryEvent.ANNOUNCEMENT_IGNORED),
    (Component.RPC_BACKEND, BackendEvent.LINK_FAILED), (Component.RPC_BACKEND, BackendEvent.LINK_CLOSED),
}

log = logging.getLogger("synapticllamas")


def one_line(message: str) -> str:
    """An error message as the user sees it: it may quote their input, so control characters are
    escaped and a huge argument is cut; line breaks the command meant are kept."""
    return "\n".join(shown(line, 500) for line in message.split("\n"))


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
        self._slots: threading.Semaphore | None = None  # bounds how far the stdin reader reads ahead
        self._chat_session: Any = None                 # the `chat> ` prompt, made on first use
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
            self.renderer.error(f"{one_line(str(exc))}\nUsage: {cmd.usage}")
            return False
        except CommandError as exc:
            self.renderer.error(one_line(str(exc)))
            return False
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug of ours: one line for the user, the traceback in the log
            where = self._log_internal_error(name, exc)
            self.renderer.error(f"internal error in '{cmd.name}': {type(exc).__name__}: {shown(str(exc), 200)}"
                                f" (traceback in {where})")
            return False
        if result is not None and not result.ok and result.message:
            result.message = one_line(result.message)
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
                if self.terminating in (None, signal.SIGINT):
                    self.renderer.show(Result.warning("Cancelled."))
                return False
            raise
        finally:
            self.current = None

    # ------------------------------------------------------------ modes

    async def run_lines(self, lines: Iterable[str] | None = None) -> int:
        """Piped mode (stdin not a TTY) or `-c` commands: run each line, exit at the end.

        Exit status 0 if every command succeeded, 1 if one failed, 128+N after signal N."""
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
                item = await queue.get()
                if item is None:
                    break
                if self._slots is not None:
                    self._slots.release()
                line = item.strip()
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

        from synapticllamas.shell.completion import RegistryCompleter

        session: PromptSession = PromptSession(
            history=self._history(), auto_suggest=AutoSuggestFromHistory(), completer=RegistryCompleter(),
            bottom_toolbar=self.toolbar, complete_while_typing=False, enable_history_search=False)
        self._install_signals(interactive=True)
        self.app.ui.line_reader = self._read_line
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

    async def _read_line(self, prompt: str) -> str:
        """A line at a command's own prompt (`chat> `), with its own history; Ctrl-C raises
        KeyboardInterrupt, Ctrl-D EOFError, as at the shell's prompt."""
        from prompt_toolkit import PromptSession
        from prompt_toolkit.patch_stdout import patch_stdout

        if self._chat_session is None:
            self._chat_session = PromptSession(history=self._history("chat_history"))
        try:
            with patch_stdout(raw=True):
                self._prompt_app = self._chat_session.app
                return await self._chat_session.prompt_async(prompt)
        finally:
            self._prompt_app = None
            self._install_sigint()           # prompt_toolkit took SIGINT while it prompted

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
        """Observer sink: tell the person at the prompt about background happenings.

        Sinks run inside emit(), which does no I/O: the notice is printed on the loop's next turn."""
        if self.current is not None:
            return  # the running command reports for itself; `events` shows the rest
        notable = (event.component, event.event_type) in NOTABLE or event.level in ("error", "critical")
        if notable:
            asyncio.get_running_loop().call_soon(self._notice, event)

    def _notice(self, event: Event) -> None:
        # the message may carry raw llama.cpp output: escaped, so it cannot drive the terminal
        self.app.ui.notice(f"[{event.component}] {safe(event.message)}", event.level)
        if self._prompt_app is not None:
            self._prompt_app.invalidate()

    def _history(self, name: str | None = None) -> Any:
        from prompt_toolkit.history import FileHistory, InMemoryHistory

        path = Path(self.app.settings.history_file)
        if name is not None:            # a command's own prompt keeps its history beside the shell's
            path = path.with_name(name)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch(exist_ok=True)
            return FileHistory(str(path))
        except OSError as exc:
            self.renderer.show(Result.warning(f"history file {path} is not writable ({exc.strerror});"
                                              " history is kept for this session only"))
            return InMemoryHistory()

    def _start_stdin_reader(self, queue: asyncio.Queue) -> None:
        """Read stdin on a daemon thread: a blocking read must never hold up the loop or exit.

        At most PIPED_AHEAD lines wait in the queue (`yes help | main.py` must not fill memory):
        the thread takes a slot before queueing a line, the loop gives it back as it takes one."""
        loop = asyncio.get_running_loop()
        self._slots = slots = threading.Semaphore(PIPED_AHEAD)

        def read() -> None:
            try:
                for line in sys.stdin:
                    slots.acquire()
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
        """Interactive: Ctrl-C cancels the running command, the shell goes on. Piped or -c: like
        a shell script, Ctrl-C cancels the running command and ends the run (exit status 130)."""
        if self._interactive:
            interrupt = self.app.ui.on_interrupt
            if interrupt is not None:
                interrupt()              # the command handles Ctrl-C itself (chat: stop the answer only)
            elif self.current is not None:
                self.current.cancel()
        else:
            self._terminate(signal.SIGINT)

    def _terminate(self, signum: int) -> None:
        self.terminating = signum
        if self.current is not None:
            self.current.cancel()
        if self._prompt_app is not None and self._prompt_app.is_running:
            self._prompt_app.exit(exception=EOFError)
        if self._lines is not None:
            self._lines.put_nowait(None)     # piped mode may be waiting for a line that never comes

    def close_budget(self) -> float:
        """Seconds App.close() may take: the coordinator's SIGTERM->SIGKILL wait, the local
        backends' (5 s), each SIGKILL's wait, and the 2 s flush, with room to spare."""
        return self.app.settings.coordinator_stop_timeout + 5 + 2 * 5 + 2 + 5

    async def _close(self) -> None:
        reason = "exit" if self.terminating is None else signal.Signals(self.terminating).name
        budget = self.close_budget()
        try:
            await asyncio.wait_for(self.app.close(reason), budget)
            return
        except TimeoutError:
            problem = f"clean-up did not finish within {budget:g} s"
        except Exception as exc:
            where = self._log_internal_error("close", exc)
            problem = f"clean-up failed: {type(exc).__name__}: {shown(str(exc), 200)} (details in {where})"
        # whatever went wrong, no child of ours may outlive the shell
        killed = kill_children()
        self.failures += 1
        self.renderer.error(problem + (f"; killed the child processes left: {', '.join(map(str, killed))}"
                                       if killed else ""))

    def _exit_status(self) -> int:
        if self.terminating is not None:
            return 128 + self.terminating
        return 1 if self.failures else 0

    def _log_internal_error(self, what: str, exc: BaseException) -> str:
        """The traceback to the log file (util/internal_errors.py); the caller says one line."""
        from synapticllamas.util.internal_errors import REPORTED

        log.error("internal error in %r", what, exc_info=exc, extra={REPORTED: True})
        return self.app.settings.log_file
