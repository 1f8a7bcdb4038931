"""Even a shell killed with SIGKILL (no clean-up possible) leaves no llama.cpp process behind:
its children carry the kernel's parent-death signal (child_process.py)."""
import signal

from llama_support import TAG_VAR, tagged, tagged_processes
from support import PipedShell, free_port, wait_for


def test_children_die_with_a_sigkilled_shell(tmp_path):
    with tagged() as tag:
        shell = PipedShell(tmp_path, "--distributed", **{TAG_VAR: tag, "SYNAPTICLLAMAS_COORDINATOR_ARGS": "-t 1",
                                                         "SYNAPTICLLAMAS_COORDINATOR_PORT": str(free_port())})
        shell.send("backends spawn 2", "coordinator start", "status")
        shell.expect(r"^uptime")                       # the status table comes after the start
        names = sorted(name for _, name in tagged_processes(tag))
        assert names == ["ggml-rpc-server", "ggml-rpc-server", "llama-server"], names
        shell.proc.send_signal(signal.SIGKILL)
        shell.wait(10)
        wait_for(lambda: not tagged_processes(tag), 10, what="the shell's children to die with it")
