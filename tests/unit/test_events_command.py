"""`events [N] [--component C] [--level L] [--follow]` on the in-memory buffer (no Redis involved)."""
import asyncio
import io

import pytest
from support import until

from synapticllamas.app import App
from synapticllamas.commands.events import events_command
from synapticllamas.commands.registry import UsageError
from synapticllamas.config import load_settings
from synapticllamas.shell.render import render_plain
from synapticllamas.ui import PlainUI


def make_app(tmp_path):
    settings = load_settings(env={"XDG_CONFIG_HOME": str(tmp_path), "XDG_STATE_HOME": str(tmp_path),
                                  "SOLLOL_OBSERVER_SAMPLING": "false"})
    app = App(settings, ui=PlainUI(out=io.StringIO()))
    return app


def test_table_shows_the_last_n_and_filters(tmp_path):
    app = make_app(tmp_path)
    obs = app.observer
    for i in range(30):
        obs.emit("raw", "log", f"line {i}", sample=True)
    obs.emit("rpc_backend", "disconnect", "127.0.0.1:50052 is down", level="warning")
    obs.emit("coordinator", "stop", "coordinator crashed (signal 6)", level="error")

    text = render_plain(asyncio.run(events_command(app, ["5"])))
    lines = [line for line in text.splitlines() if "raw" in line or "rpc_backend" in line or "coordinator" in line]
    assert len(lines) == 5 and "coordinator crashed (signal 6)" in lines[-1] and "line 27" in lines[0]

    text = render_plain(asyncio.run(events_command(app, ["--level", "warning"])))
    assert "127.0.0.1:50052 is down" in text and "coordinator crashed" in text and "line " not in text

    text = render_plain(asyncio.run(events_command(app, ["--component", "raw", "2"])))
    assert "line 28" in text and "line 29" in text and "line 27" not in text and "crashed" not in text

    text = render_plain(asyncio.run(events_command(app, ["--component", "model"])))
    assert text.startswith("No events match component=model")


@pytest.mark.parametrize("args,message", [
    (["--component", "gpu"], "unknown component 'gpu'; accepted: coordinator, rpc_backend, rpc_registry, model,"
                             " system, raw"),
    (["--level", "loud"], "unknown level 'loud'; accepted: debug, info, warning, error, critical"),
    (["0"], "N must be 1 or more, got '0'"),
    (["ten"], "N must be a whole number of events, got 'ten'"),
    (["--colour"], "unrecognized arguments: --colour"),
])
def test_bad_input_is_one_line_naming_the_value_and_what_is_accepted(tmp_path, args, message):
    with pytest.raises(UsageError) as err:
        asyncio.run(events_command(make_app(tmp_path), args))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_follow_prints_new_events_live_until_cancelled(tmp_path):
    app = make_app(tmp_path)
    out = app.ui.out
    app.observer.emit("system", "register", "already there")

    async def scenario():
        sinks_before = len(app.observer.sinks)
        task = asyncio.ensure_future(events_command(app, ["1", "--follow", "--level", "info"]))
        await until(lambda: "following new events" in out.getvalue(), 5, what="--follow to start")
        app.observer.emit("rpc_backend", "connect", "127.0.0.1:50052 is up")
        app.observer.emit("raw", "log", "debug noise", level="debug")          # below --level info
        app.observer.emit("raw", "log", "evil \x1b[2J line\nsecond", sample=True)
        # the last event printed: the debug one, emitted before it, would have been printed by now
        await until(lambda: "evil" in out.getvalue(), 5, what="the last event to be printed")
        task.cancel()                                                          # what Ctrl-C does
        with pytest.raises(asyncio.CancelledError):
            await task
        return sinks_before

    sinks_before = asyncio.run(scenario())
    lines = out.getvalue().splitlines()
    assert "system/register already there" in lines[0]
    assert "following new events (Ctrl-C to stop)" in lines[1]
    assert "INFO     rpc_backend/connect 127.0.0.1:50052 is up" in lines[2]
    assert lines[3].endswith("raw/log evil \\x1b[2J line\\nsecond")   # escaped: no terminal control
    assert len(lines) == 4                                               # the debug line was filtered
    assert len(app.observer.sinks) == sinks_before                       # the sink is gone after Ctrl-C
