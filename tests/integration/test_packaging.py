"""The wheel, as `pip install .` builds it: commands live in the project's own namespace (no
top-level `commands` in site-packages), and the installed console script runs from elsewhere."""
import os
import subprocess
import sys
import zipfile

from support import ROOT


def test_the_wheel_has_no_top_level_commands_and_its_script_runs_from_another_directory(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(wheels), str(ROOT)], check=True, capture_output=True, text=True, timeout=300)
    [wheel] = list(wheels.glob("synapticllamas-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/", 1)[0] for name in names}
    assert tops == {"synapticllamas", wheel.name.split("-py3")[0] + ".dist-info"}, tops
    assert "synapticllamas/commands/registry.py" in names and "synapticllamas/commands/chat.py" in names
    assert "synapticllamas/dashboard/static/app.js" in names

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, text=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "XDG_CONFIG_HOME": str(tmp_path / "config"),
           "XDG_STATE_HOME": str(tmp_path / "state"), "SOLLOL_REDIS_URL": "redis://127.0.0.1:1"}
    where = subprocess.run([sys.executable, "-c", "import synapticllamas.commands as c; print(c.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=30)
    assert where.stdout.strip().startswith(str(target)), where      # the installed copy, not the checkout
    status = subprocess.run([str(target / "bin" / "synapticllamas"), "-c", "status"], cwd=elsewhere, env=env,
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    assert "coordinator  stopped" in status.stdout and "Traceback" not in status.stderr
