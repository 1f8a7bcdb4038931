"""Helpers for the dashboard's tests: the real dashboard process, real shells that push to Redis,
and a contract-format publisher for events no shell command can produce on demand.
"""
from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from support import PYTHON, ROOT, PipedShell, cpu_seconds, free_port, shell_env, stop_process, wait_for

CHANNEL = "synapticllamas:llama_cpp:"
JOURNAL = "synapticllamas:events"
APPS = "synapticllamas:apps"


class Dashboard:
    """`python3 main.py dashboard-server` on a free loopback port, as a user starts it."""

    def __init__(self, tmp: Path, redis_url: str, *args: str, token: str | None = None,
                 host: str = "127.0.0.1", env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.token = token
        self.host = host
        cmd = [PYTHON, str(ROOT / "main.py"), "dashboard-server", "--host", host, "--port", str(self.port),
               "--redis-url", redis_url, *args]
        if token:
            cmd += ["--token", token]
        self.log_path = tmp / f"dashboard-{self.port}.log"
        with open(self.log_path, "wb") as log:      # the child has its own copy of the fd
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                         env=shell_env(tmp, **(env or {})))
        wait_for(self._up, 20, what=f"the dashboard on port {self.port} (log: {self.log_path})")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def page_url(self) -> str:
        return self.url + "/" + (f"?token={self.token}" if self.token else "")

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"the dashboard exited with {self.proc.returncode}: {self.log_path.read_text()}")
        try:
            self.get("/healthz")
            return True
        except (OSError, urllib.error.URLError):
            return False

    def get(self, path: str, headers: dict[str, str] | None = None, auth: bool = True) -> tuple[int, Any]:
        hdrs = dict(headers or {})
        if auth and self.token:
            hdrs.setdefault("Authorization", f"Bearer {self.token}")
        request = urllib.request.Request(self.url + path, headers=hdrs)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                body = response.read().decode()
                status = response.status
                kind = response.headers.get("content-type", "")
        except urllib.error.HTTPError as exc:
            body, status, kind = exc.read().decode(), exc.code, exc.headers.get("content-type", "")
        return status, json.loads(body) if kind.startswith("application/json") else body

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        stop_process(self.proc)


class Shell(PipedShell):
    """A real shell process publishing to Redis (`main.py --redis`), fed commands on stdin, with its
    own XDG directories under tmp/name."""

    timeout = 30.0

    def __init__(self, tmp: Path, redis_url: str, name: str, **env: str) -> None:
        home = tmp / name
        home.mkdir(parents=True, exist_ok=True)
        super().__init__(home, "--redis", "--redis-url", redis_url, **env)


def healthz_answers(port: int) -> bool:
    """Whether a dashboard without a token answers /healthz with 200 on this loopback port."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def instance_of(client: Any, pid: int, timeout: float = 20) -> str:
    """The instance id ("host:pid:random") under which the shell with this pid registered."""
    def find():
        for instance, text in client.hgetall(APPS).items():
            try:
                reg = json.loads(text)
            except ValueError:   # anyone can write to the hash: skip what is not a registration
                continue
            if isinstance(reg, dict) and reg.get("pid") == pid:
                return instance
        return None

    return wait_for(find, timeout, what=f"shell pid {pid} in {APPS}")


class ContractPublisher:
    """Pushes events in the contract's format with the publisher's command sequence (journal entry,
    then one PUBLISH, in one MULTI/EXEC) for tests that need an event no shell command makes on
    demand: a given raw llama.cpp line, a gap in seq, a heartbeat interval."""

    def __init__(self, client: Any, instance: str = "test-host:1", app: str = "synapticllamas") -> None:
        self.client = client
        self.source = {"app": app, "instance": instance, "host": instance.split(":")[0]}
        self.seq = 0
        self.sampled = 0     # the running count of events "sampled out" before each one

    def event(self, component: str, event_type: str, message: str, details: dict | None = None,
              level: str = "info", seq: int | None = None, sampled: int | None = None,
              timestamp: float | None = None) -> dict:
        self.seq = self.seq + 1 if seq is None else seq
        self.sampled = self.sampled if sampled is None else sampled
        return {"timestamp": time.time() if timestamp is None else timestamp, "component": component,
                "event_type": event_type, "message": message, "details": details or {}, "level": level,
                "source": self.source, "seq": self.seq, "sampled": self.sampled}

    def push(self, *events: dict) -> None:
        pipe = self.client.pipeline(transaction=True)
        for ev in events:
            text = json.dumps(ev, separators=(",", ":"))
            pipe.xadd(JOURNAL, {"event": text}, maxlen=10000, approximate=True)
            pipe.publish(CHANNEL + ev["component"], text)
        pipe.execute()

    def emit(self, *args: Any, **kwargs: Any) -> dict:
        ev = self.event(*args, **kwargs)
        self.push(ev)
        return ev

    def register(self, **registration: Any) -> dict:
        reg = {"app": self.source["app"], "instance": self.source["instance"], "host": self.source["host"],
               "pid": 1, "version": "test", "mode": "standard", "started_at": time.time(),
               "heartbeat_interval": 30.0, "backend_heartbeat": True, "backend_heartbeat_interval": 30.0,
               **registration}
        self.client.hset(APPS, self.source["instance"], json.dumps(reg))
        return self.emit("system", "register", "test app started", reg)


def command_counts(client: Any) -> dict[str, int]:
    """INFO commandstats as {command: calls}."""
    return {name.removeprefix("cmdstat_"): stats["calls"] for name, stats in client.info("commandstats").items()}


class Node:
    """`python3 main.py node --host 127.0.0.1 --port P --redis-url URL`: a real node (its own
    ggml-rpc-server) announcing itself to this Redis, with its cache under tmp/name."""

    def __init__(self, tmp: Path, redis_url: str, name: str, tag: str, **extra_env: str) -> None:
        from llama_support import TAG_VAR

        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        home = tmp / name
        home.mkdir(parents=True, exist_ok=True)
        self.log_path = home / "node.log"
        env = shell_env(home, XDG_CACHE_HOME=str(home / "cache"), **{TAG_VAR: tag}, **extra_env)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([PYTHON, str(ROOT / "main.py"), "node", "--host", "127.0.0.1", "--port",
                                          str(self.port), "--redis-url", redis_url],
                                         stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)

    def registered(self, client: Any) -> dict | None:
        """Its entry in the nodes hash once it announced itself as up."""
        if self.proc.poll() is not None:
            raise AssertionError(f"the node exited with {self.proc.returncode}: {self.log_path.read_text()}")
        text = client.hget("synapticllamas:nodes", self.address)
        reg = json.loads(text) if text else None
        return reg if reg and reg.get("state") == "up" and reg.get("devices") else None

    def stop(self) -> int:
        return stop_process(self.proc, 15)
