"""The dashboard web app (Starlette) and how it is served (uvicorn).

Routes: GET / (the page), GET /events (the live feed, text/event-stream), GET /api/events?since=ID,
GET /api/apps, GET /api/nodes, GET /metrics (Prometheus), GET /healthz, and /static/*. The API
routes read Redis only when asked; the live feed and /metrics go through the hub, which holds Redis
only while someone is watching or a scraper asked within the last `metrics_hold` seconds.
"""
from __future__ import annotations

import contextlib
import html
import socket
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from synapticllamas import __version__
from synapticllamas.dashboard import contract_script, frames
from synapticllamas.dashboard.access import Guard, is_loopback_name
from synapticllamas.dashboard.hub import Hub
from synapticllamas.dashboard.sse import EventStream

STATIC = Path(__file__).resolve().parent / "static"
API_LIMIT_DEFAULT, API_LIMIT_MAX = 100, 10000
NO_STORE = {"cache-control": "no-store"}
METRICS_HOLD = 300.0     # seconds a scrape keeps the subscription (scrapers come every 15-60 s)
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


def bad_request(error: str) -> JSONResponse:
    return JSONResponse({"error": error}, status_code=400, headers=NO_STORE)


def int_param(request: Request, name: str, default: int | None, lo: int, hi: int) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    # ASCII digits only: str.isdigit() says yes to '²' (which int() refuses) and int() reads '٣' as 3;
    # the length check keeps int() from a 5000-digit string (it refuses those with its own message)
    if not (raw.isascii() and raw.isdecimal()) or len(raw.lstrip("0")) > len(str(hi)) or not lo <= int(raw) <= hi:
        raise ValueError(f"{name}={raw[:60]!r} is not valid: expected an integer from {lo} to {hi}")
    return int(raw)


def id_param(value: str | None, name: str) -> str | None:
    if value is None or value == "":
        return None
    try:
        frames.parse_id(value)
    except ValueError as exc:
        raise ValueError(f"{name}={value[:60]!r} is not valid: {exc}") from None
    return value


def create_app(redis_url: str, token: str | None = None, replay: int = 1000,
               loopback_only: bool = True, metrics_hold: float = METRICS_HOLD, redis_ca_file: str | None = None,
               announce_key: bytes | None = None) -> Any:
    hub = Hub(redis_url, replay=replay, redis_ca_file=redis_ca_file, announce_key=announce_key)
    page = (STATIC / "index.html").read_text(encoding="utf-8")
    # the page's own assets need the token too; it is the configured one, escaped for an attribute
    asset_query = html.escape("?token=" + quote(token, safe=""), quote=True) if token else ""
    page = page.replace("{{asset_query}}", asset_query)

    async def index(request: Request) -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=NO_STORE)

    async def contract_js(request: Request) -> Response:
        return Response(contract_script.script(), media_type="text/javascript; charset=utf-8", headers=NO_STORE)

    async def events(request: Request) -> Any:
        try:
            last = id_param(request.headers.get("last-event-id") or request.query_params.get("last_event_id"),
                            "Last-Event-ID")
            replay_n = int_param(request, "replay", None, 0, hub.capacity)
        except ValueError as exc:
            return bad_request(str(exc))
        return EventStream(hub, last, replay_n)

    async def api_events(request: Request) -> Response:
        try:
            since = id_param(request.query_params.get("since"), "since")
            limit = int_param(request, "limit", API_LIMIT_DEFAULT, 1, API_LIMIT_MAX) or API_LIMIT_DEFAULT
        except ValueError as exc:
            return bad_request(str(exc))
        try:
            entries = await hub.read_journal(since, limit)
        except Exception as exc:
            # a well-formed id Redis still refuses (the highest id: nothing comes after it)
            if since is not None and is_refused(exc) and "id" in str(exc).lower():
                return bad_request(f"since={since[:60]!r} is not valid: Redis refused it ({exc}); "
                                   f"expected {frames.ID_ACCEPTED}")
            return unavailable(hub, exc)
        return JSONResponse({"events": [{"id": sid, "event": event.to_dict()} for sid, event, _ in entries],
                             "last_id": entries[-1][0] if entries else since}, headers=NO_STORE)

    async def api_apps(request: Request) -> Response:
        try:
            apps, skipped = await hub.apps()
        except Exception as exc:
            return unavailable(hub, exc)
        return JSONResponse({"apps": [apps[k] | {"instance": k} for k in sorted(apps)], "skipped": skipped},
                            headers=NO_STORE)

    async def api_nodes(request: Request) -> Response:
        try:
            nodes, skipped = await hub.nodes()
        except Exception as exc:
            return unavailable(hub, exc)
        return JSONResponse({"nodes": [nodes[k] | {"address": k} for k in sorted(nodes)], "skipped": skipped},
                            headers=NO_STORE)

    async def metrics(request: Request) -> Response:
        # from the events the hub reads; the scrape keeps it reading for metrics_hold seconds
        await hub.hold(metrics_hold)
        return Response(hub.metrics.render(redis_up=hub.status["redis"] == "up",
                                           invalid={"journal": hub.invalid.total, "pubsub": hub.invalid_pubsub.total}),
                        media_type=PROMETHEUS_TEXT, headers=NO_STORE)

    async def healthz(request: Request) -> Response:
        error = await hub.ping()
        return JSONResponse({
            "status": "ok" if error is None else "degraded",
            "version": __version__,
            "redis": "up" if error is None else "down",
            "redis_url": hub.public_url,
            "error": error,
            "viewers": hub.viewers,
            "subscribed": hub.subscribed,
            "events_in_memory": len(hub.ring),
            "counters": hub.counters,
            # what failed the event schema (events/schema.py) and was skipped: per field, and the last reason
            "invalid": {"journal": hub.invalid.status(), "pubsub": hub.invalid_pubsub.status()},
        }, headers=NO_STORE)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any):
        yield
        await hub.aclose()

    app = Starlette(routes=[
        Route("/", index),
        Route("/contract.js", contract_js),
        Route("/events", events),
        Route("/api/events", api_events),
        Route("/api/apps", api_apps),
        Route("/api/nodes", api_nodes),
        Route("/metrics", metrics),
        Route("/healthz", healthz),
        Mount("/static", StaticFiles(directory=STATIC)),
    ], lifespan=lifespan)
    app.state.hub = hub
    return Guard(app, token, loopback_only)


def is_refused(exc: Exception) -> bool:
    """Redis answered with an error (as opposed to not answering at all)."""
    from redis.exceptions import ResponseError

    return isinstance(exc, ResponseError)


def unavailable(hub: Hub, exc: Exception) -> JSONResponse:
    if is_refused(exc):   # it answered: a key of the wrong type, a command it forbids...
        reply = hub.scrub(exc).removeprefix(f"{type(exc).__name__}: ")   # Redis's own text: "WRONGTYPE ..."
        return JSONResponse({"error": f"Redis at {hub.public_url} refused the request: {reply}"},
                            status_code=502, headers=NO_STORE)
    return JSONResponse({"error": f"Redis at {hub.public_url} did not answer: {hub.reason(exc)}"},
                        status_code=503, headers=NO_STORE)


def listen_socket(host: str, port: int) -> socket.socket:
    """Bind before starting uvicorn, so a busy port is one clear line, not a log dump."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    # proto must say TCP: asyncio sets TCP_NODELAY only on such sockets, and without it Nagle's
    # algorithm holds back the feed's small writes (tens of ms at 50 viewers)
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    sock.listen(128)
    sock.setblocking(False)
    return sock


def serve(host: str, port: int, redis_url: str, token: str | None, replay: int,
          metrics_hold: float = METRICS_HOLD, redis_ca_file: str | None = None, key_token: str | None = None,
          announce_key: bytes | None = None) -> int:
    """`key_token`: the token made from the cluster key, required when bound beyond loopback
    without --token; with neither, such a bind is refused."""
    import uvicorn

    from synapticllamas.config import redact_url

    try:
        sock = listen_socket(host, port)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        print(f"Error: cannot listen on {host}:{port}: {reason.lower()}; choose another --port", file=sys.stderr)
        return 1
    bound = sock.getsockname()[0]   # what --host resolved to: "localhost" is 127.0.0.1
    loopback = is_loopback_name(bound)
    shown_host = f"[{host}]" if ":" in host else host
    if not loopback and not token:
        if key_token is None:
            sock.close()
            print(f"Error: --host {host} would show every event to anyone who reaches {shown_host}:{port}: give "
                  "--token T (or SYNAPTICLLAMAS_DASHBOARD_TOKEN), or make a cluster key (`python3 main.py cluster "
                  "init`) and the dashboard requires a token made from it", file=sys.stderr, flush=True)
            return 2
        token = key_token
        print("Beyond loopback without --token: the token is made from the cluster key (the same on every "
              "machine that holds the key).", flush=True)
    app = create_app(redis_url, token=token, replay=replay, loopback_only=loopback, metrics_hold=metrics_hold,
                     redis_ca_file=redis_ca_file, announce_key=announce_key)
    url = f"http://{shown_host}:{sock.getsockname()[1]}/" + (f"?token={quote(token, safe='')}" if token else "")
    print(f"SynapticLlamas dashboard {__version__}: {url}", flush=True)
    print(f"Events from {redact_url(redis_url)} (Redis is used only while a page is open or a scraper asked"
          f" /metrics within {metrics_hold:g} s). Ctrl-C stops.", flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=1)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:   # uvicorn re-raises Ctrl-C after its clean shutdown
        pass
    return 0
