"""The interactive shell in a real pty, driven by pexpect as a person would type."""
import pexpect
import pytest
from support import shell_env, spawn_shell, strip_ansi

from synapticllamas.commands import load_all

PROMPT = "SynapticLlamas>"


@pytest.fixture
def shell(tmp_path):
    child = spawn_shell(tmp_path, "--distributed")
    child.expect(PROMPT)
    yield child
    if child.isalive():
        child.terminate(force=True)


def test_prompt_and_help_lists_every_command(shell):
    shell.sendline("help")
    shell.expect("Type 'help COMMAND'")
    shell.expect(PROMPT)
    listed = strip_ansi(read_log(shell))
    for name in load_all():
        assert name in listed, f"help does not list {name!r}"


def read_log(child) -> str:
    child.logfile_read.flush()
    with open(child.logfile_read.name, encoding="utf-8") as fh:
        return fh.read()


def test_tab_completes_command_name(shell):
    shell.send("coord\t")
    shell.expect("coordinator")
    shell.send(" stat\t")
    shell.expect("status")
    shell.sendcontrol("c")
    shell.expect(PROMPT)
    shell.sendline("exit")
    shell.expect(pexpect.EOF)


def test_unknown_command_suggests_and_shell_survives(shell):
    shell.sendline("stauts")
    shell.expect(r"Unknown command 'stauts'\. Did you mean 'status'\? Type 'help' for the list\.")
    shell.expect(PROMPT)
    shell.sendline("status")
    shell.expect("coordinator")
    shell.expect(PROMPT)


def test_ctrl_c_clears_half_typed_line_and_never_exits(shell):
    shell.send("backends add somewhere")
    shell.sendcontrol("c")
    shell.expect(PROMPT)
    shell.sendcontrol("c")
    shell.expect(PROMPT)
    assert shell.isalive()
    shell.sendline("status")
    shell.expect("mode")
    shell.expect(PROMPT)
    # the half-typed line was cleared, not run: nothing was added
    shell.sendline("config")
    shell.expect("Settings")
    shell.expect(PROMPT)
    assert "somewhere" not in strip_ansi(shell.before)


def test_dashboard_prints_deprecation(shell):
    shell.sendline("dashboard")
    shell.expect("deprecated")
    shell.expect("8080")
    shell.expect(PROMPT)


def test_ctrl_d_exits_zero(shell):
    shell.sendcontrol("d")
    shell.expect(pexpect.EOF)
    shell.close()
    assert shell.exitstatus == 0


def test_history_persists_across_runs(tmp_path):
    first = spawn_shell(tmp_path)
    first.expect(PROMPT)
    first.sendline("help dashboard")
    first.expect("Usage: dashboard")
    first.expect(PROMPT)
    first.sendcontrol("d")       # Ctrl-D, so 'help dashboard' stays the last history entry
    first.expect(pexpect.EOF)
    first.close()
    assert first.exitstatus == 0

    second = spawn_shell(tmp_path)
    second.expect(PROMPT)
    second.send("\x1b[A")        # Up arrow recalls the previous session's last line
    second.expect("help dashboard")
    second.sendline("")
    second.expect("Usage: dashboard")
    second.expect(PROMPT)
    second.sendcontrol("d")
    second.expect(pexpect.EOF)
    history = (tmp_path / "state" / "synapticllamas" / "history").read_text()
    assert "help dashboard" in history


def test_background_event_prints_above_the_prompt_and_keeps_the_typed_line(tmp_path):
    """A lost backend is announced while the person is typing; what they typed survives."""
    import os
    import re
    import signal

    child = spawn_shell(tmp_path, "--distributed",
                        env=shell_env(tmp_path, TERM="xterm", SOLLOL_RPC_BACKEND_HEARTBEAT_INTERVAL="1"))
    try:
        child.expect(PROMPT)
        child.sendline("backends spawn 1")
        child.expect(r"local, pid (\d+)")
        pid = int(child.match.group(1))
        child.expect(PROMPT)
        child.send("help stat")                       # half-typed when the event arrives
        os.kill(pid, signal.SIGKILL)
        child.expect(r"\[rpc_backend\] RPC backend 127\.0\.0\.1:\d+ disconnected")
        child.expect(PROMPT)                          # the prompt is redrawn below the notice ...
        child.send("us\r")                            # ... with the typed text still in it
        child.expect("Usage: status")
        child.expect(PROMPT)
        child.sendcontrol("d")
        child.expect(pexpect.EOF)
    finally:
        if child.isalive():
            child.terminate(force=True)
    assert re.search(r"disconnected: local ggml-rpc-server exited", strip_ansi(read_log(child)))
