"""`redis on` and `events --follow` in the interactive shell (a real pty), then Ctrl-D flushes."""
import pexpect
from event_support import journal
from support import shell_env, spawn_shell, wait_for

from synapticllamas.events.contract import APPS_HASH

PROMPT = "SynapticLlamas>"


def test_follow_until_ctrl_c_then_ctrl_d_flushes(tmp_path, redis_server):
    # the registry heartbeat every 0.3 s gives `events --follow` something live to show
    env = shell_env(tmp_path, TERM="xterm", SOLLOL_REDIS_URL=redis_server.url,
                    SOLLOL_RPC_BACKEND_HEARTBEAT_INTERVAL="0.3")
    child = spawn_shell(tmp_path, env=env)
    try:
        child.expect(PROMPT)
        child.sendline("redis on")
        child.expect(f"Redis publishing ON -> {redis_server.url}")
        child.expect(PROMPT)
        child.sendline("events 1 --follow --component rpc_registry")
        child.expect("following new events")
        for _ in range(3):                                    # new heartbeats, printed as they happen
            child.expect(r"INFO\s+rpc_registry/heartbeat rpc_backend_connect on rpc_registry")
        child.sendcontrol("c")
        child.expect("Cancelled.")
        child.expect(PROMPT)
        child.sendline("redis status")
        child.expect("ON, connected")
        child.expect(PROMPT)
        instance = redis_server.client().hkeys(APPS_HASH)[0]
        child.sendcontrol("d")
        child.expect(pexpect.EOF, timeout=10)
    finally:
        if child.isalive():
            child.terminate(force=True)
    mine = wait_for(lambda: [e for e in journal(redis_server.port) if e.source["instance"] == instance], 5)
    assert mine[-1].event_type == "unregister" and mine[-1].details["reason"] == "exit"
    assert redis_server.client().hkeys(APPS_HASH) == []
