"""Helpers for tests that run the real llama-server / ggml-rpc-server with the real demo model.

A missing binary or model FAILS the test that needs it (with the install hint), never skips it.
Every process a test starts carries a tag in its environment (children inherit it), so
`tagged_processes()` finds them wherever they were re-parented: that is how the orphan checks work.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from support import free_port, wait_for

TAG_VAR = "SYNAPTICLLAMAS_TEST_TAG"
LLAMA_NAMES = ("llama-server", "ggml-rpc-server", "rpc-server")


def llama_binaries() -> tuple[Path, Path, Path]:
    """(llama-server, ggml-rpc-server, demo model), or an AssertionError saying how to install them."""
    from synapticllamas.llama import binaries

    try:
        return binaries.llama_server(), binaries.rpc_server(), binaries.demo_model()
    except binaries.NotFound as exc:
        raise AssertionError(f"these tests need the real llama.cpp and demo model: {exc}") from None


def new_tag() -> str:
    return uuid.uuid4().hex


@contextlib.contextmanager
def tagged() -> Iterator[str]:
    """A new tag for the processes a test starts (llama.cpp's binaries found first). After the test
    none of them may be left: whatever is, is killed, and the test fails."""
    llama_binaries()
    tag = new_tag()
    yield tag
    left = tagged_processes(tag)
    for pid, _ in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left running by the test: {left}"


def tagged_processes(tag: str) -> list[tuple[int, str]]:
    """(pid, name) of live llama.cpp processes whose environment carries `tag` (zombies excluded)."""
    found = []
    needle = f"{TAG_VAR}={tag}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read().decode(errors="replace")
            name = stat[stat.index("(") + 1: stat.rindex(")")]
            state = stat[stat.rindex(")") + 2]
            if state in "ZX" or not any(name.startswith(n[:15]) for n in LLAMA_NAMES):
                continue
            with open(f"/proc/{entry}/environ", "rb") as fh:
                if needle in fh.read().split(b"\0"):
                    found.append((int(entry), name))
        except (OSError, ValueError):
            continue
    return found


def settings_for(tmp: Path, **values: Any):
    """Settings with the defaults, private paths under tmp, and `values` on top."""
    from synapticllamas.config import load_settings

    config = tmp / "config.toml"
    config.write_text("")
    base = load_settings({}, env={}, config_path=str(config))
    defaults = {"backends_file": str(tmp / "rpc_backends.conf"), "history_file": str(tmp / "history"),
                "log_file": str(tmp / "log"), "coordinator_port": free_port(), "coordinator_args": "-t 1",
                "rpc_backend_heartbeat": False,
                # the split over every backend by memory, as these tests expect (support.shell_env says why)
                "placement": "memory"}
    return base.replace(**{**defaults, **values})


class Collector:
    """An observer sink that keeps every event (sampling off in the tests' observer)."""

    def __init__(self, observer: Any) -> None:
        self.events: list[Any] = []
        observer.add_sink(self.events.append)

    def of(self, component: str | None = None, event_type: str | None = None) -> list[Any]:
        return [e for e in self.events if (component is None or e.component == component)
                and (event_type is None or e.event_type == event_type)]

    def lifecycle(self) -> list[str]:
        """Coordinator lifecycle event types in order (heartbeats and per-request events left out)."""
        return [e.event_type for e in self.events if e.component == "coordinator"
                and e.event_type not in ("heartbeat", "request", "response", "inference")]


class RpcServers:
    """Real ggml-rpc-server processes on free loopback ports, for in-process tests."""

    def __init__(self, n: int, env: dict[str, str]) -> None:
        _, rpc, _ = llama_binaries()
        self.procs: list[subprocess.Popen] = []
        self.addresses: list[str] = []
        for _ in range(n):
            port = free_port()
            self.procs.append(subprocess.Popen([str(rpc), "--host", "127.0.0.1", "--port", str(port)],
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env))
            self.addresses.append(f"127.0.0.1:{port}")
        for address, proc in zip(self.addresses, self.procs, strict=True):
            wait_for(lambda address=address, proc=proc: port_open(address) or proc.poll() is not None, 20,
                     what=f"rpc-server {address}")
            assert proc.poll() is None, f"ggml-rpc-server {address} exited with {proc.returncode}"

    def kill(self, index: int) -> None:
        self.procs[index].send_signal(signal.SIGKILL)
        self.procs[index].wait(10)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def port_open(address: str) -> bool:
    import socket

    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=0.5):
            return True
    except OSError:
        return False


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read().decode(errors="replace")
        return stat[stat.rindex(")") + 2] not in "ZX"
    except OSError:
        return False


def wait_gone(pid: int, timeout: float = 10.0) -> None:
    wait_for(lambda: not pid_alive(pid), timeout, what=f"process {pid} to end")
