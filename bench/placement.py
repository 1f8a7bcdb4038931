#!/usr/bin/env python3
"""Placement figures for docs/PERFORMANCE.md: what the plan says each backend holds, next to what
llama-server really allocated (its `RPC[...] model / KV / compute buffer size` lines).

    .venv/bin/python bench/placement.py [--ctx 2048]

Real: three local ggml-rpc-servers (LocalBackends.spawn with --memory, what `backends spawn 3
--memory ...` runs), llama-server and the demo model, for the splits 1:1:1 and 2:1:1. The
baseline is llama.cpp itself: each planned figure is shown as a ratio of the actual one.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
from support import free_port  # noqa: E402

from synapticllamas.app import App  # noqa: E402
from synapticllamas.config import load_settings  # noqa: E402
from synapticllamas.ui import PlainUI  # noqa: E402


async def measure(tmp: Path, memory: list[int], ctx: int) -> list[dict]:
    config = tmp / "config.toml"
    config.write_text("")
    settings = load_settings({}, env={}, config_path=str(config)).replace(
        distributed=True, backends_file=str(tmp / "backends.conf"), coordinator_port=free_port(),
        coordinator_args="-t 1", coordinator_ctx_size=ctx, rpc_backend_heartbeat=False, placement="memory",
        history_file=str(tmp / "history"), log_file=str(tmp / "log"))
    app = App(settings, PlainUI(io.StringIO()))      # what the commands would print is not measured
    await app.start()
    try:
        await app.local_backends.spawn(3, memory=memory)
        status = await app.coordinator.start()
        return [b for b in (app.coordinator.status()["placement"] or []) if b["address"] in status["backends"]]
    finally:
        await app.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", type=int, default=2048)
    ctx = ap.parse_args().ctx
    print(f"demo model, -c {ctx}, three local backends; planned / actual MiB (ratio)\n")
    print("| split | backend | layers | model | KV | compute | total |")
    print("|---|---|---|---|---|---|---|")
    worst = 0.0
    for memory in ([100, 100, 100], [200, 100, 100]):
        with tempfile.TemporaryDirectory() as tmp:
            rows = asyncio.run(measure(Path(tmp), memory, ctx))
        label = ":".join(str(m // 100) for m in memory)
        for i, b in enumerate(rows):
            cells = []
            for kind in ("model", "kv", "compute"):
                planned, actual = b[f"planned_{kind}_mib"], b[f"{kind}_mib"]
                cells.append(f"{planned:.1f} / {actual:.1f} ({planned / actual:.2f}x)" if actual else f"{planned:.1f} / -")
            planned = b["planned_model_mib"] + b["planned_kv_mib"] + b["planned_compute_mib"]
            actual = b["model_mib"] + b["kv_mib"] + b["compute_mib"]
            worst = max(worst, abs(planned / actual - 1))
            layers = f"{b['layers'][0]}-{b['layers'][1]}" if b["layers"] else "-"
            print(f"| {label} | #{i + 1} | {layers}{' + out' if b['output_layer'] else ''} | {cells[0]} | {cells[1]} | "
                  f"{cells[2]} | {planned:.1f} / {actual:.1f} ({planned / actual:.2f}x) |")
    print(f"\nlargest difference of a backend's planned total from its actual total: {worst * 100:.1f} %")


if __name__ == "__main__":
    main()
