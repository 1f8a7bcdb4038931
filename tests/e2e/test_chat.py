"""`chat` as a person uses it: the real shell, llama-server and demo model (standard mode), piped and
in a pty. The demo model's answers are nonsense; what is checked is the conversation and the keys."""
import json
import re

import pexpect
import pytest
from llama_support import TAG_VAR, tagged
from support import PipedShell, RedisCliSubscriber, free_port, shell_env, spawn_shell

pytestmark = pytest.mark.llama


@pytest.fixture
def tag():
    with tagged() as value:
        yield value


def env(tag, **extra):
    return {TAG_VAR: tag, "SYNAPTICLLAMAS_COORDINATOR_PORT": str(free_port()),
            # -n: the demo model's sampled answers are sometimes endless: a bound keeps each turn short
            "SYNAPTICLLAMAS_COORDINATOR_ARGS": "-t 1 -n 160", "SOLLOL_OBSERVER_SAMPLING": "false", **extra}


def test_piped_chat_keeps_the_conversation_until_reset(tmp_path, redis_server, tag):
    sub = RedisCliSubscriber(redis_server.port)
    shell = PipedShell(tmp_path, **env(tag, SOLLOL_REDIS_URL=redis_server.url))
    try:
        shell.send('chat "hello"')
        shell.expect(r"^Error: no running coordinator \(state: stopped\); `coordinator start` first$")
        shell.send("redis on", "coordinator start")
        shell.expect(r"^Coordinator running at ")
        shell.send('chat "Name a color."', 'chat "And another one?"', "chat --reset", 'chat "Hi" --system "Answer in one word."')
        for _ in range(2):
            shell.expect(r"^\[\d+ tokens in [\d.]+s, first token after [\d.]+s, [\d.]+ tokens/s\]$", timeout=60)
        shell.expect(r"^Conversation cleared \(2 turns\)\.$")
        shell.expect(r"^\[\d+ tokens in ", timeout=60)
        shell.send("exit")
        assert shell.close() == 1           # the first chat, before the coordinator ran, failed
        # the shell's last event: what it published before has reached the subscriber too
        sub.wait_for_event("system", "unregister", timeout=20)
        # one gateway event per turn (the shell's chat goes through the gateway like any client's)
        requests = [e["details"] for e in sub.events() if e["component"] == "gateway" and e["details"].get("kind") == "chat"]
        assert [r["messages"] for r in requests] == [1, 3, 2]    # 1 turn; 2 more; after reset: system + 1
        for r in requests:
            assert r["api"] == "shell" and r["status"] == "ok"
            assert r["tokens"] > 0 and r["prompt_tokens"] > 0 and r["first_token_s"] > 0 and r["tokens_per_s"] > 0
        inference = [e for e in sub.events() if e["event_type"] == "inference"]
        assert len(inference) == 3                                # llama-server's own count agrees
    finally:
        shell.kill()
        sub.close()


def test_the_chat_prompt_ctrl_c_stops_an_answer_and_keeps_the_conversation(tmp_path, tag):
    child = spawn_shell(tmp_path, env=shell_env(tmp_path, TERM="xterm", **env(tag)), timeout=60)
    try:
        child.expect("SynapticLlamas>")
        child.sendline("coordinator start")
        child.expect("Coordinator running at")
        child.expect("SynapticLlamas>")
        child.sendline("chat")
        child.expect("Chatting with the model")
        child.expect("chat>")
        child.sendline("Name a color.")
        child.expect(r"\[\d+ tokens in ")
        child.expect("chat>")
        child.sendline("Write a very long story about a dragon, with many chapters.")
        # the prompt hands the terminal back (bracketed paste off), then the answer streams
        child.expect(r"\x1b\[\?2004l\s*\w+")
        child.sendcontrol("c")
        child.expect(re.escape("[stopped; the conversation goes on without this answer]"))
        child.expect("chat>")                      # still chatting, not back at the shell
        child.sendline("/wat")
        child.expect("unknown chat command '/wat'")
        child.expect("chat>")
        child.sendline("/exit")
        child.expect(r"Back at the shell prompt; the conversation \(1 turns\) is kept")
        child.expect("SynapticLlamas>")
        child.sendline("chat --reset")
        child.expect(r"Conversation cleared \(1 turn\)\.")
        child.expect("SynapticLlamas>")
        child.sendline("chat")
        child.expect("chat>")
        child.sendeof()                             # Ctrl-D leaves the chat, like /exit
        child.expect("Back at the shell prompt")
        child.expect("SynapticLlamas>")
        child.sendline("exit")
        child.expect(pexpect.EOF)
    finally:
        if child.isalive():
            child.terminate(force=True)
    history = (tmp_path / "state" / "synapticllamas" / "chat_history").read_text()
    assert "Name a color." in history and "/exit" in history      # the chat prompt keeps its own history
    assert json.dumps("Name a color.") not in (tmp_path / "state" / "synapticllamas" / "history").read_text()
