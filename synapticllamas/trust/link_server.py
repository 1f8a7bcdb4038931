"""LinkServer: a node's end of its encrypted RPC link, on the address the node announces.

rpc-server binds 127.0.0.1:P only; stunnel listens on HOST:PORT (what the node announces and the
shells dial) and forwards a connection to rpc-server only once its TLS handshake proved the cluster
key. A connection that fails the handshake is counted (`refused`, with the last peer), never
forwarded: rpc-server does not see it, so it cannot hold rpc-server's one client slot either.
"""
from __future__ import annotations

import asyncio

from synapticllamas.trust.stunnel import LinkError, Outcome, StunnelProcess

START_TIMEOUT = 10.0


class LinkServer:
    def __init__(self, psk: bytes, host: str, port: int, target_port: int) -> None:
        self._psk = psk
        self.host, self.port, self.target_port = host, port, target_port
        self.process: StunnelProcess | None = None
        self.accepted = 0          # connections that proved the key
        self.refused = 0           # connections that did not (a probe, a scanner, another cluster)
        self.last_refused: str | None = None

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    async def start(self) -> None:
        """Listen; LinkError (stunnel's own reason: the port is taken...) when it cannot."""
        self.process = await StunnelProcess.start(self._psk, f"{self.host}:{self.port}",
                                                  f"127.0.0.1:{self.target_port}", client=False,
                                                  on_outcome=self._seen)
        try:
            await self.process.wait_ready(START_TIMEOUT)
        except LinkError:
            await self.process.stop()
            raise

    @property
    def exited(self) -> asyncio.Task[int]:
        assert self.process is not None
        return self.process.exited

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.running

    def _seen(self, peer: str, outcome: Outcome) -> None:
        if outcome.ok:
            self.accepted += 1
        elif outcome.reason in ("key", "not-a-link", "closed"):
            self.refused += 1
            self.last_refused = peer

    async def stop(self, timeout: float = 3.0) -> None:
        if self.process is not None and self.process.running:
            await self.process.stop(timeout)
