#!/usr/bin/env python3
"""Start-up figures for docs/PERFORMANCE.md: time to the first prompt, and a piped `status`.

    .venv/bin/python bench/startup.py [--runs 20]

Each figure is the median (and max) of N runs, next to `python3 -c pass` measured in the same run
as the floor no Python program can beat on this machine.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from support import shell_env  # noqa: E402


def timed(fn, runs: int) -> list[float]:
    """fn() returns the seconds it measured itself, or None to be timed whole."""
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        own = fn()
        out.append(own if own is not None else time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    runs = ap.parse_args().runs
    import pexpect

    tmp = Path(tempfile.mkdtemp())
    env = shell_env(tmp, TERM="xterm")
    py = sys.executable

    def floor() -> None:
        subprocess.run([py, "-c", "pass"], check=True, env=env)

    def first_prompt() -> float:
        t0 = time.perf_counter()
        child = pexpect.spawn(py, [str(ROOT / "main.py"), "--distributed"], env=env, cwd=str(ROOT),
                              encoding="utf-8", timeout=30, dimensions=(40, 140))
        child.expect("SynapticLlamas>")
        elapsed = time.perf_counter() - t0
        child.sendcontrol("d")   # not timed: leaving is not part of start-up
        child.expect(pexpect.EOF)
        return elapsed

    def piped() -> None:
        subprocess.run([py, str(ROOT / "main.py"), "--distributed"], input="status\nexit\n", text=True,
                       capture_output=True, check=True, env=env, cwd=ROOT)

    first_prompt()  # warm the page cache and __pycache__ once
    rows = []
    for name, fn in [("python3 -c pass (floor)", floor), ("main.py --distributed -> first prompt", first_prompt),
                     ("printf 'status\\nexit\\n' | main.py --distributed", piped)]:
        samples = timed(fn, runs)
        rows.append((name, statistics.median(samples), max(samples)))
    base = rows[0][1]
    print(f"runs per row: {runs}; python {sys.version.split()[0]}; {os.cpu_count()} cores")
    print("| what | median | max | median / floor |")
    print("|---|---|---|---|")
    for name, med, mx in rows:
        print(f"| {name} | {med * 1000:.0f} ms | {mx * 1000:.0f} ms | {med / base:.1f}x |")


if __name__ == "__main__":
    main()
