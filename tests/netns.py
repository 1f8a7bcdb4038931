"""A real black hole for probe tests: addresses whose TCP SYNs are silently dropped.

A network namespace is reached through a veth pair, and a /24 is routed into it. The namespace does
not forward, so a SYN to an address of that /24 that the namespace does not own is dropped without
an answer: the connect hangs until its timeout, as with a crashed host or a firewall that drops. An
address the namespace does own (`restore`) answers again. Needs root (ip netns); everything is
created here and removed on exit.
"""
from __future__ import annotations

import os
import subprocess
import sys


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if proc.returncode != 0:
        raise RuntimeError(f"'ip {' '.join(args)}' failed: {proc.stderr.strip()} "
                           "(the black-hole tests need root and 'ip netns')")


LISTENER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(64); print("ready", flush=True)
while True:
    c, _ = s.accept(); c.close()
"""


class Blackhole:
    def __init__(self) -> None:
        tag = os.getpid() % 100000
        self.ns = f"slbh{tag}"
        self.veth, self.peer = f"slbh{tag}a", f"slbh{tag}b"
        n = os.getpid() % 250 + 2
        self.link_root, self.link_ns = f"10.253.{n}.1", f"10.253.{n}.2"
        self.subnet = f"10.254.{n}"
        self.listeners: list[subprocess.Popen] = []
        self._created: list[str] = []

    def address(self, i: int) -> str:
        """An address of the black-holed /24 (1 <= i <= 254)."""
        return f"{self.subnet}.{i}"

    def __enter__(self) -> Blackhole:
        try:
            _ip("netns", "add", self.ns)
            self._created.append("netns")
            _ip("link", "add", self.veth, "type", "veth", "peer", "name", self.peer)
            self._created.append("link")
            _ip("link", "set", self.peer, "netns", self.ns)
            _ip("addr", "add", f"{self.link_root}/30", "dev", self.veth)
            _ip("link", "set", self.veth, "up")
            _ip("-n", self.ns, "addr", "add", f"{self.link_ns}/30", "dev", self.peer)
            _ip("-n", self.ns, "link", "set", self.peer, "up")
            _ip("-n", self.ns, "link", "set", "lo", "up")
            _ip("route", "add", f"{self.subnet}.0/24", "via", self.link_ns)
            self._created.append("route")
        except BaseException:
            self.__exit__()
            raise
        return self

    def listen(self, port: int) -> None:
        """A TCP listener inside the namespace on every address it owns (see restore())."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns, sys.executable, "-c", LISTENER, str(port)],
                                stdout=subprocess.PIPE, text=True)
        self.listeners.append(proc)
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the listener in the network namespace did not start")

    def restore(self, ip: str) -> None:
        """Make `ip` answer: the namespace owns it, so its SYNs reach the listener."""
        _ip("-n", self.ns, "addr", "add", f"{ip}/32", "dev", "lo")

    def drop(self, ip: str) -> None:
        """Make `ip` a black hole again."""
        _ip("-n", self.ns, "addr", "del", f"{ip}/32", "dev", "lo")

    def __exit__(self, *exc: object) -> None:
        for proc in self.listeners:
            proc.kill()
            proc.wait(5)
        cleanup = {"route": ("route", "del", f"{self.subnet}.0/24"),
                   "link": ("link", "del", self.veth), "netns": ("netns", "del", self.ns)}
        for what in reversed(self._created):
            subprocess.run(["ip", *cleanup[what]], capture_output=True, timeout=10)
        self._created.clear()
