"""Placement for speed, without llama.cpp: the cost model, the chooser, this host's CPU as a device,
hosts counted once, the speed benchmark's arithmetic and what a node's announcement may say.
The real thing (llama-bench, llama-server, nodes) is in tests/integration/test_speed_placement.py and
bench/speed_placement.py."""
import json
import sys
from pathlib import Path

import pytest

from synapticllamas.llama import speed as speed_mod
from synapticllamas.llama.chooser import World, choose
from synapticllamas.llama.cost import DeviceInfo, Link, predict
from synapticllamas.llama.devices import announced, is_loopback
from synapticllamas.llama.gguf_layout import read_layout
from synapticllamas.llama.placement import LOCAL, HostOffer, Offer, assign_layers, place, split_for
from synapticllamas.llama.speed import DeviceSpeed
from synapticllamas.util import host

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo():
    from synapticllamas.llama.binaries import demo_model

    return read_layout(demo_model())


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """The bench's 553 MiB model, as a sparse file (placement reads only its header)."""
    from synapticllamas.llama import bench_model

    path = tmp_path_factory.mktemp("big") / "big.gguf"
    bench_model.write(path, "F16", n_layers=5, width=2560, ffn=4096)
    return read_layout(path)


def speed(f16: float = 0.05, q4: float = 0.1, threads: int = 2, cpus: float = 2.0) -> DeviceSpeed:
    return DeviceSpeed({"F16": f16, "Q8_0": f16 * 1.3, "Q6_K": f16 * 1.3, "Q4_K": q4}, 5000.0, threads, cpus, False)


def one_machine(layout, backends=2, mib=16000):
    addresses = [f"127.0.0.1:{50100 + i}" for i in range(backends)]
    devices = {LOCAL: DeviceInfo(LOCAL, "h0", speed())}
    devices.update({a: DeviceInfo(a, "h0", speed(), Link(0.2, 10000)) for a in addresses})
    return World(layout, 2048, devices, {}, {"h0": HostOffer("h0", "vm", mib, "its free memory")}, addresses)


def cluster(layout, quotas=(0.2, 0.5, 1.0), offers=(800, 430, 560)):
    addresses = [f"10.0.0.{i}:50052" for i in range(len(quotas))]
    devices = {a: DeviceInfo(a, f"host{i}", speed(0.107, 0.17, threads=1, cpus=q), Link(0.2, 100))
               for i, (a, q) in enumerate(zip(addresses, quotas, strict=True))}
    return World(layout, 2048, devices, {a: Offer(m, "node --memory") for a, m in zip(addresses, offers, strict=True)},
                 {}, addresses)


# ---------------------------------------------------------------- llama.cpp's rule with CPU layers

@pytest.mark.parametrize("n_layer,split,cpu,layers,output", [
    (30, [1, 1], 0, [0] * 16 + [1] * 14, 1),                    # 31 slots, the output's is the last
    (30, [1, 1], 10, [-1] * 10 + [0] * 11 + [1] * 9, 1),       # -ngl 21: the first 10 stay on the CPU
    (5, [3, 3], 0, [0, 0, 0, 1, 1], 1),
])
def test_layers_kept_on_this_hosts_cpu_follow_llama_cpps_rule(n_layer, split, cpu, layers, output):
    assert assign_layers(n_layer, split, cpu) == (layers, output)


@pytest.mark.parametrize("counts", [[3, 2], [1, 1, 3], [0, 5], [5], [2, 0, 3]])
def test_a_split_gives_each_backend_exactly_its_layers(counts):
    device_of, output = assign_layers(sum(counts), split_for(counts))
    assert [device_of.count(d) for d in range(len(counts))] == counts and output == len(counts) - 1


def test_a_plan_all_on_this_host_offloads_nothing(demo):
    placed = place(demo, [], {}, 2048, [], 30, Offer(1000, "its free memory"), {LOCAL: "h0"},
                   {"h0": HostOffer("h0", "vm", 1000, "its free memory")})
    assert placed.ngl == 0 and placed.local is not None and placed.local.output and placed.fits
    assert placed.tensor_split() == ""


# ---------------------------------------------------------------- hosts counted once

def test_backends_on_one_host_share_its_memory_and_the_refusal_counts_it_once(demo):
    """Two local backends that each offer the machine's whole memory: the model fits either one,
    but not the machine."""
    addresses = ["127.0.0.1:1", "127.0.0.1:2"]
    offers = {a: Offer(200, "local rpc-server free memory") for a in addresses}
    placed = place(demo, addresses, offers, 2048, [15, 15], 0, None, dict.fromkeys(addresses, "h0"),
                   {"h0": HostOffer("h0", "vm", 200, "its free memory")})
    assert all(b.fits for b in placed.backends) and not placed.fits and placed.short_hosts == ["h0"]
    line = placed.refusal()
    assert "host vm needs" in line and "127.0.0.1:1 + 127.0.0.1:2" in line and "counted once" in line
    assert "they offer 200 MiB" in line            # not 400


def test_nothing_fits_when_the_host_is_too_small_for_what_each_device_would_take(demo):
    world = one_machine(demo, mib=150)
    assert choose(world).chosen is None


# ---------------------------------------------------------------- the cost model

def test_the_cost_of_a_plan_is_compute_plus_a_round_trip_per_remote_stage(demo):
    world = one_machine(demo)
    local = place(demo, [], {}, 2048, [], 30, None)
    remote = place(demo, ["127.0.0.1:50100"], {}, 2048, [30], 0)
    a, b = predict(demo, local, world.devices), predict(demo, remote, world.devices)
    assert not a.link_ms and set(b.link_ms) == {"127.0.0.1:50100"}
    # same device speed, same bytes: the difference is the link (round trip, hidden state, logits)
    assert b.ms_per_token - a.ms_per_token == pytest.approx(b.link_ms["127.0.0.1:50100"], rel=1e-6)
    expected_bytes = 4 * 576 + 2048 + 4 * 49152
    assert b.link_ms["127.0.0.1:50100"] == pytest.approx(0.2 + expected_bytes * 8 / 10000e3)


def test_a_device_under_a_cpu_quota_sets_the_pace_only_when_it_would_exceed_it(big):
    world = cluster(big)
    slow, fast = world.backends[0], world.backends[2]
    # one layer on the slow host (20 % of a core): idle most of each token, never held back
    light = place(big, [fast, slow], world.offers, 2048, [4, 1], 0)
    # three layers there: it would need more than its fifth of a core
    heavy = place(big, [slow, fast], world.offers, 2048, [3, 2], 0)
    p_light, p_heavy = predict(big, light, world.devices), predict(big, heavy, world.devices)
    assert p_light.bound is None
    assert p_heavy.bound == slow
    assert p_heavy.ms_per_token == pytest.approx(p_heavy.compute_ms[slow] * 1 / 0.2)


# ---------------------------------------------------------------- the chooser

def test_a_model_that_fits_this_host_is_served_there_and_says_why(demo):
    c = choose(one_machine(demo))
    assert c.chosen.devices == [LOCAL] and c.chosen.backends == [] and c.idle == ["127.0.0.1:50100", "127.0.0.1:50101"]
    assert c.reason.startswith("fits on this host: 2 backends left idle; predicted ") and "`--spread`" in c.reason


def test_spread_puts_layers_on_every_backend(demo):
    c = choose(one_machine(demo, 3), "spread")
    layers = c.chosen.layers()
    assert set(c.chosen.backends) == {"127.0.0.1:50100", "127.0.0.1:50101", "127.0.0.1:50102"}
    assert all(layers[b] >= 1 for b in c.chosen.backends) and c.idle == []


def test_the_chooser_drops_a_slow_host_the_memory_split_would_load_most(big):
    world = cluster(big)
    c = choose(world)
    slow = world.backends[0]
    assert slow not in c.chosen.backends and c.idle == [slow]
    by_memory = next(x for x in c.candidates if x.name == "by memory")
    assert by_memory.layers()[slow] >= 2 and by_memory.ms > 1.5 * c.chosen.ms


def test_the_chooser_never_loses_to_an_exhaustive_search_of_the_same_cost_model(big):
    import itertools

    world = cluster(big)
    best = min((predict(big, p, world.devices).ms_per_token, counts)
               for counts in itertools.product(range(6), repeat=3) if sum(counts) == 5
               for used in [[a for a, n in zip(world.backends, counts, strict=True) if n]]
               for p in [place(big, used, world.offers, 2048, [n for n in counts if n], 0)] if p.fits)
    assert choose(world).chosen.ms <= best[0] * 1.0001


def test_memory_mode_is_the_split_of_before(demo):
    c = choose(one_machine(demo), "memory")
    assert c.chosen.name == "by memory" and c.chosen.placement.local is None
    assert c.chosen.backends == ["127.0.0.1:50100", "127.0.0.1:50101"]


def test_only_the_best_few_plans_are_placed_exactly(big, monkeypatch):
    """Six devices: every subset is estimated, but the exact memory model and cost (the part that
    costs) run for a bounded number of plans; bench/speed_placement.py times `coordinator plan`."""
    from synapticllamas.llama import chooser

    placed = []

    def counting(*args, **kwargs):
        placed.append(args[1])
        return place(*args, **kwargs)

    monkeypatch.setattr(chooser, "place", counting)
    world = cluster(big, quotas=(0.2, 0.5, 1.0, 0.3, 0.8, 1.0), offers=(800, 430, 560, 300, 300, 300))
    c = choose(world)
    assert c.chosen is not None and c.chosen.fits
    assert 0 < len(placed) <= 2 * chooser.EXACT * 8      # speed and spread candidates; the memory split is plan()


# ---------------------------------------------------------------- speed: arithmetic and untrusted input

def test_the_benchmark_separates_the_per_layer_cost_from_the_per_byte_cost():
    files = {"overhead": (Path("o"), 1_000_000, 16), "F16": (Path("f"), 100_000_000, 4), "Q4_K": (Path("q"), 50_000_000, 8)}
    layer_ns, f16, q4 = 20_000.0, 0.05, 0.2
    token = {"overhead": 16 * layer_ns + 1_000_000 * f16, "F16": 4 * layer_ns + 100_000_000 * f16,
             "Q4_K": 8 * layer_ns + 50_000_000 * q4}
    per_byte, layer = speed_mod.solve(token, files)
    assert layer == pytest.approx(layer_ns) and per_byte["F16"] == pytest.approx(f16)
    assert per_byte["Q4_K"] == pytest.approx(q4)


def test_a_busy_machine_that_slowed_the_tiny_layers_model_leaves_no_type_free():
    """Seen in the suite: two nodes measuring at once, the tiny-layers model slowed most, and a
    per-layer cost that left Q6_K's bytes nothing; announced as 0.0, the schema refused node_up."""
    from synapticllamas.events.schema import decode_node_entry

    files = {"overhead": (Path("o"), 1_000_000, 16), "F16": (Path("f"), 100_000_000, 4),
             "Q6_K": (Path("q"), 100_000_000, 4)}
    token = {"overhead": 16 * 2_000_000.0, "F16": 4 * 2_000_000.0 + 5e6, "Q6_K": 4e6}
    per_byte, layer = speed_mod.solve(token, files)
    assert per_byte["Q6_K"] == pytest.approx(speed_mod.BYTES_SHARE * 4e6 / 100_000_000)
    measured = DeviceSpeed(per_byte, layer, 2, 2.0, False)
    assert DeviceSpeed.from_summary(measured.summary()) is not None
    _, reg = decode_node_entry("127.0.0.1:50052", json.dumps({"speed": measured.summary()}))
    assert all(v > 0 for v in reg["speed"]["ns_per_byte"].values())


def test_under_a_quota_a_run_held_back_is_not_taken_for_the_speed():
    files = {"F16": (Path("/m/F16.gguf"), 1, 1)}
    rows = [{"model_filename": "/m/F16.gguf", "n_gen": 1, "n_prompt": 0, "samples_ns": [9e6, 90e6, 10e6, 80e6]}]
    assert speed_mod._token_ns(rows, files, window_ns=20e6) == {"F16": 9e6}          # a run fit in the window
    held = [{"model_filename": "/m/F16.gguf", "n_gen": 1, "n_prompt": 0, "samples_ns": [90e6, 110e6]}]
    assert speed_mod._token_ns(held, files, window_ns=20e6, running=0.2) == {"F16": pytest.approx(20e6)}


def test_a_type_not_measured_takes_the_nearest_measured_one():
    s = speed()
    assert s.per_byte("Q4_1") == s.per_byte("Q4_K") and s.per_byte("BF16") == s.per_byte("F16")
    assert s.per_byte("Q5_K") in (s.per_byte("Q4_K"), s.per_byte("Q6_K"))


@pytest.mark.parametrize("bad", [
    None, "fast", {"ns_per_byte": {"F16": float("nan")}, "layer_ns": 1, "threads": 1, "cpus": 1},
    {"ns_per_byte": {"F16": 0.1}, "layer_ns": 1, "threads": True, "cpus": 1},
    {"ns_per_byte": {"F16": 0.1}, "layer_ns": 1e30, "threads": 1, "cpus": 1},
    {"ns_per_byte": {"\x1b[31m": 0.1}, "layer_ns": 1, "threads": 1, "cpus": 1},
    {"ns_per_byte": {"F16": 0.1}, "layer_ns": 1, "threads": 1, "cpus": 0},
])
def test_an_announced_speed_that_is_not_sane_is_no_speed(bad):
    assert DeviceSpeed.from_summary(bad) is None


def test_an_announcement_is_checked_before_placement_reads_it():
    good = announced({"host": {"id": "host1", "name": "pi", "mem_available_mib": 4000},
                      "speed": speed().summary(), "memory_offered_mib": 3000})
    assert (good.host_id, good.host_name, good.mem_available_mib, good.offer_mib) == ("host1", "pi", 4000, 3000)
    assert good.speed == DeviceSpeed.from_summary(speed().summary())
    bad = announced({"host": {"id": "a\nb", "mem_available_mib": -1}, "speed": "x", "memory_offered_mib": True})
    assert bad == announced({})


def test_the_speed_cache_is_keyed_by_what_changes_the_speed(tmp_path):
    binary = tmp_path / "llama-bench"
    binary.write_text("#!/bin/sh\n")
    key = speed_mod.cache_key(binary, 2, False, 2.0, "h0", speed_mod.DEFAULT_TYPES)
    assert key != speed_mod.cache_key(binary, 1, False, 2.0, "h0", speed_mod.DEFAULT_TYPES)
    assert key != speed_mod.cache_key(binary, 2, False, 0.5, "h0", speed_mod.DEFAULT_TYPES)
    cache = tmp_path / "speed.json"
    speed_mod.store(cache, key, speed())
    assert speed_mod.cached(cache, key) == DeviceSpeed.from_summary(speed().summary())
    cache.write_text("{not json")
    assert speed_mod.cached(cache, key) is None


# ---------------------------------------------------------------- host identity

def test_the_host_id_is_the_kernels_unless_one_is_given(monkeypatch):
    ident, source = host.host_id()
    assert source == "boot id" and ident.startswith("boot-")
    assert host.host_id("host3") == ("host3", "SYNAPTICLLAMAS_HOST_ID")
    assert host.threads_for(0.2) == 1 and host.threads_for(1.0) == 1 and host.threads_for(1.5) == 2


def test_a_loopback_backend_is_on_this_host():
    assert is_loopback("127.0.0.1:50052") and is_loopback("[::1]:50052") and not is_loopback("10.0.0.2:50052")


def test_the_benchmark_models_are_sparse_files_the_gguf_reader_sizes(tmp_path):
    from synapticllamas.llama import bench_model

    path = tmp_path / "q.gguf"
    layers = bench_model.write(path, "Q4_K", 3)
    layout = read_layout(path)
    assert sum(layout.layer_bytes) - 3 * 2 * 4 * 1024 == layers    # the norms are f32, the rest q4_K
    assert path.stat().st_blocks * 512 < 1 << 20 < path.stat().st_size
    assert json.dumps(layout.layer_types[0]) == json.dumps({"F32": 8192, "Q4_K": layers // 3})
    sys.modules.pop("big_model", None)


def test_a_fast_device_is_timed_over_more_runs_than_a_slow_share():
    runs_for = speed_mod.runs_for
    # back-to-back runs on a full core need many to miss a burst of other work; a fifth of a core
    # spreads its few over its quota's periods, and its benchmark takes no longer than before
    assert [runs_for(c, 1) for c in (0.1, 0.2, 0.5, 1.0, 2.0)] == [5, 5, 10, 20, 20]
    assert runs_for(4.0, 8) == 10 and runs_for(8.0, 8) == 20
