"""The dashboard's pure parts: SSE ids and frames, the token and Host checks, password redaction."""
import json
import time

import pytest

from synapticllamas.dashboard import frames
from synapticllamas.dashboard.access import host_name, is_loopback_name, request_token
from synapticllamas.dashboard.hub import redact_strings
from synapticllamas.events.schema import Tally


def test_ids_sort_in_journal_order_with_pubsub_only_events_between():
    ids = ["1700000000000-0", "1700000000000-0~1", "1700000000000-0~2", "1700000000000-1", "1700000000001-0"]
    assert sorted(ids, key=frames.parse_id) == ids
    assert frames.parse_id("1700000000000") == (1700000000000, 0, 0)
    assert frames.stream_part("5-1~2") == "5-1"
    assert frames.parse_id("18446744073709551615-18446744073709551615") == (2**64 - 1, 2**64 - 1, 0)


@pytest.mark.parametrize("bad", ["", "abc", "1-", "-1", "1-2-3", "1~", "<script>", "1 -2", "9" * 21,
                                 "0-" + "9" * 20, "18446744073709551616-0", "٣", "1-٣", "²", "1~²", "５-0"])
def test_bad_ids_say_what_is_accepted(bad):
    with pytest.raises(ValueError, match="expected a journal id such as 1704067200123-0"):
        frames.parse_id(bad)


def test_a_frame_is_one_data_line_even_for_pretty_printed_json():
    raw = {"timestamp": 1.5, "component": "raw", "event_type": "log", "message": "a\nb", "seq": 1}
    pretty = json.dumps(raw, indent=2).encode()
    event = frames.decode(pretty)
    frame = frames.frame("1-0", event, pretty)
    assert frame.startswith(b"id: 1-0\ndata: {") and frame.endswith(b"\n\n")
    assert frame.count(b"\n") == 3 and json.loads(frame.split(b"data: ", 1)[1])["message"] == "a\nb"
    compact = json.dumps(raw, separators=(",", ":")).encode()
    assert frames.frame("2-0", event, compact) == b"id: 2-0\ndata: " + compact + b"\n\n"


def test_events_are_keyed_by_instance_and_seq_else_by_text():
    base = {"timestamp": 1.0, "component": "raw", "event_type": "log"}
    ev = frames.decode(json.dumps(dict(base, source={"instance": "h:1"}, seq=3)).encode())
    assert frames.event_key(ev, b"x") == ("h:1", 3)
    assert frames.event_key(frames.decode(json.dumps(dict(base, seq=3)).encode()), b"x") == b"x"
    tally = Tally()
    assert frames.decode(b"[1]", tally) is None and frames.decode(b"\xff", tally) is None
    assert frames.decode(b"{", tally) is None and tally.total == 3


def test_token_from_bearer_header_or_query():
    assert request_token({"headers": [(b"authorization", b"Bearer abc")]}) == "abc"
    assert request_token({"headers": [(b"authorization", b"Basic abc")]}) is None
    assert request_token({"headers": [], "query_string": b"a=1&token=x%2By"}) == "x+y"
    assert request_token({"headers": []}) is None


@pytest.mark.parametrize("header, name", [
    (b"127.0.0.1:8080", "127.0.0.1"), (b"localhost", "localhost"), (b"[::1]:8080", "[::1]"),
    (b"Evil.example:80", "evil.example"),
])
def test_host_names(header, name):
    assert host_name({"headers": [(b"host", header)]}) == name


def test_registration_urls_lose_their_password():
    reg = {"redis_url": "redis://:pw@h:6379/0", "nested": [{"u": "rediss://user:pw@h"}], "n": 1, "s": "a@b"}
    out = redact_strings(reg)
    assert "pw" not in json.dumps(out)
    assert out["redis_url"] == "redis://:***@h:6379/0" and out["s"] == "a@b" and out["n"] == 1


@pytest.mark.parametrize("name, loopback", [
    ("127.0.0.1", True), ("127.0.0.2", True), ("127.255.255.254", True), ("localhost", True), ("[::1]", True),
    ("::1", True), ("evil.example", False), ("127.0.0.1.evil.example", False), ("0.0.0.0", False),
    ("10.0.0.1", False), ("[::]", False), ("", False), ("localhost.evil.example", False),
])
def test_loopback_names(name, loopback):
    assert is_loopback_name(name) is loopback


def gateway_request(seq: int, instance: str = "gw:1", **details):
    from synapticllamas.events.schema import event_from_dict

    return event_from_dict({"timestamp": time.time(), "component": "gateway", "event_type": "request",
                            "message": "m", "details": details, "seq": seq,
                            "source": {"app": "synapticllamas", "instance": instance}})


def test_gateway_series_stay_bounded_and_go_with_their_app():
    """Anyone can publish any api or status: unknown ones are one `other` series, not one each. A
    forgotten app takes its gateway series with it."""
    from synapticllamas.dashboard import metrics as m

    fold = m.Metrics()
    for seq, (api, status) in enumerate([("openai", "ok"), ("made-up", "who-knows"), ("another", "odd"), ("ollama", "failed")], 1):
        fold.observe(None, gateway_request(seq, api=api, status=status, queue_depth=seq, first_token_s=0.5), True)
    text = fold.render(True)
    requests = [line for line in text.splitlines() if line.startswith("synapticllamas_gateway_requests_total{")]
    assert requests == ['synapticllamas_gateway_requests_total{app_instance="gw:1",api="ollama",status="failed"} 1',
                        'synapticllamas_gateway_requests_total{app_instance="gw:1",api="openai",status="ok"} 1',
                        'synapticllamas_gateway_requests_total{app_instance="gw:1",api="other",status="other"} 2']
    assert 'synapticllamas_gateway_queue_depth{app_instance="gw:1"} 4' in text.splitlines()
    assert 'synapticllamas_gateway_first_token_seconds_count{app_instance="gw:1",api="other"} 2' in text.splitlines()

    fold.sweep(time.time() + m.FORGET_AFTER + 1)
    assert not [line for line in fold.render(True).splitlines() if line.startswith("synapticllamas_gateway_")
                and not line.startswith("#")]
    assert fold.forgotten["app"] == 1


def test_an_exposition_keeps_a_histograms_samples_under_its_family():
    from synapticllamas.dashboard.metrics import Exposition

    out = Exposition()
    out.family("h_seconds", "histogram", "a histogram")
    for name in ("h_seconds_bucket", "h_seconds_sum", "h_seconds_count"):
        out.sample(name, {}, 1)
    with pytest.raises(ValueError, match="group each family"):
        out.sample("h_seconds", {}, 1)
    out.family("g", "gauge", "a gauge")
    with pytest.raises(ValueError, match="group each family"):
        out.sample("h_seconds_sum", {}, 1)
