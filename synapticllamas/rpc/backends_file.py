"""The backends file (`rpc_backends.conf`): one HOST[:PORT] per line, `#` starts a comment.

Reading never gives up on the whole file: each bad line is reported with its number and the good
lines still load. Edits re-read the file, change only the lines concerned (comments, blank lines and
lines we cannot parse stay as the user wrote them) and replace it atomically (temp file + rename),
so a crash mid-write never leaves half a file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from synapticllamas.rpc.addresses import BackendId, parse_address

HEADER = ("# SynapticLlamas RPC backends: one HOST:PORT per line (default port 50052), '#' comments.\n"
          "# 'backends add' and 'backends remove' edit this file.\n")


@dataclass(frozen=True)
class Entry:
    line: int
    key: BackendId    # normalised address (rpc/addresses.py)


def _content(line: str) -> str:
    return line.split("#", 1)[0].strip()


def parse(text: str, path: str) -> tuple[list[Entry], list[str]]:
    """(entries, errors). An error is one line: `backends file PATH line N: reason`."""
    entries: list[Entry] = []
    errors: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        content = _content(line)
        if not content:
            continue
        try:
            entries.append(Entry(number, parse_address(content).key))
        except ValueError as exc:
            errors.append(f"backends file {path} line {number}: {exc}")
    return entries, errors


def _read_text(path: Path) -> str | None:
    """The file's text, None when it does not exist. Raises ValueError (one line) otherwise."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        raise ValueError(f"backends file {path}: not UTF-8 text") from None
    except OSError as exc:
        raise ValueError(f"backends file {path}: cannot read it ({exc.strerror})") from None


def read(path: str) -> tuple[list[Entry], list[str]]:
    """Entries and line errors of the file; a missing file is empty; an unreadable one is one error."""
    try:
        text = _read_text(Path(path))
    except ValueError as exc:
        return [], [str(exc)]
    return parse(text or "", path)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        except FileNotFoundError:
            pass
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _target(path: str) -> Path:
    # Edit the file a symlink points to, not the link itself (os.replace would replace the link).
    return Path(os.path.realpath(Path(path).expanduser()))


def append(path: str, key: str) -> None:
    """Add one address line. Raises ValueError (one line) when the file cannot be read or written."""
    target = _target(path)
    text = _read_text(target)
    if text is None:
        text = HEADER
    elif text and not text.endswith("\n"):
        text += "\n"
    try:
        _write_atomic(target, text + key + "\n")
    except OSError as exc:
        raise ValueError(f"cannot save backends file {path}: {exc.strerror or exc}") from None


def remove(path: str, key: str) -> int:
    """Delete the lines holding `key` (in any spelling that normalises to it); returns how many."""
    target = _target(path)
    text = _read_text(target)
    if text is None:
        return 0
    kept: list[str] = []
    removed = 0
    for line in text.splitlines(keepends=True):
        content = _content(line)
        try:
            same = bool(content) and parse_address(content).key == key
        except ValueError:
            same = False
        if same:
            removed += 1
        else:
            kept.append(line)
    if removed:
        try:
            _write_atomic(target, "".join(kept))
        except OSError as exc:
            raise ValueError(f"cannot save backends file {path}: {exc.strerror or exc}") from None
    return removed
