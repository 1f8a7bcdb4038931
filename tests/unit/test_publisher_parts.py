"""Small parts of the publisher that need no Redis: event encoding and error wording."""
import asyncio
import json
import socket
from types import SimpleNamespace

import pytest
import redis

from synapticllamas.events import publisher, schema
from synapticllamas.events.contract import Event
from synapticllamas.events.observer import Observer
from synapticllamas.events.publisher import encode
from synapticllamas.events.redis_errors import describe


def test_an_event_whose_details_cannot_be_encoded_still_goes_out():
    details: dict = {"pid": 1}
    details["self"] = details                        # a cycle: json.dumps raises ValueError
    event = Event(1.5, "coordinator", "stop", "stopped", details, "error", {"instance": "h:1"}, 7)
    data = json.loads(encode(event))
    assert (data["seq"], data["message"], data["level"]) == (7, "stopped", "error")
    # fitted (events/schema.py fit()): what can be kept is, the cycle ends in a note at the depth limit
    inner, depth = data["details"], 0
    while isinstance(inner, dict):
        assert inner["pid"] == 1
        inner, depth = inner["self"], depth + 1
    assert inner == "[dict nested too deeply]" and depth == schema.MAX_DEPTH - 1
    assert schema.decode_event(encode(event)).seq == 7


def test_what_we_send_is_always_what_readers_accept():
    """Too long, too deep, not finite, too many: fitted so the schema accepts it (else readers skip it)."""
    cases = [{"last_lines": ["x" * (2 * schema.MAX_STRING_CHARS)] * 12}, {"tokens_per_second": float("nan")},
             {"rate": float("inf")}, {"backends": list(range(5000))}, {"a": [[[[[[[[[[1]]]]]]]]]]},
             {"port": "not a port"}]
    for details in cases:
        event = Event(1.5, "coordinator", "stop", "m" * 100000, details, "error", {"instance": "h:1"}, 7, 0)
        data = encode(event)
        assert len(data) <= schema.MAX_PAYLOAD_BYTES
        decoded = schema.decode_event(data)
        assert decoded.seq == 7 and len(decoded.message) == schema.MAX_MESSAGE_CHARS, details
    bad_port = schema.decode_event(encode(Event(1.5, "coordinator", "stop", "m", {"port": "x"}, "info", {}, 1)))
    assert bad_port.details == {"unencodable_details": "Invalid: details.port: 'x' is not an integer from 1 to 65535"}


def test_an_ordinary_event_is_its_compact_json():
    event = Event(1.5, "raw", "log", "line \x1b[0m é", {"n": 1}, "info", {"instance": "h:1"}, 2)
    assert encode(event) == event.to_json().encode()
    assert b"\n" not in encode(event)


@pytest.mark.parametrize("exc,shown", [
    (redis.ConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused."), "connection refused"),
    (redis.TimeoutError("Timeout connecting to server"), "no answer within 1.5 s"),
    (redis.TimeoutError("Timeout reading from 127.0.0.1:6379"), "no reply within 2 s"),
    (redis.ConnectionError("Error -2 connecting to nohost:6379. Name or service not known."), "unknown host"),
    (redis.AuthenticationError("invalid username-password pair or user is disabled."),
     "wrong user or password, or the user is disabled (the URL's redis://USER:PASSWORD@...)"),
    (redis.AuthenticationError("Authentication required."),
     "Redis needs a password: redis://:PASSWORD@host, or redis://USER:PASSWORD@host for an ACL user"),
    (redis.ConnectionError("Error 1 connecting to 127.0.0.1:6380. [SSL: CERTIFICATE_VERIFY_FAILED] certificate "
                           "verify failed: self-signed certificate in certificate chain (_ssl.c:1006)."),
     "TLS: the server's certificate is not trusted (SYNAPTICLLAMAS_REDIS_CA_FILE names the CA that signed it)"),
    (redis.ConnectionError("Error 1 connecting to 127.0.0.1:6380. [SSL: WRONG_VERSION_NUMBER] wrong version number"),
     "TLS failed: is this Redis's TLS port? (rediss:// needs redis-server --tls-port)"),
])
def test_errors_are_described_in_a_few_words(exc, shown):
    assert describe(exc, connect_timeout=1.5, reply_timeout=2.0) == shown


@pytest.mark.parametrize("exc,shown", [
    (redis.TimeoutError("Timeout connecting to server"), "no answer within 3 s"),
    (redis.TimeoutError("Timeout reading from 127.0.0.1:6379"), "no reply within 10 s"),
    (TimeoutError(), "no reply within 10 s"),            # asyncio.wait_for's, which says nothing
])
def test_a_timeout_is_named_as_the_caller_set_it(exc, shown):
    assert describe(exc, connect_timeout=3.0, reply_timeout=10.0) == shown


def test_the_publisher_names_the_timeout_it_really_used(monkeypatch):
    """A server that accepts the connection and never answers: `redis on` reports the reply timeout
    the publisher was made with, not a number from elsewhere."""
    monkeypatch.setattr(publisher, "SOCKET_TIMEOUT", 0.3)
    with socket.create_server(("127.0.0.1", 0)) as silent:    # listens; the kernel accepts; nobody answers
        settings = SimpleNamespace(redis_url=f"redis://127.0.0.1:{silent.getsockname()[1]}", observer_max_events=10)

        async def scenario():
            pub = publisher.RedisPublisher(settings, Observer())
            pub.start()
            try:
                return await pub.wait_first_attempt(5)
            finally:
                await pub.close(0.1)

        assert asyncio.run(scenario()) == (False, "no reply within 0.3 s")
