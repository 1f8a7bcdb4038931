"""The README tells the truth: its tables are compared with the command registry, the settings
table (config.SPECS), the click options of the shell, the viewer and the dashboard, and the scripts.
Each check goes both ways where it can: nothing missing from the README, nothing in it that is gone."""
from __future__ import annotations

import os
import re
import tomllib

import click
import pytest
from support import ROOT

from synapticllamas.cli import cli
from synapticllamas.commands import load_all
from synapticllamas.config import SPEC_BY_NAME, SPECS
from synapticllamas.dashboard.command import dashboard_server
from synapticllamas.events.viewer import events_viewer
from synapticllamas.node.command import node

README = (ROOT / "README.md").read_text()
OPTION = re.compile(r"(?<![\w-])--?[A-Za-z][\w-]*")


def section(heading: str) -> str:
    """The text under `## heading`, up to the next heading of that level."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", README, re.M | re.S)
    assert match, f"README has no section '## {heading}'"
    return match.group(1)


def table(heading: str) -> list[list[str]]:
    """The rows of the first table in that section, as cells (`\\|` read as `|`), header row left out."""
    rows = []
    for line in section(heading).splitlines():
        if line.startswith("|"):
            cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if not set("".join(cells)) <= set("-: "):
                rows.append(cells)
        elif rows:
            break
    assert len(rows) > 1, f"no table under '## {heading}'"
    return rows[1:]


def options_of(command: click.Command, with_help: bool = False) -> dict[str, click.Parameter]:
    """Every option string of a click command (-c, --command, --no-redis, ...)."""
    ctx = click.Context(command, **command.context_settings)
    help_name = command.get_help_option(ctx).name
    return {opt: p for p in command.get_params(ctx)
            if isinstance(p, click.Option) and (with_help or p.name != help_name)
            for opt in (*p.opts, *p.secondary_opts)}


# ---------------------------------------------------------------- shell commands

COMMAND_ROWS = table("Shell commands")


def rows_of(name: str) -> str:
    """The first cells of the command table's rows about `name` (`backends add ...`, or `quit` in
    `exit`, `quit`), joined."""
    return " ; ".join(row[0] for row in COMMAND_ROWS if re.search(rf"`{re.escape(name)}[`\s]", row[0]))


@pytest.mark.parametrize("name", list(load_all()))
def test_every_command_has_rows_with_its_usage_subcommands_options_and_aliases(name):
    cmd = load_all()[name]
    rows = rows_of(name)
    assert rows, f"the README's command table has no row for {name!r}"
    # `backends [list] | add HOST[:PORT] | ...`: each alternative of the usage line is in a row
    for form in cmd.usage.split(" | "):
        assert form.removeprefix(f"{name} ") in rows, f"{name}: usage {form!r} is not in the README ({rows})"
    for word in (*cmd.subcommands, *cmd.options):
        assert re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", rows), f"{name}: {word!r} is not in the README"
    for alias in cmd.aliases:
        assert f"`{alias}`" in rows, f"{name}: the alias {alias!r} is not in the README"


def test_every_row_of_the_command_table_is_a_command():
    known = set(load_all()) | {alias for cmd in load_all().values() for alias in cmd.aliases}
    named = {m.group(1) for row in COMMAND_ROWS for m in [re.match(r"`([\w-]+)", row[0])]}
    assert named <= known, f"the README lists commands that do not exist: {named - known}"


# ---------------------------------------------------------------- settings

SETTING_ROWS = {row[0].strip("`"): row for row in table("Settings")}


def as_shown(value) -> str:
    """A default as the README writes it."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if value in ("", ()):
        return "(none)"
    return str(value)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_every_setting_has_a_row_with_its_variable_name_and_real_default(spec, monkeypatch):
    # the XDG paths as the README writes them
    monkeypatch.setenv("XDG_CONFIG_HOME", "$XDG_CONFIG_HOME")
    monkeypatch.setenv("XDG_STATE_HOME", "$XDG_STATE_HOME")
    for var in spec.env:
        assert var in SETTING_ROWS, f"the README's settings table has no row for {var}"
        _, name, default, _ = SETTING_ROWS[var]
        assert name == spec.name
        value = spec.default_value()
        if value is None:       # found at run time: the README says how, in parentheses
            assert default.startswith("(") and default.endswith(")"), (var, default)
        else:
            assert default.strip("`") == as_shown(value), f"{var}: README says {default!r}, the default is {value!r}"


def test_every_row_of_the_settings_table_is_a_setting():
    variables = {var for spec in SPECS for var in spec.env} | {"SYNAPTICLLAMAS_CONFIG"}   # the file's path
    assert set(SETTING_ROWS) == variables


# ---------------------------------------------------------------- command-line options

def test_the_options_table_has_every_option_of_the_shell_and_no_other():
    in_readme = {opt for row in table("Command-line options") for opt in OPTION.findall(row[0])}
    assert in_readme == set(options_of(cli, with_help=True))


def test_the_event_viewer_paragraph_names_every_option_of_events():
    paragraph = re.search(r"^- \*\*A terminal event viewer\*\*.*?(?=^- \*\*|^$)", section("Starting the parts"),
                          re.M | re.S)
    assert paragraph, "README has no paragraph on the terminal event viewer"
    text = paragraph.group(0)
    assert "python3 main.py events" in text
    assert set(OPTION.findall(text)) == set(options_of(events_viewer))
    replay = options_of(events_viewer)["--replay"]
    assert f"default {replay.default}" in text


def test_the_dashboard_table_has_every_option_with_its_default():
    rows = {OPTION.findall(row[0])[0]: row for row in table("The unified dashboard")}
    options = options_of(dashboard_server)
    assert set(rows) == set(options)
    for opt, (_, default, _) in rows.items():
        param = options[opt]
        if param.envvar:
            assert f"`{param.envvar}`" in default, (opt, default)
        elif param.show_default:
            assert default == str(param.default), (opt, default, param.default)
    # without --redis-url: the shell's own setting
    redis_url = SPEC_BY_NAME["redis_url"]
    assert f"`{redis_url.env[0]}`" in rows["--redis-url"][1] and redis_url.default in rows["--redis-url"][1]


def test_the_node_table_has_every_option_with_its_default():
    rows = {opt: row for row in table("Cluster nodes") for opt in OPTION.findall(row[0])}
    options = options_of(node)
    assert set(rows) == set(options)
    for opt, (_, default, _) in rows.items():
        param = options[opt]
        if param.show_default and not param.is_flag:
            assert default == str(param.default), (opt, default, param.default)


def test_the_subcommands_and_console_scripts_are_named():
    for name in cli.list_commands(click.Context(cli)):
        assert f"python3 main.py {name}" in README, f"README does not show `python3 main.py {name}`"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for script in scripts:
        assert re.search(rf"`{re.escape(script)}[`\s]", README), f"README does not name the command {script}"


# ---------------------------------------------------------------- the two commands

def test_the_two_commands_exist_and_are_executable():
    block = re.search(r"```bash\n(.*?)```", section("Two commands"), re.S)
    assert block, "no command block under '## Two commands'"
    commands = [line.split()[0] for line in block.group(1).splitlines() if line.strip()]
    assert commands == ["scripts/run", "scripts/test"]
    for command in commands:
        path = ROOT / command
        assert path.is_file() and os.access(path, os.X_OK), f"{command} is missing or not executable"
