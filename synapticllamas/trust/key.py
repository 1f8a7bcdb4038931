"""The cluster key: 256 random bits every machine of one cluster holds, and the keys made from it.

`python3 main.py cluster init` writes it as 64 hex digits to $XDG_CONFIG_HOME/synapticllamas/cluster.key
(mode 0600). Shells, nodes, the dashboard and the viewer find it through the `cluster_key_file`
setting (--cluster-key-file, SYNAPTICLLAMAS_CLUSTER_KEY_FILE, the config file, else that default
path). The key itself is never printed; `id` (a hash of it) lets two machines be compared.

Each use gets its own key, derived with HMAC-SHA256 under a label, so a key that leaks from one use
(the PSK file stunnel reads, a dashboard token in a browser's history) says nothing about another.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KEY_BYTES = 32
FILE_NAME = "cluster.key"
LABEL = b"synapticllamas/v1/"


class ClusterKeyError(ValueError):
    """The key file cannot be used; one line for the user."""


@dataclass(frozen=True)
class ClusterKey:
    secret: bytes = b""
    path: str = ""

    def derive(self, purpose: str) -> bytes:
        """The key for one use: announcements, link, dashboard."""
        return hmac.new(self.secret, LABEL + purpose.encode(), hashlib.sha256).digest()

    @property
    def id(self) -> str:
        """Eight hex digits that name this key without revealing it (same key, same id)."""
        return self.derive("id").hex()[:8]

    def __repr__(self) -> str:          # never the secret, also not in a traceback or a log
        return f"ClusterKey(id={self.id}, path={self.path!r})"


def default_path() -> Path:
    from synapticllamas.config import xdg_dir

    return xdg_dir("config") / FILE_NAME


def read(path: str | os.PathLike[str]) -> ClusterKey:
    """The key in `path`, or ClusterKeyError saying why not (missing, readable by others, not a key)."""
    where = Path(path)
    try:
        fd = os.open(where, os.O_RDONLY)
        try:
            info = os.fstat(fd)
            data = os.read(fd, 4096)
        finally:
            os.close(fd)
    except FileNotFoundError:
        raise ClusterKeyError(f"cluster key {where}: no such file; make one with `python3 main.py cluster init` "
                        "and copy it to every machine") from None
    except OSError as exc:
        raise ClusterKeyError(f"cluster key {where}: cannot read it ({exc.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise ClusterKeyError(f"cluster key {where}: not a regular file")
    if info.st_mode & 0o077:
        raise ClusterKeyError(f"cluster key {where} is readable by others (mode {stat.S_IMODE(info.st_mode):04o}); "
                        f"chmod 600 {where}")
    text = data.decode("ascii", "replace").strip()
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        secret = b""
    if len(secret) != KEY_BYTES:
        raise ClusterKeyError(f"cluster key {where}: not a key made by `cluster init` (expected {KEY_BYTES * 2} hex "
                        "digits on one line)")
    return ClusterKey(secret, str(where))


def load(path: str | None, explicit: bool) -> ClusterKey | None:
    """The configured key. A path given on purpose (flag, env, config file) must hold a key; the
    default path may be absent (then there is no key: an insecure cluster)."""
    if path is None:
        return None
    if not explicit and not Path(path).exists():
        return None
    return read(path)


def from_settings(settings: Any) -> ClusterKey | None:
    """The key the settings point at (ClusterKeyError when a path given on purpose holds none)."""
    return load(settings.cluster_key_file, explicit=settings.source("cluster_key_file") != "default")


def create(path: str | os.PathLike[str], force: bool = False) -> ClusterKey:
    """Write a new random key to `path` (0600, parent directory made 0700). Refuses to replace an
    existing file unless `force`: every machine of the cluster holds the old one."""
    where = Path(path)
    if where.exists() and not force:
        raise ClusterKeyError(f"cluster key {where} already exists; every machine of the cluster holds it. "
                        "Replace it with --force (then copy the new one to every machine)")
    where.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    secret = secrets.token_bytes(KEY_BYTES)
    tmp = where.with_name(f".{where.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, (secret.hex() + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, where)               # a reader never sees half a key
    return ClusterKey(secret, str(where))
