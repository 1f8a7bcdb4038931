"""The shell with piped stdin, as scripts and CI use it."""
import signal
import subprocess

from support import PYTHON, ROOT, run_piped, shell_env

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
    out, err = proc.communicate(timeout=30)
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


def test_endless_input_is_read_ahead_only_a_little_and_ctrl_c_ends_the_run(tmp_path):
    """`yes status | main.py`: memory stays bounded (input is read just ahead of the commands),
    and Ctrl-C (SIGINT) ends the script like a shell script's, exit status 130."""
    import time

    # 1 KB lines (`status` and trailing blanks): each line the reader queues shows in memory
    producer = subprocess.Popen(["yes", "status" + " " * 1000], stdout=subprocess.PIPE)
    shell = subprocess.Popen([PYTHON, str(ROOT / "main.py")], stdin=producer.stdout, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, env=shell_env(tmp_path))
    producer.stdout.close()
    try:
        time.sleep(1)
        first = _rss_mb(shell.pid)
        time.sleep(5)                      # an unbounded reader queues lines faster than they run
        growth = _rss_mb(shell.pid) - first
        shell.send_signal(signal.SIGINT)
        _, err = shell.communicate(timeout=30)
    finally:
        producer.kill()
        producer.wait()
        if shell.poll() is None:
            shell.kill()
    assert growth < 5, f"the shell grew by {growth:.0f} MB in 5 s"
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
