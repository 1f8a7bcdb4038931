"""Settings: the reference document's variables, precedence, validation, redaction."""
import subprocess

import pytest
from support import PYTHON, ROOT, shell_env

from synapticllamas.config import ConfigError, load_settings, redact_url

# variable, a good value, the value it must produce, bad values
SOLLOL = [
    ("SOLLOL_RPC_HEARTBEAT_INTERVAL", "10", ("rpc_heartbeat_interval", 10.0), ["0", "-5", "abc", "nan", "0.01"]),
    ("SOLLOL_RPC_BACKEND_HEARTBEAT", "false", ("rpc_backend_heartbeat", False), ["maybe", "2"]),
    ("SOLLOL_RPC_BACKEND_HEARTBEAT_INTERVAL", "2.5", ("rpc_backend_heartbeat_interval", 2.5),
     ["0", "x", "0.000001"]),
    ("SOLLOL_OBSERVER_MAX_EVENTS", "500", ("observer_max_events", 500), ["0", "1.5", "ten"]),
    ("SOLLOL_REDIS_URL", "redis://:pw@10.0.0.2:6380/1", ("redis_url", "redis://:pw@10.0.0.2:6380/1"),
     ["localhost:6379", "http://x", "redis://host:99999"]),
    ("SOLLOL_OBSERVER_SAMPLING", "off", ("observer_sampling", False), ["sometimes"]),
    ("SOLLOL_OBSERVER_SAMPLE_RATE", "1.0", ("observer_sample_rate", 1.0), ["abc", "1.5", "-0.1", "inf"]),
]


@pytest.mark.parametrize("var,good,expected,bad", SOLLOL, ids=[s[0] for s in SOLLOL])
def test_each_variable_good_and_bad(tmp_path, var, good, expected, bad):
    env = {"XDG_CONFIG_HOME": str(tmp_path)}
    settings = load_settings(env=dict(env, **{var: good}))
    name, value = expected
    assert getattr(settings, name) == value
    assert settings.source(name) == f"env {var}"
    for value in bad:
        with pytest.raises(ConfigError) as err:
            load_settings(env=dict(env, **{var: value}))
        message = str(err.value)
        assert "\n" not in message
        assert message.startswith(f"{var}=") and value in message and "expected" in message


@pytest.mark.parametrize("var,bad", [(s[0], s[3][0]) for s in SOLLOL], ids=[s[0] for s in SOLLOL])
def test_bad_value_stops_the_real_cli_with_exit_2(tmp_path, var, bad):
    proc = subprocess.run([PYTHON, str(ROOT / "main.py"), "--distributed"], input="status\n",
                          capture_output=True, text=True, env=shell_env(tmp_path, **{var: bad}), timeout=30)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {var}=")
    assert proc.stdout == ""


def test_good_values_reach_the_running_shell(tmp_path):
    env = shell_env(tmp_path, SOLLOL_OBSERVER_SAMPLE_RATE="0.5", SOLLOL_RPC_HEARTBEAT_INTERVAL="12",
                    SOLLOL_OBSERVER_MAX_EVENTS="77", SOLLOL_REDIS_URL="redis://user:secret@db:6390/0")
    proc = subprocess.run([PYTHON, str(ROOT / "main.py")], input="config\n", capture_output=True,
                          text=True, env=env, timeout=30)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines() if line.strip()}
    assert rows["observer_sample_rate"][1:4] == ["0.5", "env", "SOLLOL_OBSERVER_SAMPLE_RATE"]
    assert rows["rpc_heartbeat_interval"][1] == "12"
    assert rows["observer_max_events"][1] == "77"
    assert rows["redis_url"][1] == "redis://user:***@db:6390/0"
    assert "secret" not in proc.stdout


def test_precedence_default_file_env_flag(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("coordinator_port = 18100\nobserver_sample_rate = 0.3\nrpc_heartbeat_interval = 5\n")
    s = load_settings(flags={"coordinator_port": "18200"}, config_path=str(cfg),
                      env={"SOLLOL_OBSERVER_SAMPLE_RATE": "0.4", "XDG_CONFIG_HOME": str(tmp_path)})
    assert (s.coordinator_port, s.source("coordinator_port")) == (18200, "flag --coordinator-port")
    assert (s.observer_sample_rate, s.source("observer_sample_rate")) == (0.4, "env SOLLOL_OBSERVER_SAMPLE_RATE")
    assert s.rpc_heartbeat_interval == 5.0 and s.source("rpc_heartbeat_interval").startswith("config ")
    assert s.observer_max_events == 10000 and s.source("observer_max_events") == "default"


def test_config_file_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("observer_sample_rate = 2\n")
    with pytest.raises(ConfigError, match=r"observer_sample_rate in .*bad.toml='2' is not valid"):
        load_settings(config_path=str(bad), env={})
    bad.write_text("sample_rate = 0.2\n")
    with pytest.raises(ConfigError, match="unknown setting 'sample_rate'"):
        load_settings(config_path=str(bad), env={})
    bad.write_text("this is not toml\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(config_path=str(bad), env={})
    with pytest.raises(ConfigError, match="no such file"):
        load_settings(config_path=str(tmp_path / "missing.toml"), env={})


def test_flags_are_validated_like_env(tmp_path):
    proc = subprocess.run([PYTHON, str(ROOT / "main.py"), "--coordinator-port", "99999", "-c", "status"],
                          capture_output=True, text=True, env=shell_env(tmp_path), timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.strip() == \
        "Error: --coordinator-port='99999' is not valid: expected an integer from 0 to 65535"


def test_bad_url_with_a_password_is_one_line_and_redacted(tmp_path):
    proc = subprocess.run([PYTHON, str(ROOT / "main.py"), "--redis-url", "redis://bob:hunter2@127.0.0.1:99999",
                           "-c", "status"], capture_output=True, text=True, env=shell_env(tmp_path), timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "Error: --redis-url='redis://bob:***@127.0.0.1:99999' is not valid: expected "
        "redis://[:password@]host[:port][/db], rediss://... or unix:///path"]


@pytest.mark.parametrize("url,shown", [
    ("redis://:pw@host:6379/0", "redis://:***@host:6379/0"),
    ("rediss://user:pw@h", "rediss://user:***@h"),
    ("redis://host:6379", "redis://host:6379"),
    ("redis://bob:hunter2@127.0.0.1:99999", "redis://bob:***@127.0.0.1:99999"),
    ("redis://u:p@[::1]:6379/0", "redis://u:***@[::1]:6379/0"),
    ("unix:///run/redis.sock", "unix:///run/redis.sock"),
])
def test_redact_url(url, shown):
    assert redact_url(url) == shown


def test_config_hides_an_api_key_in_the_llama_server_arguments(tmp_path):
    env = shell_env(tmp_path, SYNAPTICLLAMAS_COORDINATOR_ARGS="-t 2 --api-key sekrit123")
    proc = subprocess.run([PYTHON, str(ROOT / "main.py"), "-c", "config"], capture_output=True, text=True,
                          env=env, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "sekrit123" not in proc.stdout
    assert "-t 2 --api-key REDACTED" in proc.stdout
