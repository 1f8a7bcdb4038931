"""Nodes on a simulated cluster, as the cluster tests use them: a Redis in the root namespace (bound
to the address every host reaches), a redis-cli subscriber, `python3 main.py node` on each host,
and piped shells pointed at that Redis. Everything it started is stopped on the way out."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from llama_support import TAG_VAR
from support import PYTHON, ROOT, PipedShell, RedisCliSubscriber, RedisServer, free_port

HEARTBEAT = 1.0
NODE_PORT = 50052


class NodesOnHosts:
    def __init__(self, cluster: Any, tmp: Path, tag: str) -> None:
        self.cluster, self.tmp, self.tag = cluster, tmp, tag
        self.addresses = [f"{h.address}:{NODE_PORT}" for h in cluster.hosts]
        self.nodes: list[Any] = []
        self.shells: list[PipedShell] = []

    def __enter__(self) -> NodesOnHosts:
        self.redis = RedisServer(self.tmp / "redis", bind=self.cluster.root_address).start()
        self.sub = RedisCliSubscriber(self.redis.port, host=self.cluster.root_address)
        try:
            self.nodes = [self.start_node(h) for h in self.cluster.hosts]     # fresh caches
        except BaseException:
            self.__exit__()
            raise
        return self

    def start_node(self, host: Any, *extra: str) -> Any:
        """`python3 main.py node` inside a simulated host, as a user on that machine runs it."""
        home = self.tmp / host.name
        home.mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SOLLOL_", "SYNAPTICLLAMAS_"))}
        env.update({TAG_VAR: self.tag, "XDG_CACHE_HOME": str(home / "cache"), "XDG_CONFIG_HOME": str(home / "config"),
                    "SOLLOL_RPC_BACKEND_HEARTBEAT_INTERVAL": str(HEARTBEAT), "PYTHONUNBUFFERED": "1"})
        with open(home / "node.log", "w") as log:          # the child has its own copy of the fd
            return host.popen([PYTHON, str(ROOT / "main.py"), "node", "--port", str(NODE_PORT), "--redis-url",
                               self.redis.url, "--threads", "1", *extra], env=env, stdout=log, stderr=log,
                              cwd=str(ROOT))

    def node_log(self, host: Any) -> str:
        return (self.tmp / host.name / "node.log").read_text()

    def wait_all_up(self) -> None:
        for address in self.addresses:
            self.sub.wait_for_event("node", "node_up", address=address, timeout=30)

    def shell(self, *args: str, **env: str) -> PipedShell:
        """A piped shell on this Redis, heartbeats every HEARTBEAT, a quick stop timeout; `env` on top."""
        shell = PipedShell(self.tmp, *args, **{
            TAG_VAR: self.tag, "SOLLOL_REDIS_URL": self.redis.url,
            "SOLLOL_RPC_BACKEND_HEARTBEAT_INTERVAL": str(HEARTBEAT),
            "SYNAPTICLLAMAS_COORDINATOR_PORT": str(free_port()), "SYNAPTICLLAMAS_COORDINATOR_ARGS": "-t 1",
            "SYNAPTICLLAMAS_COORDINATOR_STOP_TIMEOUT": "2", **env})
        self.shells.append(shell)
        return shell

    def __exit__(self, *exc: object) -> None:
        for shell in self.shells:
            shell.kill()
        for proc in self.nodes:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(20)
        self.sub.close()
        self.redis.kill()
