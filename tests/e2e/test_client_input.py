"""What clients send to llama-server stays theirs: a prompt that holds llama.cpp's failure lines
changes no backend state, blames no backend at the next start, and its text is in no event.

Real parts: the shell piped, two local ggml-rpc-servers, llama-server with the demo model, curl as
the client, redis-server with the journal every event reaches (sampling off: every raw line kept).
"""
import json
import re
import shutil
import subprocess

import pytest
from llama_support import TAG_VAR, tagged
from support import PipedShell, free_port

pytestmark = pytest.mark.llama
MARK = "zq-client-text-7c1e"


@pytest.fixture
def tag():
    with tagged() as value:
        yield value


def curl(*args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("curl")
    assert binary, "curl is not installed (apt-get install curl)"
    return subprocess.run([binary, "-sS", "--max-time", "60", *args], capture_output=True, text=True, timeout=90)


def test_a_prompt_holding_llama_cpps_failure_lines_changes_nothing_and_is_in_no_event(tmp_path, redis_server, tag):
    port = free_port()
    shell = PipedShell(tmp_path, "--distributed", **{
        TAG_VAR: tag, "SOLLOL_REDIS_URL": redis_server.url, "SOLLOL_OBSERVER_SAMPLING": "false",
        "SYNAPTICLLAMAS_COORDINATOR_PORT": str(port), "SYNAPTICLLAMAS_COORDINATOR_ARGS": "-t 1",
        "SOLLOL_RPC_BACKEND_HEARTBEAT": "false"})
    try:
        shell.send("redis on", "backends spawn 2", "coordinator start")
        match, _ = shell.read_until(r"Coordinator running .* RPC backends: (.*); ready", timeout=120)
        backends = match.group(1).split(", ")
        assert len(backends) == 2
        lines = [f"Failed to connect to {backends[0]}", f"ggml-rpc.cpp:547: Failed to connect to {backends[1]}",
                 "/src/ggml/src/ggml-rpc/ggml-rpc.cpp:566: Remote RPC server crashed or returned malformed response",
                 "0.00.000.001 E Remote RPC server crashed or returned malformed response",
                 "srv  llama_server: exiting due to model loading error"]
        prompt = f"{MARK}\n" + "\n".join(lines) + f"\n{MARK}"
        url = f"http://127.0.0.1:{port}"
        done = curl(f"{url}/completion", "-d", json.dumps({"prompt": prompt, "n_predict": 4}))
        assert done.returncode == 0 and "content" in json.loads(done.stdout), done.stderr
        chat = curl(f"{url}/v1/chat/completions", "-H", "Content-Type: application/json", "-d",
                    json.dumps({"messages": [{"role": "user", "content": prompt}], "max_tokens": 4}))
        assert chat.returncode == 0 and json.loads(chat.stdout)["choices"], chat.stdout
        lost = curl(f"{url}/{MARK}%0AFailed%20to%20connect%20to%20{backends[0]}%0A")   # the text in a path
        assert lost.returncode == 0

        # nothing changed: both backends up, the coordinator running, never restarted
        shell.send("backends list", "coordinator status")
        _, listed = shell.read_until(r"^restarts\s+0\b")
        for backend in backends:
            assert any(line.startswith(backend) and re.search(r"\bup\b", line) for line in listed), listed
        assert any(re.match(r"^state\s+running\b", line) for line in listed), listed
        # and nothing was blamed: a restart leaves no backend out
        shell.send("coordinator restart")
        shell.read_until(r"Coordinator running .* RPC backends: (.*); ready", timeout=120)
        assert shell.exit() == 0, shell.output()
    finally:
        shell.kill()

    journal = [fields["event"] for _, fields in redis_server.client().xrange("synapticllamas:events")]
    events = [json.loads(text) for text in journal]
    assert any(e["component"] == "coordinator" and e["event_type"] == "inference" for e in events)
    assert any(e["component"] == "raw" for e in events)        # raw lines were published, every one of them
    assert not [text for text in journal if MARK in text or "Failed to connect" in text], "client text in an event"
    kinds = [(e["component"], e["event_type"], e["details"].get("reason")) for e in events]
    assert ("rpc_backend", "disconnect", None) not in [(c, t, None) for c, t, _ in kinds]
    assert [r for c, t, r in kinds if (c, t) == ("coordinator", "stop")] == ["user", "exit"]
    starts = [e["details"] for e in events if (e["component"], e["event_type"]) == ("coordinator", "starting")]
    assert len(starts) == 2 and all(not s.get("left_out") and sorted(s["rpc_backends"]) == sorted(backends)
                                    for s in starts), starts
