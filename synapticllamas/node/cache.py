"""The node's rpc-server cache directory: its size, and pruning it under a limit.

rpc-server (`-c`) writes one file per large tensor under `$LLAMA_CACHE/rpc`, named by the
tensor's content hash, and never deletes any: every model ever loaded stays, until the disk is
full. The node prunes the least recently used files (by access time, falling back to modification
time) when it starts and after each model load, so the cache stays under `--cache-max-gb`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pruned:
    files: int
    bytes: int


def _entries(directory: Path) -> list[tuple[float, int, Path]]:
    out = []
    try:
        with os.scandir(directory) as it:
            for entry in it:
                try:
                    if entry.is_file(follow_symlinks=False):
                        st = entry.stat(follow_symlinks=False)
                        out.append((max(st.st_atime, st.st_mtime), st.st_size, Path(entry.path)))
                except OSError:       # removed meanwhile
                    continue
    except FileNotFoundError:
        return []
    return out


def size(directory: Path) -> int:
    """Bytes in the cache (0 when it does not exist yet). Raises OSError when it cannot be read
    (PermissionError...): the caller says so and carries on."""
    return sum(n for _, n, _ in _entries(directory))


def prune(directory: Path, max_bytes: int) -> Pruned:
    """Delete the least recently used files until the cache holds at most max_bytes."""
    entries = sorted(_entries(directory))
    total = sum(n for _, n, _ in entries)
    files = freed = 0
    for _, n, path in entries:
        if total <= max_bytes:
            break
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError:
            continue
        total -= n
        freed += n
        files += 1
    return Pruned(files, freed)


def check_writable(directory: Path) -> str | None:
    """None when rpc-server will be able to write its cache there, else the reason (one line)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"cannot create it ({exc.strerror or exc})"
    if not os.access(directory, os.W_OK | os.X_OK):
        return "it is not writable"
    probe = directory / f".synapticllamas-write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        return f"cannot write to it ({exc.strerror or exc})"
    return None
