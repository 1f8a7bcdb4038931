"""How fast a device computes a token, measured through llama.cpp itself (llama-bench), cached.

Why llama-bench: it ships with the same build as llama-server and rpc-server, so the kernels it
times are the ones that will run, with the same threads and the same CPU features; timing a graph
of our own would need ggml bindings and would measure something near, not the thing. What it
runs: one generated model per tensor type (llama/bench_model.py, sparse files that cost nothing
to make: about 96 MiB of layers, read into memory, not mapped), and one of many tiny layers for the
fixed cost of a layer. 96 MiB because the weights must stream from memory as a real model's do: on
this machine a model of up to ~50 MiB ran twice as fast per byte (it stayed in the CPU's cache), and
from ~60 MiB on the speed per byte stayed the same up to 250 MiB. Each model generates a token,
RUNS times; the fastest run is kept (the least disturbed by other work on the
machine). Twenty, not two: on a full core a token of these models takes 5-10 ms, so two runs fall
within one burst of other work. bench/speed_noise.py, 8 benchmarks in a row each way: f16 61 % ->
24 % apart, q8_0 51 % -> 27 %, q6_K 55 % -> 26 %, q4_K 35 % -> 33 %, the smallest figures lower too.
What is left is per process (the memory the models landed in), not per run: the chooser treats
plans predicted within 10 % as equal (llama/chooser.py SAME_WITHIN). 0.7-0.9 s on a full core.

Under a CPU quota (a cgroup's cpu.cfs_quota_us, a container's limit) what is wanted is the speed
of the device when it is not at its quota (the cost model applies the quota itself, llama/cost.py).
So each run is one token: a token that takes less CPU than the quota allows per period runs whole
in some of the runs, and the fastest is the device's speed. A small share spreads its runs over its
periods by itself, so it needs fewer of them (runs_for: from 5 at a fifth of a core to 20 at a core
per thread), and its benchmark takes no longer than before. A token longer
than that is held back in every run; then the mean run is scaled to the share of the benchmark
the cgroup let run (its cpu.stat's throttled time).

What comes out (DeviceSpeed): nanoseconds per byte of weights for each type, and nanoseconds per
layer per token (norms, attention, the thread pool's barriers). A stage's time per token is then
layers x layer_ns + its weights' bytes x ns_per_byte: decoding reads every weight once per token.

rpc-server computes with the CPU backend's plain buffers, llama-server's own CPU with its weight
repacking (extra buffer types): the two are measured apart (`repack`). If repacking crashes
llama.cpp on this CPU (it did here: a build whose AMX kernels die of SIGILL on batches of 2 and
more), the measurement is repeated without it and `repack_failed` says how it died; llama-server
then runs with --no-repack (llama/planner uses it).

Results are cached (a JSON file) under a key of everything that changes them: the llama-bench
binary (path, size, mtime), threads, repacking, the CPU share, the host id and the types. Nothing
is measured twice while none of these changes.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from synapticllamas.util.processes import describe_exit, spawn

VERSION = 3                        # 3: more runs on a fast device; 2: a floor on ns per byte, GOMP_SPINCOUNT
# the types of the models people run (f16, q8_0, q4_K_M = q4_K + q6_K); another type takes the
# nearest of these by bits per weight (on this machine q4_1 and q4_0 were within 10 % of q4_K)
DEFAULT_TYPES = ("F16", "Q8_0", "Q6_K", "Q4_K")
TARGET_BYTES = 96 * 2**20          # each type's model: about this much of layer weights
OVERHEAD_LAYERS = 16               # the fixed-cost model: many tiny layers
OVERHEAD_WIDTH, OVERHEAD_FFN = 128, 256
RUNS = 20                          # one token each; on a full core (see above)
QUOTA_RUNS = 5                     # the fewest, at a small CPU share (its runs spread over periods)
TIMEOUT = 60.0                     # a very slow machine: give up rather than hang a start
BYTES_SHARE = 0.5                  # at least this share of a type model's token is its bytes' (solve())
CACHE_ENTRIES = 32
# bits per weight, to stand in for a type that was not measured by the nearest one that was
_BPW = {"F32": 32, "F16": 16, "BF16": 16, "Q8_0": 8.5, "Q6_K": 6.56, "Q5_1": 6, "Q5_0": 5.5, "Q5_K": 5.5,
        "Q4_1": 5, "Q4_0": 4.5, "IQ4_NL": 4.5, "Q4_K": 4.5, "IQ4_XS": 4.25, "Q3_K": 3.44, "Q2_K": 2.63}


def runs_for(cpus: float, threads: int) -> int:
    """How many single-token runs per model: more on a device whose runs come back to back."""
    share = min(1.0, cpus / max(1, threads))
    return max(QUOTA_RUNS, min(RUNS, round(RUNS * share)))


class SpeedError(RuntimeError):
    """The benchmark could not run; one line."""


@dataclass(frozen=True)
class DeviceSpeed:
    ns_per_byte: dict[str, float]      # generation: per byte of weights of each type
    layer_ns: float                    # per layer per token, whatever its size
    threads: int
    cpus: float                        # the CPU share when measured (cgroup quota, affinity)
    repack: bool                       # measured with llama.cpp's weight repacking
    repack_failed: str | None = None   # repacking crashed llama.cpp: how (then measured without)
    seconds: float = 0.0               # how long the benchmark took
    measured_at: float = field(default_factory=time.time)

    def per_byte(self, kind: str) -> float:
        """ns per byte for a tensor type; a type not measured takes the nearest measured one (by bits
        per weight; quantised types never stand in for f16/f32 and the other way round)."""
        kind = kind.upper()
        if kind in self.ns_per_byte:
            return self.ns_per_byte[kind]
        bits = _BPW.get(kind, 4.5)
        plain = bits >= 16
        pool = [k for k in self.ns_per_byte if (_BPW.get(k, 4.5) >= 16) == plain] or list(self.ns_per_byte)
        nearest = min(pool, key=lambda k: abs(_BPW.get(k, 4.5) - bits))
        return self.ns_per_byte[nearest]

    def seconds_for(self, bytes_by_type: dict[str, int], layers: int) -> float:
        """Time per token of a stage holding these weights and this many layers."""
        ns = layers * self.layer_ns + sum(n * self.per_byte(kind) for kind, n in bytes_by_type.items())
        return ns / 1e9

    def summary(self) -> dict[str, Any]:
        return {"ns_per_byte": {k: float(f"{v:.5g}") for k, v in self.ns_per_byte.items()},  # never rounded to 0
                "layer_ns": round(self.layer_ns, 1), "threads": self.threads, "cpus": round(self.cpus, 3),
                "repack": self.repack, "repack_failed": self.repack_failed, "seconds": round(self.seconds, 2),
                "measured_at": round(self.measured_at, 1)}

    @classmethod
    def from_summary(cls, raw: Any) -> DeviceSpeed | None:
        """From what a node announced (untrusted): None unless every figure is a sane number."""
        if not isinstance(raw, dict) or not isinstance(raw.get("ns_per_byte"), dict):
            return None
        per_byte: dict[str, float] = {}
        for kind, value in list(raw["ns_per_byte"].items())[:32]:
            if isinstance(kind, str) and kind.upper() in _BPW and _number(value, 1e-6, 1e6):
                per_byte[kind.upper()] = float(value)
        layer_ns, threads, cpus = raw.get("layer_ns"), raw.get("threads"), raw.get("cpus")
        if not per_byte or not isinstance(layer_ns, (int, float)) or not isinstance(cpus, (int, float)) \
                or not _number(layer_ns, 0, 1e9) or not _number(cpus, 1e-3, 4096):
            return None
        if not isinstance(threads, int) or isinstance(threads, bool) or not 1 <= threads <= 4096:
            return None
        failed = raw.get("repack_failed")
        seconds, measured = raw.get("seconds"), raw.get("measured_at")
        return cls(per_byte, float(layer_ns), threads, float(cpus), raw.get("repack") is True,
                   failed[:80] if isinstance(failed, str) else None,
                   float(seconds) if isinstance(seconds, (int, float)) and _number(seconds, 0, 1e6) else 0.0,
                   float(measured) if isinstance(measured, (int, float)) and _number(measured, 0, 1e11) else 0.0)


def _number(value: Any, lo: float, hi: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and lo <= value <= hi


# ---------------------------------------------------------------- running llama-bench

def _scratch() -> str | None:
    """Where the sparse models go: a tmpfs (/dev/shm) when there is one, where reading a hole costs
    a copy of the zero page; on a disk file system the kernel first fills the page cache with zeros
    (1 s of a fifth of a core's time here, against 0.2 s on tmpfs)."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


def _write_models(directory: Path, types: Iterable[str]) -> dict[str, tuple[Path, int, int]]:
    """kind -> (file, layer bytes, layers); "overhead" is the many-tiny-layers model."""
    from synapticllamas.llama import bench_model

    out = {}
    for kind in types:
        layers = max(1, round(TARGET_BYTES / bench_model.layer_bytes(kind)))
        path = directory / f"{kind}.gguf"
        out[kind] = (path, bench_model.write(path, kind, layers), layers)
    path = directory / "overhead.gguf"
    out["overhead"] = (path, bench_model.write(path, "F16", OVERHEAD_LAYERS, OVERHEAD_WIDTH, OVERHEAD_FFN),
                       OVERHEAD_LAYERS)
    return out


async def _run(argv: list[str], timeout: float) -> tuple[int, str, str]:
    from synapticllamas.rpc.launch import SPIN_COUNT

    # idle threads spin as briefly as rpc-server's and llama-server's do (rpc/launch.py): measured
    # as it will run, and two nodes measuring at once on one machine do not burn each other's time
    env = {**os.environ, "GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT", SPIN_COUNT)}
    proc = await spawn(argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                       stderr=asyncio.subprocess.PIPE, env=env)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except (TimeoutError, asyncio.CancelledError):
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    return proc.returncode if proc.returncode is not None else -1, out.decode("utf-8", "replace"), \
        err.decode("utf-8", "replace")


def _token_ns(results: Any, files: dict[str, tuple[Path, int, int]], window_ns: float | None = None,
              running: float = 1.0) -> dict[str, float]:
    """kind -> nanoseconds per generated token, from llama-bench's JSON: of the fastest run; under
    a quota (`window_ns` per period), of the mean run times `running` when even the fastest run
    took longer than the quota allows per period (every run was held back)."""
    by_file = {str(path): kind for kind, (path, _, _) in files.items()}
    out: dict[str, float] = {}
    for row in results if isinstance(results, list) else []:
        if not isinstance(row, dict) or not row.get("n_gen") or row.get("n_prompt"):
            continue
        kind = by_file.get(str(row.get("model_filename")))
        samples = [s for s in row.get("samples_ns") or [] if isinstance(s, (int, float)) and s > 0]
        if kind and samples:
            best = min(samples)
            if window_ns is not None and best >= window_ns:
                best = sum(samples) / len(samples) * running
            out[kind] = best / row["n_gen"]
    return out


def solve(token_ns: dict[str, float], files: dict[str, tuple[Path, int, int]]) -> tuple[dict[str, float], float]:
    """(ns per byte per type, ns per layer) from the per-token times: the f16 model and the tiny-layers
    model are two equations in the two unknowns of f16; every other type then has one unknown."""
    _, ovh_bytes, ovh_layers = files["overhead"]
    _, f16_bytes, f16_layers = files["F16"]
    t_o, t_f = token_ns["overhead"], token_ns["F16"]
    det = ovh_layers * f16_bytes - f16_layers * ovh_bytes
    layer_ns = max(0.0, (t_o * f16_bytes - t_f * ovh_bytes) / det)
    per_byte = {}
    for kind, ns in token_ns.items():
        if kind == "overhead":
            continue
        _, nbytes, layers = files[kind]
        # each type's model is built to be bound by its bytes (96 MiB, a few layers): a remainder
        # below half its time is the noise of a busy machine slowing the tiny-layers model, never
        # a type whose bytes are (nearly) free
        per_byte[kind] = max((ns - layers * layer_ns) / nbytes, BYTES_SHARE * ns / nbytes, 1e-6)
    return per_byte, layer_ns


async def measure(llama_bench: Path, threads: int, repack: bool, cpus: float, types: Iterable[str] = DEFAULT_TYPES,
                  devices: str | None = None, timeout: float = TIMEOUT,
                  runs: tuple[int, int] | None = None) -> DeviceSpeed:
    """Run the benchmark (seconds); SpeedError with one line if it cannot. `runs`: (tokens, runs)
    per model instead of runs_for's (bench/speed_noise.py compares them)."""
    from synapticllamas.util.host import quota_window_ns, throttled_ns

    types = tuple(dict.fromkeys(["F16", *(t.upper() for t in types)]))
    window = quota_window_ns()
    tokens, repeats = runs or (1, runs_for(cpus, threads))
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="synapticllamas-speed-", dir=_scratch()) as tmp:
        files = await asyncio.to_thread(_write_models, Path(tmp), types)
        models = ",".join(str(path) for path, _, _ in files.values())
        failed = None
        while True:
            argv = [str(llama_bench), "-m", models, "-n", str(tokens), "-r", str(repeats), "-t", str(threads),
                    "-o", "json", "--repack", "1" if repack else "0", "-ngl", "99" if devices else "0",
                    "-lm", "none",           # read, not mapped: a hole mapped is one shared zero page
                    "--no-warmup"]           # the fastest of the runs is kept: the first is the warm-up
            # a batch finds the crashes of repacked kernels that single tokens do not (AMX, here)
            argv += ["-p", "8"] if repack else ["-p", "0"]
            if devices:
                argv += ["-dev", devices.replace(",", "/")]
            held_before, run_started = throttled_ns(), time.monotonic()
            try:
                code, out, err = await _run(argv, max(1.0, timeout - (time.monotonic() - started)))
            except TimeoutError:
                raise SpeedError(f"llama-bench did not finish within {timeout:g}s") from None
            except OSError as exc:
                raise SpeedError(f"cannot run {llama_bench}: {exc.strerror or exc}") from None
            if code < 0 and repack:           # killed by a signal with repacking: measure without
                failed = f"llama-bench with weight repacking {describe_exit(code)}"
                repack = False
                continue
            if code != 0:
                last = (err.strip().splitlines() or ["no output"])[-1][:200]
                raise SpeedError(f"llama-bench {describe_exit(code)}: {last}")
            held_after, wall = throttled_ns(), time.monotonic() - run_started
            break
        running = 1.0
        if held_before is not None and held_after is not None and wall > 0:
            running = max(0.02, 1.0 - (held_after - held_before) / 1e9 / wall)
        try:
            token_ns = _token_ns(json.loads(out), files, window, running)
        except ValueError:
            raise SpeedError("llama-bench printed no JSON") from None
    missing = [k for k in files if k not in token_ns]
    if "F16" in missing or "overhead" in missing:
        raise SpeedError(f"llama-bench gave no timing for {', '.join(missing)}")
    per_byte, layer_ns = solve(token_ns, files)
    return DeviceSpeed(per_byte, layer_ns, threads, cpus, repack, failed, time.monotonic() - started)


# ---------------------------------------------------------------- the cache

def cache_key(llama_bench: Path, threads: int, repack: bool, cpus: float, host: str, types: Iterable[str],
              devices: str | None = None) -> str:
    try:
        st = llama_bench.stat()
        binary = f"{llama_bench.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        binary = str(llama_bench)
    return (f"v{VERSION}|{binary}|t{threads}|repack{int(repack)}|cpus{cpus:.3f}|{host}|"
            f"{','.join(sorted(t.upper() for t in types))}|{devices or 'cpu'}")


def read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def cached(path: Path, key: str) -> DeviceSpeed | None:
    return DeviceSpeed.from_summary(read_cache(path).get(key))


def store(path: Path, key: str, speed: DeviceSpeed) -> None:
    """Add one result; the oldest go beyond CACHE_ENTRIES. Written whole to a temp file, then renamed."""
    data = read_cache(path)
    data.pop(key, None)
    data[key] = speed.summary()
    while len(data) > CACHE_ENTRIES:
        data.pop(next(iter(data)))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".speed-")
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh)
        os.replace(tmp, path)
    except OSError:
        pass          # an unwritable cache costs a benchmark next time, nothing else


async def speed_of(llama_bench: Path, cache_file: Path, threads: int, repack: bool, cpus: float, host: str,
                   types: Iterable[str] = DEFAULT_TYPES, devices: str | None = None,
                   timeout: float = TIMEOUT) -> tuple[DeviceSpeed, bool]:
    """(speed, measured now?): the cached result for this key, else a new measurement, cached."""
    types = tuple(types)
    key = cache_key(llama_bench, threads, repack, cpus, host, types, devices)
    hit = cached(cache_file, key)
    if hit is not None:
        return hit, False
    speed = await measure(llama_bench, threads, repack, cpus, types, devices, timeout)
    await asyncio.to_thread(store, cache_file, key, speed)
    return speed, True
