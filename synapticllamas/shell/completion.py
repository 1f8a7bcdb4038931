"""Tab completion from the command registry: command names, then subcommands, then options."""
from __future__ import annotations

from collections.abc import Iterable

from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document

from synapticllamas.commands.registry import REGISTRY, lookup


class RegistryCompleter(Completer):
    def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterable[Completion]:
        text = document.text_before_cursor
        words = text.split()
        if text.endswith(" ") or not words:
            words.append("")
        word = words[-1]
        if len(words) == 1:
            candidates = {name: cmd.summary for name, cmd in REGISTRY.items()}
        else:
            cmd = lookup(words[0])
            if cmd is None:
                return
            if len(words) == 2 and cmd.subcommands:
                candidates = dict(cmd.subcommands)
            else:
                candidates = {opt: "" for opt in cmd.options if opt not in words[:-1]}
        for name in sorted(candidates):
            if name.startswith(word):
                yield Completion(name, start_position=-len(word), display_meta=candidates[name])
