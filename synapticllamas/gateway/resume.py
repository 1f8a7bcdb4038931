"""What the client already has of an answer, and how to go on after llama-server died under it.

Two ways to go on, chosen per request (measured in docs/ARCHITECTURE.md, "Gateway"):
- **replay** for a deterministic request (temperature <= 0, or a fixed seed) that llama-server
  decoded alone: the same request again from the start, with the text the client already has
  skipped as it is generated again.
  llama.cpp's CPU kernels give a prompt evaluated in one batch different rounding from the same
  tokens generated one by one (here 10-13 of 28 resume points drifted at -ub 512, none at -ub 48 or
  less), so a prefix resume would not give the uninterrupted answer; generating again does. Should
  it still differ from what was delivered (another placement after a failover), the replay stops
  there and the answer goes on as a prefix resume. A request that shared llama-server's batch
  with others had no reproducible answer to begin with (measured under load: 1 prompt in 12 gave
  the same greedy answer in every uninterrupted run), so it resumes by prefix, which is faster.
- **prefix** otherwise (sampled answers have no "the" answer to match): the prompt plus the ids
  of the tokens already delivered, asking only for what is still allowed. Fast: one prompt
  evaluation, no tokens generated twice.

Only whole deliveries count: llama-server sends a token with empty text while it holds back a
possible stop word (and sends no chunk at all for half a UTF-8 character), so the tokens after the
last chunk that carried text are generated again rather than assumed delivered. So a stop word
never spans a cut: what was delivered never ends in the beginning of one. Pure: no I/O,
unit-tested in tests/unit/test_gateway_resume.py.
"""
from __future__ import annotations

from typing import Any


class Diverged(Exception):
    """A replay generated something other than what the client already has."""


def deterministic(params: dict[str, Any]) -> bool:
    temperature = params.get("temperature")
    greedy = isinstance(temperature, (int, float)) and temperature <= 0
    top_k_one = params.get("top_k") == 1
    seeded = isinstance(params.get("seed"), int) and params["seed"] >= 0
    return greedy or top_k_one or seeded


class Progress:
    def __init__(self, params: dict[str, Any]) -> None:
        self.params = params
        self.replay_ok = deterministic(params)
        self.delivered: list[str] = []       # the texts the client got, in order
        self.committed: list[int] = []       # ids of the tokens behind them
        self.ids_ok = True                   # False once llama-server left a token's id out
        self.cuts = 0
        self.shared = False                  # decoded while other requests were (in llama-server's batch)
        self.mode = "first"                  # first, replay, prefix
        self.base = 0                        # tokens generated before this segment's prompt
        self._pending: list[int] = []
        self._tokens: list[int] = []         # this segment's ids (a replay's, from the start)
        self._seen = ""                      # a replay's text so far, while it is still skipping
        self.tokens = 0                      # generated, over every segment

    @property
    def text(self) -> str:
        return "".join(self.delivered)

    def cut(self) -> None:
        """llama-server stopped answering: the next segment goes on from what was delivered."""
        self.cuts += 1
        self._pending.clear()
        # a replay can only give back the answer of a request that was decoded alone: batched with
        # others, llama.cpp rounds differently, so not even an uninterrupted greedy answer repeats
        self.mode = "replay" if self.replay_ok and self.delivered and not self.shared else "prefix"

    def diverged(self) -> None:
        """The replay differed from what was delivered: go on from it as a prefix instead."""
        self.replay_ok = False
        self.mode = "prefix"
        self._pending.clear()

    def payload(self, prompt: str) -> dict[str, Any] | None:
        """The /completion body of the next segment; None when the token budget is spent."""
        payload = dict(self.params, stream=True, cache_prompt=True, prompt=prompt)
        limit = self.params.get("n_predict")
        self._tokens, self._pending, self._seen = [], [], ""
        if self.mode == "prefix" and self.delivered:
            self.base = len(self.committed) if self.ids_ok else self.tokens
            # the ids as they were generated: nothing is tokenised again (text only without them)
            payload["prompt"] = [prompt, *self.committed] if self.ids_ok else prompt + self.text
            if isinstance(limit, int) and limit >= 0:
                if limit - self.base <= 0:
                    return None
                payload["n_predict"] = limit - self.base
        else:
            self.base = 0
        return payload

    def feed(self, chunk: dict[str, Any]) -> str:
        """One streamed chunk of the segment -> the text to pass on to the client ("" for none).
        Raises Diverged when a replay generates something the client does not have."""
        text = chunk.get("content") or ""
        if not isinstance(text, str):
            text = ""
        tokens = chunk.get("tokens")
        if isinstance(tokens, list):
            new = [t for t in tokens if isinstance(t, int) and not isinstance(t, bool)]
            self._pending.extend(new)
            self._tokens.extend(new)
        predicted = chunk.get("tokens_predicted")
        if isinstance(predicted, int) and predicted != len(self._tokens):
            self.ids_ok = False                  # a held-back half character came without its id
        if isinstance(predicted, int):
            self.tokens = self.base + predicted
        if self.mode == "replay" and text:
            have = self.text
            seen = self._seen + text
            if have.startswith(seen):            # still within what the client has
                self._seen = seen
                return ""
            if not seen.startswith(have):
                raise Diverged()
            self.mode = "first"                  # past it: from here on, a normal segment
            text = seen[len(have):]
            self.committed = list(self._tokens)
            self._pending.clear()
            self.delivered.append(text)
            return text
        if text and self.mode != "replay":
            self.delivered.append(text)
            self.committed.extend(self._pending)
            self._pending.clear()
        return text if self.mode != "replay" else ""
