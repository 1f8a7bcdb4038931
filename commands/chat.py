"""`chat`: talk to the model through the running coordinator, in turns, with its own chat template.

At a terminal, `chat` opens its own prompt (`chat> `, with history): each line is a turn, streamed
as it is generated; Ctrl-C stops the answer and keeps the conversation; /reset, /system TEXT and
/exit (or Ctrl-D) as said in /help. Piped or with -c, `chat "TEXT"` sends one turn, and the
conversation goes on with the next `chat` of the same run; `chat --reset` clears it.
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from synapticllamas.commands.coordinator import Stream, failure, figures, request_failure
from synapticllamas.commands.registry import CommandError, Result, UsageError, command, parse_args, parser
from synapticllamas.llama.preflight import CoordinatorError
from synapticllamas.util.text import shown

if TYPE_CHECKING:
    from synapticllamas.app import App

USAGE = 'chat ["TEXT"] [--system TEXT] | chat --reset'
PROMPT = "chat> "
SLASH_HELP = ("/reset: forget the conversation; /system TEXT: set the system prompt (and start again); "
              "/exit or Ctrl-D: back to the shell; Ctrl-C: stop the answer, keep the conversation")


async def _turn(app: App, text: str) -> Result:
    """One turn, streamed; Ctrl-C (at a terminal) stops it and keeps what came."""
    from synapticllamas.gateway.core import Request

    conversation = app.conversation
    out = Stream(app)
    request = Request("shell", "chat", {"n_predict": -1}, messages=conversation.messages(text))
    task = asyncio.ensure_future(app.gateway.complete(request, out.say, out.text))
    app.ui.on_interrupt = task.cancel
    try:
        reply, result = await task
    except asyncio.CancelledError:
        if not task.cancelled():
            raise            # the shell itself is ending: let it
        out.end()
        return Result.warning("[stopped; the conversation goes on without this answer]")
    except CoordinatorError as exc:
        out.end()
        raise failure(app, exc) from None
    except Exception as exc:
        out.end()
        raise request_failure(app, exc) from None
    finally:
        app.ui.on_interrupt = None
    out.end()
    conversation.record(text, reply)
    return Result.text(figures(result))


async def _interactive(app: App) -> Result:
    app.ui.write(f"Chatting with the model ({len(app.conversation)} turns so far). {SLASH_HELP}.")
    while True:
        try:
            line = (await app.ui.read_line(PROMPT)).strip()
        except KeyboardInterrupt:
            continue                   # Ctrl-C at the prompt clears the line
        except EOFError:
            break
        if not line:
            continue
        if line.startswith("/"):
            word, _, rest = line.partition(" ")
            if word == "/exit":
                break
            if word == "/reset":
                app.conversation.reset()
                app.ui.write("Conversation cleared.")
            elif word == "/system":
                app.conversation.system = rest.strip() or None
                app.conversation.reset()
                app.ui.write(f"System prompt {'set' if rest.strip() else 'cleared'}; the conversation starts again.")
            elif word == "/help":
                app.ui.write(SLASH_HELP)
            else:
                app.ui.notice(f"Error: unknown chat command '{shown(word)}'; {SLASH_HELP}", "error")
            continue
        try:
            result = await _turn(app, line)
        except CommandError as exc:
            app.ui.notice(f"Error: {exc}", "error")
            continue
        app.ui.write(result.message or "")
    return Result.text(f"Back at the shell prompt; the conversation ({len(app.conversation)} turns) is kept "
                       "for the next `chat`.")


@command("chat", "Talk to the model: turns through its own chat template, streamed", USAGE,
         options=("--reset", "--system"),
         details="At a terminal, `chat` alone opens the chat> prompt. " + SLASH_HELP + ".")
async def chat_command(app: App, args: list[str]) -> Result:
    p = parser("chat")
    p.add_argument("text", nargs="*")
    p.add_argument("--reset", action="store_true")
    p.add_argument("--system", metavar="TEXT")
    ns = parse_args(p, args)
    if ns.reset:
        if ns.text or ns.system is not None:
            raise UsageError("chat --reset takes nothing else")
        n = len(app.conversation)
        app.conversation.reset()
        return Result.text(f"Conversation cleared ({n} turn{'s' if n != 1 else ''}).")
    if ns.system is not None:
        app.conversation.system = ns.system.strip() or None
        app.conversation.reset()
    text = " ".join(ns.text).strip()
    try:
        app.coordinator.require_running()
    except CoordinatorError as exc:
        raise CommandError(str(exc)) from None
    if text:
        return await _turn(app, text)
    if ns.system is not None:
        return Result.text("System prompt set; the conversation starts again.")
    if not app.ui.can_read_lines():
        raise UsageError('chat needs TEXT when not at a terminal: chat "Hello"')
    return await _interactive(app)
