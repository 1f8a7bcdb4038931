"""The layers of docs/ARCHITECTURE.md hold in the code.

The engine (synapticllamas.app, .config, .ui and every subpackage but shell, commands and dashboard:
events, rpc, llama, util, and any added later) never imports the shell layer, rich or prompt_toolkit;
the dashboard never imports the shell layer; the dashboard's server does not import its command (the
cycle stays broken); subpackage __init__ files stay empty, so importing one module of a package
costs only that module.

Each import rule is checked twice: statically, on the AST of every module (imports inside functions
and under TYPE_CHECKING included, relative imports resolved), and dynamically, in a fresh interpreter
that imports the modules and then looks at sys.modules (what the imports really pull in).
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

from support import ROOT

PACKAGE = ROOT / "synapticllamas"
NOT_ENGINE = {"shell", "commands", "dashboard"}          # the subpackages outside the engine
ENGINE_TOP_MODULES = ("app", "config", "ui")             # the engine's modules at the top of the package
# the shell layer, and the console script that starts it
SHELL_LAYER = ("synapticllamas.shell", "synapticllamas.commands", "synapticllamas.cli")
TERMINAL_UI = ("rich", "prompt_toolkit")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def subpackages() -> list[str]:
    return sorted(d.name for d in PACKAGE.iterdir() if (d / "__init__.py").is_file())


def package_files(name: str) -> list[Path]:
    """Every module of the subpackage `name`, nested packages included."""
    return sorted(p for p in (PACKAGE / name).rglob("*.py") if "__pycache__" not in p.parts)


def engine_files() -> list[Path]:
    files = [PACKAGE / "__init__.py", *(PACKAGE / f"{m}.py" for m in ENGINE_TOP_MODULES)]
    for name in subpackages():
        if name not in NOT_ENGINE:
            files += package_files(name)
    return files


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import in the file, wherever it is; `from X import y` gives X and
    X.y (y may be a module), relative imports made absolute."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names if alias.name != "*"]
    return found


def within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def static_violations(files: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{line} imports {module}"
            for path in files for line, module in imports(path) if within(module, forbidden)]


def loaded_after_importing(modules: list[str]) -> list[str]:
    """sys.modules of a fresh interpreter (this tree first on its path) after importing `modules`."""
    script = ("import importlib, json, sys\n"
              "for name in json.loads(sys.argv[1]):\n"
              "    importlib.import_module(name)\n"
              "print(json.dumps(sorted(sys.modules)))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(modules)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# ---------------------------------------------------------------- the engine

def test_the_engine_is_what_the_tree_holds():
    """The lists below are computed from the tree: a new engine package (node/, ...) is checked
    without editing this file. This makes sure they are not empty by mistake."""
    engine = {module_name(p) for p in engine_files()}
    assert {"synapticllamas.app", "synapticllamas.config", "synapticllamas.ui", "synapticllamas.events.observer",
            "synapticllamas.rpc.registry", "synapticllamas.llama.supervisor",
            "synapticllamas.util.processes"} <= engine
    assert not any(within(m, (*SHELL_LAYER, "synapticllamas.dashboard")) for m in engine)
    assert {"shell", "commands", "dashboard", "events", "rpc", "llama", "util"} <= set(subpackages())


def test_no_engine_module_imports_the_shell_layer_or_a_terminal_ui_library():
    assert static_violations(engine_files(), SHELL_LAYER + TERMINAL_UI) == []


def test_importing_the_whole_engine_loads_no_shell_layer_and_no_terminal_ui_library():
    loaded = loaded_after_importing([module_name(p) for p in engine_files()])
    assert "synapticllamas.llama.supervisor" in loaded           # the imports did run
    assert [m for m in loaded if within(m, SHELL_LAYER + TERMINAL_UI)] == []


# ---------------------------------------------------------------- the dashboard

def test_the_dashboard_imports_nothing_of_the_shell_layer():
    files = package_files("dashboard")
    assert static_violations(files, SHELL_LAYER) == []
    loaded = loaded_after_importing([module_name(p) for p in files])
    assert "synapticllamas.dashboard.server" in loaded
    assert [m for m in loaded if within(m, SHELL_LAYER)] == []


def test_the_dashboard_server_does_not_import_its_command():
    """command.py (click options, light) imports server.py on use; the other way round would be
    the cycle that was broken."""
    server = PACKAGE / "dashboard" / "server.py"
    assert static_violations([server], ("synapticllamas.dashboard.command",)) == []
    assert "synapticllamas.dashboard.command" not in loaded_after_importing(["synapticllamas.dashboard.server"])


# ---------------------------------------------------------------- lean packages

def test_subpackage_inits_hold_nothing_but_a_docstring():
    """Importing synapticllamas.rpc.probe must not import the rest of rpc/. commands/ is the
    exception: its __init__ is the registry's public face (load_all), checked below."""
    inits = [p for p in PACKAGE.rglob("__init__.py")
             if p.parent != PACKAGE and "commands" not in p.relative_to(PACKAGE).parts]
    assert len(inits) >= 6
    not_empty = []
    for path in inits:
        body = ast.parse(path.read_text()).body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            body = body[1:]                                       # the docstring
        if body:
            not_empty.append(f"{path.relative_to(ROOT)}:{body[0].lineno}")
    assert not_empty == [], "code in a subpackage __init__ (start-up stays lean: keep them empty)"


def test_the_commands_package_loads_only_its_registry_until_load_all():
    """`import synapticllamas.commands` (what the shell's completion and rendering need) costs the
    registry, not the command modules: those load in load_all()."""
    init = PACKAGE / "commands" / "__init__.py"
    top_level = [node for node in ast.parse(init.read_text()).body if isinstance(node, ast.Import | ast.ImportFrom)]
    assert [(type(n).__name__, getattr(n, "module", None)) for n in top_level] == [
        ("ImportFrom", "synapticllamas.commands.registry")]
    loaded = loaded_after_importing(["synapticllamas.commands"])
    assert [m for m in loaded if within(m, ("synapticllamas.commands",))] == [
        "synapticllamas.commands", "synapticllamas.commands.registry"]
