"""A chat conversation: the system prompt and the turns so far, sent whole with each new turn
(llama-server keeps no conversation; its prompt cache makes the repeated prefix cheap)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Conversation:
    system: str | None = None
    turns: list[dict[str, str]] = field(default_factory=list)

    def messages(self, user_text: str) -> list[dict[str, str]]:
        """What to send for a new user turn (not yet recorded)."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return [*head, *self.turns, {"role": "user", "content": user_text}]

    def record(self, user_text: str, reply: str) -> None:
        self.turns += [{"role": "user", "content": user_text}, {"role": "assistant", "content": reply}]

    def reset(self) -> None:
        self.turns.clear()

    def __len__(self) -> int:
        return len(self.turns) // 2
