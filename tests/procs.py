"""Find running processes by scanning /proc (no psutil, no pgrep output parsing)."""
from __future__ import annotations

import os


def processes(name: str) -> dict[int, list[str]]:
    """pid -> argv of every live process whose program is called `name` (zombies excluded)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                argv = [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
            with open(f"/proc/{entry}/stat", "rb") as fh:
                state = fh.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if argv and os.path.basename(argv[0]) == name and state != b"Z":
            found[int(entry)] = argv
    return found


def rpc_servers_on(ports) -> dict[int, list[str]]:
    """Live ggml-rpc-server processes listening on any of `ports` (by their --port argument)."""
    wanted = {str(p) for p in ports}
    out = {}
    for pid, argv in processes("ggml-rpc-server").items():
        for flag in ("--port", "-p"):
            if flag in argv and argv.index(flag) + 1 < len(argv) and argv[argv.index(flag) + 1] in wanted:
                out[pid] = argv
    return out
