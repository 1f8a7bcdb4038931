"""Placement, without llama.cpp: the GGUF layout reader, llama.cpp's layer assignment, the fit
check and its one-line refusal. The real allocations are compared in
tests/integration/test_placement.py and bench/placement.py."""
import sys
from pathlib import Path

import pytest

from synapticllamas.llama.gguf_layout import GGUFError, read_layout
from synapticllamas.llama.placement import MiB, Offer, assign_layers, plan

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo():
    from synapticllamas.llama.binaries import demo_model

    return read_layout(demo_model())


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "bench"))
    from big_model import write_model

    path = tmp_path_factory.mktemp("model") / "small.gguf"
    write_model(path, n_layers=3, width=256, ffn=512, dtype="f16", seed=3)
    return path


def test_the_layout_reader_agrees_with_the_gguf_package(small_model):
    from gguf import GGUFReader

    layout = read_layout(small_model)
    reader = GGUFReader(small_model)
    by_layer = [sum(int(t.n_bytes) for t in reader.tensors if t.name.startswith(f"blk.{i}.")) for i in range(3)]
    assert list(layout.layer_bytes) == by_layer
    assert layout.total_bytes == sum(int(t.n_bytes) for t in reader.tensors)
    assert layout.n_layer == 3 and layout.n_embd == 256


def test_the_demo_models_layout(demo):
    assert (demo.n_layer, demo.n_embd, demo.n_head, demo.n_head_kv, demo.key_length) == (30, 576, 9, 3, 64)
    assert demo.tied_output and round(demo.embd_bytes / MiB, 2) == 28.69     # SmolLM2 ties its embeddings
    assert demo.kv_bytes_per_layer(2048) == 1.5 * MiB                         # 24 MiB for 16 layers, as measured


def test_a_file_that_is_not_gguf_is_one_line(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00")
    with pytest.raises(GGUFError, match="ends in the middle of its header"):
        read_layout(bad)


@pytest.mark.parametrize("n_layer,split,layers,output", [
    (30, [2, 1, 1], [16, 8, 6], 2),          # measured on this build: 16/8/6, output on the last
    (30, [1, 1, 1], [11, 10, 9], 2),
    (4, [1, 1, 1], [2, 2, 0], 2),            # the last device may hold only the output layer
    (30, [1], [30], 0),
])
def test_layers_go_where_llama_cpp_puts_them(n_layer, split, layers, output):
    devices, out = assign_layers(n_layer, split)
    assert [devices.count(d) for d in range(len(split))] == layers and out == output
    assert devices == sorted(devices)        # contiguous blocks, in order


def test_offers_give_the_split_and_the_plan_follows_it(demo):
    backends = ["a:1", "b:1", "c:1"]
    placed = plan(demo, backends, {b: Offer(m, "test") for b, m in zip(backends, (200, 100, 100), strict=True)}, 2048)
    assert placed.fits and not placed.even and placed.tensor_split() == "200,100,100"
    model = [round(b.weights_mib, 2) for b in placed.backends]
    assert model == [33.82, 16.91, 41.37]          # what llama-server allocates, to the hundredth
    assert [b.kv_mib for b in placed.backends] == [24.0, 12.0, 9.0]
    assert placed.ngl == 31


def test_a_model_that_cannot_fit_is_refused_in_one_line_naming_need_and_offers(demo):
    backends = ["10.0.0.1:50052", "10.0.0.2:50052", "10.0.0.3:50052"]
    placed = plan(demo, backends, {b: Offer(30, "node") for b in backends}, 2048)
    assert not placed.fits
    line = placed.refusal()
    assert "\n" not in line and line.startswith("the model does not fit: it needs ")
    assert "but they offer 90 MiB" in line and all(f"{b} 30 MiB (node)" in line for b in backends)
    assert "--force" in line


def test_unknown_offers_split_evenly_and_say_so(demo):
    backends = ["a:1", "b:1"]
    placed = plan(demo, backends, {"a:1": Offer(4000, "test")}, 2048)
    assert placed.even and placed.tensor_split() == "1,1" and placed.fits
    assert placed.notes == ["memory of b:1 unknown: the model is split evenly"]


def test_fixed_costs_shift_the_split_when_proportions_would_overflow(demo):
    backends = ["a:1", "b:1", "c:1"]
    placed = plan(demo, backends, {b: Offer(100, "test") for b in backends}, 2048)
    assert placed.fits and all(b.need_mib <= 100 for b in placed.backends)
    assert placed.split[2] < placed.split[0]         # the output layer's device takes fewer layers
