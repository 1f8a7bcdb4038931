"""When clean-up runs out of time, the shell still leaves no child behind and says so."""
import asyncio
import io

from synapticllamas.app import App
from synapticllamas.config import load_settings
from synapticllamas.shell.render import Renderer
from synapticllamas.shell.repl import Shell
from synapticllamas.util.processes import spawn


class HangingClose:
    """Stands in for a component whose close() never returns (a bug, or a stuck child)."""

    async def close(self) -> None:
        await asyncio.Event().wait()

    def status(self) -> dict:
        return {"state": "stuck"}


def test_clean_up_timeout_kills_the_children_and_fails(tmp_path):
    env = {"XDG_CONFIG_HOME": str(tmp_path / "c"), "XDG_STATE_HOME": str(tmp_path / "s")}
    app = App(load_settings(env=env))
    err = io.StringIO()
    shell = Shell(app, Renderer(io.StringIO(), err, rich_output=False))
    shell.close_budget = lambda: 0.5

    async def scenario():
        # a real child that ignores SIGTERM, started the way llama-server and rpc-servers are
        child = await spawn(["sh", "-c", "trap '' TERM; sleep 600"])
        app.coordinator = HangingClose()
        await shell._close()
        await asyncio.wait_for(child.wait(), 10)
        return child

    child = asyncio.run(scenario())
    assert child.returncode == -9                       # SIGKILLed, not left running
    assert shell._exit_status() == 1
    message = err.getvalue().strip()
    assert message == f"Error: clean-up did not finish within 0.5 s; killed the child processes left: {child.pid}"
