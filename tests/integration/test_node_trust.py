"""`main.py node` and the cluster key: what it refuses before starting anything, each in one line.
(Serving behind the link, signing, and --insecure on a real address: tests/e2e/test_cluster_trust.py
and tests/e2e/test_cluster_nodes.py, on simulated hosts.)"""
from __future__ import annotations

import os
import subprocess

from support import PYTHON, ROOT, shell_env

from synapticllamas.trust.key import create


def node(tmp, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, str(ROOT / "main.py"), "node", "--redis-url", "redis://127.0.0.1:1", *args],
                          capture_output=True, text=True, timeout=30, cwd=ROOT, env=shell_env(tmp, **env))


def test_beyond_loopback_without_a_key_is_refused_and_says_how_to_make_one(tmp_path):
    done = node(tmp_path, "--host", "10.9.9.9")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [
        "Error: rpc-server would listen on 10.9.9.9 with no authentication, and there is no cluster key "
        f"({tmp_path}/config/synapticllamas/cluster.key): make one with `python3 main.py cluster init` on one "
        "machine and copy it to every other, or add --insecure on a network you trust"], done.stderr


def test_a_key_file_others_can_read_or_that_is_missing_is_refused(tmp_path):
    key = tmp_path / "config" / "synapticllamas" / "cluster.key"
    create(key)
    os.chmod(key, 0o644)
    done = node(tmp_path, "--host", "10.9.9.9")
    assert done.returncode == 2
    assert done.stderr.strip() == f"Error: cluster key {key} is readable by others (mode 0644); chmod 600 {key}"
    done = node(tmp_path, "--host", "10.9.9.9", "--cluster-key-file", str(tmp_path / "elsewhere.key"))
    assert done.returncode == 2 and "elsewhere.key: no such file; make one with `python3 main.py cluster init`" \
        in done.stderr and done.stderr.count("\n") == 1


def test_without_stunnel_a_keyed_node_names_the_package(tmp_path):
    create(tmp_path / "config" / "synapticllamas" / "cluster.key")
    done = node(tmp_path, "--host", "10.9.9.9", PATH=str(tmp_path / "empty"))
    assert done.returncode == 1
    assert done.stderr.strip() == ("Error: stunnel is not installed (the encrypted RPC links need it): "
                                   "apt-get install stunnel4"), done.stderr
