"""How a ggml-rpc-server is launched, for local backends and nodes alike: argv, cache, threads.

rpc-server's own defaults are poor for our use: one thread (`-t 1`), and no cache, so every
coordinator restart sends every weight over the network again. With `-c` it keeps tensors above a
size threshold in files under `$LLAMA_CACHE/rpc`, named by content hash, so a restart (or another
coordinator loading the same model) only sends the hashes of those tensors.
"""
from __future__ import annotations

import os
from pathlib import Path


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "synapticllamas" / "rpc-cache"


def argv(binary: str, host: str, port: int, threads: int, devices: str | None = None,
         cache: bool = True) -> list[str]:
    out = [binary, "--host", host, "--port", str(port), "--threads", str(threads)]
    if devices:
        out += ["--device", devices]
    if cache:
        out.append("--cache")
    return out


def environment(cache_dir: Path | None) -> dict[str, str]:
    """The child's environment: LLAMA_CACHE points at the cache (rpc-server adds `rpc/`)."""
    env = dict(os.environ)
    if cache_dir is not None:
        env["LLAMA_CACHE"] = str(cache_dir)
    return env
