"""bench/big_model.py writes a model the real llama-server loads, and rpc-server caches its big tensors.

A small variant (2 layers of width 1024, f32: 10.5 MiB feed-forward matrices above the cache
threshold, 4 MiB attention matrices below it), so the test takes seconds.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from llama_run import LlamaServer, start_rpc_server
from llama_support import llama_binaries
from support import ROOT, free_port, wait_for


def big_model():
    spec = importlib.util.spec_from_file_location("big_model", ROOT / "bench" / "big_model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["big_model"] = module          # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


def complete(port: int, prompt: str, n: int) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/completion", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"prompt": prompt, "n_predict": n}).encode())
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def cache_files(cache: Path) -> dict[str, int]:
    rpc = cache / "rpc"
    return {f.name: f.stat().st_size for f in rpc.iterdir()} if rpc.exists() else {}


@pytest.mark.llama
def test_the_generated_model_loads_and_its_big_tensors_are_cached_by_rpc_server(tmp_path):
    llama_server, rpc_server, _ = llama_binaries()
    bm = big_model()
    info = bm.write_model(tmp_path / "small.gguf", n_layers=2, width=1024, ffn=2688, dtype="f32")
    assert info.path.stat().st_size >= info.tensor_bytes
    assert Counter(info.cacheable.values()) == {1024 * 2688 * 4: 6}      # the ffn matrices, and nothing else

    # standard mode: it loads, and answers a completion (the tokenizer and the graph work)
    with LlamaServer(llama_server, info.path, tmp_path / "standard.log") as llama:
        llama.wait_healthy(60)
        assert complete(llama.port, "Hello, world", 4)["tokens_predicted"] == 4

    # over one rpc-server with its cache: exactly the tensors above the threshold are written to it
    cache = tmp_path / "cache"
    port = free_port()
    rpc, out, banner = start_rpc_server(subprocess.Popen, rpc_server, "127.0.0.1", port,
                                        env={**os.environ, "LLAMA_CACHE": str(cache)}, cache=True)
    try:
        assert banner["cache"] == str(cache / "rpc")
        with LlamaServer(llama_server, info.path, tmp_path / "cold.log", rpc=[f"127.0.0.1:{port}"]) as llama:
            llama.wait_healthy(60)
        cold = cache_files(cache)
        assert Counter(cold.values()) == Counter(info.cacheable.values()), out.text()
        wait_for(lambda: sum("[set_tensor] saved to" in line for line in out.lines) == len(info.cacheable), 10,
                 what="rpc-server to say it saved each big tensor")

        # a second load finds every one of them in the cache: nothing new is written
        saved_before = len(out.lines)
        with LlamaServer(llama_server, info.path, tmp_path / "warm.log", rpc=[f"127.0.0.1:{port}"]) as llama:
            llama.wait_healthy(60)
            assert complete(llama.port, "Hello, world", 2)["tokens_predicted"] == 2
        assert not [line for line in out.lines[saved_before:] if "saved to" in line]
        assert cache_files(cache) == cold
    finally:
        rpc.terminate()
        rpc.wait(10)


@pytest.mark.llama
def test_a_tensor_of_exactly_the_threshold_is_not_cached(tmp_path):
    """The rule big_model.py's sizes rely on: strictly more than 10 MiB."""
    llama_server, rpc_server, _ = llama_binaries()
    bm = big_model()
    info = bm.write_model(tmp_path / "edge.gguf", n_layers=1, width=1024, ffn=2560, dtype="f32")
    assert max(info.tensors.values()) == bm.RPC_CACHE_THRESHOLD == 10 * 1024 * 1024
    cache = tmp_path / "cache"
    port = free_port()
    rpc, out, _ = start_rpc_server(subprocess.Popen, rpc_server, "127.0.0.1", port,
                                   env={**os.environ, "LLAMA_CACHE": str(cache)}, cache=True)
    try:
        with LlamaServer(llama_server, info.path, tmp_path / "edge.log", rpc=[f"127.0.0.1:{port}"]) as llama:
            llama.wait_healthy(60)
    finally:
        rpc.terminate()
        rpc.wait(10)
    assert cache_files(cache) == {}, out.text()


def test_the_command_line_writes_the_model_and_refuses_a_bad_width(tmp_path):
    out = tmp_path / "cli.gguf"
    ok = subprocess.run([sys.executable, str(ROOT / "bench" / "big_model.py"), str(out), "--layers", "1", "--width", "256"],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith(f"{out}: llama, 1 layers of width 256") and out.stat().st_size > 0
    bad = subprocess.run([sys.executable, str(ROOT / "bench" / "big_model.py"), str(tmp_path / "x.gguf"), "--width", "1000"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip() == "big_model: width must be a positive multiple of 128"
