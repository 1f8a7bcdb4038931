"""Requests to the coordinator that survive its recoveries: `coordinator ask` and `chat`.

A request issued while the coordinator restarts (after a crash, a failover, a failed /health), or
in flight when llama-server dies, does not fail for a loss the supervisor recovers from: it says in
one line that it waits and why, waits for `running` (at most the start timeout), and is sent again
once. A second failure, or a coordinator that is stopped, fatal or never started, is one line of
error. Each request is a `request` and a `response` event (sampled, like raw lines); llama-server's
own `inference` event counts every request, ours and other clients'.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from synapticllamas.events.contract import CoordinatorEvent
from synapticllamas.llama import http as llama_http
from synapticllamas.llama.lifecycle import State
from synapticllamas.llama.preflight import CoordinatorError

if TYPE_CHECKING:
    from synapticllamas.llama.coordinator import CoordinatorManager
    from synapticllamas.llama.supervisor import Run

Say = Callable[[str], object]


class CoordinatorClient:
    def __init__(self, manager: CoordinatorManager) -> None:
        self.mgr = manager

    # ------------------------------------------------------------ waiting for the coordinator

    def check(self) -> None:
        """Raise CoordinatorError unless a request can be sent now or after a recovery."""
        mgr = self.mgr
        if mgr.state != State.RUNNING and not mgr.recovering:
            raise CoordinatorError(f"no running coordinator (state: {mgr.state}); `coordinator start` first")

    async def _serving(self, say: Say | None) -> tuple[llama_http.Endpoint, Run | None]:
        mgr = self.mgr
        if mgr.state != State.RUNNING:
            self.check()
            if say is not None:
                say(f"[the coordinator is {mgr.state} ({mgr.recovery_reason()}): waiting for it, at most "
                    f"{mgr.settings.coordinator_start_timeout:g}s]")
            await mgr.wait_running(mgr.settings.coordinator_start_timeout)
        return mgr.serving_endpoint()

    async def _with_retry(self, kind: str, path: str, payload: dict[str, Any], details: dict[str, Any],
                          on_chunk: Callable[[dict[str, Any]], bool], say: Say) -> dict[str, Any]:
        """Send, stream through on_chunk (True when it saw the last chunk); once more after a
        recoverable loss. Returns {"url", "seconds", "first_token_s", "final"}."""
        mgr = self.mgr
        mgr.requests += 1
        try:
            for attempt in (1, 2):
                endpoint, run = await self._serving(say if attempt == 1 else None)   # the retry said it
                url = endpoint.url
                mgr.hooks.call("on_request", _notice(CoordinatorEvent.REQUEST, f"{kind} request to {url}",
                                                     {"url": url, "kind": kind, "attempt": attempt, **details}))
                started = time.monotonic()
                first: float | None = None
                final: dict[str, Any] | None = None
                error = "the stream ended before the last token"
                try:
                    async for chunk in llama_http.stream(endpoint, path, payload):
                        if first is None and _has_text(chunk):
                            first = time.monotonic() - started
                        if on_chunk(chunk):
                            final = chunk
                            break
                except (OSError, ValueError) as exc:
                    error = str(exc) or type(exc).__name__
                if final is not None:
                    return {"url": url, "seconds": round(time.monotonic() - started, 3),
                            "first_token_s": round(first, 3) if first is not None else None, "final": final}
                if run is not None:
                    # it probably died under us: wait (bounded) for the exit, whose diagnosis says why
                    await asyncio.wait({run.ended}, timeout=3.0)
                    if run.ended.done():
                        error = run.ended.result()
                mgr.hooks.call("on_request", _notice(CoordinatorEvent.RESPONSE, f"{kind} failed: {error}",
                                                     {"url": url, "kind": kind, "attempt": attempt, "error": error},
                                                     "error"))
                if attempt == 1 and mgr.recovering:
                    say(f"[{error}; the coordinator is being restarted: sending the request again once it "
                        "is back]")
                    continue
                raise CoordinatorError(f"the {kind} failed: {error}")
            raise AssertionError("unreachable")
        finally:
            mgr.requests -= 1

    # ------------------------------------------------------------ the two kinds of request

    async def ask(self, prompt: str, n_predict: int, on_token: Callable[[str], None],
                  say: Say = print) -> dict[str, Any]:
        """One raw completion (/completion), streamed; returns counts and timings."""
        tokens = 0

        def chunk(event: dict[str, Any]) -> bool:
            nonlocal tokens
            if event.get("content"):
                tokens += 1
                on_token(event["content"])
            return bool(event.get("stop"))

        done = await self._with_retry("completion", "/completion",
                                      {"prompt": prompt, "n_predict": n_predict, "stream": True},
                                      {"prompt_chars": len(prompt), "n_predict": n_predict}, chunk, say)
        final, timings = done["final"], done["final"].get("timings", {})
        result = {"tokens": tokens, "seconds": done["seconds"], "stop_type": final.get("stop_type"),
                  "tokens_per_s": round(timings.get("predicted_per_second", 0.0), 1),
                  "prompt_tokens": final.get("tokens_evaluated"), "first_token_s": done["first_token_s"]}
        self.mgr.hooks.call("on_request", _notice(CoordinatorEvent.RESPONSE,
                                                  f"completion: {tokens} tokens in {done['seconds']:g}s",
                                                  {"url": done["url"], "kind": "completion", **result}))
        return result

    async def chat(self, messages: list[dict[str, str]], on_token: Callable[[str], None], say: Say = print,
                   max_tokens: int | None = None) -> dict[str, Any]:
        """One chat turn (/v1/chat/completions, the model's own template), streamed; returns the
        reply and its figures."""
        parts: list[str] = []
        usage: dict[str, Any] = {}
        timings: dict[str, Any] = {}

        def chunk(event: dict[str, Any]) -> bool:
            for choice in event.get("choices") or ():
                text = (choice.get("delta") or {}).get("content")
                if text:
                    parts.append(text)
                    on_token(text)
            if isinstance(event.get("usage"), dict):
                usage.update(event["usage"])
            if isinstance(event.get("timings"), dict):
                timings.update(event["timings"])
            return bool(usage)          # the last chunk carries the usage (we ask for it)

        payload: dict[str, Any] = {"messages": messages, "stream": True, "stream_options": {"include_usage": True}}
        if max_tokens:
            payload["max_tokens"] = max_tokens
        done = await self._with_retry("chat", "/v1/chat/completions", payload,
                                      {"messages": len(messages), "prompt_chars": sum(len(m["content"]) for m in messages)},
                                      chunk, say)
        generated = int(usage.get("completion_tokens") or len(parts))
        rate = timings.get("predicted_per_second")
        result = {"reply": "".join(parts), "prompt_tokens": usage.get("prompt_tokens"), "tokens": generated,
                  "seconds": done["seconds"], "first_token_s": done["first_token_s"],
                  "tokens_per_s": round(rate, 1) if isinstance(rate, (int, float)) else None}
        self.mgr.hooks.call("on_request", _notice(
            CoordinatorEvent.RESPONSE, f"chat: {generated} tokens in {done['seconds']:g}s",
            {"url": done["url"], "kind": "chat", **{k: v for k, v in result.items() if k != "reply"}}))
        return result


def _has_text(chunk: dict[str, Any]) -> bool:
    if chunk.get("content"):
        return True
    return any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or ())


def _notice(event_type: str, message: str, details: dict[str, Any], level: str = "info") -> Any:
    from synapticllamas.llama.hooks import Notice

    return Notice(event_type, message, details, level)
