"""A bug in a background task is one line for the user (a system/error event the shell prints) and
a traceback in the log file, never a traceback on the terminal (util/internal_errors.py)."""
import asyncio
import gc

from llama_support import Collector, settings_for

from synapticllamas.app import App


def run_app_with(tmp_path, trouble):
    """Start a real App (no Redis), let `trouble(loop)` fail in the background, collect its events."""
    settings = settings_for(tmp_path)
    app = App(settings)
    events = Collector(app.observer)

    async def main():
        await app.start()
        trouble(asyncio.get_running_loop())
        for _ in range(200):
            if events.of("system", "error"):
                break
            gc.collect()                 # a failed task nobody awaited is reported when it is collected
            await asyncio.sleep(0.01)
        await app.close()

    asyncio.run(main())
    return settings, events.of("system", "error")


async def _fails():
    raise RuntimeError("boom in the background")


def test_a_failed_background_task_is_one_line_and_its_traceback_goes_to_the_log_file(tmp_path, capfd):
    settings, errors = run_app_with(tmp_path, lambda loop: loop.create_task(_fails()))
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and "boom in the background" not in out + err
    [error] = errors
    assert "RuntimeError: boom in the background" in error.message and settings.log_file in error.message
    assert "\n" not in error.message
    log = (tmp_path / "log").read_text()
    assert "Traceback (most recent call last)" in log and "boom in the background" in log


def test_a_failing_callback_is_one_line_too(tmp_path, capfd):
    def callback():
        raise ValueError("bad callback")

    _, errors = run_app_with(tmp_path, lambda loop: loop.call_soon(callback))
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    assert len(errors) == 1 and "ValueError: bad callback" in errors[0].message


def test_an_unwritable_log_file_costs_the_traceback_not_the_line(tmp_path, capfd):
    (tmp_path / "ro").write_text("a file where the log directory should be")
    settings = settings_for(tmp_path, log_file=str(tmp_path / "ro" / "log"))
    app = App(settings)
    events = Collector(app.observer)

    async def main():
        await app.start()
        asyncio.get_running_loop().call_soon(lambda: 1 / 0)
        for _ in range(200):
            if events.of("system", "error"):
                break
            await asyncio.sleep(0.01)
        await app.close()

    asyncio.run(main())
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    assert "ZeroDivisionError" in events.of("system", "error")[0].message
