"""The README tells the truth: every command, every setting, the two commands."""
from pathlib import Path

from synapticllamas.commands import load_all
from synapticllamas.config import SPECS

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_readme_names_every_command_and_subcommand():
    for name, cmd in load_all().items():
        assert f"`{name}" in README, f"README does not document the command {name!r}"
        for sub in cmd.subcommands:
            assert sub in README, f"README does not document '{name} {sub}'"


def test_readme_names_every_setting_and_variable():
    for spec in SPECS:
        assert spec.name in README, f"README does not document the setting {spec.name!r}"
        for var in spec.env:
            assert f"`{var}`" in README, f"README does not document {var}"


def test_readme_gives_the_two_commands():
    assert "scripts/run" in README and "scripts/test" in README
