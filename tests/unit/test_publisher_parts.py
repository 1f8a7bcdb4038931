"""Small parts of the publisher that need no Redis: event encoding and error wording."""
import json

import pytest
import redis

from synapticllamas.events.contract import Event
from synapticllamas.events.publisher import describe, encode


def test_an_event_whose_details_cannot_be_encoded_still_goes_out():
    details: dict = {"pid": 1}
    details["self"] = details                        # a cycle: json.dumps raises ValueError
    event = Event(1.5, "coordinator", "stop", "stopped", details, "error", {"instance": "h:1"}, 7)
    data = json.loads(encode(event))
    assert (data["seq"], data["message"], data["level"]) == (7, "stopped", "error")
    assert data["details"] == {"unencodable_details": "ValueError: Circular reference detected"}


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
     "invalid username-password pair or user is disabled."),
])
def test_errors_are_described_in_a_few_words(exc, shown):
    assert describe(exc) == shown
