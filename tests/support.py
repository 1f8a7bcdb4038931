"""Test helpers shared by every suite: free ports, polling, a real redis-server, running the shell.

Nothing here fakes a component: RedisServer starts the real `redis-server` binary on a free
loopback port, the shell runs as a real subprocess (run_piped for a whole script, PipedShell for
a conversation) or in a pty (pexpect), and RedisCliSubscriber is `redis-cli psubscribe` itself.
The bench scripts import from here too.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>]")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process `pid` has used so far (from /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def polls(predicate, timeout: float, what: str):
    """The polling of wait_for (sync) and until (async): yields what each call of `predicate` returns,
    the first truthy value last, and fails with `what` once `timeout` has passed. The caller sleeps
    between the calls in its own way."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        yield value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    """Poll `predicate` until it returns a truthy value; fail with `what` after `timeout`."""
    for value in polls(predicate, timeout, what):
        if value:
            return value
        time.sleep(interval)


async def until(predicate, timeout: float = 10.0, what: str = "condition", interval: float = 0.01):
    """wait_for inside asyncio: awaits between the calls, so the loop is never blocked."""
    for value in polls(predicate, timeout, what):
        if value:
            return value
        await asyncio.sleep(interval)


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> int:
    """SIGTERM, SIGKILL after `grace` seconds; the exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


def strip_ansi(text: str) -> str:
    return ANSI.sub("", text)


class RedisServer:
    """A real redis-server on 127.0.0.1:<free port> (or `bind`: the simulated cluster's root address),
    killable and restartable on the same port."""

    def __init__(self, workdir: Path, port: int | None = None, bind: str = "127.0.0.1") -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise RuntimeError("redis-server is not installed; scripts/test installs it (apt-get install redis-server)")
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.bind = bind
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.bind}:{self.port}"

    def start(self) -> RedisServer:
        with open(self.workdir / "redis.log", "ab") as log:      # the child has its own copy of the fd
            self.proc = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", self.bind, "--save", "", "--appendonly", "no",
                 "--dir", str(self.workdir), "--protected-mode", "no"],
                stdout=log, stderr=subprocess.STDOUT)
        wait_for(self.ping, 10, what=f"redis-server on port {self.port}")
        return self

    def ping(self) -> bool:
        try:
            with socket.create_connection((self.bind, self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)

    def restart(self) -> RedisServer:
        self.kill()
        return self.start()

    def client(self, **kwargs):
        import redis

        return redis.Redis(host=self.bind, port=self.port, decode_responses=True, **kwargs)


def shell_env(tmp: Path, **extra: str) -> dict[str, str]:
    """Environment for a shell under test: its own XDG dirs, no CPR wait, a fixed terminal size."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SOLLOL_", "SYNAPTICLLAMAS_")) and k not in ("LLAMA_SERVER", "LLAMA_RPC_SERVER")}
    env.update({
        "XDG_CONFIG_HOME": str(tmp / "config"),
        "XDG_STATE_HOME": str(tmp / "state"),
        "PROMPT_TOOLKIT_NO_CPR": "1",
        "LINES": "40",
        "COLUMNS": "140",
        "PYTHONUNBUFFERED": "1",
        # nothing listens on port 1: a test that wants Redis passes its own server's URL
        "SOLLOL_REDIS_URL": "redis://127.0.0.1:1",
        # the split over every backend by memory: what the failover, load and memory tests are about
        # (the speed-aware default would serve the demo model on this host, with no backend in use);
        # the placement tests set it themselves
        "SYNAPTICLLAMAS_PLACEMENT": "memory",
        # every shell's gateway on a port of its own (11434 may be a real Ollama's)
        "SYNAPTICLLAMAS_GATEWAY_PORT": str(free_port()),
    })
    env.update(extra)
    return env


def run_piped(script: str, tmp: Path, *args: str, env: dict[str, str] | None = None,
              timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `python3 main.py ARGS` with `script` on stdin, as a user would pipe it."""
    return subprocess.run([PYTHON, str(ROOT / "main.py"), *args], input=script, capture_output=True,
                          text=True, env=env or shell_env(tmp), timeout=timeout, cwd=ROOT)


def spawn_shell(tmp: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 15):
    """The shell in a pty, driven by pexpect (TERM=xterm so prompt_toolkit runs in full mode)."""
    import pexpect

    child = pexpect.spawn(PYTHON, [str(ROOT / "main.py"), *args], env=env or shell_env(tmp, TERM="xterm"),
                          encoding="utf-8", timeout=timeout, dimensions=(40, 140), cwd=str(ROOT))
    child.logfile_read = AppendLog(tmp / "pexpect.log")
    return child


class AppendLog:
    """A log file for pexpect (`logfile_read`) that holds no file open: each write appends and closes,
    so nothing is left to close after the child, whichever way the test ends."""

    def __init__(self, path: Path) -> None:
        self.name = str(path)

    def write(self, text: str) -> None:
        with open(self.name, "a", encoding="utf-8") as fh:
            fh.write(text)

    def flush(self) -> None:
        pass                    # every write is already on disk


class PipedShell:
    """`python3 main.py ARGS` with stdin a pipe kept open: commands go in one at a time (send), and
    stdout and stderr are read line by line on two threads, for expect() / read_until() to wait on.

    Every line is kept in `transcript` as (stream, line), in the order the lines arrived. Reading
    does not take lines away: the merged output, stdout and stderr each have their own read
    position, so reading one stream never skips the other's lines."""

    timeout = 60.0      # the default, in seconds, for expect() and for waiting for the exit

    def __init__(self, tmp: Path, *args: str, **env: str) -> None:
        self.proc = subprocess.Popen([PYTHON, str(ROOT / "main.py"), *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8",
                                     env=shell_env(tmp, **env), cwd=ROOT)
        self.transcript: list[tuple[str, str]] = []
        self._arrived = threading.Condition()
        self._ended: set[str] = set()
        self._next: dict[str | None, int] = {None: 0, "stdout": 0, "stderr": 0}   # transcript index
        for name, stream in (("stdout", self.proc.stdout), ("stderr", self.proc.stderr)):
            threading.Thread(target=self._read, args=(name, stream), daemon=True).start()

    def _read(self, name: str, stream) -> None:
        for line in stream:
            with self._arrived:
                self.transcript.append((name, line.rstrip("\n")))
                self._arrived.notify_all()
        with self._arrived:
            self._ended.add(name)
            self._arrived.notify_all()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, *lines: str) -> None:
        self.proc.stdin.write("".join(line + "\n" for line in lines))
        self.proc.stdin.flush()

    def read_until(self, pattern: str, timeout: float | None = None,
                   stream: str | None = None) -> tuple[re.Match, list[str]]:
        """Read on until a line matches `pattern` (re.search): the match, and the lines read on the
        way, the matching one last. `stream` ("stdout" or "stderr") reads only that stream; None
        reads both as they arrived. Fails if that output ends first, or after `timeout` seconds."""
        timeout = self.timeout if timeout is None else timeout
        watched = {stream} if stream else {"stdout", "stderr"}
        deadline = time.monotonic() + timeout
        read: list[str] = []
        with self._arrived:
            while True:
                while self._next[stream] < len(self.transcript):
                    name, line = self.transcript[self._next[stream]]
                    self._next[stream] += 1
                    if stream in (None, name):
                        read.append(line)
                        if (match := re.search(pattern, line)):
                            return match, read
                if watched <= self._ended:
                    raise AssertionError(f"the shell's output ended without a line matching {pattern!r}; "
                                         f"output:\n{self.output()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no line matching {pattern!r} within {timeout}s; output:\n"
                                         + self.output())
                self._arrived.wait(left)

    def unread(self, stream: str | None = None, timeout: float = 0.0) -> list[str]:
        """The lines (of `stream`, or of both) not read yet, now counted as read; first waits up to
        `timeout` seconds for that output to end."""
        watched = {stream} if stream else {"stdout", "stderr"}
        with self._arrived:
            self._arrived.wait_for(lambda: watched <= self._ended, timeout)
            lines = [line for name, line in self.transcript[self._next[stream]:] if stream in (None, name)]
            self._next[stream] = len(self.transcript)
        return lines

    def expect(self, pattern: str, timeout: float | None = None) -> re.Match:
        """The match of the next line (of either stream) that matches `pattern`."""
        return self.read_until(pattern, timeout)[0]

    def wait(self, timeout: float | None = None) -> int:
        """The exit status; fails the test if the shell does not end within `timeout`."""
        timeout = self.timeout if timeout is None else timeout
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the shell did not exit within {timeout}s; output:\n" + self.output()) from None

    def close(self, timeout: float | None = None) -> int:
        """Close stdin (end of input, as Ctrl-D would) and wait for the exit status."""
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        return self.wait(timeout)

    def exit(self, timeout: float | None = None) -> int:
        """Type `exit`, close stdin and wait for the exit status."""
        if self.proc.poll() is None:
            try:
                self.send("exit")
            except BrokenPipeError:
                pass
        return self.close(timeout)

    def kill(self, grace: float | None = None) -> None:
        """End the shell whatever state it is in (clean-up after a failed test): SIGKILL, or with
        `grace`, SIGTERM first (so it can stop what it started) and SIGKILL `grace` seconds later."""
        if self.proc.poll() is not None:
            return
        if grace is not None:
            self.proc.terminate()
            try:
                self.proc.wait(grace)
                return
            except subprocess.TimeoutExpired:
                pass
        self.proc.kill()
        self.proc.wait(10)

    def output(self) -> str:
        """Every line the shell printed so far, stdout and stderr as they arrived."""
        return "\n".join(line for _, line in self.transcript)

    def stderr(self, timeout: float = 10.0) -> str:
        """All the shell wrote to stderr; waits (up to `timeout`) for the stream to end."""
        with self._arrived:
            self._arrived.wait_for(lambda: "stderr" in self._ended, timeout)
            return "".join(line + "\n" for name, line in self.transcript if name == "stderr")


class RedisCliSubscriber:
    """`redis-cli psubscribe "synapticllamas:llama_cpp:*"`, exactly as a user would run it, read on a
    thread: `raw` is every line it printed (after the three that confirm the subscription, four per
    message), events() the messages' JSON, each as often as pub/sub delivered it.

    event_support.Subscriber is the tests' other subscriber, and stays separate: see there why."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        from synapticllamas.events.contract import CHANNEL_PATTERN

        cli = shutil.which("redis-cli")
        assert cli, "redis-cli is not installed (apt-get install redis-tools / redis-server)"
        self.proc = subprocess.Popen([cli, "-h", host, "-p", str(port), "psubscribe", CHANNEL_PATTERN],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, encoding="utf-8")
        self.raw: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        # redis-cli confirms with three lines: psubscribe, the pattern, the count
        wait_for(lambda: len(self.raw) >= 3, 10, what="redis-cli psubscribe to confirm")
        assert self.raw[:3] == ["psubscribe", CHANNEL_PATTERN, "1"], self.raw

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.raw.append(line.rstrip("\n"))

    def events(self, instance: str | None = None) -> list[dict]:
        out = []
        for line in list(self.raw):
            if line.startswith("{"):
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                # a test may publish malformed events on purpose: this reader skips them too
                if not (isinstance(event.get("source"), dict) and isinstance(event.get("details"), dict)):
                    continue
                if instance is None or event["source"].get("instance") == instance:
                    out.append(event)
        return out

    def wait_for_event(self, component: str, event_type: str, timeout: float = 60.0, after: int = 0,
                       **details) -> tuple[int, dict]:
        """The first event of that kind (and details) at index `after` or later: (index, event)."""
        def find():
            for i, e in enumerate(self.events()[after:], after):
                if e["component"] == component and e["event_type"] == event_type and \
                        all(e["details"].get(k) == v for k, v in details.items()):
                    return i, e
            return None

        try:
            return wait_for(find, timeout, what=f"{component}/{event_type} {details or ''} at the subscriber")
        except AssertionError as exc:
            seen = ", ".join(f"{e['component']}/{e['event_type']}" for e in self.events()[after:])
            raise AssertionError(f"{exc}; seen from #{after} on: {seen}") from None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
