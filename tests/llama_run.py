"""Run the real ggml-rpc-server and llama-server from a test and wait for what they say.

rpc-server's stdout is block-buffered into a pipe, so it runs under `stdbuf -oL -eL`; its lines are
read by a thread (Output) that tests wait on: the banner, `Accepted client connection`,
`[set_tensor] saved to '<file>'` (a tensor written to its cache). llama-server writes a lot: its
output goes to a file, read back when it fails.
"""
from __future__ import annotations

import re
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from support import free_port, stop_process, wait_for

DEVICE = re.compile(r"^\s+(?P<name>[^:]+): (?P<desc>.*) \((?P<total>\d+) MiB, (?P<free>\d+) MiB free\)\s*$")


class Output:
    """Every line a process writes to its stdout (stderr merged), collected by a daemon thread."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_line(self, predicate: Callable[[str], bool], timeout: float, what: str) -> str:
        """The first line that satisfies `predicate`; fails if the process ends first or after `timeout`."""
        def found() -> str | bool:
            match = next((line for line in list(self.lines) if predicate(line)), None)
            if match is None and self.proc.poll() is not None and not self._thread.is_alive():
                raise AssertionError(f"the process ended ({self.proc.returncode}) before {what}: {self.text()}")
            return match or False
        return wait_for(found, timeout, what=what)

    def text(self) -> str:
        return "\n".join(self.lines[-40:])


def parse_banner(lines: Sequence[str]) -> dict:
    """rpc-server's start banner: version, endpoint, cache dir, devices (name, total and free MiB)."""
    banner: dict = {"devices": []}
    for line in lines:
        if m := re.match(r"Starting RPC server v(\S+)", line):
            banner["version"] = m[1]
        elif m := re.match(r"\s+endpoint\s*:\s*(\S+)", line):
            banner["endpoint"] = m[1]
        elif m := re.match(r"\s+local cache\s*:\s*(\S+)", line):
            banner["cache"] = m[1]
        elif m := DEVICE.match(line):
            banner["devices"].append({"name": m["name"].strip(), "total_mib": int(m["total"]),
                                      "free_mib": int(m["free"])})
    return banner


def start_rpc_server(popen: Callable[..., subprocess.Popen], binary: Path, host: str, port: int,
                     env: dict[str, str] | None = None, cache: bool = False,
                     ) -> tuple[subprocess.Popen, Output, dict]:
    """Start rpc-server through `popen` (subprocess.Popen, or Host.popen for a simulated host) and wait
    for its banner to list a device. The caller stops the process (a Host's cluster does)."""
    argv = ["stdbuf", "-oL", "-eL", str(binary), "-H", host, "-p", str(port), *(["-c"] if cache else [])]
    proc = popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = Output(proc)
    out.wait_line(lambda line: DEVICE.match(line) is not None, 20, what="rpc-server's banner to list a device")
    return proc, out, parse_banner(out.lines)


def health(port: int) -> bool:
    """Whether llama-server on loopback `port` answers /health with 200 (it says 503 while loading)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


class LlamaServer:
    """The real llama-server on a free loopback port, its output in `log`; a context manager."""

    def __init__(self, binary: Path, model: Path, log: Path, rpc: Sequence[str] = (),
                 env: dict[str, str] | None = None, extra: Sequence[str] = ()) -> None:
        self.port = free_port()
        self.log = log
        argv = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(self.port),
                "-c", "256", "-t", "1", "-ngl", "99", "--no-webui", *extra]
        if rpc:
            argv += ["--rpc", ",".join(rpc)]
        with open(log, "w") as fh:
            self.proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env)

    def wait_healthy(self, timeout: float = 60) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"llama-server exited with {self.proc.returncode}:\n{self.output()}")
            return health(self.port)
        wait_for(ready, timeout, interval=0.1, what=f"llama-server's /health on port {self.port}")

    def output(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-40:])

    def stop(self) -> None:
        stop_process(self.proc)

    def __enter__(self) -> LlamaServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
