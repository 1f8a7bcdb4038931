"""Probe rounds against a real black hole (tests/netns.py: a network namespace that drops SYNs).

A black-holed address makes a connect hang for the whole timeout, the case where probing one
backend after another is slowest. Needs root for `ip netns`; without it these tests fail and say so.
"""
import asyncio
import time

from netns import Blackhole
from support import free_port

from synapticllamas.config import load_settings
from synapticllamas.events.observer import Observer
from synapticllamas.rpc.registry import RpcRegistry

TIMEOUT = 1.0


def make_settings(tmp_path, backends, **values):
    (tmp_path / "config.toml").touch()
    settings = load_settings(flags={"backends_file": str(tmp_path / "rpc_backends.conf"),
                                    "rpc_backends": backends},
                             env={"SYNAPTICLLAMAS_CONFIG": str(tmp_path / "config.toml")})
    return settings.replace(rpc_backend_heartbeat=False, **values)


async def _listeners(n):
    servers = []
    for _ in range(n):
        servers.append(await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0))
    return servers, [f"127.0.0.1:{s.sockets[0].getsockname()[1]}" for s in servers]


def test_round_of_50_with_10_unreachable_takes_about_one_timeout(tmp_path):
    with Blackhole() as hole:
        black = [f"{hole.address(i)}:50052" for i in range(10, 15)]
        # the black hole really drops: a lone connect hangs for the whole timeout
        async def lone():
            started = time.perf_counter()
            registry = RpcRegistry(make_settings(tmp_path, black[:1], probe_timeout=TIMEOUT), Observer())
            await registry.start()
            await registry.check()
            return time.perf_counter() - started, registry.backends()[0].reason

        took, reason = asyncio.run(lone())
        assert took >= 0.9 * TIMEOUT and reason == f"no answer within {TIMEOUT:g}s", (took, reason)

        async def round_of_50():
            servers, alive = await _listeners(40)
            refused = [f"127.0.0.1:{free_port()}" for _ in range(5)]
            observer = Observer()
            registry = RpcRegistry(make_settings(tmp_path, alive + refused + black, probe_timeout=TIMEOUT),
                                   observer)
            await registry.start()
            started = time.perf_counter()
            await registry.check()
            took = time.perf_counter() - started
            for s in servers:
                s.close()
            return took, registry, observer

        took, registry, observer = asyncio.run(round_of_50())
    assert registry.status() == {"configured": 50, "up": 40, "down": 10, "unknown": 0}
    assert registry.healthy() == registry.addresses()[:40]
    # one after another this round would take 5 timeouts (the refused ones are instant)
    # (with room for a busy machine; bench/backends.py measures it: 1.01x one timeout)
    assert took < 3 * TIMEOUT, f"a round of 50 with 10 unreachable took {took:.2f}s"
    reasons = {e.details["address"]: e.details["reason"] for e in observer.recent(component="rpc_backend")
               if e.event_type == "disconnect"}
    assert len(reasons) == 10
    assert {reasons[a] for a in black} == {f"no answer within {TIMEOUT:g}s"}


def test_hysteresis_against_a_backend_that_goes_silent(tmp_path):
    """up -> one silent probe (still up) -> second silent probe (down) -> answers again (up)."""
    port = free_port()
    with Blackhole() as hole:
        hole.listen(port)
        ip = hole.address(20)
        hole.restore(ip)
        address = f"{ip}:{port}"
        observer = Observer()
        states = []

        async def run():
            registry = RpcRegistry(make_settings(tmp_path, [address], probe_timeout=0.5, probe_failures=2),
                                   observer)
            await registry.start()

            async def probe(step):
                await registry.check()
                states.append((step, registry.backends()[0].state))

            await probe("answer")
            hole.drop(ip)
            await probe("silent")
            await probe("silent")
            hole.restore(ip)
            await probe("answer")

        asyncio.run(run())
    assert states == [("answer", "up"), ("silent", "up"), ("silent", "down"), ("answer", "up")]
    moves = [(e.event_type, e.details["from_state"], e.details["failures"])
             for e in observer.recent(component="rpc_backend")]
    assert moves == [("connect", "unknown", 0), ("disconnect", "up", 2), ("connect", "down", 0)]
