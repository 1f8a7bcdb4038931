"""Redis that is not open to anyone: an ACL user with a password, the default user with a password
(requirepass), and TLS with a private CA. The shell, a node, the dashboard and the terminal viewer
each work against each, and a wrong password or an untrusted certificate is one line that says so.

Real servers: redis-server with a config file (the passwords stay out of `ps`) and, for TLS,
`tls-port` with certificates made here by openssl (a CA, and a server certificate it signs for
127.0.0.1). Debian's redis-server is built with TLS.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from dashboard_support import Dashboard, Node
from llama_support import tagged
from support import PYTHON, ROOT, free_port, run_piped, shell_env, stop_process, wait_for

ACL_PASSWORD = "s3cret-app"
DEFAULT_PASSWORD = "s3cret-default"


def make_certs(where: Path) -> dict[str, Path]:
    where.mkdir(parents=True, exist_ok=True)
    files = {name: where / name for name in ("ca.key", "ca.crt", "server.key", "server.csr", "server.crt", "ext")}

    def ssl(*args: str | Path) -> None:
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)

    ssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
        "-subj", "/CN=test CA", "-keyout", files["ca.key"], "-out", files["ca.crt"])
    ssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=127.0.0.1",
        "-keyout", files["server.key"], "-out", files["server.csr"])
    files["ext"].write_text("subjectAltName = IP:127.0.0.1\n")
    ssl("x509", "-req", "-in", files["server.csr"], "-CA", files["ca.crt"], "-CAkey", files["ca.key"],
        "-CAcreateserial", "-days", "2", "-extfile", files["ext"], "-out", files["server.crt"])
    return files


class ConfiguredRedis:
    """redis-server started from a config file (what a careful admin does: no secret in argv)."""

    def __init__(self, workdir: Path, lines: list[str], ping: list[str]) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        conf = workdir / "redis.conf"
        conf.write_text("\n".join([*lines, "bind 127.0.0.1", "save \"\"", "appendonly no", f"dir {workdir}"]) + "\n")
        conf.chmod(0o600)
        self.log = workdir / "redis.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([shutil.which("redis-server"), str(conf)], stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: subprocess.run(["redis-cli", *ping, "ping"], capture_output=True, text=True).stdout.strip()
                 == "PONG", 10, what=f"redis-server from {conf} (log {self.log})")

    def stop(self) -> None:
        stop_process(self.proc)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("secured-redis")
    certs = make_certs(tmp / "certs")
    acl_port, tls_port = free_port(), free_port()
    acl = ConfiguredRedis(tmp / "acl", [
        f"port {acl_port}", f"requirepass {DEFAULT_PASSWORD}",
        # an ACL user that may touch only our keys and channels
        f"user app on >{ACL_PASSWORD} ~synapticllamas:* &synapticllamas:* +@all"],
        ["-p", str(acl_port), "--user", "app", "--pass", ACL_PASSWORD, "--no-auth-warning"])
    tls = ConfiguredRedis(tmp / "tls", [
        "port 0", f"tls-port {tls_port}", f"tls-cert-file {certs['server.crt']}",
        f"tls-key-file {certs['server.key']}", f"tls-ca-cert-file {certs['ca.crt']}", "tls-auth-clients no"],
        ["-p", str(tls_port), "--tls", "--cacert", str(certs["ca.crt"])])
    yield {"acl": (f"redis://app:{ACL_PASSWORD}@127.0.0.1:{acl_port}", {}),
           "requirepass": (f"redis://:{DEFAULT_PASSWORD}@127.0.0.1:{acl_port}", {}),   # the default user
           "tls": (f"rediss://127.0.0.1:{tls_port}", {"SYNAPTICLLAMAS_REDIS_CA_FILE": str(certs["ca.crt"])})}
    acl.stop()
    tls.stop()


def client_for(url: str, env: dict[str, str]):
    import redis

    extra = {"ssl_ca_certs": env["SYNAPTICLLAMAS_REDIS_CA_FILE"]} if url.startswith("rediss") else {}
    return redis.Redis.from_url(url, decode_responses=True, **extra)


@pytest.mark.llama
@pytest.mark.parametrize("kind", ["acl", "requirepass", "tls"])
def test_shell_node_dashboard_and_viewer_all_work(servers, kind, tmp_path):
    url, env = servers[kind]
    client = client_for(url, env)
    with tagged() as tag:
        node = Node(tmp_path, url, "node", tag, **env)
        try:
            wait_for(lambda: node.registered(client), 30, what=f"the node to register ({node.log_path})")
            # the shell publishes, and its discovery (another client) finds the node
            done = run_piped("redis on\nbackends discover\nexit\n", tmp_path / "shell", "--distributed",
                             env=shell_env(tmp_path / "shell", SOLLOL_REDIS_URL=url, **env))
            assert done.returncode == 0, done.stdout + done.stderr
            assert "Redis publishing ON -> " in done.stdout, done.stdout
            assert ACL_PASSWORD not in done.stdout + done.stderr           # redacted: redis://app:***@
            assert DEFAULT_PASSWORD not in done.stdout + done.stderr
            assert "1 node announced on" in done.stdout and node.address in done.stdout, done.stdout
            journal = [json.loads(fields["event"])["event_type"] for _, fields in client.xrange("synapticllamas:events")]
            assert "redis_on" in journal and "unregister" in journal
            # the dashboard reads the journal and the nodes hash
            dashboard = Dashboard(tmp_path, url, env=env)
            try:
                status, nodes = dashboard.get("/api/nodes")
                assert status == 200 and node.address in json.dumps(nodes), nodes
                status, events = dashboard.get("/api/events?limit=50")
                assert status == 200 and "redis_on" in json.dumps(events)
            finally:
                dashboard.stop()
            # the terminal viewer replays the journal
            viewer = subprocess.run([PYTHON, str(ROOT / "main.py"), "events", "--replay", "200", "--redis-url", url],
                                    capture_output=True, text=True, timeout=30, cwd=ROOT,
                                    env=shell_env(tmp_path / "viewer", **env))
            assert viewer.returncode == 0, viewer.stderr
            assert "redis_on" in viewer.stdout and "node_up" in viewer.stdout, viewer.stdout
            assert ACL_PASSWORD not in viewer.stdout + viewer.stderr and DEFAULT_PASSWORD not in viewer.stdout
        finally:
            assert node.stop() == 0, node.log_path.read_text()


def test_a_wrong_password_and_an_untrusted_certificate_are_one_line_each(servers, tmp_path):
    acl_url, _ = servers["acl"]
    wrong = acl_url.replace(ACL_PASSWORD, "guess")
    done = run_piped("redis on\nexit\n", tmp_path, env=shell_env(tmp_path, SOLLOL_REDIS_URL=wrong))
    assert "unreachable (wrong user or password, or the user is disabled" in done.stdout, done.stdout
    assert "guess" not in done.stdout + done.stderr
    no_password = acl_url.replace(f"app:{ACL_PASSWORD}@", "")
    done = run_piped("redis on\nexit\n", tmp_path, env=shell_env(tmp_path, SOLLOL_REDIS_URL=no_password))
    assert "Redis needs a password: redis://:PASSWORD@host" in done.stdout, done.stdout

    tls_url, _ = servers["tls"]
    done = run_piped("redis on\nexit\n", tmp_path, env=shell_env(tmp_path, SOLLOL_REDIS_URL=tls_url))
    assert "TLS: the server's certificate is not trusted (SYNAPTICLLAMAS_REDIS_CA_FILE names the CA" in done.stdout, \
        done.stdout
    done = run_piped("redis on\nexit\n", tmp_path, env=shell_env(tmp_path, SOLLOL_REDIS_URL=tls_url.replace(
        "rediss://", "redis://")))
    assert "unreachable" in done.stdout, done.stdout
    # a CA file that is not there stops the shell at start, in one line
    done = run_piped("exit\n", tmp_path, env=shell_env(tmp_path, SOLLOL_REDIS_URL=tls_url,
                                                       SYNAPTICLLAMAS_REDIS_CA_FILE=str(tmp_path / "nope.pem")))
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr
    assert "SYNAPTICLLAMAS_REDIS_CA_FILE=" in done.stderr and "expected a readable file" in done.stderr
