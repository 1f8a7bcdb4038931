"""What a coordinator launch will run (Plan), and the checks that can fail before anything starts.

Each check raises CoordinatorError with one line for the user: the model (exists, is a file, starts
with the GGUF magic), the port (free where llama-server will bind).
"""
from __future__ import annotations

import shlex
import socket
import subprocess
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from synapticllamas.util.text import shown

if TYPE_CHECKING:
    from synapticllamas.llama.placement import Placement

GGUF_MAGIC = b"GGUF"


class CoordinatorError(Exception):
    """A coordinator action failed; the message is one line for the user."""


class NoFit(CoordinatorError):
    """The model does not fit on the backends there are (placement.py says why), or none is up:
    an automatic start then waits for a backend rather than giving up."""


class NoBackend(NoFit):
    """Distributed mode, and no RPC backend is healthy."""


@dataclass(frozen=True)
class Target:
    """What the user asked `coordinator start` for; restarts keep it."""
    model: Path | None = None
    port: int | None = None
    force: bool = False
    spread: bool = False          # every healthy backend holds layers (`coordinator start --spread`)


@dataclass
class Plan:
    """What one launch will run; built by the pre-flight checks."""
    binary: Path
    model: Path
    host: str
    port: int
    backends: list[str]
    left_out: dict[str, str] = field(default_factory=dict)   # backend -> why it is not used
    placement: Placement | None = None
    fit_flag: bool = False                                     # this llama-server knows --fit
    # backend -> the address llama-server dials for it (a secured link's local end); absent: itself
    dial: dict[str, str] = field(default_factory=dict)
    # the speed-aware choice (llama/chooser.py): why this plan, what it predicts, what it leaves idle
    choice: Any = None
    idle: list[str] = field(default_factory=list)             # healthy backends the plan does not need
    threads: int | None = None                                 # llama-server's -t (rpc/launch.py's rule)
    no_repack: bool = False                                    # weight repacking crashed llama.cpp here
    env: dict[str, str] = field(default_factory=dict)          # added to llama-server's environment

    def dialled(self, backend: str) -> str:
        return self.dial.get(backend, backend)

    def backend_of(self, address: str) -> str:
        """The backend behind an address llama-server names in its log (a dialled one, or itself)."""
        for backend, dialled in self.dial.items():
            if dialled == address:
                return backend
        return address

    def argv(self, ctx_size: int, extra: str, parallel: int = 4) -> list[str]:
        ngl = str(self.placement.ngl) if self.placement else "99"
        # -np slots over one KV cache (-kvu): the gateway sends at most that many requests at once
        argv = [str(self.binary), "--model", str(self.model), "--host", self.host, "--port", str(self.port),
                "-ngl", ngl, "-c", str(ctx_size), "-np", str(parallel), "-kvu", "-lv", "4", "--no-webui"]
        if self.backends:
            argv += ["--rpc", ",".join(self.dialled(b) for b in self.backends)]
        if self.placement is not None and len(self.backends) > 1:
            argv += ["--tensor-split", self.placement.tensor_split()]
        if self.placement is not None and self.fit_flag:
            argv += ["--fit", "off"]     # the placement is ours: no second guess, and no probe connections
        if self.threads is not None:
            argv += ["-t", str(self.threads)]      # before the extra arguments: a user's -t wins
        if self.no_repack:
            argv.append("--no-repack")
        return argv + shlex.split(extra)


@lru_cache(maxsize=4)
def _help_text(binary: str, mtime_ns: int) -> str:
    try:
        return subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def supports_flag(binary: Path, flag: str) -> bool:
    """Does this llama-server build know `flag`? (Its --help, read once per binary.)"""
    try:
        mtime = binary.stat().st_mtime_ns
    except OSError:
        return False
    text = _help_text(str(binary), mtime)
    return f"{flag} " in text or f"{flag}," in text


def check_model(path: Path) -> None:
    """Raise CoordinatorError unless `path` is a readable file that starts with the GGUF magic."""
    name = shown(str(path), 200)
    try:
        if not path.exists():
            raise CoordinatorError(f"model {name} does not exist; give a GGUF file with --model PATH")
        if not path.is_file():
            raise CoordinatorError(f"model {name} is not a file; give a GGUF file with --model PATH")
        with path.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:       # a name too long, a directory we may not search, ...
        raise CoordinatorError(f"model {name} cannot be read ({exc.strerror})") from None
    if magic != GGUF_MAGIC:
        raise CoordinatorError(f"model {name} is not a GGUF file (it starts with {magic!r}, a GGUF file with "
                               f"b'GGUF'); llama-server needs a .gguf model")


def free_port(host: str) -> int:
    """A port nothing listens on at `host` now (the kernel's choice)."""
    try:
        family = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror:
        family = socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, 0))
        except OSError as exc:
            raise CoordinatorError(f"cannot bind llama-server to {host} (SYNAPTICLLAMAS_COORDINATOR_HOST): "
                                   f"{exc.strerror}") from None
        return int(sock.getsockname()[1])


def port_in_use(host: str, port: int) -> bool:
    """Would llama-server fail to bind? (SO_REUSEADDR like llama-server, so TIME_WAIT is no conflict.)"""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False  # llama-server will report the bad host itself
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError:
            return True
    return False
