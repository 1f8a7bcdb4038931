"""The shell with piped stdin, as scripts and CI use it."""
import signal
import socket
import subprocess
import threading

from support import PYTHON, ROOT, run_piped, shell_env, wait_for

ESC = "\x1b"


def test_status_help_exit_plain_and_zero(tmp_path):
    proc = run_piped("status\nhelp\nexit\n", tmp_path, "--distributed")
    assert proc.returncode == 0, proc.stderr
    assert ESC not in proc.stdout and ESC not in proc.stderr
    assert "mode         distributed" in proc.stdout
    assert "coordinator" in proc.stdout and "Type 'help COMMAND'" in proc.stdout
    assert "SynapticLlamas>" not in proc.stdout          # no prompt echo
    assert "Warning" not in proc.stderr                  # no prompt_toolkit "not a terminal" warning


def test_bad_command_exits_1_and_the_other_lines_still_run(tmp_path):
    proc = run_piped("status\nstauts\n# a comment\n\nconfig\n", tmp_path)
    assert proc.returncode == 1
    assert "Unknown command 'stauts'. Did you mean 'status'?" in proc.stderr
    assert "Status" in proc.stdout and "Settings" in proc.stdout   # lines before and after it ran


def test_exit_on_error_stops_at_first_failure(tmp_path):
    proc = run_piped("stauts\nconfig\n", tmp_path, "--exit-on-error")
    assert proc.returncode == 1
    assert "Settings" not in proc.stdout


def test_eof_on_empty_stdin_exits_at_once(tmp_path):
    # upstream loops forever on EOF; the timeout turns that into a failure
    proc = subprocess.run([PYTHON, str(ROOT / "main.py"), "--distributed"], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, env=shell_env(tmp_path), timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""


def test_dash_c_commands_run_in_order(tmp_path):
    proc = subprocess.run([PYTHON, str(ROOT / "main.py"), "-c", "help status", "-c", "status"],
                          capture_output=True, text=True, env=shell_env(tmp_path), timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.index("Usage: status") < proc.stdout.index("uptime")


def test_wrong_arguments_show_usage(tmp_path):
    proc = run_piped("status now\nhelp a b\n", tmp_path)
    assert proc.returncode == 1
    assert "Usage: status" in proc.stderr and "Usage: help [COMMAND]" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unbalanced_quote_is_one_line_error(tmp_path):
    proc = run_piped('help "status\nstatus\n', tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "Error: cannot read the line: No closing quotation (quote arguments with ' or \")"]
    assert "Status" in proc.stdout


def test_sigterm_while_waiting_for_input_exits_cleanly(tmp_path):
    proc = subprocess.Popen([PYTHON, str(ROOT / "main.py")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=shell_env(tmp_path))
    proc.stdin.write("status\n")
    proc.stdin.flush()
    assert "Status" in proc.stdout.readline()           # the shell is up and answered
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "Traceback" not in err


def test_internal_error_is_one_line_with_log_path(tmp_path):
    # a bug of ours, simulated by registering a command that raises: the user gets one line, the
    # traceback goes to the log file
    script = (
        "import sys, asyncio\n"
        "sys.argv = ['main.py', '-c', 'boom']\n"
        "from synapticllamas.commands.registry import command\n"
        "@command('boom', 'raise', 'boom')\n"
        "async def boom(app, args):\n"
        "    raise KeyError('kaput')\n"
        "from synapticllamas.cli import main\n"
        "main()\n")
    proc = subprocess.run([PYTHON, "-c", script], capture_output=True, text=True, cwd=ROOT,
                          env=shell_env(tmp_path), timeout=30)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "internal error in 'boom': KeyError" in lines[0]
    log = tmp_path / "state" / "synapticllamas" / "synapticllamas.log"
    assert str(log) in lines[0]
    assert "Traceback" in log.read_text()


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def busy_listener() -> tuple[socket.socket, list[socket.socket]]:
    """A TCP listener whose accept queue is full, as a busy rpc-server's: the kernel drops new
    connection requests, so a probe waits for its whole timeout. (The listener, and the connections
    that fill its queue, to close.)"""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(listener.getsockname())
        fillers.append(filler)
    return listener, fillers


def test_endless_input_is_read_ahead_only_a_little_and_ctrl_c_ends_the_run(tmp_path):
    """`yes 'backends check' | main.py`: memory stays bounded (input is read just ahead of the
    commands), and Ctrl-C (SIGINT) ends the script like a shell script's, exit status 130.

    Each check waits 0.2 s for a backend that does not answer: while a command waits, an unbounded
    reader would queue the endless input as fast as `yes` writes it (a quick command like `status`
    keeps the reader too busy handing lines over to outrun it)."""
    listener, fillers = busy_listener()
    # 1 KB lines (the command and trailing blanks): each line the reader queues shows in memory
    producer = subprocess.Popen(["yes", "backends check" + " " * 1000], stdout=subprocess.PIPE)
    env = shell_env(tmp_path, SOLLOL_RPC_BACKEND_HEARTBEAT="false", SYNAPTICLLAMAS_PROBE_TIMEOUT="0.2")
    shell = subprocess.Popen([PYTHON, str(ROOT / "main.py"), "--rpc-backend", f"127.0.0.1:{listener.getsockname()[1]}"],
                             stdin=producer.stdout, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    producer.stdout.close()
    out = []            # the shell's stdout, line by line

    def read_stdout():
        for line in shell.stdout:
            out.append(line)

    def checks_run():
        return sum(line.startswith("Probed 1 backend in") for line in out)

    threading.Thread(target=read_stdout, daemon=True).start()
    try:
        wait_for(lambda: checks_run() >= 3, 60, what="3 backends checks")
        first = _rss_mb(shell.pid)
        wait_for(lambda: checks_run() >= 8, 60, what="5 more backends checks")
        growth = _rss_mb(shell.pid) - first
        shell.send_signal(signal.SIGINT)
        shell.wait(30)
        err = shell.stderr.read()
    finally:
        producer.kill()
        producer.wait()
        if shell.poll() is None:
            shell.kill()
            shell.wait()
        for sock in (listener, *fillers):
            sock.close()
    assert any("no answer within 0.2s" in line for line in out)      # the commands did wait
    assert growth < 5, f"the shell grew by {growth:.0f} MB while 5 commands waited"
    assert shell.returncode == 128 + signal.SIGINT
    assert "Traceback" not in err


def test_errors_quote_input_without_its_control_characters(tmp_path):
    long_word = "a" * 100_000
    proc = run_piped(f"help \x1b[31mX\nevents --component \x1b[2Jbad\nredis \x07on\nhelp {long_word}\n"
                     "dashboard now\n", tmp_path)
    assert proc.returncode == 1
    assert ESC not in proc.stderr and "\x07" not in proc.stderr
    assert "no command '\\x1b[31mX'" in proc.stderr
    assert "got '\\x07on'" in proc.stderr
    assert max(len(line) for line in proc.stderr.splitlines()) < 600      # the long word was cut
    assert "Error: dashboard takes no arguments" in proc.stderr
