"""Random command lines: no traceback, every line answered, the shell survives."""
import asyncio
import io
import random
import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import run_piped

from synapticllamas.app import App
from synapticllamas.config import load_settings
from synapticllamas.shell.render import Renderer
from synapticllamas.shell.repl import Shell

# Commands that are safe with any arguments: they read state, they never start processes or exit.
SAFE_PREFIXES = ["help", "status", "config", "dashboard", "events", "redis status", "backends list",
                 "coordinator status", "coordinator logs", "stauts", "hlep", "coord"]

words = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30)
lines = st.one_of(
    st.lists(words, min_size=1, max_size=6).map(" ".join),
    st.tuples(st.sampled_from(SAFE_PREFIXES), st.lists(words, max_size=4)).map(
        lambda t: " ".join([t[0], *t[1]])),
    st.text(alphabet=st.sampled_from("\"'\\\t #-=\x00\x01\x1b[]{}"), min_size=1, max_size=20),
    st.text(min_size=1000, max_size=5000),
)


def _app(tmp_path):
    env = {"XDG_CONFIG_HOME": str(tmp_path / "c"), "XDG_STATE_HOME": str(tmp_path / "s")}
    return App(load_settings(env=env))


def _is_exit(line: str) -> bool:
    first = line.split()[0].lower() if line.split() else ""
    return first in ("exit", "quit")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(line=lines)
def test_every_random_line_gets_a_response_without_traceback(tmp_path, line):
    if not line.strip() or _is_exit(line):
        return
    out, err = io.StringIO(), io.StringIO()
    shell = Shell(_app(tmp_path), Renderer(out, err, rich_output=False))

    async def run():
        return await shell.run_line(line)

    ok = asyncio.run(run())
    text = out.getvalue() + err.getvalue()
    assert text.strip(), f"no response to {line!r}"
    assert "Traceback" not in text and "internal error" not in text, text
    if not ok:
        assert err.getvalue().startswith("Error: "), err.getvalue()


def test_a_piped_script_of_random_lines_runs_to_the_end(tmp_path):
    rng = random.Random(20261127)
    alphabet = string.printable + "éü漢字🙂\x00\x01\x7f"
    script = []
    for _ in range(300):
        kind = rng.random()
        if kind < 0.4:
            line = " ".join("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))
                            for _ in range(rng.randint(1, 5)))
        elif kind < 0.8:
            line = rng.choice(SAFE_PREFIXES) + " " + "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 20)))
        else:
            line = "".join(rng.choice(alphabet) for _ in range(rng.randint(500, 3000)))
        line = line.replace("\n", " ").replace("\r", " ").replace("\x0b", " ").replace("\x0c", " ")
        if line.strip() and not _is_exit(line):
            script.append(line)
    script.append("status")
    proc = run_piped("\n".join(script) + "\n", tmp_path, timeout=300)
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "internal error" not in proc.stderr
    assert proc.returncode == 1                       # some lines were bad ...
    assert "uptime" in proc.stdout.splitlines()[-1]   # ... and the last line, status, still ran
