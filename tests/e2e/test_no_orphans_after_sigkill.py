"""Even a shell killed with SIGKILL (no clean-up possible) leaves no llama.cpp process behind:
its children carry the kernel's parent-death signal (child_process.py)."""
import os
import signal
import subprocess

from llama_support import TAG_VAR, llama_binaries, new_tag, tagged_processes
from support import PYTHON, ROOT, free_port, shell_env, wait_for


def test_children_die_with_a_sigkilled_shell(tmp_path):
    llama_binaries()
    tag = new_tag()
    env = shell_env(tmp_path, **{TAG_VAR: tag, "SYNAPTICLLAMAS_COORDINATOR_PORT": str(free_port()),
                                 "SYNAPTICLLAMAS_COORDINATOR_ARGS": "-t 1"})
    shell = subprocess.Popen([PYTHON, str(ROOT / "main.py"), "--distributed"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    try:
        shell.stdin.write("backends spawn 2\ncoordinator start\nstatus\n")
        shell.stdin.flush()
        for line in shell.stdout:                      # the status table comes after the start
            if line.startswith("uptime"):
                break
        names = sorted(name for _, name in tagged_processes(tag))
        assert names == ["ggml-rpc-server", "ggml-rpc-server", "llama-server"], names
        os.kill(shell.pid, signal.SIGKILL)
        shell.wait(10)
        wait_for(lambda: not tagged_processes(tag), 10, what="the shell's children to die with it")
    finally:
        for pid, _ in tagged_processes(tag):
            os.kill(pid, signal.SIGKILL)
        if shell.poll() is None:
            shell.kill()
