"""What every Redis client of ours passes besides the URL, so rediss:// and ACL users work the same
for the shell's publisher, node discovery, a node, the dashboard and the terminal viewer.

The URL carries the user and password (redis://USER:PASSWORD@host:6379, or :PASSWORD@ for the
default user) and the scheme (rediss:// is TLS, checked against the system's CAs and the host
name); SYNAPTICLLAMAS_REDIS_CA_FILE names the CA of a private Redis certificate.
"""
from __future__ import annotations

from typing import Any


def redis_options(url: str, ca_file: str | None) -> dict[str, Any]:
    """Keyword arguments for redis-py's from_url() beside the URL's own."""
    if ca_file and url.strip().lower().startswith("rediss://"):
        return {"ssl_ca_certs": ca_file}
    return {}
