"""Parse llama-server / ggml-rpc-server output lines into typed log records.

llama.cpp prints one of two shapes: `0.00.005.077 I srv  load_model: ...` (timestamp, level letter,
then the message) or bare text (ggml aborts, rpc-server, multi-line continuations). `parse()` never
fails: a line it does not recognise is kind "log" with the level the prefix gave it.
The patterns were taken from the real binaries (tests/fixtures/llama_log/ holds captured output).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

MAX_PARSED = 4096   # longer lines are kept as they are, but not matched against the patterns
_PREFIX = re.compile(r"^\d+\.\d+\.\d+\.\d+ ([IWEDT]) (.*)$")
_LEVELS = {"I": "info", "W": "warning", "E": "error", "D": "debug", "T": "debug"}

# Every pattern is anchored to the form llama.cpp itself prints, never searched for inside a line:
# text from clients (a prompt, a request path) can reach a log line, and a line that merely
# contains "Failed to connect to HOST:PORT" must not make the supervisor blame a backend.
# A logged message is `[tag ]function: text` (`srv    load_model: ...`, `slot print_timing: ...`,
# `llama_model_loader: ...`; the function name is padded and cut to 12 characters).
_SRC = r"^(?:[a-z]{2,5} +)?[A-Za-z_]\w*(?:\(\))?: +"
# GGML_ABORT writes `FILE:LINE: message` to stderr itself, without the log prefix
_FILE_LINE = r"[\w./+-]+\.(?:c|cc|cpp|h):\d+: "     # a source path: no quotes, no spaces
_ABORTED = "^" + _FILE_LINE

# Model loading, in the order llama-server prints it at -lv 4. Each step is one `model_loading`
# progress event; llama.cpp gives no percentage, so progress is "step k of n", not a made-up %.
LOAD_STEPS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("opening model file", re.compile(_SRC + r"loading model '(?P<path>.*)'\s*$")),
    ("reading metadata", re.compile(_SRC + r"loaded meta data with (?P<kv>\d+) key-value pairs "
                                    r"and (?P<tensors>\d+) tensors")),
    ("loading tensors", re.compile(_SRC + r"loading model tensors")),
    ("creating context", re.compile(_SRC + r"constructing llama_context\s*$")),
    ("warming up", re.compile(_SRC + r"warming up the model")),
)
LOAD_STEP_COUNT = len(LOAD_STEPS) + 1   # the last step is "model loaded"

_LOADED = re.compile(r"^(?:srv +)?(?:llama_server|main): +model loaded\s*$")
_LISTENING = re.compile(_SRC + r"(?:server is )?listening on (?P<url>https?://\S+)\s*$")
# ggml-rpc's two aborts, bare lines (older builds printed them without FILE:LINE)
_CONNECT_FAILED = re.compile(rf"^(?:{_FILE_LINE})?Failed to connect to (?P<backend>\S+)\s*$")
_RPC_CRASHED = re.compile(rf"^(?:{_FILE_LINE})?Remote RPC server crashed or returned malformed response\s*$")
_DEVICE = re.compile(_SRC + r"- (?P<name>RPC\d+)\s*: (?P<backend>\S+) \((?P<total>\d+) MiB, (?P<free>\d+) MiB free\)\s*$")
_BUFFER = re.compile(_SRC + r"(?P<device>\w+)(?:\[(?P<backend>[^\]\s]+)\])? +(?P<what>model|KV|compute|output) "
                     r"buffer size = +(?P<mib>\d+(?:\.\d+)?) MiB\s*$")
_OFFLOADED = re.compile(_SRC + r"offloaded (?P<done>\d+)/(?P<total>\d+) layers")
_MODEL_FAILED = re.compile(_SRC + r"(?:failed to load model|error loading model|exiting due to model loading error)")
_BIND_FAILED = re.compile(_SRC + r"couldn't bind HTTP server socket, hostname: (?P<host>[^,]+), port: (?P<port>\d+)\s*$")
_FILE_SIZE = re.compile(_SRC + r"file size += +(?P<mib>\d+(?:\.\d+)?) MiB")
_ABORT = re.compile(_ABORTED + r"(?P<what>.+)$")   # GGML_ABORT: file.cpp:566: message
# ggml-rpc-server: bare printf lines (never a llama.cpp log line: those are matched above)
_RPC_ENDPOINT = re.compile(r"^\s*endpoint\s*: (?P<endpoint>\S+)\s*$")
_RPC_ACCEPTED = re.compile(r"^Accepted client connection")
_RPC_CLOSED = re.compile(r"^Client connection closed")
# per request, for every client: "slot print_timing: id  3 | task 0 | prompt eval time =  40.27 ms /  4 tokens (...)"
_TIMING = re.compile(r"^slot +print_timing: id +(?P<slot>\d+) \| task (?P<task>\d+) \| +(?P<what>prompt eval|eval|total) "
                     r"time = +(?P<ms>[\d.]+) ms / +(?P<tokens>\d+) tokens(?: \( *[\d.]+ ms per token, +(?P<rate>[\d.]+) "
                     r"tokens per second\))?\s*$")
_RPC_STARTING = re.compile(r"^Starting RPC server v(?P<version>\S+)\s*$")
_RPC_CACHE_DIR = re.compile(r"^\s*local cache\s*: (?P<dir>\S(?:.*\S)?)\s*$")
# a device of rpc-server's banner: "  CPU: AMD EPYC (24105 MiB, 24105 MiB free)". Greedy, anchored
# parts only: every output line goes through these on the loop, so no pattern may backtrack
# quadratically on a long line of spaces.
_RPC_DEVICE = re.compile(r"^\s+(?P<name>[^\s:()]+):(?P<description>.*)\((?P<total>\d+) MiB, (?P<free>\d+) MiB free\)\s*$")
_RPC_CACHE_SAVED = re.compile(r"^\[set_tensor\] saved to '(?P<path>.+)'\s*$")
_RPC_BIND_FAILED = re.compile(r"^(?:Failed to create server socket|.*\bbind failed\b|.*Address already in use)")


@dataclass(frozen=True, slots=True)
class LogLine:
    """One output line. `kind` says what it means to the coordinator:

    load_step, model_loaded, listening, device, buffer, offloaded, timing, rpc_connect_failed, rpc_crashed,
    abort, model_failed, bind_failed, rpc_server_started, rpc_endpoint, rpc_cache_dir, rpc_device,
    rpc_cache_saved, rpc_bind_failed, rpc_client_connected, rpc_client_closed, or log (anything
    else)."""
    text: str                 # the line as printed, without the trailing newline
    message: str              # the line without llama.cpp's timestamp/level prefix
    level: str = "info"
    kind: str = "log"
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def is_failure(self) -> bool:
        return self.kind in ("rpc_connect_failed", "rpc_crashed", "abort", "model_failed", "bind_failed")


def _mib(text: str) -> float:
    return round(float(text), 2)


def parse(text: str) -> LogLine:
    text = text.rstrip("\r\n")
    if len(text) > MAX_PARSED:     # no status line is this long (a prompt echo, a dump): no pattern
        return LogLine(text, text, "info", "log")
    m = _PREFIX.match(text)
    level, message = (_LEVELS[m.group(1)], m.group(2)) if m else ("info", text)

    def line(kind: str, lvl: str | None = None, **details: Any) -> LogLine:
        return LogLine(text, message, lvl or level, kind, details)

    # failures first: they matter most and some share words with ordinary lines. The aborts are
    # bare lines (GGML_ABORT prints them itself); the endpoint must be an address, which it is
    # in llama.cpp's own line, and the one it names is given in the address parser's spelling
    if not m and (hit := _CONNECT_FAILED.match(message)):
        from synapticllamas.rpc.addresses import backend_id_or_none

        backend = backend_id_or_none(hit.group("backend"))
        if backend is not None:
            return line("rpc_connect_failed", "error", backend=backend)
    if not m and _RPC_CRASHED.match(message):
        return line("rpc_crashed", "error")
    if m and (hit := _BIND_FAILED.match(message)):
        return line("bind_failed", "error", host=hit.group("host").strip(), port=int(hit.group("port")))
    if level == "error" and _MODEL_FAILED.match(message):
        return line("model_failed", "error")
    if not m and (hit := _ABORT.match(message)):
        return line("abort", "error", error=hit.group("what"))
    if m:
        return _logged(text, message, level, line)
    return _bare(message, line)


def _logged(text: str, message: str, level: str, line: Any) -> LogLine:
    """A llama.cpp log line (timestamp and level prefix): llama-server's own messages."""
    for step, (stage, pattern) in enumerate(LOAD_STEPS, 1):
        if (hit := pattern.match(message)):
            # the counts (\d+ groups) as numbers; the path stays text, even when it is "123"
            extra = {k: (v if k == "path" else int(v)) for k, v in hit.groupdict().items()}
            return LogLine(text, message, level, "load_step",
                           {"stage": stage, "step": step, "steps": LOAD_STEP_COUNT, **extra})
    if _LOADED.match(message):
        return line("model_loaded", stage="model loaded", step=LOAD_STEP_COUNT, steps=LOAD_STEP_COUNT)
    if (hit := _LISTENING.match(message)):
        return line("listening", url=hit.group("url"))
    if (hit := _TIMING.match(message)):
        rate = hit.group("rate")
        return line("timing", slot=int(hit.group("slot")), task=int(hit.group("task")), what=hit.group("what"),
                    ms=float(hit.group("ms")), tokens=int(hit.group("tokens")),
                    tokens_per_second=float(rate) if rate else None)
    if (hit := _BUFFER.match(message)):
        device = hit.group("backend") or hit.group("device")
        return line("buffer", device=device, what=hit.group("what").lower(), mib=_mib(hit.group("mib")))
    if (hit := _DEVICE.match(message)):
        return line("device", name=hit.group("name"), backend=hit.group("backend"),
                    total_mib=int(hit.group("total")), free_mib=int(hit.group("free")))
    if (hit := _OFFLOADED.match(message)):
        return line("offloaded", layers=int(hit.group("done")), total_layers=int(hit.group("total")))
    if (hit := _FILE_SIZE.match(message)):
        return line("file_size", mib=_mib(hit.group("mib")))
    return line("log")


def _bare(message: str, line: Any) -> LogLine:
    """A line without the log prefix: ggml-rpc-server's banner and notices (printf)."""
    if (hit := _RPC_STARTING.match(message)):
        return line("rpc_server_started", version=hit.group("version"))
    if (hit := _RPC_ENDPOINT.match(message)):
        return line("rpc_endpoint", endpoint=hit.group("endpoint"))
    if (hit := _RPC_CACHE_DIR.match(message)):
        cache = hit.group("dir")
        return line("rpc_cache_dir", dir=None if cache == "n/a" else cache)
    if (hit := _RPC_CACHE_SAVED.match(message)):
        return line("rpc_cache_saved", path=hit.group("path"))
    if (hit := _RPC_DEVICE.match(message)):
        return line("rpc_device", name=hit.group("name"), description=hit.group("description").strip(),
                    total_mib=int(hit.group("total")), free_mib=int(hit.group("free")))
    if _RPC_BIND_FAILED.match(message):
        return line("rpc_bind_failed", "error")
    if _RPC_ACCEPTED.match(message):
        return line("rpc_client_connected")
    if _RPC_CLOSED.match(message):
        return line("rpc_client_closed")
    return line("log")


class LoadReport:
    """Collects what the load log says about devices: per-backend buffer sizes and offloaded layers.

    The coordinator feeds it every parsed line of one run and puts `summary()` in the `model_load`
    and `start` events, so a dashboard sees how the model was split over the backends."""

    def __init__(self) -> None:
        self.devices: dict[str, dict[str, Any]] = {}
        self.layers: dict[str, int] = {}
        self.file_mib: float | None = None

    def feed(self, rec: LogLine) -> None:
        if rec.kind == "device":
            self.devices.setdefault(rec.details["backend"], {}).update(
                total_mib=rec.details["total_mib"], free_mib=rec.details["free_mib"])
        elif rec.kind == "buffer":
            entry = self.devices.setdefault(rec.details["device"], {})
            key = f"{rec.details['what']}_mib"
            entry[key] = round(entry.get(key, 0.0) + rec.details["mib"], 2)
        elif rec.kind == "offloaded":
            self.layers = {"offloaded": rec.details["layers"], "total": rec.details["total_layers"]}
        elif rec.kind == "file_size":
            self.file_mib = rec.details["mib"]

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"devices": self.devices}
        if self.layers:
            out["layers"] = self.layers
        if self.file_mib is not None:
            out["file_mib"] = self.file_mib
        return out


class RequestTimings:
    """Joins one request's print_timing lines (prompt eval, eval, total) into one record.

    llama-server prints them for every request whoever sent it, so this sees requests made with
    curl as well as our own `ask` and `chat`."""

    def __init__(self) -> None:
        self._open: dict[tuple[int, int], dict[str, Any]] = {}

    def feed(self, rec: LogLine) -> dict[str, Any] | None:
        """The finished request's figures when `rec` is its `total time` line, else None."""
        if rec.kind != "timing":
            return None
        d = rec.details
        key = (d["slot"], d["task"])
        if d["what"] == "prompt eval":
            self._open[key] = {"slot": d["slot"], "task": d["task"], "prompt_tokens": d["tokens"],
                               "prompt_ms": d["ms"]}
        elif d["what"] == "eval":
            self._open.setdefault(key, {"slot": d["slot"], "task": d["task"]}).update(
                generated_tokens=d["tokens"], generation_ms=d["ms"], tokens_per_second=d["tokens_per_second"])
        else:
            done = self._open.pop(key, {"slot": d["slot"], "task": d["task"]})
            done["total_ms"] = d["ms"]
            done.setdefault("prompt_tokens", 0)
            done.setdefault("prompt_ms", 0.0)
            done.setdefault("generated_tokens", 0)
            done.setdefault("generation_ms", 0.0)
            if done.get("tokens_per_second") is None:   # llama.cpp's own figure when it printed one
                ms = done["generation_ms"]
                done["tokens_per_second"] = round(done["generated_tokens"] * 1000.0 / ms, 2) if ms > 0 else None
            return done
        return None
