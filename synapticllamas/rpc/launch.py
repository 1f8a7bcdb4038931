"""How a ggml-rpc-server is launched, for local backends and nodes alike: argv, cache, threads.

rpc-server's own defaults are poor for our use: half the cores (`hardware_concurrency / 2`), and no
cache, so every coordinator restart sends every weight over the network again. With `-c` it keeps
tensors above a size threshold in files under `$LLAMA_CACHE/rpc`, named by content hash, so a
restart (or another coordinator loading the same model) only sends the hashes of those tensors.

Threads, the rule: every process that computes layers on a host's CPU (each rpc-server, and
llama-server when it holds layers) gets one thread per core of the host's CPU share
(util/host.threads_for: affinity, capped by a cgroup quota, rounded up). Not a share of them: the
devices of a layer split work one after another on each token, never at once, so each one running
uses the whole CPU while the others wait.

And while they wait they must not spin. ggml's CPU backend (built with OpenMP) waits at the end of
each graph in GOMP's spin loop, 300000 turns by default: on a host whose stages take turns, an idle
rpc-server's threads spun through the next stage's time slice (measured on 2 cores, demo model:
two local rpc-servers 54 tokens/s, 79 with GOMP_SPINCOUNT=3000, llama-server alone 92; spinning
less than that made the barriers inside a graph sleep: 28 tokens/s with OMP_WAIT_POLICY=passive).
So GOMP_SPINCOUNT=3000 for every rpc-server (unless the environment sets it), and for llama-server
when another process on its host holds layers (llama/devices.py).
"""
from __future__ import annotations

import os
from pathlib import Path

SPIN_COUNT = "3000"


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


def host_threads() -> int:
    """The thread count of the rule above, for this process's host share."""
    from synapticllamas.util.host import cpu_share, threads_for

    return threads_for(cpu_share())


def environment(cache_dir: Path | None) -> dict[str, str]:
    """The child's environment: LLAMA_CACHE points at the cache (rpc-server adds `rpc/`); short
    spinning when idle (see above)."""
    env = dict(os.environ)
    if cache_dir is not None:
        env["LLAMA_CACHE"] = str(cache_dir)
    env.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)
    return env
