"""The coordinator's lifecycle, driven with a fake llama-server: every allowed and refused
transition, backoff, fatal, counters, and the stop/start races, each in milliseconds.

A fake stands in for llama-server here on purpose: these tests are about the supervisor's table
and timing rules, and a real server takes seconds per start. The real process is exercised by
tests/integration/test_coordinator.py and tests/e2e/test_coordinator_shell.py.
"""
import asyncio
import itertools
import shutil
import signal

import pytest
from llama_support import Collector, settings_for
from support import until

from synapticllamas.events.observer import Observer
from synapticllamas.llama.coordinator import CoordinatorManager
from synapticllamas.llama.lifecycle import ATTACHED, SUPERVISED, IllegalTransition, Lifecycle, State
from synapticllamas.llama.preflight import CoordinatorError
from synapticllamas.llama.process import ChildOps

STATES = list(State)


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory):
    """A real (tiny) GGUF, so placement has something to size."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from big_model import write_model

    path = tmp_path_factory.mktemp("model") / "small.gguf"
    write_model(path, n_layers=12, width=256, ffn=512, dtype="f16", seed=3)
    return path


class FakeProcess:
    """What the manager sees of a child: pid, stdout/stderr streams, wait(), returncode."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.stdout = asyncio.StreamReader()
        self.stderr = asyncio.StreamReader()
        self.returncode: int | None = None
        self._exit = asyncio.get_running_loop().create_future()
        self.signals: list[int] = []

    def say(self, line: str) -> None:
        self.stderr.feed_data((line + "\n").encode())

    def exit(self, code: int, close_pipes: bool = True) -> None:
        if self.returncode is not None:
            return
        self.returncode = code
        if close_pipes:
            self.stdout.feed_eof()
            self.stderr.feed_eof()
        self._exit.set_result(code)

    async def wait(self) -> int:
        return await asyncio.shield(self._exit)


class FakeLlama(ChildOps):
    """Fake ChildOps: each spawn is a FakeProcess that says it listens; /health answers as told.

    on_term: what a process does on SIGTERM: "exit" (code 0), "ignore", or an exit code to die with."""

    def __init__(self) -> None:
        super().__init__(spawn=self._spawn, signal=self._signal, health=self._health)
        self.procs: list[FakeProcess] = []
        self.pids = itertools.count(4_000_000)
        self.healthy = True           # what /health answers
        self.on_term: str | int = "exit"
        self.fail_starts = 0          # the next N spawned processes exit at once with code 1
        self.fail_spawns = 0          # the next N spawns fail like a binary that is gone

    @property
    def last(self) -> FakeProcess:
        return self.procs[-1]

    async def _spawn(self, argv, **_):
        await asyncio.sleep(0)        # a real spawn yields to the loop (fork, exec, pipes) before it returns
        if self.fail_spawns:
            self.fail_spawns -= 1
            raise FileNotFoundError(2, "No such file or directory")
        proc = FakeProcess(next(self.pids))
        proc.argv = list(argv)
        self.procs.append(proc)
        if self.fail_starts:
            self.fail_starts -= 1
            proc.say("E failed to load model")
            proc.exit(1)
        else:
            proc.say("main: server is listening on http://127.0.0.1:1 - starting the main loop")
        return proc

    def _signal(self, pid: int, sig: int) -> bool:
        proc = next((p for p in self.procs if p.pid == pid), None)
        if proc is None or proc.returncode is not None:
            return False
        proc.signals.append(sig)
        if sig == signal.SIGKILL:
            proc.exit(-signal.SIGKILL)
        elif self.on_term == "exit":
            proc.exit(0)
        elif isinstance(self.on_term, int):
            proc.exit(self.on_term)
        return True

    async def _health(self, endpoint, timeout):
        return (True, "ok") if self.healthy else (False, "/health: connection refused")


def make(tmp_path, registry=None, **values):
    """A manager over a fake llama-server; `registry(settings, observer)` makes its registry."""
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF" + bytes(60))
    values = {"coordinator_backoff": 0.001, "coordinator_stop_timeout": 0.05, "model": str(model), **values}
    settings = settings_for(tmp_path, llama_server=shutil.which("true"), **values)
    observer = Observer(sampling=False)
    events = Collector(observer)
    events.observer = observer
    fake = FakeLlama()
    reg = registry(settings, observer) if registry is not None else None
    return CoordinatorManager(settings, observer, reg, ops=fake), fake, events


def wait(predicate, what):
    """Wait on the loop (the manager's own tasks move it) for predicate()."""
    return until(predicate, 5, what, 0.001)


def lifecycle(events):
    return [(e.event_type, e.details.get("reason")) for e in events.of("coordinator")
            if e.event_type != "heartbeat"]


# ---------------------------------------------------------------- the table itself

@pytest.mark.parametrize("table", [SUPERVISED, ATTACHED], ids=["supervised", "attached"])
@pytest.mark.parametrize("source,target", list(itertools.product(STATES, STATES)))
def test_every_transition_is_allowed_or_refused_as_the_table_says(table, source, target):
    refused: list[str] = []
    lc = Lifecycle(table, "coordinator", refused.append)
    lc.state = source
    if target in table.get(source, frozenset()):
        assert lc.enter(target) == source and lc.state == target and not refused
    else:
        with pytest.raises(IllegalTransition, match=f"from {source} to {target}"):
            lc.enter(target)
        assert lc.state == source and refused == [f"internal error: the coordinator cannot go from {source} to {target}"]


def test_a_state_change_outside_the_supervisors_task_is_refused_as_an_error_event(tmp_path):
    mgr, _, events = make(tmp_path)

    async def main():
        with pytest.raises(IllegalTransition, match="outside the supervisor's task"):
            mgr.supervisor._change_state(State.RUNNING, "llama.cpp coordinator started")

    asyncio.run(main())
    assert mgr.state == "stopped" and events.of("coordinator") == []
    [error] = events.of("system", "error")
    assert error.level == "error" and "state change to running outside the supervisor's task" in error.message


# ---------------------------------------------------------------- the manager, with a fake child

def test_start_then_user_stop_goes_through_stopping(tmp_path):
    mgr, fake, events = make(tmp_path)

    async def main():
        status = await mgr.start()
        assert status["state"] == "running" and status["pid"] == fake.last.pid
        await mgr.stop()

    asyncio.run(main())
    assert lifecycle(events) == [("starting", "user"), ("start", None), ("stopping", "user"), ("stop", "user")]
    assert fake.last.signals == [signal.SIGTERM]
    stop = events.of("coordinator", "stop")[0]
    assert stop.details["from_state"] == "stopping" and stop.details["exit_code"] == 0
    assert mgr.state == "stopped" and mgr.status()["pid"] is None


def test_the_state_says_exited_the_moment_it_dies_before_the_diagnosis_is_out(tmp_path):
    mgr, fake, events = make(tmp_path, coordinator_backoff=30)

    async def main():
        await mgr.start()
        fake.last.exit(-signal.SIGABRT, close_pipes=False)   # a grandchild holds its pipes: the drain waits
        await wait(lambda: mgr.state != "running", "the exit")
        seen = (mgr.state, mgr.status()["state"], [e.event_type for e in events.of("coordinator")])
        await wait(lambda: events.of("coordinator", "stop"), "the stop event")
        await mgr.stop()                                     # cancels the backoff
        return seen

    state, status_state, announced = asyncio.run(main())
    assert state == status_state == "exited"
    assert "stop" not in announced                           # the diagnosis was still being drained
    stop = events.of("coordinator", "stop")[0]
    assert stop.details["reason"] == "crash" and stop.details["signal"] == "SIGABRT"
    assert lifecycle(events)[-2:] == [("backoff", None), ("stop", "user")]


def test_crashes_back_off_doubling_then_fatal_with_counters(tmp_path):
    mgr, fake, events = make(tmp_path, coordinator_max_restarts=3)

    async def main():
        await mgr.start()
        fake.fail_starts = 3                      # every restart fails to load
        fake.last.exit(-signal.SIGSEGV)
        await wait(lambda: mgr.state == "fatal", "fatal")

    asyncio.run(main())
    assert lifecycle(events) == [
        ("starting", "user"), ("start", None), ("stop", "crash"),
        ("backoff", None), ("starting", "restart"), ("stop", "startup_failed"),
        ("backoff", None), ("starting", "restart"), ("stop", "startup_failed"),
        ("backoff", None), ("starting", "restart"), ("stop", "startup_failed"),
        ("fatal", "max_restarts")]
    backoffs = events.of("coordinator", "backoff")
    assert [b.details["delay_s"] for b in backoffs] == [0.001, 0.002, 0.004]
    assert [b.details["tries"] for b in backoffs] == [1, 2, 3]
    fatal = events.of("coordinator", "fatal")[0]
    assert fatal.level == "critical" and fatal.details["max_restarts"] == 3
    assert mgr.restarts == 3 and mgr.tries == 3 and len(fake.procs) == 4


def test_a_restart_that_comes_up_resets_tries_but_counts_restarts(tmp_path):
    mgr, fake, events = make(tmp_path)

    async def main():
        await mgr.start()
        for n in (1, 2):
            fake.last.exit(-signal.SIGKILL)
            await wait(lambda n=n: len(events.of("coordinator", "start")) == n + 1, "the restart")
            assert mgr.tries == 0 and mgr.restarts == n
        await mgr.stop()

    asyncio.run(main())
    assert [b.details["tries"] for b in events.of("coordinator", "backoff")] == [1, 1]


def test_stop_during_backoff_cancels_the_restart(tmp_path):
    mgr, fake, events = make(tmp_path, coordinator_backoff=30)

    async def main():
        await mgr.start()
        fake.last.exit(-signal.SIGKILL)
        await wait(lambda: mgr.state == "backoff", "backoff")
        await mgr.stop()
        assert mgr.state == "stopped"

    asyncio.run(main())
    assert lifecycle(events)[-2:] == [("backoff", None), ("stop", "user")]
    assert events.of("coordinator", "stop")[-1].details["from_state"] == "backoff"
    assert len(fake.procs) == 1


def test_start_during_stopping_is_refused_in_one_line(tmp_path):
    mgr, fake, events = make(tmp_path, coordinator_stop_timeout=0.2)
    fake.on_term = "ignore"                      # only the SIGKILL after the stop timeout ends it

    async def main():
        await mgr.start()
        stopping = asyncio.ensure_future(mgr.stop())
        await wait(lambda: mgr.state == "stopping", "stopping")
        with pytest.raises(CoordinatorError, match=r"^the coordinator is already stopping at http://127\.0\.0\.1:\d+ "
                                                   r"\(pid \d+\); use `coordinator stop` or `coordinator restart`$"):
            await mgr.start()
        await stopping

    asyncio.run(main())
    assert lifecycle(events) == [("starting", "user"), ("start", None), ("stopping", "user"), ("stop", "user")]
    assert fake.last.signals[:2] == [signal.SIGTERM, signal.SIGKILL]
    assert events.of("coordinator", "stop")[0].details["signal"] == "SIGKILL"


def test_failed_health_stops_through_stopping_then_restarts(tmp_path):
    mgr, fake, events = make(tmp_path, rpc_heartbeat_interval=0.001)

    async def main():
        await mgr.start()
        first = fake.last
        fake.healthy = False
        await wait(lambda: mgr.state == "backoff", "the health stop")
        fake.healthy = True
        await wait(lambda: mgr.state == "running" and fake.last is not first, "the restart")
        await mgr.stop()

    asyncio.run(main())
    assert lifecycle(events)[:6] == [("starting", "user"), ("start", None), ("stopping", "health"),
                                     ("stop", "health"), ("backoff", None), ("starting", "restart")]
    stopping = events.of("coordinator", "stopping")[0]
    failed = [b for b in events.of("coordinator", "heartbeat") if b.level == "warning"]
    assert len(failed) >= 2 and failed[1].seq < stopping.seq          # two failed /health in a row, then the stop
    assert "connection refused" in stopping.message


def test_a_crash_while_stopping_for_health_is_a_crash(tmp_path):
    mgr, fake, events = make(tmp_path, rpc_heartbeat_interval=0.001, coordinator_backoff=30)
    fake.on_term = -signal.SIGABRT              # it aborts instead of shutting down

    async def main():
        await mgr.start()
        fake.healthy = False
        await wait(lambda: mgr.state == "backoff", "the exit")
        await mgr.stop()

    asyncio.run(main())
    assert [r for t, r in lifecycle(events) if t in ("stopping", "stop")][:2] == ["health", "crash"]
    assert events.of("coordinator", "stop")[0].details["signal"] == "SIGABRT"


def test_start_timeout_stops_through_stopping_and_a_users_start_is_not_retried(tmp_path):
    mgr, fake, events = make(tmp_path, coordinator_start_timeout=0.05)
    fake.healthy = False

    async def main():
        with pytest.raises(CoordinatorError, match=r"did not report ok within 0\.05s"):
            await mgr.start()

    asyncio.run(main())
    assert lifecycle(events) == [("starting", "user"), ("stopping", "startup_failed"), ("stop", "startup_failed")]
    assert mgr.state == "exited" and len(fake.procs) == 1


def test_cancelling_a_start_kills_through_stopping(tmp_path):
    mgr, fake, events = make(tmp_path)
    fake.healthy = False

    async def main():
        task = asyncio.ensure_future(mgr.start())
        await wait(lambda: mgr.state == "starting", "starting")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert lifecycle(events) == [("starting", "user"), ("stopping", "user"), ("stop", "user")]
    assert fake.last.signals[0] == signal.SIGKILL and mgr.state == "stopped"


def test_a_start_from_exited_or_fatal_is_allowed_and_resets_tries(tmp_path):
    mgr, fake, events = make(tmp_path, coordinator_max_restarts=0)

    async def main():
        await mgr.start()
        fake.last.exit(-signal.SIGKILL)
        await wait(lambda: mgr.state == "fatal", "fatal")
        await mgr.start()
        assert mgr.state == "running" and mgr.tries == 0
        await mgr.stop()

    asyncio.run(main())
    assert [t for t, _ in lifecycle(events)] == ["starting", "start", "stop", "fatal", "starting", "start",
                                                 "stopping", "stop"]


# ---------------------------------------------------------------- failover, with a fake llama-server

class FakeNetwork:
    """The registry's probe: backends in `up` answer, the others refuse."""

    def __init__(self, addresses):
        self.up = set(addresses)

    async def probe(self, host, port, timeout):
        from synapticllamas.rpc.probe import ProbeFailure, ProbeResult

        if f"{host}:{port}" in self.up:
            return ProbeResult(0.1, f"{host}:{port}")
        raise ProbeFailure("connection refused", definitive=True)


def make_cluster_manager(tmp_path, model=None, **values):
    from synapticllamas.rpc.registry import RpcRegistry

    backends = ("10.9.0.1:50052", "10.9.0.2:50052", "10.9.0.3:50052")
    net = FakeNetwork(backends)
    if model is not None:
        values["model"] = str(model)
    mgr, fake, events = make(tmp_path, lambda settings, observer: RpcRegistry(settings, observer, probe_fn=net.probe),
                             distributed=True, rpc_backends=backends, **values)
    return mgr, fake, events, mgr.registry, net, list(backends)


def rpc_of(argv):
    return argv[argv.index("--rpc") + 1].split(",")


def test_a_lost_backend_fails_over_at_once_to_the_survivors(tmp_path):
    mgr, fake, events, registry, net, (a, b, c) = make_cluster_manager(tmp_path)

    async def main():
        await registry.start()
        await mgr.start()
        first = fake.last
        net.up.discard(b)
        registry.report(b, up=False, reason="local ggml-rpc-server exited (killed by SIGKILL)")
        await wait(lambda: events.of("coordinator", "failover"), "the failover")
        assert fake.last is not first and first.signals[0] == signal.SIGKILL
        await mgr.stop()

    asyncio.run(main())
    assert lifecycle(events) == [("starting", "user"), ("start", None), ("stopping", "failover"),
                                 ("stop", "failover"), ("starting", "failover"), ("start", None),
                                 ("failover", "local ggml-rpc-server exited (killed by SIGKILL)"), ("stopping", "user"),
                                 ("stop", "user")]
    starting = events.of("coordinator", "starting")[1]
    assert starting.details["rpc_backends"] == [a, c] and starting.details["left_out"] == {b: "down"}
    failover = events.of("coordinator", "failover")[0]
    assert failover.details["lost"] == [b] and failover.details["survivors"] == [a, c]
    assert failover.details["before"] == [a, b, c] and failover.details["downtime_s"] > 0
    assert mgr.tries == 0 and mgr.restarts == 1


def test_survivors_that_cannot_hold_the_model_wait_until_a_backend_is_back(tmp_path, small_gguf):
    from synapticllamas.llama.placement import Offer

    mgr, fake, events, registry, net, (a, b, c) = make_cluster_manager(tmp_path, model=small_gguf)
    need = {}

    def offers(backends):
        return {x: Offer(need["each"], "test") for x in backends}

    mgr.offers_for = offers

    async def main():
        from synapticllamas.llama.gguf_layout import read_layout
        from synapticllamas.llama.placement import plan

        layout = read_layout(small_gguf)
        # enough for a third of the model each, not for half
        third = plan(layout, [a, b, c], {x: Offer(10**6, "t") for x in (a, b, c)}, mgr.settings.coordinator_ctx_size)
        need["each"] = int(max(p.need_mib for p in third.backends)) + 1
        two = plan(layout, [a, c], {x: Offer(need["each"], "t") for x in (a, c)}, mgr.settings.coordinator_ctx_size)
        assert not two.fits, "the test model must not fit on two of the three"
        await registry.start()
        await mgr.start()
        net.up.discard(b)
        registry.report(b, up=False, reason="node 10.9.0.2:50052 heartbeat overdue")
        await wait(lambda: mgr.state == "waiting", "waiting")
        status = mgr.status()
        assert status["state"] == "waiting" and status["waiting"].startswith("the model does not fit")
        net.up.add(b)
        registry.report(b, up=True, reason="node 10.9.0.2:50052 up")
        await wait(lambda: events.of("coordinator", "failover"), "the restart once memory is back")
        await mgr.stop()

    asyncio.run(main())
    kinds = [t for t, _ in lifecycle(events)]
    assert kinds[:6] == ["starting", "start", "stopping", "stop", "waiting", "starting"]
    waiting = events.of("coordinator", "waiting")[0]
    assert waiting.level == "warning" and waiting.details["lost"] == [b] and "does not fit" in waiting.message
    assert rpc_of(fake.procs[-1].argv) == [a, b, c]


def test_stop_while_waiting_cancels_the_wait(tmp_path):
    mgr, fake, events, registry, net, (a, b, c) = make_cluster_manager(tmp_path)

    async def main():
        await registry.start()
        await mgr.start()
        net.up.clear()
        for x in (a, b, c):
            registry.report(x, up=False, reason="gone")
        await wait(lambda: mgr.state == "waiting", "waiting")       # no backend left at all
        await mgr.stop()
        assert mgr.state == "stopped"
        net.up.add(a)
        registry.report(a, up=True, reason="back")

    asyncio.run(main())
    assert [t for t, _ in lifecycle(events)][-2:] == ["waiting", "stop"]
    assert len(fake.procs) == 1


def third_each(mgr, small_gguf, backends):
    """Offers so that each backend holds a third of the model, and two of them cannot hold it."""
    from synapticllamas.llama.gguf_layout import read_layout
    from synapticllamas.llama.placement import Offer, plan

    layout = read_layout(small_gguf)
    ctx = mgr.settings.coordinator_ctx_size
    third = plan(layout, backends, {x: Offer(10**6, "t") for x in backends}, ctx)
    each = int(max(p.need_mib for p in third.backends)) + 1
    assert not plan(layout, backends[:2], {x: Offer(each, "t") for x in backends[:2]}, ctx).fits
    mgr.offers_for = lambda addresses: {x: Offer(each, "test") for x in addresses}


def test_two_backends_back_at_once_while_waiting_give_one_launch(tmp_path, small_gguf):
    mgr, fake, events, registry, net, (a, b, c) = make_cluster_manager(tmp_path, model=small_gguf)
    third_each(mgr, small_gguf, [a, b, c])

    async def main():
        await registry.start()
        await mgr.start()
        net.up -= {b, c}
        registry.report(b, up=False, reason="node b heartbeat overdue")
        await wait(lambda: mgr.state == "waiting", "waiting")
        registry.report(c, up=False, reason="node c heartbeat overdue")
        net.up |= {b, c}
        registry.report(b, up=True, reason="node b up")        # both in the same turn of the loop
        registry.report(c, up=True, reason="node c up")
        await wait(lambda: events.of("coordinator", "failover"), "serving again")
        state = mgr.state
        await mgr.stop()
        return state

    assert asyncio.run(main()) == "running"
    assert len(fake.procs) == 2 and mgr.supervisor.launches == 2      # the first, and one relaunch
    assert rpc_of(fake.procs[-1].argv) == [a, b, c]
    assert [t for t, _ in lifecycle(events)] == ["starting", "start", "stopping", "stop", "waiting", "starting",
                                                 "start", "failover", "stopping", "stop"]
    assert not [e for e in events.of("system", "error") if e.level == "error"]


def test_a_spawn_that_fails_during_recovery_backs_off_and_comes_back(tmp_path):
    mgr, fake, events, registry, net, (_a, b, _c) = make_cluster_manager(tmp_path)

    async def main():
        await registry.start()
        await mgr.start()
        fake.fail_spawns = 1                   # the binary is gone for the first relaunch
        net.up.discard(b)
        registry.report(b, up=False, reason="gone")
        await wait(lambda: events.of("coordinator", "failover"), "serving again")
        await mgr.stop()

    asyncio.run(main())
    kinds = [t for t, _ in lifecycle(events)]
    assert kinds[:7] == ["starting", "start", "stopping", "stop", "backoff", "starting", "start"]
    backoff = events.of("coordinator", "backoff")[0]
    assert "cannot run" in backoff.details["cause"] and "No such file or directory" in backoff.details["cause"]
    assert mgr.tries == 0 and not [e for e in events.of("system", "error") if e.level == "error"]


def test_a_spawn_that_keeps_failing_during_recovery_ends_fatal(tmp_path):
    mgr, fake, events, registry, net, (_a, b, _c) = make_cluster_manager(tmp_path, coordinator_max_restarts=2)

    async def main():
        await registry.start()
        await mgr.start()
        fake.fail_spawns = 10
        net.up.discard(b)
        registry.report(b, up=False, reason="gone")
        await wait(lambda: mgr.state == "fatal", "fatal")

    asyncio.run(main())
    kinds = [t for t, _ in lifecycle(events)]
    assert kinds == ["starting", "start", "stopping", "stop", "backoff", "backoff", "fatal"]
    assert "No such file or directory" in events.of("coordinator", "fatal")[0].message
    assert len(fake.procs) == 1


def test_a_rebalance_that_would_not_fit_keeps_it_running(tmp_path, small_gguf):
    mgr, fake, _events, registry, net, (_a, _b, c) = make_cluster_manager(tmp_path, model=small_gguf)

    async def main():
        await registry.start()
        net.up.discard(c)
        registry.report(c, up=False, reason="not yet")
        await mgr.start()
        from synapticllamas.llama.placement import Offer

        mgr.offers_for = lambda addresses: {x: Offer(1, "tiny") for x in addresses}   # nothing fits any more
        net.up.add(c)
        registry.report(c, up=True, reason="back")
        with pytest.raises(CoordinatorError, match="not rebalanced, it keeps running on 2 backends: the model "
                                                   "does not fit"):
            await mgr.rebalance()
        state = mgr.state
        await mgr.stop()
        return state

    assert asyncio.run(main()) == "running"
    assert len(fake.procs) == 1


def test_a_rebalance_whose_restart_fails_is_retried_not_left_stopped(tmp_path):
    mgr, fake, events, registry, net, (a, b, c) = make_cluster_manager(tmp_path)

    async def main():
        await registry.start()
        net.up.discard(c)
        registry.report(c, up=False, reason="not yet")
        await mgr.start()
        net.up.add(c)
        registry.report(c, up=True, reason="back")
        await wait(lambda: mgr.status()["unused_backends"] == [c], "c usable again")
        fake.fail_starts = 1                       # the restart over a, b, c fails to load once
        with pytest.raises(CoordinatorError, match="the rebalance did not complete"):
            await mgr.rebalance()
        await wait(lambda: mgr.state == "running", "the retry")
        backends = mgr.status()["backends"]
        await mgr.stop()
        return backends

    assert asyncio.run(main()) == [a, b, c]
    kinds = [t for t, _ in lifecycle(events)]
    assert kinds[2:8] == ["stopping", "stop", "starting", "stop", "backoff", "starting"]


def test_rebalance_waits_for_every_clients_requests_not_only_the_shells(tmp_path):
    mgr, _fake, events, registry, net, (a, b, c) = make_cluster_manager(tmp_path)
    outside = {"n": 2}
    mgr.in_flight = lambda: outside["n"]            # what the gateway counts: any client's requests

    async def main():
        await registry.start()
        net.up.discard(c)
        registry.report(c, up=False, reason="not yet")
        await mgr.start()
        net.up.add(c)
        registry.report(c, up=True, reason="back")
        await wait(lambda: mgr.status()["unused_backends"] == [c], "c usable again")
        with pytest.raises(CoordinatorError, match="2 requests are running; rebalance when it is done"):
            await mgr.rebalance()
        outside["n"] = 0
        status = await mgr.rebalance()
        await mgr.stop()
        return status

    assert asyncio.run(main())["backends"] == [a, b, c]
    [rebalance] = events.of("coordinator", "rebalance")
    assert rebalance.details["added"] == [c] and rebalance.details["auto"] is False
