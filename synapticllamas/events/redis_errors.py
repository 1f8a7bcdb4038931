"""Why talking to Redis failed, in a few words for the user, with the caller's own timeouts.

The publisher, the terminal viewer and the dashboard hub each connect with their own timeouts, so
each passes them in: "no answer within 2 s" names the timeout that really ran out. No redis import:
only the exception's text and type are read.
"""
from __future__ import annotations


def describe(exc: BaseException, *, connect_timeout: float, reply_timeout: float) -> str:
    """A short, password-free reason: 'connection refused', 'no answer within 2 s', 'unknown host'...

    `connect_timeout`: what the caller allows for connecting (redis-py's socket_connect_timeout);
    `reply_timeout`: what it allows for a reply (socket_timeout, or its own wait for an answer)."""
    text = " ".join(str(exc).split())
    lowered = text.lower()
    if "connection refused" in lowered:
        return "connection refused"
    if "certificate verify failed" in lowered:
        if "hostname" in lowered or "ip address mismatch" in lowered:
            return "TLS: the server's certificate is not for this host name"
        return ("TLS: the server's certificate is not trusted (SYNAPTICLLAMAS_REDIS_CA_FILE names the CA "
                "that signed it)")
    if "wrong version number" in lowered or "packet length too long" in lowered or "record layer" in lowered:
        return "TLS failed: is this Redis's TLS port? (rediss:// needs redis-server --tls-port)"
    if "wrongpass" in lowered or "invalid username-password" in lowered or "invalid password" in lowered:
        return "wrong user or password, or the user is disabled (the URL's redis://USER:PASSWORD@...)"
    if "noauth" in lowered or "authentication required" in lowered or "already authenticated" in lowered:
        return "Redis needs a password: redis://:PASSWORD@host, or redis://USER:PASSWORD@host for an ACL user"
    if "timeout" in lowered or "timed out" in lowered or (isinstance(exc, TimeoutError) and not text):
        # redis-py says "Timeout connecting to server" or "Timeout reading from HOST:PORT"
        return f"no answer within {connect_timeout:g} s" if "connect" in lowered else \
            f"no reply within {reply_timeout:g} s"
    if "name or service not known" in lowered or "nodename nor servname" in lowered:
        return "unknown host"
    if "no such file" in lowered:
        return "no such socket file"
    return text[:200] or type(exc).__name__
