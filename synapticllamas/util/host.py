"""Which machine this is, and what of it we may use: its identity, CPU share and memory.

Identity. Backends that share a machine share its memory and its CPUs, so placement counts each
machine once. A machine is a running kernel: the id is a hash of the kernel's boot id
(/proc/sys/kernel/random/boot_id), which every process and every container on that kernel reads
the same, and which differs between machines and virtual machines. /etc/machine-id is not used: it
names an installation, and two containers on one kernel (one machine's memory) may carry two.

Simulated hosts (tests/cluster.py's network namespaces) share one kernel, so by this rule they are
one machine, which is the truth about their memory. A test or bench that wants them counted apart
says so with SYNAPTICLLAMAS_HOST_ID (`node --host-id NAME`): the one way an id is chosen by hand, so
a real machine is never split in two unless someone asks for it.

CPU share: the CPUs this process may run on (its affinity), capped by its cgroup's CPU quota
(v1 cpu.cfs_quota_us / cpu.cfs_period_us, v2 cpu.max): a container limited to half a core has 0.5.
Memory: MemAvailable of /proc/meminfo, capped by the cgroup's memory limit less its usage.
"""
from __future__ import annotations

import hashlib
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
MIB = 2**20
_UNLIMITED = 1 << 60


@dataclass(frozen=True)
class HostInfo:
    id: str                 # "boot-<16 hex>" or the name given by SYNAPTICLLAMAS_HOST_ID
    id_source: str          # "boot id", "SYNAPTICLLAMAS_HOST_ID", "hostname"
    name: str               # its hostname, for people
    cpus: float             # the CPU share (cores) this process may use
    mem_total_mib: int | None
    mem_available_mib: int | None

    def summary(self) -> dict[str, Any]:
        return {"id": self.id, "id_source": self.id_source, "name": self.name, "cpus": round(self.cpus, 3),
                "mem_total_mib": self.mem_total_mib, "mem_available_mib": self.mem_available_mib}


def host_id(override: str | None = None) -> tuple[str, str]:
    """(id, where it came from)."""
    if override:
        return override, "SYNAPTICLLAMAS_HOST_ID"
    try:
        boot = BOOT_ID.read_text().strip()
    except OSError:
        boot = ""
    if boot:
        return "boot-" + hashlib.sha256(boot.encode()).hexdigest()[:16], "boot id"
    return "name-" + socket.gethostname(), "hostname"


def _own_cgroups() -> dict[str, str]:
    """controller -> path of this process's cgroup ('' for the v2 unified hierarchy)."""
    out: dict[str, str] = {}
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(",") if parts[1] else [""]:
                out[controller] = parts[2]
    return out


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _quota(root: Path = Path("/sys/fs/cgroup")) -> tuple[float, Path, str] | None:
    """(cores allowed, the cgroup directory that sets the quota, "v1" or "v2"), or None (unlimited)."""
    groups = _own_cgroups()
    if "cpu" in groups:
        base = root / "cpu" / groups["cpu"].lstrip("/")
        # the quota of any ancestor applies too: the smallest wins
        best: tuple[float, Path, str] | None = None
        for directory in (base, *base.parents):
            if not str(directory).startswith(str(root / "cpu")):
                break
            quota, period = _read_int(directory / "cpu.cfs_quota_us"), _read_int(directory / "cpu.cfs_period_us")
            if quota is not None and period and quota > 0 and (best is None or quota / period < best[0]):
                best = (quota / period, directory, "v1")
        return best
    if "" in groups:
        directory = root / groups[""].lstrip("/")
        try:
            limit, every = (directory / "cpu.max").read_text().split()
            return (int(limit) / int(every), directory, "v2") if limit != "max" else None
        except (OSError, ValueError):
            return None
    return None


def cpu_quota() -> float | None:
    """Cores allowed by the cgroup CPU quota, or None when unlimited (or unknown)."""
    found = _quota()
    return found[0] if found else None


def quota_window_ns() -> int | None:
    """The CPU time the quota allows per period (cfs_quota_us; v2: cpu.max's first number), in ns."""
    found = _quota()
    if found is None:
        return None
    _, directory, version = found
    try:
        if version == "v1":
            return int((directory / "cpu.cfs_quota_us").read_text()) * 1000
        return int((directory / "cpu.max").read_text().split()[0]) * 1000
    except (OSError, ValueError, IndexError):
        return None


def throttled_ns() -> int | None:
    """How long the cgroup that sets our CPU quota has been held back by it, in total (cpu.stat)."""
    found = _quota()
    if found is None:
        return None
    _, directory, version = found
    key, scale = ("throttled_time", 1) if version == "v1" else ("throttled_usec", 1000)
    try:
        for line in (directory / "cpu.stat").read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value) * scale
    except (OSError, ValueError):
        return None
    return None


def cpu_share() -> float:
    try:
        cpus = float(len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        cpus = float(os.cpu_count() or 1)
    quota = cpu_quota()
    return min(cpus, quota) if quota else cpus


def threads_for(cpus: float) -> int:
    """Threads for a process that has `cpus` cores to itself: one per core it may use, rounded up
    (0.2 of a core is still one thread; 1.5 cores are two)."""
    return max(1, math.ceil(cpus - 1e-6))


def memory_mib() -> tuple[int | None, int | None]:
    """(total, available) MiB: /proc/meminfo, capped by the cgroup's memory limit."""
    total = available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key == "MemTotal":
                total = int(value.split()[0]) // 1024
            elif key == "MemAvailable":
                available = int(value.split()[0]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    groups = _own_cgroups()
    limit = usage = None
    if "memory" in groups:
        base = Path("/sys/fs/cgroup/memory") / groups["memory"].lstrip("/")
        limit, usage = _read_int(base / "memory.limit_in_bytes"), _read_int(base / "memory.usage_in_bytes")
    elif "" in groups:
        base = Path("/sys/fs/cgroup") / groups[""].lstrip("/")
        limit, usage = _read_int(base / "memory.max"), _read_int(base / "memory.current")
    if limit is not None and limit < _UNLIMITED:
        cap = limit // MIB
        total = min(total, cap) if total is not None else cap
        if usage is not None:
            free = max(0, (limit - usage) // MIB)
            available = min(available, free) if available is not None else free
    return total, available


def this_host(override: str | None = None) -> HostInfo:
    ident, source = host_id(override)
    total, available = memory_mib()
    return HostInfo(ident, source, socket.gethostname(), cpu_share(), total, available)
