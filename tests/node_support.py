"""Nodes on a simulated cluster, as the cluster tests use them: a Redis in the root namespace (bound
to the address every host reaches), a redis-cli subscriber, `python3 main.py node` on each host,
and piped shells pointed at that Redis. Everything it started is stopped on the way out.

secure=True is what the README tells a user: `python3 main.py cluster init` where the shells run
(their XDG_CONFIG_HOME is tmp/config), and that one file copied to each host's config directory;
the nodes then serve through encrypted links and sign what they announce. secure=False starts the
nodes with --insecure (rpc-server open on the host's address, nothing signed)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from llama_support import TAG_VAR
from support import PYTHON, ROOT, PipedShell, RedisCliSubscriber, RedisServer, free_port

HEARTBEAT = 1.0
NODE_PORT = 50052


class NodesOnHosts:
    def __init__(self, cluster: Any, tmp: Path, tag: str, secure: bool = False, hosts: list[int] | None = None,
                 node_env: dict[str, str] | None = None, one_by_one: bool = False) -> None:
        """`one_by_one`: each node up before the next starts. The simulated hosts share this machine's
        two cores, so a node measuring its speed (llama-bench, at its start) while the next node's
        Python starts up measures that start-up too, which real hosts never share: for the tests
        whose plan follows the measured speeds."""
        self.cluster, self.tmp, self.tag, self.secure = cluster, tmp, tag, secure
        self.one_by_one = one_by_one
        self.hosts = [cluster.hosts[i] for i in hosts] if hosts is not None else list(cluster.hosts)
        self.addresses = [f"{h.address}:{NODE_PORT}" for h in self.hosts]
        self.node_env = node_env or {}
        self.nodes: list[Any] = []
        self.shells: list[PipedShell] = []
        self.key_file = tmp / "config" / "synapticllamas" / "cluster.key"
        if secure and not self.key_file.exists():
            done = subprocess.run([PYTHON, str(ROOT / "main.py"), "cluster", "init"], capture_output=True, text=True,
                                  env={**os.environ, "XDG_CONFIG_HOME": str(tmp / "config")}, cwd=ROOT, timeout=30)
            assert done.returncode == 0, done.stderr

    def __enter__(self) -> NodesOnHosts:
        self.redis = RedisServer(self.tmp / "redis", bind=self.cluster.root_address).start()
        self.sub = RedisCliSubscriber(self.redis.port, host=self.cluster.root_address)
        try:
            for host, address in zip(self.hosts, self.addresses, strict=True):
                self.nodes.append(self.start_node(host))        # fresh caches
                if self.one_by_one:
                    self.sub.wait_for_event("node", "node_up", address=address, timeout=60)
        except BaseException:
            self.__exit__()
            raise
        return self

    def copy_key(self, host: Any, key_file: Path | None = None) -> None:
        """The one file a user copies to each machine (or another cluster's key, for a test)."""
        target = self.tmp / host.name / "config" / "synapticllamas" / "cluster.key"
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        shutil.copyfile(key_file or self.key_file, target)
        target.chmod(0o600)

    def start_node(self, host: Any, *extra: str) -> Any:
        """`python3 main.py node` inside a simulated host, as a user on that machine runs it."""
        home = self.tmp / host.name
        home.mkdir(exist_ok=True)
        if self.secure:
            if not (home / "config" / "synapticllamas" / "cluster.key").exists():
                self.copy_key(host)
        elif "--insecure" not in extra:
            extra = (*extra, "--insecure")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SOLLOL_", "SYNAPTICLLAMAS_"))}
        env.update({TAG_VAR: self.tag, "XDG_CACHE_HOME": str(home / "cache"), "XDG_CONFIG_HOME": str(home / "config"),
                    "SOLLOL_RPC_BACKEND_HEARTBEAT_INTERVAL": str(HEARTBEAT), "PYTHONUNBUFFERED": "1", **self.node_env})
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
