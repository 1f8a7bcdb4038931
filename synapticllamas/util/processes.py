"""Child processes: start them so they cannot outlive us, stop them, say how they ended.

The shell stops its children on every exit path it sees (exit, EOF, SIGTERM, SIGHUP). It cannot
see SIGKILL, or a crash of the interpreter: for those the kernel's parent-death signal ends the
child. Setting it with preexec_fn is unsafe in a program with threads (the stdin reader and the
Redis sender are threads), so the child is started through util-linux's `setpriv --pdeathsig`,
which sets it and then execs the real binary (same pid, same argv from then on). The signal fires
when the thread that forked dies; asyncio forks from the loop thread, which lives as long as the app.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import weakref
from collections.abc import Callable
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def _setpriv() -> str | None:
    return shutil.which("setpriv") if sys.platform.startswith("linux") else None


def tied_to_parent(argv: list[str]) -> list[str]:
    """argv, prefixed so the child gets SIGTERM if this process dies (where setpriv exists)."""
    setpriv = _setpriv()
    return [setpriv, "--pdeathsig", "TERM", "--", *argv] if setpriv else list(argv)


@lru_cache(maxsize=1)
def _stdbuf() -> str | None:
    return shutil.which("stdbuf")


def line_buffered(argv: list[str]) -> list[str]:
    """argv, run so that its C stdio flushes every line. ggml-rpc-server prints with printf and
    nothing else: into a pipe its banner would sit in a 4 KiB buffer until it exits."""
    stdbuf = _stdbuf()
    return [stdbuf, "-oL", "-eL", *argv] if stdbuf else list(argv)


_children: weakref.WeakSet[asyncio.subprocess.Process] = weakref.WeakSet()


async def spawn(argv: list[str], lines: bool = False, **kwargs: Any) -> asyncio.subprocess.Process:
    """asyncio.create_subprocess_exec in its own session, tied to this process's life;
    `lines`: its output arrives line by line (see line_buffered)."""
    if lines:
        argv = line_buffered(argv)
    proc = await asyncio.create_subprocess_exec(*tied_to_parent(argv), start_new_session=True, **kwargs)
    _children.add(proc)
    return proc


def kill_children() -> list[int]:
    """Last resort when clean-up ran out of time: SIGKILL the process group of every child that
    spawn() started and that has not exited. Returns their pids."""
    killed = []
    for proc in list(_children):
        if proc.returncode is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)     # each child leads its own session
                killed.append(proc.pid)
            except OSError:                             # already gone
                pass
        _children.discard(proc)
    return killed


def signal_group(pid: int, sig: int) -> bool:
    """Send `sig` to the process group led by `pid` (every child runs in its own session).
    False when there is nothing left to signal."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


async def terminate(pid: int, exited: asyncio.Future[Any], timeout: float, kill_wait: float = 5.0,
                    send: Callable[[int, int], bool] = signal_group) -> bool:
    """The one stop routine: SIGTERM to the group, SIGKILL when `exited` is not done within
    `timeout` s, then wait up to `kill_wait` s more. `exited` is whatever completes when the
    process has been reaped (its watcher task). True when it is gone."""
    if exited.done():
        return True
    if send(pid, signal.SIGTERM):
        done, _ = await asyncio.wait({exited}, timeout=timeout)
        if done:
            return True
    send(pid, signal.SIGKILL)
    done, _ = await asyncio.wait({exited}, timeout=kill_wait)
    return bool(done)


def exit_details(returncode: int) -> dict[str, Any]:
    """{"exit_code": N} or {"signal": "SIGKILL", "exit_code": None}: how a process ended, for events."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return {"signal": name, "exit_code": None}
    return {"exit_code": returncode}


def describe_exit(returncode: int | None) -> str:
    """How a process ended, in words: 'exit code 1', 'killed by SIGKILL', 'still running'."""
    if returncode is None:
        return "still running"
    details = exit_details(returncode)
    return f"killed by {details['signal']}" if "signal" in details else f"exit code {returncode}"
