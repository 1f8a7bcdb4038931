"""What the OpenAI and Ollama APIs put on the wire: request bodies -> core.Request, and the
answers' shapes (chunks, final objects, error bodies). Pure functions, no I/O.

A field we cannot honour is refused (400, one line naming the field, the value and what is
accepted) rather than ignored, except the ones that only tune Ollama's own runtime (num_ctx,
keep_alive, ...), which have no meaning here and are accepted as Ollama's clients always send them.
"""
from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from synapticllamas.gateway.core import Request
from synapticllamas.util.text import shown


class BadRequest(ValueError):
    """The client's request is wrong: one line for its error body (HTTP 400)."""


# ---------------------------------------------------------------- checking fields

def _number(body: dict[str, Any], name: str, lo: float, hi: float, where: str = "") -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise BadRequest(f"{where}{name}={shown(json.dumps(value), 60)} is not valid: expected a number from {lo:g} "
                         f"to {hi:g}")
    return float(value)


def _integer(body: dict[str, Any], name: str, lo: int, hi: int = 2**31 - 1, where: str = "") -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise BadRequest(f"{where}{name}={shown(json.dumps(value), 60)} is not valid: expected an integer from {lo} "
                         f"to {hi}")
    return value


def _stop(value: Any, where: str = "") -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value) and len(value) <= 16:
        return list(value)
    raise BadRequest(f"{where}stop={shown(json.dumps(value), 60)} is not valid: expected a string or a list of up "
                     "to 16 strings")


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise BadRequest("the request body is not a JSON object")
    return body


def decode_body(raw: bytes) -> dict[str, Any]:
    try:
        return _object(json.loads(raw or b"null"))
    except ValueError as exc:
        if isinstance(exc, BadRequest):
            raise
        raise BadRequest(f"the request body is not valid JSON ({exc})") from None


# llama-server's sampling fields and the ranges we pass on (names as /completion takes them)
SAMPLING = {"temperature": (0.0, 100.0), "top_p": (0.0, 1.0), "min_p": (0.0, 1.0), "typical_p": (0.0, 1.0),
            "presence_penalty": (-2.0, 2.0), "frequency_penalty": (-2.0, 2.0), "repeat_penalty": (0.0, 100.0)}


def _sampling(source: dict[str, Any], where: str = "") -> dict[str, Any]:
    params: dict[str, Any] = {}
    for name, (lo, hi) in SAMPLING.items():
        value = _number(source, name, lo, hi, where)
        if value is not None:
            params[name] = value
    for name, lo in (("top_k", 0), ("seed", 0), ("repeat_last_n", -1)):
        value = _integer(source, name, lo, where=where)
        if value is not None:
            params[name] = value
    stop = _stop(source.get("stop"), where)
    if stop:
        params["stop"] = stop
    return params


def _messages(value: Any, ollama: bool = False) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise BadRequest("messages is not valid: expected a non-empty list of {\"role\", \"content\"} objects")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"messages[{i}] is not valid: expected an object with a string role")
        content = m.get("content")
        if content is None:
            content = ""
        if not isinstance(content, (str, list)):
            raise BadRequest(f"messages[{i}].content is not valid: expected a string or a list of text parts")
        if ollama and m.get("images"):
            raise BadRequest(f"messages[{i}].images: this model takes text only")
        out.append({"role": m["role"], "content": content})
    return out


# ---------------------------------------------------------------- OpenAI

UNSUPPORTED_OPENAI = ("tools", "functions", "tool_choice", "logprobs", "top_logprobs", "echo", "best_of",
                      "suffix", "audio", "modalities", "prediction")


def openai_request(body: dict[str, Any], kind: str) -> tuple[Request, dict[str, Any]]:
    """A /v1/chat/completions or /v1/completions body -> the core's request and the options the
    answer needs (stream, include_usage, model)."""
    for name in UNSUPPORTED_OPENAI:
        if body.get(name) not in (None, False, [], 0):
            raise BadRequest(f"{name} is not supported by this gateway (the model answers with text)")
    _integer(body, "n", 1, 1)                  # one choice per request: n=2 is refused
    params = _sampling(body)
    limit = _integer(body, "max_completion_tokens", 1) or _integer(body, "max_tokens", 1)
    params["n_predict"] = limit if limit is not None else (16 if kind == "completion" else -1)
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_object":
        params["json_schema"] = {"type": "object"}
    elif isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise BadRequest("response_format.json_schema.schema is not valid: expected a JSON schema object")
        params["json_schema"] = schema
    elif fmt not in (None, {"type": "text"}):
        raise BadRequest(f"response_format={shown(json.dumps(fmt), 60)} is not valid: expected text, json_object "
                         "or json_schema")
    stream = body.get("stream") is True
    options = {"stream": stream, "model": body.get("model"),
               "include_usage": stream and bool((body.get("stream_options") or {}).get("include_usage"))}
    model = body.get("model") if isinstance(body.get("model"), str) else None
    if kind == "chat":
        return Request("openai", "chat", params, messages=_messages(body.get("messages")), model=model), options
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise BadRequest("prompt is not valid: expected a string (one prompt per request)")
    return Request("openai", "completion", params, prompt=prompt, model=model), options


def openai_error(message: str, status: int) -> dict[str, Any]:
    kind = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
            503: "server_error", 502: "server_error"}.get(status, "invalid_request_error")
    code = {401: "invalid_api_key", 503: "unavailable", 502: "upstream_failed"}.get(status)
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


class OpenAIShape:
    """The chunks and the final object of one answer."""

    def __init__(self, kind: str, model: str, include_usage: bool) -> None:
        self.kind = kind
        self.model = model
        self.include_usage = include_usage
        prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
        self.id = prefix + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.object = "chat.completion" if kind == "chat" else "text_completion"

    def _chunk(self, choice: dict[str, Any]) -> bytes:
        obj = {"id": self.id, "object": self.object + (".chunk" if self.kind == "chat" else ""),
               "created": self.created, "model": self.model, "choices": [choice]}
        return sse(obj)

    def start(self) -> bytes:
        if self.kind != "chat":
            return b""
        return self._chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})

    def piece(self, text: str) -> bytes:
        if self.kind == "chat":
            return self._chunk({"index": 0, "delta": {"content": text}, "finish_reason": None})
        return self._chunk({"index": 0, "text": text, "logprobs": None, "finish_reason": None})

    def end(self, finish: str | None, usage: dict[str, int]) -> bytes:
        last = ({"index": 0, "delta": {}, "finish_reason": finish or "stop"} if self.kind == "chat" else
                {"index": 0, "text": "", "logprobs": None, "finish_reason": finish or "stop"})
        out = self._chunk(last)
        if self.include_usage:
            out += sse({"id": self.id, "object": self.object + (".chunk" if self.kind == "chat" else ""),
                        "created": self.created, "model": self.model, "choices": [], "usage": usage})
        return out + b"data: [DONE]\n\n"

    def whole(self, text: str, finish: str | None, usage: dict[str, int]) -> dict[str, Any]:
        choice: dict[str, Any] = ({"index": 0, "message": {"role": "assistant", "content": text},
                                   "finish_reason": finish or "stop"} if self.kind == "chat" else
                                  {"index": 0, "text": text, "logprobs": None, "finish_reason": finish or "stop"})
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": [choice], "usage": usage}


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def usage(prompt_tokens: int | None, tokens: int) -> dict[str, int]:
    p = prompt_tokens or 0
    return {"prompt_tokens": p, "completion_tokens": tokens, "total_tokens": p + tokens}


# ---------------------------------------------------------------- Ollama

OLLAMA_IGNORED = ("num_ctx", "num_batch", "num_gpu", "main_gpu", "use_mmap", "use_mlock", "num_thread", "numa",
                  "low_vram", "num_keep", "penalize_newline", "mirostat", "mirostat_tau", "mirostat_eta", "tfs_z")


def ollama_request(body: dict[str, Any], kind: str) -> tuple[Request, dict[str, Any]]:
    """An /api/chat or /api/generate body -> the core's request and the answer's options."""
    raw_options = body.get("options") or {}
    if not isinstance(raw_options, dict):
        raise BadRequest("options is not valid: expected an object")
    params = _sampling(raw_options, "options.")
    limit = _integer(raw_options, "num_predict", -2, where="options.")
    params["n_predict"] = limit if limit is not None and limit >= 0 else -1
    fmt = body.get("format")
    if fmt == "json":
        params["json_schema"] = {"type": "object"}
    elif isinstance(fmt, dict):
        params["json_schema"] = fmt
    elif fmt not in (None, ""):
        raise BadRequest(f"format={shown(json.dumps(fmt), 60)} is not valid: expected \"json\" or a JSON schema")
    if body.get("tools"):
        raise BadRequest("tools are not supported by this gateway (the model answers with text)")
    stream = body.get("stream") is not False           # Ollama streams unless told not to
    model = body.get("model") if isinstance(body.get("model"), str) else None
    options = {"stream": stream, "model": model}
    if kind == "chat":
        return Request("ollama", "chat", params, messages=_messages(body.get("messages"), ollama=True),
                       model=model), options
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise BadRequest("prompt is not valid: expected a string")
    if body.get("images"):
        raise BadRequest("images: this model takes text only")
    if body.get("raw") is True:
        return Request("ollama", "completion", params, prompt=prompt, model=model), options
    messages = ([{"role": "system", "content": body["system"]}] if isinstance(body.get("system"), str) else [])
    messages.append({"role": "user", "content": prompt})
    return Request("ollama", "generate", params, messages=messages, model=model), options


def ollama_error(message: str) -> dict[str, Any]:
    return {"error": message}


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class OllamaShape:
    def __init__(self, kind: str, model: str) -> None:
        self.kind = kind                   # chat, or generate / completion (the same shape)
        self.model = model
        self.started = time.monotonic_ns()

    def _line(self, obj: dict[str, Any]) -> bytes:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"

    def _text(self, text: str) -> dict[str, Any]:
        if self.kind == "chat":
            return {"message": {"role": "assistant", "content": text}}
        return {"response": text}

    def piece(self, text: str) -> bytes:
        return self._line({"model": self.model, "created_at": now_iso(), **self._text(text), "done": False})

    def final(self, text: str, finish: str | None, prompt_tokens: int | None, tokens: int,
              first_token_s: float | None) -> dict[str, Any]:
        total = time.monotonic_ns() - self.started
        prompt_ns = int((first_token_s or 0) * 1e9)
        out = {"model": self.model, "created_at": now_iso(), **self._text(text), "done": True,
               "done_reason": finish or "stop", "total_duration": total, "load_duration": 0,
               "prompt_eval_count": prompt_tokens or 0, "prompt_eval_duration": prompt_ns,
               "eval_count": tokens, "eval_duration": max(0, total - prompt_ns)}
        if self.kind != "chat":
            out["context"] = []
        return out

    def end(self, finish: str | None, prompt_tokens: int | None, tokens: int, first_token_s: float | None) -> bytes:
        return self._line(self.final("", finish, prompt_tokens, tokens, first_token_s))
