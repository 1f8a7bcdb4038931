"""Secrets in llama-server's arguments: the API key to send, and their values hidden wherever shown.

The coordinator's argv goes into its `starting` event (Redis, the journal, the dashboard) and
SYNAPTICLLAMAS_COORDINATOR_ARGS into `config`; llama-server's own output can echo them too (an
unknown `--api-key=K` is printed whole, and one key's last characters are). A flag is secret when
a dash-separated word of its name is key, token, password or secret (--api-key, --api-key-file,
--ssl-key-file, --hf-token); `--image-max-tokens` or `--keep` are not.
"""
from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import overload

REDACTED = "REDACTED"
SECRET_WORDS = frozenset({"key", "token", "password", "passwd", "secret"})
SHORT_SECRET_FLAGS = frozenset({"-hft"})                # llama.cpp's short --hf-token
_API_KEYS_LINE = re.compile(r"(api_keys: \*+)\S+")      # llama-server prints `api_keys: ****Y123`
MIN_SCRUBBED = 4     # a shorter value is no real secret, and hiding it would garble every line


def is_secret_flag(flag: str) -> bool:
    name = flag.split("=", 1)[0]
    if name in SHORT_SECRET_FLAGS:
        return True
    return name.startswith("--") and not SECRET_WORDS.isdisjoint(re.split(r"[-_]", name[2:].lower()))


def _flag_values(tokens: Sequence[str]) -> Iterable[tuple[int, str, str]]:
    """(index of the value, flag, value) for each secret flag, `--flag V` or `--flag=V`."""
    for i, token in enumerate(tokens):
        name, eq, value = token.partition("=")
        if not is_secret_flag(name):
            continue
        if eq:
            yield i, name, value
        elif i + 1 < len(tokens):
            yield i + 1, name, tokens[i + 1]


@overload
def redact_args(args: str) -> str: ...  # type: ignore[overload-overlap]  # a str is also a Sequence[str]
@overload
def redact_args(args: Sequence[str]) -> list[str]: ...


def redact_args(args: str | Sequence[str]) -> str | list[str]:
    """The arguments with the value of every secret flag replaced by REDACTED.

    A list (an argv) gives a list; a string (a setting such as coordinator_args) is split like a
    shell would and given back unchanged when it holds no secret flag, else joined again."""
    if isinstance(args, str):
        try:
            tokens = shlex.split(args)
        except ValueError:        # not valid shell syntax: hide per word all the same
            tokens = args.split()
        redacted = redact_args(tokens)
        return args if redacted == tokens else shlex.join(redacted)
    out = list(args)
    for i, name, _ in _flag_values(out):
        out[i] = f"{name}={REDACTED}" if out[i].startswith(name + "=") else REDACTED
    return out


def api_keys(argv: Sequence[str]) -> list[str]:
    """The keys llama-server will accept: --api-key K1,K2 and the lines of --api-key-file
    (empty lines and lines starting with # left out, as llama-server does)."""
    keys: list[str] = []
    for _, name, value in _flag_values(argv):
        if name == "--api-key":
            keys += [k for k in value.split(",") if k]
        elif name == "--api-key-file":
            try:
                lines = Path(value).read_text(errors="replace").splitlines()
            except OSError:       # llama-server refuses to start and says why
                continue
            keys += [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    return keys


def secrets(argv: Sequence[str]) -> list[str]:
    """The secret texts of argv worth hiding in output (flag values, API keys), longest first
    so that "K1,K2" is hidden whole before "K1"."""
    values = {value for _, _, value in _flag_values(argv)}
    values.update(api_keys(argv))
    return sorted((v for v in values if len(v) >= MIN_SCRUBBED), key=len, reverse=True)


def scrub(line: str, hidden: Sequence[str]) -> str:
    """An output line with each of `hidden` and llama-server's key tail replaced."""
    for value in hidden:
        if value in line:
            line = line.replace(value, REDACTED)
    if "api_keys: *" in line:
        line = _API_KEYS_LINE.sub(r"\1", line)
    return line
