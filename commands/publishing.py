"""`redis on|off|status`: publish this app's events to Redis pub/sub, and say truthfully how it goes."""
from __future__ import annotations

from typing import TYPE_CHECKING

from synapticllamas.commands.registry import Result, UsageError, command

if TYPE_CHECKING:
    from synapticllamas.app import App

SUBCOMMANDS = {
    "on": "start publishing events (reports whether Redis answered within 2 s)",
    "off": "stop publishing: flush what is queued (at most 2 s) and say how many were sent",
    "status": "on/off, connected, URL, published, buffered, dropped, last error, reconnects",
}


@command("redis", "Publish events to Redis pub/sub (on, off, status)", "redis on|off|status",
         subcommands=SUBCOMMANDS)
async def redis_command(app: App, args: list[str]) -> Result:
    if len(args) != 1 or args[0] not in SUBCOMMANDS:
        given = f"'{args[0]}'" if args else "nothing"
        extra = " (one at a time)" if len(args) > 1 and args[0] in SUBCOMMANDS else ""
        raise UsageError(f"redis needs one of: on, off, status; got {given}{extra}")
    return await {"on": _on, "off": _off, "status": _status}[args[0]](app)


async def _on(app: App) -> Result:
    started, outcome = await app.redis_on()
    status = app.publisher.status()
    url, limit = status["url"], status["buffer_limit"]
    if not started:
        state = "connected" if status["connected"] else f"not connected ({status['last_error'] or 'connecting'})"
        return Result.text(f"Redis publishing is already ON -> {url}, {state}")
    if outcome is None:
        return Result.warning(f"Redis publishing ON, but {url} has not answered within 2 s; buffering up to"
                              f" {limit} events and retrying")
    connected, error = outcome
    if connected:
        earlier = f"; sent the {app.backlog_sent} events from before first" if app.backlog_sent else ""
        return Result.success(f"Redis publishing ON -> {url} (channels {status['channels']},"
                              f" journal {status['journal']}){earlier}")
    return Result.warning(f"Redis publishing ON, but {url} is unreachable ({error}); buffering up to"
                          f" {limit} events and retrying")


async def _off(app: App) -> Result:
    outcome = await app.redis_off()
    if outcome is None:
        return Result.text("Redis publishing is already OFF")
    status = app.publisher.status()
    if outcome["unsent"]:
        return Result.warning(f"Redis publishing OFF; {outcome['unsent']} queued events were NOT sent"
                              f" ({status['url']}: {status['last_error'] or 'no answer within 2 s'});"
                              f" {status['published']} were published since 'redis on'")
    flushed = f", {outcome['flushed']} of them while stopping" if outcome["flushed"] else ""
    return Result.success(f"Redis publishing OFF: {status['published']} events published since 'redis on'"
                          f"{flushed}")


async def _status(app: App) -> Result:
    publisher = app.publisher
    if publisher is None:
        return Result.text(f"Redis publishing: OFF (type 'redis on' to publish to {_url(app)})")
    s = publisher.status()
    if not s["enabled"]:
        state = "OFF"
    elif s["connected"]:
        state = "ON, connected"
    elif s["state"] == "connecting":
        state = "ON, connecting"
    else:
        state = "ON, unreachable: buffering and retrying"
    rows = [
        ("state", state),
        ("url", s["url"]),
        ("channels", s["channels"]),
        ("journal", s["journal"]),
        ("published", s["published"]),
        ("buffered", f"{s['buffered']} (limit {s['buffer_limit']})"),
        ("dropped", s["dropped"]),
        ("reconnects", s["reconnects"]),
        ("failed attempts", s["failed_attempts"]),
        ("last error", s["last_error"] or "-"),
    ]
    discovery = app.status()["discovery"]
    if discovery.get("enabled"):
        from synapticllamas.commands.core import discovery_summary

        rows.append(("node discovery", discovery_summary(discovery)))
    return Result.table("Redis publishing", ("item", "value"), rows)


def _url(app: App) -> str:
    from synapticllamas.config import redact_url

    return redact_url(app.settings.redis_url)
