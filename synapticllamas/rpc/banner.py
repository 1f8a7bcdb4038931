"""What ggml-rpc-server says about itself when it starts, collected from its parsed output lines.

This build prints `Starting RPC server v7.0.0`, `endpoint : HOST:PORT`, `local cache : DIR` (or
n/a), `Devices:` and one `NAME: DESCRIPTION (TOTAL MiB, FREE MiB free)` line per device. The
banner changes between llama.cpp versions: whatever is missing stays None or empty, nothing fails.
We read the banner and never speak rpc-server's binary protocol (it changes too).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from synapticllamas.llama.log import LogLine


@dataclass
class RpcBanner:
    version: str | None = None
    endpoint: str | None = None
    cache_dir: str | None = None
    devices: list[dict[str, Any]] = field(default_factory=list)

    def feed(self, rec: LogLine) -> bool:
        """Take one parsed line; True when it was part of the banner."""
        d = rec.details
        if rec.kind == "rpc_server_started":
            self.version = d["version"]
        elif rec.kind == "rpc_endpoint":
            self.endpoint = d["endpoint"]
        elif rec.kind == "rpc_cache_dir":
            self.cache_dir = d["dir"]
        elif rec.kind == "rpc_device":
            self.devices.append({"name": d["name"], "description": d["description"],
                                 "total_mib": d["total_mib"], "free_mib": d["free_mib"]})
        else:
            return False
        return True

    @property
    def free_mib(self) -> int | None:
        """What the devices report free in total, or None when the banner listed none."""
        return sum(dev["free_mib"] for dev in self.devices) if self.devices else None

    @property
    def total_mib(self) -> int | None:
        return sum(dev["total_mib"] for dev in self.devices) if self.devices else None
