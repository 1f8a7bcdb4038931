"""What a node says about its machine and its device's speed (placement reads it, llama/devices.py).

At start, before rpc-server is started (nothing else runs on the device then), the node measures
its device with llama-bench from the same build as its rpc-server (llama/speed.py: a few seconds,
at most ~5 s at a fifth of a core), or takes the cached figure when nothing that changes it has
changed (the binary, the threads, the CPU quota, the host id). It announces it in its registration
(`speed`) with its host (`host`: id, name, CPU share, memory), so shells count its machine once.
While it runs, each heartbeat looks whether any of that changed (a cgroup quota changed, the binary
was replaced) and measures again, but only while no client is connected to rpc-server: the
benchmark would slow a coordinator's tokens down, and rpc-server says when a client comes and goes.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from synapticllamas.llama.speed import DeviceSpeed
    from synapticllamas.util.host import HostInfo


def bench_binary(rpc_server: str) -> Path | None:
    """llama-bench beside the rpc-server binary (the same build), else on PATH."""
    import shutil

    beside = Path(rpc_server).parent / "llama-bench"
    if beside.is_file():
        return beside
    found = shutil.which("llama-bench")
    return Path(found) if found else None


class NodeSpeed:
    def __init__(self, rpc_server: str, threads: int, devices: str | None, host_id: str | None) -> None:
        self.rpc_server = rpc_server
        self.threads = threads
        self.devices = devices
        self.host_id = host_id
        self.host: HostInfo | None = None
        self.speed: DeviceSpeed | None = None
        self.note: str | None = None
        self._key: str | None = None

    def _current_key(self) -> tuple[str | None, HostInfo]:
        from synapticllamas.llama import speed
        from synapticllamas.util.host import this_host

        host = this_host(self.host_id)
        bench = bench_binary(self.rpc_server)
        if bench is None:
            return None, host
        return speed.cache_key(bench, self.threads, False, host.cpus, host.id, speed.DEFAULT_TYPES,
                               self.devices), host

    def changed(self) -> bool:
        """Did something that changes the speed change since it was measured? (Cheap: a stat and
        a few cgroup files.)"""
        key, _ = self._current_key()
        return key is not None and key != self._key

    async def measure(self) -> tuple[float, bool]:
        """Measure (or take from the cache); (seconds it took, measured now?). Never raises: a
        benchmark that cannot run leaves the speed unknown and says why in `note`."""
        from synapticllamas.llama import speed
        from synapticllamas.llama.devices import cache_file

        started = time.monotonic()
        key, self.host = self._current_key()
        bench = bench_binary(self.rpc_server)
        if key is None or bench is None:
            self.speed, self.note = None, "no llama-bench beside rpc-server: speed not measured"
            return 0.0, False
        try:
            self.speed, fresh = await speed.speed_of(bench, cache_file(), self.threads, False, self.host.cpus,
                                                     self.host.id, devices=self.devices)
            self.note = None
        except speed.SpeedError as exc:
            self.speed, fresh, self.note = None, False, f"speed not measured: {exc}"
        self._key = key
        return time.monotonic() - started, fresh

    def summary(self) -> dict[str, Any]:
        """The registration's `host`, `speed` and `speed_note`."""
        return {"host": self.host.summary() if self.host else None,
                "speed": self.speed.summary() if self.speed else None, "speed_note": self.note}
