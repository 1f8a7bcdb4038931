"""The gateway's API keys: from `gateway_api_keys` and the keys file; checked in constant time.

Keys never leave this object: `config` redacts the setting, events and logs name only how many
keys there are and whether a request had a right one.
"""
from __future__ import annotations

import hmac
from typing import Any


class KeysError(ValueError):
    """The keys file cannot be used (one line)."""


class ApiKeys:
    def __init__(self, keys: list[str]) -> None:
        self._keys = [k.encode() for k in keys]

    @classmethod
    def from_settings(cls, settings: Any) -> ApiKeys:
        keys = [k for k in str(settings.gateway_api_keys or "").replace(",", " ").split() if k]
        path = settings.gateway_api_keys_file
        if path:
            try:
                with open(path, encoding="utf-8") as fh:
                    lines = fh.read().splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise KeysError(f"gateway API keys file {path}: cannot read it ({exc})") from None
            for n, line in enumerate(lines, 1):
                key = line.strip()
                if not key or key.startswith("#"):
                    continue
                if not key.isascii() or not key.isprintable() or " " in key:
                    raise KeysError(f"gateway API keys file {path}, line {n}: a key is printable ASCII without "
                                    "spaces")
                keys.append(key)
        return cls(keys)

    def __len__(self) -> int:
        return len(self._keys)

    def allows(self, headers: Any) -> bool:
        """Does the request carry one of the keys (`Authorization: Bearer K`, or Ollama/OpenAI
        clients' `x-api-key`)? Always true when no key is set."""
        if not self._keys:
            return True
        given = ""
        auth = headers.get("authorization") or ""
        if auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        elif headers.get("x-api-key"):
            given = headers.get("x-api-key").strip()
        candidate = given.encode("utf-8", "replace")
        found = False
        for key in self._keys:            # every key compared, whatever matched: no timing hint
            found |= hmac.compare_digest(candidate, key)
        return found
