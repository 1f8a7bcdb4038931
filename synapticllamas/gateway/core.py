"""The gateway's request core: every request to the model, the HTTP clients' and the shell's own.

One path (docs/ARCHITECTURE.md, "Gateway"): a request waits in the admission line until
llama-server runs and has a free slot (held while the coordinator starts, restarts, fails over or
waits for memory), is sent as a streamed raw /completion (a chat over the model's own template,
from /apply-template), and, when llama-server dies under it, goes back to the head of the line and
is sent again once the coordinator is back. A request that had already delivered text is
**resumed**: the prompt again plus the tokens already delivered (their ids, as llama-server sent
them, so nothing is tokenised anew), asking for the tokens still allowed; the client's stream just
goes on. With greedy sampling the resumed answer is the uninterrupted one (tests/e2e/test_gateway.py
checks it on a SIGKILLed backend).

Only whole deliveries count: llama-server sends a token with empty text while it holds back a
possible stop word (or half of a UTF-8 character, for which it sends no token at all), so the
tokens after the last chunk that carried text are not "delivered" and are generated again.
Every request ends in one `gateway/request` event (never sampled).
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from synapticllamas.events.contract import Component, GatewayEvent
from synapticllamas.gateway.admission import Admission, Full
from synapticllamas.gateway.resume import Diverged, Progress
from synapticllamas.gateway.upstream import Lost, Refused
from synapticllamas.llama.lifecycle import State
from synapticllamas.llama.preflight import CoordinatorError

if TYPE_CHECKING:
    from synapticllamas.events.observer import Observer
    from synapticllamas.gateway.upstream import Upstream
    from synapticllamas.llama.coordinator import CoordinatorManager

Say = Callable[[str], object]
FINISH = {"eos": "stop", "word": "stop", "limit": "length"}
RETRY_AFTER_S = 5


class Unavailable(Exception):
    """The request cannot be served now (503): why, and when to try again."""

    def __init__(self, message: str, retry_after: int = RETRY_AFTER_S) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class Failed(Exception):
    """The request was sent and could not be completed (502): llama-server went away for good."""


@dataclass
class Request:
    api: str                                   # openai, ollama, shell
    kind: str                                  # chat or completion
    params: dict[str, Any] = field(default_factory=dict)    # /completion's fields: n_predict, temperature, stop...
    messages: list[dict[str, Any]] | None = None             # chat: what /apply-template renders
    template: dict[str, Any] = field(default_factory=dict)  # chat: more of /apply-template's fields
    prompt: str | None = None                  # completion: the raw prompt
    model: str | None = None                   # the name the client asked for (events only)


@dataclass
class Outcome:
    """What a finished request reports (and its event carries)."""
    finish_reason: str | None = None           # stop, length
    prompt_tokens: int | None = None
    tokens: int = 0                            # generated, over every segment
    text_chars: int = 0
    queue_s: float | None = None               # from arrival to the first admission
    first_token_s: float | None = None         # from arrival to the first text
    seconds: float = 0.0
    held: int = 0                              # times it waited for the coordinator
    resumed: int = 0                           # times it was sent again after a cut
    status: str = "ok"
    http_status: int = 200
    error: str | None = None

    @property
    def tokens_per_s(self) -> float | None:
        if self.first_token_s is None or self.tokens < 2 or self.seconds <= self.first_token_s:
            return None
        return round((self.tokens - 1) / (self.seconds - self.first_token_s), 1)

    def details(self) -> dict[str, Any]:
        out = {k: v for k, v in vars(self).items() if v is not None}
        out["tokens_per_s"] = self.tokens_per_s
        return out


class Gateway:
    """The request core; `server.py` puts HTTP in front of it, `commands/` the shell's ask and chat."""

    def __init__(self, settings: Any, observer: Observer | None, coordinator: CoordinatorManager) -> None:
        self.settings = settings
        self.observer = observer
        self.coordinator = coordinator
        self.admission = Admission(settings.coordinator_parallel, settings.gateway_max_waiting, self._ready)
        self.in_flight = 0                     # admitted or waiting: what rebalance must not cut
        self._upstream: Upstream | None = None
        self._changed = asyncio.Event()
        self.totals: dict[str, int] = {"requests": 0, "ok": 0, "failed": 0, "unavailable": 0, "resumed": 0,
                                       "cancelled": 0, "refused": 0}
        coordinator.in_flight = lambda: self.in_flight
        coordinator.hooks.subscribe("on_state_change", self._state_changed)

    # ------------------------------------------------------------ the coordinator's side

    def _ready(self) -> bool:
        return self.coordinator.state == State.RUNNING

    def holding(self) -> bool:
        """Will the coordinator be running soon (a start, restart, failover, wait for memory)?"""
        c = self.coordinator
        return c.state in (State.RUNNING, State.STARTING) or c.recovering

    def _state_changed(self, _change: Any) -> None:
        self.admission.poke()
        self._changed.set()          # waiters look again: held on, or refused (stopped, fatal)

    @property
    def upstream(self) -> Upstream:
        if self._upstream is None:
            from synapticllamas.gateway.upstream import Upstream

            self._upstream = Upstream()
        return self._upstream

    async def close(self) -> None:
        if self._upstream is not None:
            await self._upstream.close()
            self._upstream = None

    def status(self) -> dict[str, Any]:
        return {"slots": self.admission.slots, "busy": self.admission.busy, "waiting": self.admission.waiting,
                "in_flight": self.in_flight, **self.totals}

    def _why_waiting(self) -> str:
        c = self.coordinator
        if c.state == State.RUNNING:
            return f"all {self.admission.slots} llama-server slots are busy"
        if c.state == State.STARTING and not c.recovering:
            return "the coordinator is starting"
        return f"the coordinator is {c.state} ({c.recovery_reason()})"

    def _not_serving(self) -> Unavailable:
        c = self.coordinator
        hint = "; `coordinator start` in the shell" if c.state in (State.STOPPED, State.EXITED, State.FATAL) else ""
        return Unavailable(f"no coordinator running (state: {c.state}){hint}", 10)

    # ------------------------------------------------------------ one request

    async def _admit(self, out: Outcome, arrived: float, front: bool, say: Say | None) -> None:
        """A slot with llama-server running, or Unavailable (503)."""
        if not self.holding():
            raise self._not_serving()
        timeout = self.settings.gateway_hold_timeout
        waited = not self._ready()
        if waited:
            out.held += 1
            if say is not None and not front:      # after a cut, the cut's own line said it
                say(f"[{self._why_waiting()}: waiting for it, at most {timeout:g}s]")
        # the wait ends early when the coordinator stops for good (stop, fatal): state changes poke
        acquire = asyncio.ensure_future(self.admission.acquire(timeout, front))
        try:
            while not acquire.done():
                self._changed.clear()
                changed = asyncio.ensure_future(self._changed.wait())
                try:
                    await asyncio.wait({acquire, changed}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    changed.cancel()
                if not acquire.done() and not self.holding():
                    raise self._not_serving()
            acquire.result()
        except Full:
            raise Unavailable(f"{self.admission.waiting} requests are waiting already (gateway_max_waiting="
                              f"{self.admission.max_waiting}); {self._why_waiting()}", 1) from None
        except TimeoutError:
            raise Unavailable(f"waited {timeout:g}s (gateway_hold_timeout): {self._why_waiting()}",
                              RETRY_AFTER_S) from None
        finally:
            if not acquire.done():
                acquire.cancel()
        if out.queue_s is None:
            out.queue_s = round(time.monotonic() - arrived, 3)

    @contextlib.contextmanager
    def _accounted(self, request: Request, out: Outcome, arrived: float,
                   progress: Progress | None = None) -> Iterator[None]:
        """Count the request in flight while it lasts; at its end, its status and one event."""
        self.in_flight += 1
        self.totals["requests"] += 1
        try:
            yield
        except Unavailable as exc:
            out.status, out.http_status, out.error = "unavailable", 503, exc.message
            raise
        except Refused as exc:
            out.status, out.http_status, out.error = "refused", exc.status, exc.message
            raise
        except Failed as exc:
            out.status, out.http_status, out.error = "failed", 502, str(exc)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            out.status, out.http_status, out.error = "cancelled", 499, "the client went away"
            raise
        finally:
            self.in_flight -= 1
            out.seconds = round(time.monotonic() - arrived, 3)
            if progress is not None:
                out.tokens = progress.tokens
                out.text_chars = len(progress.text)
            self._report(request, out)

    async def stream(self, request: Request, say: Say | None = None, admitted: Callable[[], object] | None = None,
                     out: Outcome | None = None) -> AsyncGenerator[str, None]:
        """The answer's text as it comes. Raises Unavailable before anything was sent, Refused
        for a request llama-server will not take, Failed when it could not be completed.
        `admitted` is called once, when the first slot is granted (a stream's headers can go);
        `out` gets the figures (finish reason, tokens, times) as they become known."""
        out = out if out is not None else Outcome()
        arrived = time.monotonic()
        progress = Progress(request.params)
        prompt: str | None = request.prompt
        front = False
        with self._accounted(request, out, arrived, progress):
            while True:
                await self._admit(out, arrived, front, say)
                if admitted is not None:
                    admitted()
                    admitted = None
                run = None
                try:
                    endpoint, run = self.coordinator.serving_endpoint()
                    if prompt is None:
                        body = {"messages": request.messages, **request.template}
                        prompt = str((await self.upstream.call(endpoint, "POST", "/apply-template", body))["prompt"])
                    payload = progress.payload(prompt)
                    if payload is None:            # the budget was spent before the cut
                        out.finish_reason = "length"
                        break
                    async for chunk in self.upstream.stream(endpoint, "/completion", payload):
                        if out.prompt_tokens is None and isinstance(chunk.get("tokens_evaluated"), int):
                            out.prompt_tokens = chunk["tokens_evaluated"]
                        if self.admission.busy > 1:
                            progress.shared = True   # batched with others: no replay can repeat it
                        text = progress.feed(chunk)
                        if text:
                            if out.first_token_s is None:
                                out.first_token_s = round(time.monotonic() - arrived, 3)
                            yield text
                        if chunk.get("stop") is True:
                            out.finish_reason = FINISH.get(str(chunk.get("stop_type")), "stop")
                            break
                    break
                except Diverged:
                    progress.diverged()          # closing the stream stopped that generation
                    front = True
                except Lost as exc:
                    reason = str(exc)
                    if run is not None:
                        # it probably died under us: the exit's diagnosis says why (bounded wait)
                        await asyncio.wait({run.ended}, timeout=3.0)
                        if run.ended.done() and not run.ended.cancelled():
                            reason = run.ended.result()
                    still_up = self._ready() and run is not None and self.coordinator.run is run
                    if not self.holding() or (still_up and progress.cuts >= 2):
                        raise Failed(reason) from None
                    progress.cut()
                    out.resumed += 1
                    self.totals["resumed"] += 1
                    front = True
                    if say is not None:
                        say(f"[{reason}; the coordinator is being restarted: "
                            f"{'resuming the answer' if progress.delivered else 'sending the request again'} "
                            "once it is back]")
                except CoordinatorError as exc:          # it stopped between admission and the send
                    raise Unavailable(str(exc), RETRY_AFTER_S) from None
                finally:
                    self.admission.release()

    async def call(self, request: Request, path: str, body: dict[str, Any]) -> Any:
        """One JSON request passed on to llama-server (embeddings): held and queued like the
        others, and sent again once after a cut (it has no stream to resume)."""
        out = Outcome()
        arrived = time.monotonic()
        with self._accounted(request, out, arrived):
            for attempt in (1, 2):
                await self._admit(out, arrived, attempt > 1, None)
                run = None
                try:
                    endpoint, run = self.coordinator.serving_endpoint()
                    return await self.upstream.call(endpoint, "POST", path, body, timeout=None)
                except Lost as exc:
                    if run is not None:
                        await asyncio.wait({run.ended}, timeout=3.0)
                    if attempt == 2 or not self.holding():
                        raise Failed(str(exc)) from None
                    out.resumed += 1
                except CoordinatorError as exc:
                    raise Unavailable(str(exc), RETRY_AFTER_S) from None
                finally:
                    self.admission.release()
            raise AssertionError("unreachable")

    async def complete(self, request: Request, say: Say | None = None,
                       on_text: Callable[[str], object] | None = None) -> tuple[str, Outcome]:
        """The whole answer (streamed to `on_text` as it comes) and its figures."""
        parts: list[str] = []
        out = Outcome()
        async for text in self.stream(request, say, out=out):
            parts.append(text)
            if on_text is not None:
                on_text(text)
        return "".join(parts), out

    def refused(self, api: str, kind: str, http_status: int, message: str) -> None:
        """A request turned away at the door (a bad body, no key): counted and one event too."""
        self.totals["requests"] += 1
        self._report(Request(api, kind), Outcome(status="refused", http_status=http_status, error=message))

    # ------------------------------------------------------------ the event

    def _report(self, request: Request, out: Outcome) -> None:
        key = {"ok": "ok", "unavailable": "unavailable", "refused": "refused", "failed": "failed",
               "cancelled": "cancelled"}[out.status]
        self.totals[key] += 1
        if self.observer is None:
            return
        details = {"api": request.api, "kind": request.kind, "model": request.model or self._model_name(),
                   "queue_depth": self.admission.waiting, "in_flight": self.in_flight, **out.details()}
        if request.messages is not None:
            details["messages"] = len(request.messages)
        figures = f"{out.tokens} tokens in {out.seconds:g}s"
        if out.first_token_s is not None:
            figures += f", first after {out.first_token_s:g}s"
        extra = "".join(f", {n} {what}" for n, what in ((out.held, "held"), (out.resumed, "resumed")) if n)
        if out.status == "ok":
            message, level = f"{request.api} {request.kind}: {figures}{extra}", "info"
        else:
            message = f"{request.api} {request.kind} {out.status} ({out.http_status}): {out.error}{extra}"
            level = "info" if out.status == "cancelled" else "warning"
        self.observer.emit(Component.GATEWAY, GatewayEvent.REQUEST, message, details, level=level)

    def model_path(self) -> str | None:
        """The model served (or last served, or configured): read per request, so without the
        whole status() (which walks the placement and the registry)."""
        run = self.coordinator.run if self.coordinator.attached is None else None
        if run is not None:
            return str(run.plan.model)
        if self.coordinator.attached is not None:
            return self.coordinator.status().get("model") or self.settings.model
        return self.settings.model

    def _model_name(self) -> str | None:
        model = self.model_path()
        return model_name(model) if model else None


def model_name(path: str) -> str:
    """What clients call the model: the GGUF file's name without `.gguf`."""
    name = path.rsplit("/", 1)[-1]
    return name[:-5] if name.lower().endswith(".gguf") else name
