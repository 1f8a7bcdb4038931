"""What one llama-server run's output says: model progress, buffers, per-request figures, failures.

The process room (process.py) hands each output line here. Lines are parsed by llama/log.py, which
matches llama.cpp's own log forms only; what a client sends (a prompt echoed in a log line) is
text like any other. Secrets of the argv are scrubbed first (llama-server echoes a bad
`--api-key=K` whole). Addresses llama-server names are the ones it dialled: they are mapped back
to the backend behind them (a secured link's local end -> the node).

The interpreter only reports: it calls the hooks (model_loading, model_load, model_load_failed,
inference, raw lines) and returns what the supervisor needs to act on (`Seen`); it never changes
the coordinator's state.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from enum import Enum
from typing import TYPE_CHECKING, Any

from synapticllamas.events.contract import CoordinatorEvent, ModelEvent
from synapticllamas.llama import args as llama_args
from synapticllamas.llama.hooks import Hooks, Notice
from synapticllamas.llama.log import LoadReport, LogLine, RequestTimings, parse

if TYPE_CHECKING:
    from synapticllamas.llama.preflight import Plan

LAST_LINES = 12     # kept for the `stop` event: the reason it died is usually in the last few


class Seen(Enum):
    LOADED = "loaded"            # the model is loaded: ask /health now
    LISTENING = "listening"      # the HTTP server listens (it may still be loading: 503)
    UPLOADING = "uploading"      # the first model buffer on an RPC backend: the weights go out now


class LogInterpreter:
    def __init__(self, plan: Plan, pid: int, hooks: Hooks, hidden: list[str],
                 keep: Callable[[float, int, str, str], None]) -> None:
        self.plan = plan
        self.pid = pid
        self.hooks = hooks
        self.hidden = hidden
        self.keep = keep                        # the `coordinator logs` buffer, across runs
        self.started = time.monotonic()
        self.report = LoadReport()
        self.timings = RequestTimings()
        self.failures: list[LogLine] = []
        self.lines: deque[str] = deque(maxlen=LAST_LINES)
        self._uploading = False
        self.loaded = False                     # the model_loaded line was seen
        self.measured_ms: float | None = None      # the last request's generation, ms per token (8 tokens or more)

    def feed(self, stream: str, text: str) -> Seen | None:
        text = llama_args.scrub(text, self.hidden)
        rec = self._backends_named(parse(text))
        self.keep(time.time(), self.pid, stream, text)
        self.lines.append(text)
        self.report.feed(rec)
        self.hooks.call("on_log", rec, {"stream": stream, "pid": self.pid})
        model = self.plan.model
        if rec.is_failure:
            if rec.kind == "model_failed" and not any(f.kind == "model_failed" for f in self.failures):
                self.hooks.call("on_model_progress", Notice(
                    ModelEvent.LOAD_FAILED, f"model {model.name} failed to load: "
                    f"{rec.message.split(': ', 1)[-1]}", {"model_path": str(model), "pid": self.pid}, "error"))
            self.failures.append(rec)
        elif rec.kind == "load_step":
            d = rec.details
            self.hooks.call("on_model_progress", Notice(
                ModelEvent.LOADING, f"loading model {model.name}: {d['stage']} ({d['step']}/{d['steps']})",
                {"model_path": str(model), "pid": self.pid, **d}))
        elif (rec.kind == "buffer" and rec.details["what"] == "model" and rec.details["device"] in self.plan.backends
              and not self._uploading):
            self._uploading = True
            return Seen.UPLOADING
        elif rec.kind == "model_loaded":
            self.loaded = True
            load_s = round(time.monotonic() - self.started, 3)
            self.hooks.call("on_model_progress", Notice(
                ModelEvent.LOAD, f"model {model.name} loaded in {load_s:g}s",
                {"model_path": str(model), "pid": self.pid, "load_s": load_s,
                 "rpc_backends": self.plan.backends, **rec.details, **self.report.summary()}))
            return Seen.LOADED
        elif rec.kind == "listening":
            return Seen.LISTENING
        elif rec.kind == "timing" and (done := self.timings.feed(rec)) is not None:
            rate = done["tokens_per_second"]
            if done["generated_tokens"] >= 8 and done["generation_ms"] > 0:
                self.measured_ms = done["generation_ms"] / done["generated_tokens"]
            self.hooks.call("on_inference", Notice(
                CoordinatorEvent.INFERENCE, f"request {done['task']} (slot {done['slot']}): {done['prompt_tokens']} "
                f"prompt + {done['generated_tokens']} generated tokens in {done['total_ms']:.0f} ms"
                + (f", {rate:g} tokens/s" if rate else ""),
                {**done, "pid": self.pid, "port": self.plan.port, "rpc_backends": self.plan.backends}))
        return None

    def _backends_named(self, rec: LogLine) -> LogLine:
        """The same line with a dialled address (a link's local end) replaced by its backend."""
        if not self.plan.dial:
            return rec
        key = {"rpc_connect_failed": "backend", "device": "backend", "buffer": "device"}.get(rec.kind)
        if key is None or key not in rec.details:
            return rec
        backend = self.plan.backend_of(rec.details[key])
        if backend == rec.details[key]:
            return rec
        return LogLine(rec.text, rec.message, rec.level, rec.kind, {**rec.details, key: backend})

    # ------------------------------------------------------------ after the exit

    def dead_named(self) -> list[str]:
        """Backends llama.cpp said it could not connect to."""
        return [f.details["backend"] for f in self.failures if f.kind == "rpc_connect_failed"]

    @property
    def rpc_crashed(self) -> bool:
        return any(f.kind == "rpc_crashed" for f in self.failures)

    def diagnosis(self, dead: list[str], fallback: str | None) -> str:
        """One line: why did it stop? The most specific failure the log printed."""
        order = ("rpc_connect_failed", "rpc_crashed", "bind_failed", "model_failed", "abort")
        failure = min(self.failures, key=lambda f: order.index(f.kind) if f.kind in order else len(order),
                      default=None)
        if failure is None:
            return fallback or ""
        if failure.kind == "rpc_connect_failed":
            return f"Failed to connect to RPC backend {failure.details['backend']}"
        # drop the source tag: "srv  load_model: ...", "ggml-rpc.cpp:566: ..."
        text = failure.message.split(": ", 1)[-1]
        if failure.kind == "rpc_crashed" and dead:
            text += f" (backend {', '.join(dead)} unreachable)"
        return text

    def summary(self) -> dict[str, Any]:
        return self.report.summary()
