"""What the one decoder costs a reader: events/schema.py's decode_event() against json.loads() alone
(what the dashboard did before), same events, same run.

Events are what the publisher sends: a raw llama.cpp line (the bulk of any stream), a node
heartbeat (typed details: an address through the parser), the registry heartbeat with ten
backends, and a coordinator start with its placement and device buffers.

    .venv/bin/python bench/decode.py [--seconds 2] [--runs 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from synapticllamas.events.observer import Observer
from synapticllamas.events.publisher import encode
from synapticllamas.events.schema import decode_event


def samples() -> dict[str, bytes]:
    obs = Observer(max_events=100, sampling=False)
    devices = [{"name": "CPU", "description": "AMD EPYC 7B13", "total_mib": 24105, "free_mib": 24000}]
    backends = [{"address": f"10.0.0.{i}:50052", "state": "up", "latency_ms": 0.4, "failures": 0, "local": False,
                 "in_use": True} for i in range(10)]
    events = {
        "raw/log": obs.emit("raw", "log", "0.00.214.841 I load_tensors: RPC0[127.0.0.1:51101] model buffer size = "
                            "33.82 MiB", {"source": "llama-server", "stream": "stderr", "pid": 4242, "kind": "buffer"}),
        "node/heartbeat": obs.emit("node", "heartbeat", "rpc_backend_connect on 10.0.0.5:50052",
                                   {"address": "10.0.0.5:50052", "state": "up", "rpc_pid": 77, "uptime_s": 12.5,
                                    "cache_bytes": 123456789, "memory_offered_mib": 2048, "interval_s": 30,
                                    "restarts": 0, "devices": devices}),
        "rpc_registry/heartbeat": obs.emit("rpc_registry", "heartbeat", "rpc_backend_connect on rpc_registry",
                                           {"backends": backends, "total_configured": 10, "total_active": 10,
                                            "interval_s": 30}),
        "coordinator/start": obs.emit("coordinator", "start", "llama.cpp coordinator started", {
            "state": "running", "port": 18080, "rpc_backends": [b["address"] for b in backends[:3]], "load_s": 2.5,
            "devices": {b["address"]: {"total_mib": 24105, "free_mib": 24000, "model_mib": 33.8, "kv_mib": 6.0,
                                       "compute_mib": 29.1} for b in backends[:3]},
            "placement": [{"address": b["address"], "offered_mib": 2048, "layers": 10} for b in backends[:3]]}),
    }
    return {name: encode(ev) for name, ev in events.items() if ev is not None}


def rate(fn, payload: bytes, seconds: float) -> float:
    n, start = 0, time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        for _ in range(200):
            fn(payload)
        n += 200
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds per measurement")
    parser.add_argument("--runs", type=int, default=3, help="runs per event kind (the median is shown)")
    args = parser.parse_args()
    print("| event | bytes | json.loads (baseline) | decode_event | ratio |")
    print("|---|---|---|---|---|")
    for name, payload in samples().items():
        base = statistics.median(rate(json.loads, payload, args.seconds) for _ in range(args.runs))
        checked = statistics.median(rate(decode_event, payload, args.seconds) for _ in range(args.runs))
        print(f"| {name} | {len(payload)} | {base:,.0f}/s | {checked:,.0f}/s | {checked / base:.2f}x |")


if __name__ == "__main__":
    main()
