"""Health checks while a real llama-server holds the backends must not flap them.

rpc-server serves one client at a time with a listen backlog of 1: while llama-server is connected,
a probe's connect waits in the backlog and the next probes time out. The registry therefore leaves
the backends the coordinator holds alone (it learns them from the coordinator's events).
Real llama-server, real ggml-rpc-servers, the real demo model.
"""
import asyncio

import pytest
from procs import processes
from support import free_port, until

from synapticllamas.app import App
from synapticllamas.config import load_settings
from synapticllamas.llama import binaries


def heartbeats(app):
    return [e for e in app.observer.recent(component="rpc_registry") if e.event_type == "heartbeat"]


def test_heartbeat_leaves_the_coordinators_backends_alone(tmp_path):
    try:
        binaries.llama_server(), binaries.rpc_server(), binaries.demo_model()
    except binaries.NotFound as exc:      # missing parts fail the test, they do not skip it
        pytest.fail(f"this test needs llama.cpp and the demo model: {exc}")
    (tmp_path / "config.toml").touch()
    settings = load_settings(flags={"backends_file": str(tmp_path / "rpc_backends.conf"), "distributed": True,
                                    "coordinator_port": str(free_port())},
                             env={"SYNAPTICLLAMAS_CONFIG": str(tmp_path / "config.toml")})
    # placement by memory: every backend held (the speed-aware default would serve on this host)
    settings = settings.replace(rpc_backend_heartbeat_interval=0.3, probe_timeout=0.3, probe_failures=2,
                                placement="memory")

    async def run():
        app = App(settings)
        await app.start()
        try:
            keys = await app.local_backends.spawn(2)
            await app.coordinator.start()
            assert all(app.registry.held(k) for k in keys)
            before = len(heartbeats(app))
            # ten heartbeat rounds with llama-server connected: with probes, 2 failures would flap them
            await until(lambda: len(heartbeats(app)) >= before + 10, 30, what="ten registry heartbeats")
            last = heartbeats(app)[-1].details
            await app.coordinator.stop()
            assert not any(app.registry.held(k) for k in keys)
            await app.registry.check()         # let go: probed again, and they answer
            return app, keys, last
        finally:
            await app.close()

    app, keys, last = asyncio.run(run())
    assert [e.event_type for e in app.observer.recent(component="rpc_backend")
            if e.event_type in ("connect", "disconnect")] == ["connect", "connect"]
    assert (last["total_configured"], last["total_active"]) == (2, 2)
    assert [(b["address"], b["state"], b["in_use"]) for b in last["backends"]] == [(k, "up", True) for k in keys]
    assert processes("llama-server") == {} or all(
        str(settings.coordinator_port) not in argv for argv in processes("llama-server").values())
