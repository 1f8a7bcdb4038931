"""The gateway's HTTP side: OpenAI and Ollama routes (Starlette) on uvicorn, on the shell's loop.

The listening socket is bound here, before uvicorn gets it, so a taken port is one line naming
the port and the setting, and the port never changes while the shell runs (llama-server behind it
moves to a free loopback port at every start). Every generation route answers through `Live`: it
watches the client's side of the connection the whole time, so a client that goes away while its
request is held or queued leaves the line at once, and one that leaves mid-answer stops its
generation (the core closes the stream to llama-server, which stops decoding it).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from synapticllamas import __version__
from synapticllamas.gateway import wire
from synapticllamas.gateway.core import Failed, Outcome, Unavailable, model_name
from synapticllamas.gateway.upstream import Lost, Refused

if TYPE_CHECKING:
    from synapticllamas.gateway.core import Gateway
    from synapticllamas.gateway.keys import ApiKeys

Send = Callable[[dict[str, Any]], Awaitable[None]]


class PortTaken(OSError):
    pass


def missing_parts() -> list[str]:
    """The ASGI stack's packages that are not installed (the `gateway` extra)."""
    import importlib.util

    return [name for name in ("starlette", "uvicorn") if importlib.util.find_spec(name) is None]


def bind(host: str, port: int) -> socket.socket:
    """The listening socket (TCP_NODELAY on accepted connections: asyncio sets it for proto TCP)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise PortTaken(exc.errno, exc.strerror) from None
    sock.listen(512)
    sock.setblocking(False)
    return sock


# ---------------------------------------------------------------- a response that watches its client

async def _gone(receive: Callable[[], Awaitable[dict[str, Any]]]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class Live:
    """An ASGI response whose body is written by `write(send)`, cancelled if the client leaves."""

    def __init__(self, write: Callable[[Send], Awaitable[None]]) -> None:
        self.write = write

    async def __call__(self, scope: Any, receive: Any, send: Send) -> None:
        gone = asyncio.ensure_future(_gone(receive))
        work = asyncio.ensure_future(self.write(send))
        try:
            await asyncio.wait({gone, work}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not work.done():
                work.cancel()
            gone.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await work


async def _start(send: Send, status: int, content_type: str, extra: dict[str, str] | None = None) -> None:
    headers = [(b"content-type", content_type.encode())]
    headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
    if content_type == "text/event-stream":
        headers += [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
    await send({"type": "http.response.start", "status": status, "headers": headers})


async def _body(send: Send, data: bytes, more: bool = True) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": more})


async def _json(send: Send, status: int, obj: Any, extra: dict[str, str] | None = None) -> None:
    await _start(send, status, "application/json", extra)
    await _body(send, json.dumps(obj, ensure_ascii=False).encode(), more=False)


def _refuse(status: int, body: Any, headers: dict[str, str] | None = None) -> Live:
    return Live(lambda send: _json(send, status, body, headers))


def _failure(exc: Exception) -> tuple[int, str, dict[str, str]]:
    """An error before anything was sent: its status, message and headers."""
    if isinstance(exc, Unavailable):
        return 503, exc.message, {"retry-after": str(exc.retry_after)}
    if isinstance(exc, Refused):
        return exc.status, exc.message, {}
    if isinstance(exc, wire.BadRequest):
        return 400, str(exc), {}
    return 502, f"the request could not be completed: {exc}", {}


# ---------------------------------------------------------------- the two APIs' answers

class _OpenAI:
    content_type = "text/event-stream"

    def __init__(self, shape: wire.OpenAIShape) -> None:
        self.shape = shape

    def opening(self) -> bytes:
        return self.shape.start()

    def piece(self, text: str) -> bytes:
        return self.shape.piece(text)

    def end(self, out: Outcome) -> bytes:
        return self.shape.end(out.finish_reason, wire.usage(out.prompt_tokens, out.tokens))

    def whole(self, text: str, out: Outcome) -> Any:
        return self.shape.whole(text, out.finish_reason, wire.usage(out.prompt_tokens, out.tokens))

    def error(self, message: str, status: int) -> Any:
        return wire.openai_error(message, status)

    def in_band(self, message: str, status: int) -> bytes:
        return wire.sse(wire.openai_error(message, status))


class _Ollama:
    content_type = "application/x-ndjson"

    def __init__(self, shape: wire.OllamaShape) -> None:
        self.shape = shape

    def opening(self) -> bytes:
        return b""

    def piece(self, text: str) -> bytes:
        return self.shape.piece(text)

    def end(self, out: Outcome) -> bytes:
        return self.shape.end(out.finish_reason, out.prompt_tokens, out.tokens, out.first_token_s)

    def whole(self, text: str, out: Outcome) -> Any:
        return self.shape.final(text, out.finish_reason, out.prompt_tokens, out.tokens, out.first_token_s)

    def error(self, message: str, _status: int) -> Any:
        return wire.ollama_error(message)

    def in_band(self, message: str, _status: int) -> bytes:
        return json.dumps(wire.ollama_error(message)).encode() + b"\n"


# ---------------------------------------------------------------- the app

class GatewayHttp:
    def __init__(self, gateway: Gateway, keys: ApiKeys) -> None:
        self.gateway = gateway
        self.keys = keys

    # -------------------------------------------------------- what is served

    def model(self) -> str:
        path = self.gateway.model_path()
        return model_name(str(path)) if path else "none"

    # -------------------------------------------------------- routing

    def asgi(self) -> Any:
        from starlette.applications import Starlette
        from starlette.responses import PlainTextResponse
        from starlette.routing import Route

        def guarded(handler: Callable[[Any], Awaitable[Any]], api: str) -> Callable[[Any], Awaitable[Any]]:
            async def endpoint(request: Any) -> Any:
                if not self.keys.allows(request.headers):
                    message = "a valid API key is needed (Authorization: Bearer KEY)"
                    self.gateway.refused(api, request.url.path.rsplit("/", 1)[-1], 401, message)
                    body = wire.openai_error(message, 401) if api == "openai" else wire.ollama_error(message)
                    return _refuse(401, body, {"www-authenticate": "Bearer"})
                return await handler(request)
            return endpoint

        async def root(_request: Any) -> Any:
            return PlainTextResponse("SynapticLlamas gateway: OpenAI API at /v1, Ollama API at /api\n")

        routes = [Route("/", root, methods=["GET", "HEAD"])]
        for path, handler, api, methods in (
                ("/v1/models", self.v1_models, "openai", ["GET"]),
                ("/v1/chat/completions", lambda r: self.openai(r, "chat"), "openai", ["POST"]),
                ("/v1/completions", lambda r: self.openai(r, "completion"), "openai", ["POST"]),
                ("/v1/embeddings", self.embeddings, "openai", ["POST"]),
                ("/api/chat", lambda r: self.ollama(r, "chat"), "ollama", ["POST"]),
                ("/api/generate", lambda r: self.ollama(r, "generate"), "ollama", ["POST"]),
                ("/api/tags", self.tags, "ollama", ["GET"]),
                ("/api/ps", self.ps, "ollama", ["GET"]),
                ("/api/show", self.show, "ollama", ["POST"]),
                ("/api/version", self.version, "ollama", ["GET"])):
            routes.append(Route(path, guarded(handler, api), methods=methods))
        return Starlette(routes=routes)

    # -------------------------------------------------------- generation

    async def openai(self, request: Any, kind: str) -> Live:
        try:
            req, options = wire.openai_request(wire.decode_body(await request.body()), kind)
        except wire.BadRequest as exc:
            self.gateway.refused("openai", kind, 400, str(exc))
            return _refuse(400, wire.openai_error(str(exc), 400))
        return self._answer(req, options["stream"], _OpenAI(wire.OpenAIShape(kind, self.model(),
                                                                             options["include_usage"])))

    async def ollama(self, request: Any, kind: str) -> Live:
        try:
            req, options = wire.ollama_request(wire.decode_body(await request.body()), kind)
        except wire.BadRequest as exc:
            self.gateway.refused("ollama", kind, 400, str(exc))
            return _refuse(400, wire.ollama_error(str(exc)))
        return self._answer(req, options["stream"],
                            _Ollama(wire.OllamaShape("chat" if kind == "chat" else "generate", self.model())))

    def _answer(self, req: Any, stream: bool, api: _OpenAI | _Ollama) -> Live:
        """One generation in the API's shape: streamed pieces (the headers go with the first, so
        a request turned away before then gets its own status), or the whole answer at the end."""

        async def write(send: Send) -> None:
            out = Outcome()
            started = False
            parts: list[str] = []

            async def begin() -> None:
                nonlocal started
                started = True
                await _start(send, 200, api.content_type)
                await _body(send, api.opening())

            gen = self.gateway.stream(req, out=out)
            try:
                async for text in gen:
                    if not stream:
                        parts.append(text)
                        continue
                    if not started:
                        await begin()
                    await _body(send, api.piece(text))
            except (Unavailable, Refused, Failed, Lost, wire.BadRequest) as exc:
                status, message, headers = _failure(exc)
                if started:                 # the status is sent: the error goes in the stream
                    await _body(send, api.in_band(message, status), more=False)
                else:
                    await _json(send, status, api.error(message, status), headers)
                return
            finally:
                await gen.aclose()
            if not stream:
                await _json(send, 200, api.whole("".join(parts), out))
                return
            if not started:
                await begin()
            await _body(send, api.end(out), more=False)

        return Live(write)

    async def embeddings(self, request: Any) -> Live:
        """Passed on to llama-server (which serves them when started with --embeddings), held
        like any request while the coordinator is not running."""
        raw = await request.body()

        async def write(send: Send) -> None:
            from synapticllamas.gateway.core import Request

            try:
                body = wire.decode_body(raw)
                answer = await self.gateway.call(Request("openai", "embeddings", model=body.get("model")),
                                                 "/v1/embeddings", body)
            except (Unavailable, Refused, Failed, Lost, wire.BadRequest) as exc:
                status, message, headers = _failure(exc)
                await _json(send, status, wire.openai_error(message, status), headers)
                return
            await _json(send, 200, answer)

        return Live(write)

    # -------------------------------------------------------- what is served

    def _entry(self) -> dict[str, Any] | None:
        path = self.gateway.model_path()
        if not path:
            return None
        try:
            stat = os.stat(path)
            size, modified = stat.st_size, stat.st_mtime
        except OSError:
            size, modified = 0, time.time()
        name = model_name(str(path))
        quant = name.rsplit(".", 1)[-1] if "." in name else "unknown"
        return {"name": name, "model": name, "size": size, "modified_at": time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime(modified)), "digest": "", "details": {
            "format": "gguf", "family": "", "families": None, "parameter_size": "", "quantization_level": quant}}

    async def v1_models(self, _request: Any) -> Any:
        from starlette.responses import JSONResponse

        entry = self._entry()
        data = [{"id": entry["name"], "object": "model", "created": int(time.time()), "owned_by": "synapticllamas"}
                ] if entry else []
        return JSONResponse({"object": "list", "data": data})

    async def tags(self, _request: Any) -> Any:
        from starlette.responses import JSONResponse

        entry = self._entry()
        return JSONResponse({"models": [entry] if entry else []})

    async def ps(self, _request: Any) -> Any:
        from starlette.responses import JSONResponse

        from synapticllamas.llama.lifecycle import State

        entry = self._entry()
        running = self.gateway.coordinator.state == State.RUNNING
        models = [{**entry, "expires_at": "0001-01-01T00:00:00Z", "size_vram": 0}] if entry and running else []
        return JSONResponse({"models": models})

    async def show(self, _request: Any) -> Any:
        from starlette.responses import JSONResponse

        entry = self._entry()
        if entry is None:
            return JSONResponse(wire.ollama_error("no model: `coordinator start` in the shell"), 404)
        return JSONResponse({"modelfile": "", "parameters": "", "template": "", "details": entry["details"],
                             "model_info": {"general.name": entry["name"]}, "capabilities": ["completion"],
                             "modified_at": entry["modified_at"]})

    async def version(self, _request: Any) -> Any:
        from starlette.responses import JSONResponse

        return JSONResponse({"version": __version__})


# ---------------------------------------------------------------- on the loop

class Listener:
    """uvicorn serving the gateway's ASGI app on a socket we bound, as a task of the app's loop
    (not a thread of its own: measured in docs/ARCHITECTURE.md, "Gateway")."""

    def __init__(self, app: Any, sock: socket.socket) -> None:
        import logging

        import uvicorn

        from synapticllamas.util.internal_errors import LOGGER

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Any:    # the shell owns SIGINT and SIGTERM
                yield

        # uvicorn's own records (an error in a route) go where ours go: the log file and one line
        ours, theirs = logging.getLogger(LOGGER), logging.getLogger("uvicorn")
        theirs.handlers = list(ours.handlers)
        theirs.propagate = False
        theirs.setLevel(logging.WARNING)
        self.sock = sock
        config = uvicorn.Config(app, lifespan="off", log_config=None, access_log=False,
                                timeout_graceful_shutdown=2, server_header=False)
        self.server = Server(config)
        self.task = asyncio.get_running_loop().create_task(self.server.serve(sockets=[sock]))

    async def close(self) -> None:
        self.server.should_exit = True
        self.server.force_exit = True
        try:
            await asyncio.wait_for(self.task, 5)
        except (TimeoutError, asyncio.CancelledError, Exception):  # closing: nothing to save
            self.task.cancel()
        self.sock.close()
