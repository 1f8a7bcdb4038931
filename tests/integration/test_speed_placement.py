"""Placement for speed with the real parts: llama-bench measures the devices, llama-server serves the
plan chosen, ggml-rpc-servers and nodes are real, the simulated hosts are network namespaces with
cgroup CPU quotas (tests/cluster.py). The arithmetic is tested in tests/unit/test_speed_plans.py,
the speed itself in bench/speed_placement.py (no timed assertions here)."""
import json
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest
from llama_support import tagged
from node_support import NodesOnHosts
from procs import processes
from support import PYTHON, ROOT, PipedShell, RedisCliSubscriber, RedisServer, free_port, wait_for

pytestmark = pytest.mark.llama

SPEED = {"SYNAPTICLLAMAS_PLACEMENT": "speed", "SYNAPTICLLAMAS_COORDINATOR_ARGS": ""}


@pytest.fixture
def tag():
    with tagged() as value:
        yield value


def llama_servers_with(tag: str) -> list[list[str]]:
    from llama_support import TAG_VAR

    out = []
    for pid, argv in processes("llama-server").items():
        try:
            if f"{TAG_VAR}={tag}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                out.append(argv)
        except OSError:
            pass
    return out


def test_a_model_that_fits_this_host_is_served_there_by_default_and_spread_on_request(tmp_path, tag):
    from llama_support import TAG_VAR

    from synapticllamas.util.host import cpu_share, threads_for

    shell = PipedShell(tmp_path, "--distributed", **SPEED, **{TAG_VAR: tag,
                       "SYNAPTICLLAMAS_COORDINATOR_PORT": str(free_port())})
    try:
        shell.send("backends spawn 2")
        match, _ = shell.read_until(r"Started 2 local backends: (\S+), (\S+) ")
        backends = [match.group(1), match.group(2)]

        # nothing started by `coordinator plan`; it shows what `start` will choose
        shell.send("coordinator plan")
        _, lines = shell.read_until(r"SmolLM2.*: fits on this host: 2 backends left idle; predicted [\d.]+ ms/token "
                                    r"vs [\d.]+ spread; `--spread` to use them all")
        chosen = [line for line in lines if line.startswith(">")]
        assert len(chosen) == 1 and re.match(r"> this host\s+this host 30\s+[\d.]+\s+[\d.]+\s+yes", chosen[0]), lines
        assert any(line.startswith("  spread ") for line in lines) and any("by memory" in line for line in lines)
        assert not llama_servers_with(tag)

        shell.send("coordinator start")
        shell.read_until(r"RPC backends: none, this host's CPU; ready", timeout=120)
        shell.read_until(r"^Placement: fits on this host: 2 backends left idle; predicted")
        (argv,) = llama_servers_with(tag)
        # no network, every layer on this host's CPU, one thread per core of its share
        assert "--rpc" not in argv and argv[argv.index("-ngl") + 1] == "0"
        assert argv[argv.index("-t") + 1] == str(threads_for(cpu_share())), argv
        shell.send('coordinator ask "The capital of France is" --n 8')
        shell.read_until(r"^\[\d+ tokens in ")
        shell.send("backends")
        _, lines = shell.read_until(r"hosts? \(each machine's memory counted once\)")
        assert all(any(line.startswith(b) and "not probed" not in line and "in use" not in line for line in lines)
                   for b in backends), lines         # idle: probed as usual, not held

        shell.send("coordinator stop", "coordinator start --spread")
        match, _ = shell.read_until(r"RPC backends: (.*); ready", timeout=120)
        assert sorted(match.group(1).split(", ")) == sorted(backends)
        shell.read_until(r"^Placement: spread over all 2 backends as asked; predicted [\d.]+ ms/token")
        shell.send("coordinator status")
        _, lines = shell.read_until(r"^127\.0\.0\.1:\d+ +layers \d+-29 \+ output")
        assert sum(bool(re.match(r"127\.0\.0\.1:\d+ +layers \d+-\d+", line)) for line in lines) == 2, lines
        shell.send("exit")
        assert shell.wait() == 0, shell.output()
    finally:
        shell.kill()


def test_coordinator_plan_refuses_bad_input_in_one_line(tmp_path):
    shell = PipedShell(tmp_path, "--distributed", **SPEED)
    try:
        shell.send("coordinator plan --model /no/such.gguf", "coordinator plan --bogus", "status")
        shell.read_until(r"model /no/such\.gguf does not exist", stream="stderr")
        shell.read_until(r"unrecognized arguments: --bogus", stream="stderr")
        shell.read_until(r"distributed")
        shell.send("exit")
        assert shell.wait() == 1                     # some commands failed; the shell went on
        assert "Traceback" not in shell.output()
    finally:
        shell.kill()


def test_backends_on_one_machine_are_counted_once(tmp_path, tag):
    """Two local backends and a node on this machine (no host id given: the kernel's boot id), and a
    model bigger than the machine: each backend offers the machine's free memory, so by their
    offers the model would fit three times over; by the machine's it does not."""
    from llama_support import TAG_VAR

    from synapticllamas.llama import bench_model

    big = tmp_path / "sparse.gguf"                   # 24 GiB of f16 layers, sparse: costs no disk
    bench_model.write(big, "F16", n_layers=64, width=4096, ffn=11008)
    redis = RedisServer(tmp_path / "redis").start()
    sub = RedisCliSubscriber(redis.port)
    node_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SOLLOL_", "SYNAPTICLLAMAS_"))}
    env.update({TAG_VAR: tag, "SOLLOL_RPC_BACKEND_HEARTBEAT_INTERVAL": "1", "XDG_CONFIG_HOME": str(tmp_path / "n")})
    node = subprocess.Popen([PYTHON, str(ROOT / "main.py"), "node", "--host", "127.0.0.1", "--port", str(node_port),
                             "--redis-url", redis.url, "--threads", "1"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shell = PipedShell(tmp_path, "--distributed", **SPEED, **{TAG_VAR: tag, "SOLLOL_REDIS_URL": redis.url})
    try:
        _, up = sub.wait_for_event("node", "node_up", address=f"127.0.0.1:{node_port}", timeout=60)
        assert up["details"]["host"]["id"].startswith("boot-") and up["details"]["devices"]
        shell.send("redis on", "backends spawn 2")
        shell.read_until(r"Started 2 local backends")
        shell.send("backends")
        _, lines = shell.read_until(r"^1 host \(each machine's memory counted once\): \S+ \(this host\) [\d.]+ GiB "
                                    r"free, shared by 3 backends")
        assert sum("(this host)" in line for line in lines if line.startswith("127.0.0.1:")) == 3, lines
        shell.send(f"coordinator plan --model {big}")
        shell.read_until(r"sparse\.gguf, 64 layers, .*: no placement fits")
        shell.send(f"coordinator start --model {big}")
        match, _ = shell.read_until(r"the model does not fit: .*", stream="stderr")
        line = match.group(0)
        assert re.search(r"short: .*host \S+ \(this host\) needs \d+ for .*127\.0\.0\.1:\d+ \+ 127\.0\.0\.1:\d+ .*"
                         r"counted once", line), line
        assert not llama_servers_with(tag)
        shell.send("exit")
        assert shell.wait() == 1, shell.output()        # the start was refused; the shell went on
    finally:
        shell.kill()
        node.terminate()
        node.wait(20)
        sub.close()
        redis.kill()


def test_a_slow_host_is_left_out_of_the_plan(tmp_path, make_cluster, tag):
    """Two simulated hosts, one at 100 % of a core and one at 20 %, both able to hold the demo model:
    the nodes measure themselves, and the plan serves on the fast one alone."""
    cluster = make_cluster(2, cpu_quota=[1.0, 0.2])
    with NodesOnHosts(cluster, tmp_path, tag, one_by_one=True) as on_hosts:
        on_hosts.wait_all_up()
        registered = {a: json.loads(v) for a, v in on_hosts.redis.client().hgetall("synapticllamas:nodes").items()}
        fast, slow = on_hosts.addresses
        for address, cpus in ((fast, 1.0), (slow, 0.2)):
            reg = registered[address]
            assert reg["host"]["id"] == f"host{on_hosts.addresses.index(address)}", reg["host"]
            assert reg["host"]["cpus"] == cpus and reg["speed"]["cpus"] == cpus, reg
            assert reg["speed"]["ns_per_byte"]["F16"] > 0 and reg["threads"] == 1
        shell = on_hosts.shell("--distributed", **SPEED, SYNAPTICLLAMAS_COORDINATOR_MEMORY="0")
        shell.send("redis on", "coordinator start")
        match, _ = shell.read_until(r"RPC backends: (.*); ready", timeout=120)
        speeds = {a: (r["speed"]["ns_per_byte"], r["speed"]["layer_ns"]) for a, r in registered.items()}
        assert match.group(1) == fast, f"measured {speeds}; shell:\n{shell.output()}"
        shell.read_until(rf"^Placement: fastest on {re.escape(fast)}: 1 backend left idle; predicted [\d.]+ ms/token "
                         r"vs [\d.]+ spread")
        shell.send("exit")
        assert shell.wait() == 0, shell.output()


def test_a_node_announces_its_devices_even_when_its_banner_comes_late(tmp_path, tag):
    """The node's TCP probe can connect before its reader has seen rpc-server's `Devices:` lines
    (two busy cores). Here the banner is held back a second on purpose, behind a pipe: the node
    must still announce the devices and its memory, not `devices: []`."""
    from llama_support import TAG_VAR

    from synapticllamas.llama import binaries

    real = binaries.rpc_server()
    late = tmp_path / "late-rpc-server"
    late.write_text(f'#!/bin/sh\nstdbuf -oL "{real}" "$@" | {{ sleep 1; exec cat; }}\n')
    late.chmod(late.stat().st_mode | stat.S_IXUSR)
    redis = RedisServer(tmp_path / "redis").start()
    sub = RedisCliSubscriber(redis.port)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SOLLOL_", "SYNAPTICLLAMAS_"))}
    env.update({TAG_VAR: tag, "XDG_CONFIG_HOME": str(tmp_path / "n")})
    node = subprocess.Popen([PYTHON, str(ROOT / "main.py"), "node", "--host", "127.0.0.1", "--port", str(port),
                             "--redis-url", redis.url, "--threads", "1", "--rpc-server", str(late)], env=env,
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _, up = sub.wait_for_event("node", "node_up", address=f"127.0.0.1:{port}", timeout=60)
        details = up["details"]
        assert details["devices"] and details["devices"][0]["total_mib"] > 0, details
        assert isinstance(details["memory_offered_mib"], int) and details["memory_offered_mib"] > 0, details
        wait_for(lambda: json.loads(redis.client().hget("synapticllamas:nodes", f"127.0.0.1:{port}") or "{}")
                 .get("devices"), 10, what="the registration to list the devices")
    finally:
        node.terminate()
        node.wait(20)
        sub.close()
        redis.kill()


def test_the_dial_map_covers_the_backends_the_chosen_plan_holds(tmp_path, monkeypatch):
    """`mgr.dial_for` (secured links) is asked for the backends the plan holds, not every healthy
    one: the plan that fits this host holds none and dials none; `--spread` dials both, and
    llama-server's --rpc names what the map says. Real rpc-servers and llama-bench; nothing started."""
    import asyncio

    from llama_support import settings_for

    from synapticllamas.app import App
    from synapticllamas.llama.preflight import Target

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))     # the speed cache of this test
    settings = settings_for(tmp_path, distributed=True, placement="speed", coordinator_args="")
    asked: list[list[str]] = []

    async def dial_for(backends: list[str]) -> dict[str, str]:
        asked.append(list(backends))
        return {b: f"127.0.0.1:{60000 + i}" for i, b in enumerate(backends)}

    async def run():
        app = App(settings)
        await app.start()
        try:
            keys = await app.local_backends.spawn(2)
            app.coordinator.dial_for = dial_for
            here = await app.coordinator.planner.plan(Target(), auto=False)
            spread = await app.coordinator.planner.plan(Target(spread=True), auto=False)
            return keys, here, spread
        finally:
            await app.close()

    keys, here, spread = asyncio.run(run())
    assert here.backends == [] and here.idle == keys and here.dial == {}
    assert asked == [spread.backends] and sorted(spread.backends) == sorted(keys)
    argv = spread.argv(2048, "")
    assert argv[argv.index("--rpc") + 1] == ",".join(spread.dial[b] for b in spread.backends)


def test_a_failover_plans_again_for_speed(tmp_path, make_cluster, tag):
    """Three simulated hosts, two at a full core and one at a tenth: the plan serves on one fast host
    alone; when its node goes, the failover plans again for speed, as `coordinator plan` then does:
    the other fast host alone, not every backend still up (the tenth of a core would set the pace)."""
    cluster = make_cluster(3, cpu_quota=[1.0, 1.0, 0.1])
    with NodesOnHosts(cluster, tmp_path, tag, one_by_one=True) as on_hosts:
        on_hosts.wait_all_up()
        slow = on_hosts.addresses[2]
        shell = on_hosts.shell("--distributed", **SPEED, SYNAPTICLLAMAS_COORDINATOR_MEMORY="0")
        shell.send("redis on", "coordinator start")
        match, _ = shell.read_until(r"RPC backends: (.*); ready", timeout=120)
        held = match.group(1)
        assert held in on_hosts.addresses[:2], shell.output()
        other = next(a for a in on_hosts.addresses[:2] if a != held)
        mark = len(on_hosts.sub.events())
        on_hosts.nodes[on_hosts.addresses.index(held)].terminate()
        _, failover = on_hosts.sub.wait_for_event("coordinator", "failover", after=mark, timeout=60)
        _, starting = on_hosts.sub.wait_for_event("coordinator", "starting", after=mark, timeout=5)
        assert starting["details"]["reason"] == "failover"
        choice = starting["details"]["choice"]
        assert choice["mode"] == "speed" and choice["chosen"]["devices"] == [other], choice
        assert choice["idle"] == [slow], choice
        assert failover["details"]["survivors"] == [other] and starting["details"]["rpc_backends"] == [other]
        # `coordinator plan` over the two left: the same choice
        shell.send("coordinator plan")
        _, lines = shell.read_until(r"SmolLM2.*predicted [\d.]+ ms/token", timeout=30)
        [picked] = [line for line in lines if line.startswith(">")]
        assert re.match(rf"> 1 backend\s+{re.escape(other)} 30\s", picked), lines
        # the same reason (its figures can move a little: the links' round trips are measured on)
        assert choice["reason"].startswith(f"fastest on {other}: 1 backend left idle; predicted "), choice["reason"]
        assert f": fastest on {other}: 1 backend left idle; predicted " in lines[-1], lines[-1]
        shell.send("exit")
        assert shell.wait() == 0, shell.output()
