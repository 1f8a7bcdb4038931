"""RpcRegistry without llama.cpp: addresses, the backends file, hysteresis, heartbeats.

Backends here are real TCP listeners on 127.0.0.1 (asyncio servers) and real closed ports; only
the hysteresis test scripts the probe's answers, because "a probe that times out once, then
answers" cannot be produced on demand with a real socket (tests/integration/test_probe_rounds.py
does it with a black-holed address in a network namespace, at the cost of root and seconds).
"""
import asyncio
import itertools
import os
import re
import time

import pytest
from support import free_port, until

from synapticllamas.config import load_settings
from synapticllamas.events.observer import Observer
from synapticllamas.rpc.probe import ProbeFailure, ProbeResult
from synapticllamas.rpc.registry import HEARTBEAT_MESSAGE, RpcRegistry


def make_settings(tmp_path, backends=(), **values):
    flags = {"backends_file": str(tmp_path / "rpc_backends.conf")}
    if backends:
        flags["rpc_backends"] = list(backends)
    settings = load_settings(flags=flags, env={"SYNAPTICLLAMAS_CONFIG": str(_empty_toml(tmp_path))})
    values.setdefault("rpc_backend_heartbeat", False)     # tests probe when they say so
    return settings.replace(**values)


def _empty_toml(tmp_path):
    path = tmp_path / "config.toml"
    path.touch()
    return path


def events(observer, component=None, event_type=None):
    return [e for e in observer.recent(component=component)
            if event_type is None or e.event_type == event_type]


class Listener:
    """A real TCP listener on 127.0.0.1 that counts the connections it accepts."""

    def __init__(self):
        self.accepted = 0
        self.server = None

    async def start(self, port=0):
        def accept(reader, writer):
            self.accepted += 1
            writer.close()

        self.server = await asyncio.start_server(accept, "127.0.0.1", port)
        self.address = f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def stop(self):
        self.server.close()
        await self.server.wait_closed()


# ---------------------------------------------------------------- addresses and the file

BAD = ["foo", "host:0", "host:99999", ":50052", "a b:1", "[::1", "10.0.0.1:http",
       "127.0.0.1:\u00b2", "127.0.0.1:\u0665", "127.0.0.1: 80", "127.0.0.1:+80"]   # no digits but ASCII ones


def test_bad_addresses_are_refused_with_one_line_and_nothing_is_lost(tmp_path):
    async def run():
        registry = RpcRegistry(make_settings(tmp_path, ["10.0.0.5:50052"]), Observer())
        await registry.start()
        await registry.add("10.0.0.6")
        before = (tmp_path / "rpc_backends.conf").read_text()
        for bad in BAD:
            with pytest.raises(ValueError, match=re.escape(repr(bad))) as err:
                await registry.add(bad)
            message = str(err.value)
            assert "\n" not in message and repr(bad) in message, message
        assert registry.addresses() == ["10.0.0.5:50052", "10.0.0.6:50052"]
        assert (tmp_path / "rpc_backends.conf").read_text() == before
        return registry

    registry = asyncio.run(run())
    assert registry.status() == {"configured": 2, "up": 0, "down": 0, "unknown": 2}


def test_a_long_or_escaped_address_is_quoted_escaped_and_cut(tmp_path):
    from synapticllamas.rpc.addresses import parse_address, parse_port

    for text in ("\x1b[31m" + "h" * 5000, "h:\x1b[0m" + "9" * 5000):
        with pytest.raises(ValueError, match=r"\\x1b") as err:
            parse_address(text)
        message = str(err.value)
        assert "\x1b" not in message and "\\x1b" in message and len(message) < 250, message
    with pytest.raises(ValueError, match=r"port '9{57}\.\.\.' is not valid; expected a number from 1 to 65535"):
        parse_port("9" * 5000)           # int() would refuse over 4300 digits with its own message


def test_unresolvable_name_says_so(tmp_path):
    async def run():
        registry = RpcRegistry(make_settings(tmp_path), Observer())
        with pytest.raises(ValueError, match=r"'foo'.*does not resolve"):
            await registry.add("foo")
        with pytest.raises(ValueError, match="has port '0'"):
            await registry.add("host:0")
        with pytest.raises(ValueError, match="has port '99999'"):
            await registry.add("host:99999")
        with pytest.raises(ValueError, match="no valid host"):
            await registry.add(":50052")

    asyncio.run(run())


def test_one_backend_under_two_spellings(tmp_path):
    async def run():
        registry = RpcRegistry(make_settings(tmp_path), Observer())
        assert await registry.add("localhost:50052") == "127.0.0.1:50052"
        with pytest.raises(ValueError, match="already configured"):
            await registry.add("127.0.0.1:50052")
        with pytest.raises(ValueError, match=r"already configured as 127\.0\.0\.1:50052"):
            await registry.add("localhost")
        assert await registry.add("[0:0:0:0:0:0:0:1]:50052") == "[::1]:50052"
        with pytest.raises(ValueError, match="already configured"):
            await registry.add("[::1]:50052")
        return registry

    assert asyncio.run(run()).addresses() == ["127.0.0.1:50052", "[::1]:50052"]


def test_file_with_bad_lines_loads_the_good_ones(tmp_path):
    path = tmp_path / "rpc_backends.conf"
    path.write_text("# lab\n10.0.0.1:50052\nfoo:0   # typo\n\n10.0.0.2  # default port\n"
                    "a b:1\nlocalhost:50060\n127.0.0.1:50060\n")
    observer = Observer()
    registry = RpcRegistry(make_settings(tmp_path), observer)
    asyncio.run(registry.start())
    assert registry.addresses() == ["10.0.0.1:50052", "10.0.0.2:50052", "127.0.0.1:50060"]
    errors = registry.file_errors
    assert len(errors) == 3
    assert errors[0].startswith(f"backends file {path} line 3: ") and "'foo:0'" in errors[0]
    assert "line 6: " in errors[1] and "'a b:1'" in errors[1]
    assert "line 8: 127.0.0.1:50060 repeats line 7" in errors[2]
    shown = [e.message for e in events(observer, "rpc_registry", "file_error")]
    assert shown == errors and all(e.level == "error" for e in events(observer, "rpc_registry"))


def test_add_and_remove_edit_the_file_atomically_and_keep_comments(tmp_path):
    path = tmp_path / "rpc_backends.conf"
    path.write_text("# my lab\n10.0.0.1:50052  # box one\nnot an address\n10.0.0.2:50052")
    os.chmod(path, 0o640)

    async def run():
        registry = RpcRegistry(make_settings(tmp_path, ["10.0.0.9:50052"]), Observer())
        await registry.start()
        await registry.add("10.0.0.3")
        assert path.read_text() == ("# my lab\n10.0.0.1:50052  # box one\nnot an address\n10.0.0.2:50052\n"
                                    "10.0.0.3:50052\n")
        await registry.remove("10.0.0.1:50052")
        assert path.read_text() == "# my lab\nnot an address\n10.0.0.2:50052\n10.0.0.3:50052\n"
        await registry.remove("10.0.0.9")      # from a flag: nothing to change in the file
        with pytest.raises(ValueError, match=r"10\.0\.0\.1:50052 is not configured; configured: 10\.0\.0\.2"):
            await registry.remove("10.0.0.1:50052")
        return registry

    registry = asyncio.run(run())
    assert registry.addresses() == ["10.0.0.2:50052", "10.0.0.3:50052"]
    assert path.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []   # no temp file left


def test_a_symlinked_file_stays_a_symlink(tmp_path):
    real = tmp_path / "real.conf"
    real.write_text("10.0.0.1:50052\n")
    (tmp_path / "rpc_backends.conf").symlink_to(real)

    async def run():
        registry = RpcRegistry(make_settings(tmp_path), Observer())
        await registry.start()
        await registry.add("10.0.0.2:50052")

    asyncio.run(run())
    assert (tmp_path / "rpc_backends.conf").is_symlink()
    assert real.read_text() == "10.0.0.1:50052\n10.0.0.2:50052\n"


def test_unwritable_file_refuses_the_add_and_keeps_the_registry(tmp_path):
    settings = make_settings(tmp_path).replace(backends_file=str(tmp_path / "file-not-dir" / "b.conf"))
    (tmp_path / "file-not-dir").write_text("")

    async def run():
        registry = RpcRegistry(settings, Observer())
        with pytest.raises(ValueError, match=r"backends file .*file-not-dir/b.conf: cannot read it \(Not a directory\)"):
            await registry.add("10.0.0.1")
        return registry

    assert asyncio.run(run()).addresses() == []


def test_unresolvable_file_entry_is_kept_and_marked_down_with_the_reason(tmp_path):
    (tmp_path / "rpc_backends.conf").write_text("no-such-host.invalid:50052\n")
    observer = Observer()

    async def run():
        registry = RpcRegistry(make_settings(tmp_path, probe_timeout=2.0), observer)
        await registry.start()
        assert registry.status()["unknown"] == 1
        await registry.check()
        return registry

    registry = asyncio.run(run())
    backend = registry.backends()[0]
    assert (backend.key, backend.state) == ("no-such-host.invalid:50052", "down")
    assert "does not resolve" in backend.reason
    [event] = events(observer, "rpc_backend", "disconnect")
    assert "unreachable" in event.message and "does not resolve" in event.details["reason"]


# ---------------------------------------------------------------- probes and hysteresis

class ScriptedProbe:
    """Answers each probe of an address from a script: 'ok', 'slow' (timeout) or 'refused'."""

    def __init__(self, script):
        self.script = {k: list(v) for k, v in script.items()}

    async def __call__(self, host, port, timeout):
        answer = self.script[f"{host}:{port}"].pop(0)
        if answer == "ok":
            return ProbeResult(1.5, f"{host}:{port}")
        if answer == "slow":
            raise ProbeFailure(f"no answer within {timeout:g}s", definitive=False)
        raise ProbeFailure("connection refused", definitive=True)


def test_hysteresis_one_slow_probe_does_not_flap(tmp_path):
    a, b, c = "10.0.0.1:50052", "10.0.0.2:50052", "10.0.0.3:50052"
    probe = ScriptedProbe({a: ["ok", "slow", "ok", "slow", "slow", "ok"],
                           b: ["ok", "refused", "ok", "ok", "ok", "ok"],
                           c: ["slow", "slow", "ok", "ok", "ok", "ok"]})
    observer = Observer()
    registry = RpcRegistry(make_settings(tmp_path, [a, b, c], probe_failures=2), observer, probe_fn=probe)
    states = []

    async def run():
        await registry.start()
        for _ in range(6):
            await registry.check()
            states.append(tuple(x.state for x in registry.backends()))

    asyncio.run(run())
    assert states == [("up", "up", "down"),
                      ("up", "down", "down"),     # a: one slow probe keeps it up; b: refused is certain
                      ("up", "up", "up"),
                      ("up", "up", "up"),         # a: 1 of 2 failures
                      ("down", "up", "up"),       # a: 2nd failure in a row -> down
                      ("up", "up", "up")]
    transitions = [(e.event_type, e.details["address"], e.details["from_state"])
                   for e in events(observer, "rpc_backend")]
    assert transitions == [("connect", a, "unknown"), ("connect", b, "unknown"), ("disconnect", c, "unknown"),
                           ("disconnect", b, "up"),
                           ("connect", b, "down"), ("connect", c, "down"),
                           ("disconnect", a, "up"),
                           ("connect", a, "down")]
    down_a = next(e for e in events(observer, "rpc_backend", "disconnect") if e.details["address"] == a)
    assert down_a.level == "warning" and down_a.details["failures"] == 2
    assert down_a.details["reason"] == "no answer within 1s" and "disconnected" in down_a.message
    up_a = events(observer, "rpc_backend", "connect")[0]
    assert up_a.details["latency_ms"] == 1.5 and up_a.details["failures"] == 0


def test_real_listeners_and_closed_ports(tmp_path):
    async def run():
        listeners = [await Listener().start() for _ in range(3)]
        closed = [f"127.0.0.1:{free_port()}" for _ in range(2)]
        observer = Observer()
        registry = RpcRegistry(make_settings(tmp_path, [x.address for x in listeners] + closed), observer)
        await registry.start()
        await registry.check()
        assert registry.healthy() == [x.address for x in listeners]
        assert registry.status() == {"configured": 5, "up": 3, "down": 2, "unknown": 0}
        assert [x.accepted for x in listeners] == [1, 1, 1]     # one connect per probe, nothing more
        await listeners[1].stop()
        await registry.check()                                  # refused: down at once
        assert registry.healthy() == [listeners[0].address, listeners[2].address]
        [lost] = [e for e in events(observer, "rpc_backend", "disconnect") if e.details["from_state"] == "up"]
        assert lost.details["address"] == listeners[1].address and lost.details["reason"] == "connection refused"
        for x in (listeners[0], listeners[2]):
            await x.stop()

    asyncio.run(run())


async def twin_heartbeats(tmp_path, interval, count):
    """Let `count` heartbeats of another registry with the same interval go by, on the same loop: the
    marker after which a registry that ticks, or still ticks, would have sent heartbeats too."""
    (tmp_path / "twin").mkdir(exist_ok=True)
    observer = Observer()
    twin = RpcRegistry(make_settings(tmp_path / "twin", rpc_backend_heartbeat=True,
                                     rpc_backend_heartbeat_interval=interval), observer)
    await twin.start()
    await until(lambda: len(events(observer, "rpc_registry", "heartbeat")) >= count,
                what=f"{count} heartbeats of the twin registry")
    await twin.close()


def test_heartbeat_every_interval_with_every_address(tmp_path):
    async def run():
        up = await Listener().start()
        dead = f"127.0.0.1:{free_port()}"
        observer = Observer()
        registry = RpcRegistry(make_settings(tmp_path, [up.address, dead], rpc_backend_heartbeat=True,
                                             rpc_backend_heartbeat_interval=0.2), observer)
        await registry.start()
        await until(lambda: len(events(observer, "rpc_registry", "heartbeat")) >= 3, what="3 heartbeats")
        await registry.close()
        beats = events(observer, "rpc_registry", "heartbeat")
        await twin_heartbeats(tmp_path, 0.2, 3)
        assert len(events(observer, "rpc_registry", "heartbeat")) == len(beats)    # close() stopped it
        await up.stop()
        return beats, up, dead

    beats, up, dead = asyncio.run(run())
    assert up.accepted == len(beats)                    # one probe per heartbeat, no more
    for beat in beats:
        assert beat.message == HEARTBEAT_MESSAGE == "rpc_backend_connect on rpc_registry"
        d = beat.details
        assert (d["total_configured"], d["total_active"]) == (2, 1)
        assert [(b["address"], b["state"]) for b in d["backends"]] == [(up.address, "up"), (dead, "down")]


def test_heartbeat_off_means_no_probe_until_check(tmp_path):
    async def run():
        listener = await Listener().start()
        observer = Observer()
        registry = RpcRegistry(make_settings(tmp_path, [listener.address], rpc_backend_heartbeat=False,
                                             rpc_backend_heartbeat_interval=0.05), observer)
        await registry.start()
        await twin_heartbeats(tmp_path, 0.05, 8)       # 8 rounds of a registry whose heartbeat is on
        idle = listener.accepted
        await registry.check()
        after_check = listener.accepted
        await registry.close()
        await listener.stop()
        return idle, after_check, observer

    idle, after_check, observer = asyncio.run(run())
    assert (idle, after_check) == (0, 1)
    assert events(observer, "rpc_registry", "heartbeat") == []


def test_a_round_is_concurrent(tmp_path):
    """40 real listeners, 5 closed ports and 5 addresses whose probe hangs for the whole timeout
    (a scripted hang around the real probe; tests/integration/test_probe_rounds.py uses a real
    black hole). One probe after another would take 5 timeouts; all at once take about one."""
    from synapticllamas.rpc.probe import probe

    hanging = {f"10.9.9.{i}:50052" for i in range(5)}

    async def probe_or_hang(host, port, timeout):
        if f"{host}:{port}" in hanging:
            await asyncio.sleep(timeout)
            raise ProbeFailure(f"no answer within {timeout:g}s", definitive=False)
        return await probe(host, port, timeout)

    async def run():
        listeners = [await Listener().start() for _ in range(40)]
        closed = [f"127.0.0.1:{free_port()}" for _ in range(5)]
        registry = RpcRegistry(make_settings(tmp_path, [x.address for x in listeners] + closed + sorted(hanging),
                                             probe_timeout=0.3), Observer(), probe_fn=probe_or_hang)
        await registry.start()
        started = time.perf_counter()
        await registry.check()
        took = time.perf_counter() - started
        for x in listeners:
            await x.stop()
        return took, registry

    took, registry = asyncio.run(run())
    assert registry.status() == {"configured": 50, "up": 40, "down": 10, "unknown": 0}
    assert took < 2 * 0.3, f"a round of 50 took {took:.2f}s (sequential: 5 x 0.3s)"


def test_backends_held_by_the_coordinator_are_not_probed_by_rounds(tmp_path):
    """The coordinator calls hold() with the backends llama-server uses, hold(()) when it exits;
    rounds skip held backends, an explicit check(addresses) still probes them. Events alone
    (another app's coordinator, a replay) change nothing."""

    async def run():
        a, b = await Listener().start(), await Listener().start()
        observer = Observer()
        registry = RpcRegistry(make_settings(tmp_path, [a.address, b.address]), observer)
        await registry.start()
        observer.emit("coordinator", "starting", "starting", {"rpc_backends": [b.address]})
        registry.hold([a.address])
        await registry.check()
        assert (a.accepted, b.accepted) == (0, 1) and registry.held(a.address) and not registry.held(b.address)
        assert [x["in_use"] for x in registry.heartbeat_details()["backends"]] == [True, False]
        await registry.check([a.address])           # the coordinator asking after a crash
        assert a.accepted == 1
        registry.hold(())
        await registry.check()
        assert (a.accepted, b.accepted) == (2, 2) and not registry.held(a.address)
        for x in (a, b):
            await x.stop()

    asyncio.run(run())


def test_a_round_longer_than_the_interval_skips_the_missed_ticks_at_once(tmp_path):
    """A 0.3 s round with a 10 ns interval (far below config's 0.1 s minimum, which
    Settings.replace does not apply): the ticks missed during a round are skipped in one step, so
    the event loop is never blocked counting them, and the rounds run one at a time, not in a burst."""
    async def slow_probe(host, port, timeout):
        await asyncio.sleep(0.3)
        raise ProbeFailure("connection refused", definitive=True)

    async def run():
        loop = asyncio.get_running_loop()
        observer = Observer()
        registry = RpcRegistry(make_settings(tmp_path, ["10.0.0.1:50052"], rpc_backend_heartbeat=True,
                                             rpc_backend_heartbeat_interval=1e-8), observer, probe_fn=slow_probe)
        await registry.start()
        worst_lag, last = 0.0, loop.time()
        while len(events(observer, "rpc_registry", "heartbeat")) < 3:     # in 10 ms steps
            await asyncio.sleep(0.01)
            now = loop.time()
            worst_lag, last = max(worst_lag, now - last - 0.01), now
        await registry.close()
        return worst_lag, events(observer, "rpc_registry", "heartbeat")

    worst_lag, beats = asyncio.run(run())
    assert worst_lag < 0.5, f"the event loop was blocked for {worst_lag:.2f}s"
    gaps = [b.timestamp - a.timestamp for a, b in itertools.pairwise(beats)]
    assert min(gaps) > 0.25, f"rounds ran back to back without the 0.3 s probe between them: {gaps}"
