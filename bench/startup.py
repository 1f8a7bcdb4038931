#!/usr/bin/env python3
"""Start-up figures for docs/PERFORMANCE.md: time to the first prompt, and a piped `status`.

    .venv/bin/python bench/startup.py [--runs 20] [--against DIR]

Each figure is the median (and max) of N runs, next to `python3 -c pass` measured in the same run
as the floor no Python program can beat on this machine. `--against DIR` also times another
checkout of the project (e.g. `git worktree add /tmp/before <commit>`), interleaved run by run
with this one, so a change is compared with what it changed in the same conditions.
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
    ap.add_argument("--against", metavar="DIR", help="another checkout to time in the same run")
    args = ap.parse_args()
    runs = args.runs
    import pexpect

    tmp = Path(tempfile.mkdtemp())
    env = shell_env(tmp, TERM="xterm")
    py = sys.executable

    def floor() -> None:
        subprocess.run([py, "-c", "pass"], check=True, env=env)

    def first_prompt(root: Path = ROOT) -> float:
        t0 = time.perf_counter()
        child = pexpect.spawn(py, [str(root / "main.py"), "--distributed"], env=env_for(root), cwd=str(root),
                              encoding="utf-8", timeout=30, dimensions=(40, 140))
        child.expect("SynapticLlamas>")
        elapsed = time.perf_counter() - t0
        child.sendcontrol("d")   # not timed: leaving is not part of start-up
        child.expect(pexpect.EOF)
        return elapsed

    def piped(root: Path = ROOT) -> None:
        subprocess.run([py, str(root / "main.py"), "--distributed"], input="status\nexit\n", text=True,
                       capture_output=True, check=True, env=env_for(root), cwd=root)

    def env_for(root: Path) -> dict[str, str]:
        # another checkout: its package first on the path (the venv's editable install is this one)
        return env if root == ROOT else {**env, "PYTHONPATH": str(root)}

    other = Path(args.against).resolve() if args.against else None
    first_prompt()  # warm the page cache and __pycache__ once
    if other:
        first_prompt(other)
    rows = []
    checks = [("python3 -c pass (floor)", floor, None), ("main.py --distributed -> first prompt", first_prompt, None),
              ("printf 'status\\nexit\\n' | main.py --distributed", piped, None)]
    if other:
        checks[1:] = [("main.py --distributed -> first prompt", first_prompt, first_prompt),
                      ("printf 'status\\nexit\\n' | main.py --distributed", piped, piped)]
    for name, fn, against in checks:
        if against is None or other is None:
            samples = timed(fn, runs)
            rows.append((name, statistics.median(samples), max(samples)))
            continue
        ours, theirs = [], []
        for _ in range(runs):                 # interleaved: both see the same machine
            ours += timed(fn, 1)
            theirs += timed(lambda a=against: a(other), 1)
        rows.append((f"{name} ({other.name})", statistics.median(theirs), max(theirs)))
        rows.append((f"{name} (this tree)", statistics.median(ours), max(ours)))
    base = rows[0][1]
    print(f"runs per row: {runs}; python {sys.version.split()[0]}; {os.cpu_count()} cores")
    print("| what | median | max | median / floor |")
    print("|---|---|---|---|")
    for name, med, mx in rows:
        print(f"| {name} | {med * 1000:.0f} ms | {mx * 1000:.0f} ms | {med / base:.1f}x |")


if __name__ == "__main__":
    main()
