"""The cluster key, signed announcements and the check a shell runs on each: milliseconds, no network."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from synapticllamas.events.contract import Event
from synapticllamas.events.observer import Observer
from synapticllamas.events.publisher import encode
from synapticllamas.trust import key as cluster_key
from synapticllamas.trust import signing
from synapticllamas.trust.announcements import NEEDS_KEY, AnnouncementCheck


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------- the key file

def test_init_writes_a_private_random_key_and_never_overwrites_it_silently(tmp_path):
    path = tmp_path / "conf" / "cluster.key"
    made = cluster_key.create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(path.read_text().strip()) == 64 and cluster_key.read(path).secret == made.secret
    with pytest.raises(cluster_key.ClusterKeyError, match="already exists; every machine"):
        cluster_key.create(path)
    assert cluster_key.read(path).secret == made.secret
    again = cluster_key.create(path, force=True)
    assert again.secret != made.secret and len(again.secret) == 32
    assert made.secret.hex() not in repr(made) and made.id in repr(made)


def test_a_key_others_can_read_or_that_is_no_key_is_refused_in_one_line(tmp_path):
    path = tmp_path / "cluster.key"
    cluster_key.create(path)
    os.chmod(path, 0o640)
    with pytest.raises(cluster_key.ClusterKeyError) as exc:
        cluster_key.read(path)
    assert str(exc.value) == f"cluster key {path} is readable by others (mode 0640); chmod 600 {path}"
    os.chmod(path, 0o600)
    path.write_text("not a key\n")
    with pytest.raises(cluster_key.ClusterKeyError, match="expected 64 hex digits"):
        cluster_key.read(path)
    missing = tmp_path / "nope.key"
    assert cluster_key.load(str(missing), explicit=False) is None          # the default path: an insecure cluster
    with pytest.raises(cluster_key.ClusterKeyError, match=r"no such file; make one with `python3 main\.py cluster init`"):
        cluster_key.load(str(missing), explicit=True)


def test_each_use_has_its_own_key_and_the_id_names_the_key():
    a, b = cluster_key.ClusterKey(b"a" * 32), cluster_key.ClusterKey(b"b" * 32)
    assert len({a.derive("announce"), a.derive("link"), a.derive("dashboard")}) == 3
    assert a.id == cluster_key.ClusterKey(b"a" * 32).id != b.id and len(a.id) == 8


# ---------------------------------------------------------------- signatures

def test_a_signature_survives_the_trip_through_json_and_nothing_else_does():
    clock = Clock()
    signer, verifier = signing.Signer(b"k" * 32, clock), signing.Verifier(b"k" * 32, clock=clock)
    event = {"component": "node", "event_type": "node_up", "details": {"address": "10.0.0.5:50052",
             "cache": Path("/var/cache"), "devices": [{"free_mib": 1}], 3: "int key"}, "seq": 7}
    sent = json.dumps(signer.sign(event), indent=2, ensure_ascii=False)     # any spacing, any order
    received = json.loads(sent)
    assert verifier.check(dict(reversed(list(received.items())))) is None
    forged = json.loads(sent)
    forged["details"]["devices"][0]["free_mib"] = 999999
    assert verifier.check(forged) == signing.BAD_SIGNATURE
    assert signing.Verifier(b"x" * 32, clock=clock).check(received) == signing.BAD_SIGNATURE
    del forged["auth"]
    assert verifier.check(forged) == signing.UNSIGNED
    for bad in ({"v": 1, "ts": "now", "mac": "00"}, {"v": 2, "ts": 1.0, "mac": "00"}, {"v": 1, "ts": float("nan")}):
        assert verifier.check({**event, "auth": bad}) in (signing.BAD_SIGNATURE, signing.UNSIGNED)


def test_an_old_signature_or_one_from_the_future_is_refused():
    clock = Clock()
    signed = signing.Signer(b"k" * 32, clock).sign({"x": 1})
    verifier = signing.Verifier(b"k" * 32, clock=clock)
    clock.now += signing.WINDOW - 1
    assert verifier.check(signed) is None
    clock.now += 300                                               # a replay from minutes before
    assert verifier.check(signed) == signing.STALE
    assert "signed 329 s ago (a replay? valid for 30 s)" in signing.describe(signing.STALE, verifier.age(signed))
    clock.now -= 400
    assert verifier.check(signed) == signing.AHEAD
    assert verifier.check(signed, window=float("inf")) is None


# ---------------------------------------------------------------- what a shell believes

def node_event(signer: signing.Signer | None, seq: int, event_type: str = "node_up",
               address: str = "10.0.0.5:50052", instance: str = "host1:42") -> dict:
    event = {"timestamp": 1.0, "component": "node", "event_type": event_type, "message": "m",
             "details": {"address": address, "link": "tls-psk"}, "level": "info",
             "source": {"app": "synapticllamas-node", "instance": instance, "host": "host1"}, "seq": seq}
    return json.loads(json.dumps(signer.sign(event) if signer else event))


def test_a_keyed_shell_takes_signed_news_only_and_says_once_per_address_what_it_ignored():
    clock = Clock()
    observer = Observer(100, False, 1.0)
    check = AnnouncementCheck(b"k" * 32, observer)
    check.verifier = signing.Verifier(b"k" * 32, clock=clock)
    ours, theirs = signing.Signer(b"k" * 32, clock), signing.Signer(b"z" * 32, clock)
    assert check.event(node_event(ours, 1), "10.0.0.5:50052")
    assert check.event(node_event(ours, 2, "heartbeat"), "10.0.0.5:50052")
    assert not check.event(node_event(ours, 2, "heartbeat"), "10.0.0.5:50052")           # the same one again
    assert not check.event(node_event(ours, 1, "node_down"), "10.0.0.5:50052")          # an older one
    for _ in range(3):
        assert not check.event(node_event(None, 9, address="127.0.0.99:50052"), "127.0.0.99:50052")
    assert not check.event(node_event(theirs, 5, address="10.0.0.7:50052"), "10.0.0.7:50052")
    real = node_event(ours, 3, "node_down")
    clock.now += 300
    assert not check.event(real, "10.0.0.5:50052")                                        # minutes later
    messages = [e.message for e in observer.buffer if e.event_type == "announcement_ignored"]
    assert messages == [
        "ignored a replayed announcement for 10.0.0.5:50052",
        "ignored an unsigned announcement for 127.0.0.99:50052",
        "ignored an announcement signed with another key (wrong cluster key?) for 10.0.0.7:50052",
        "ignored an announcement signed 300 s ago (a replay? valid for 30 s) for 10.0.0.5:50052",
    ], messages
    assert all(e.level == "warning" and e.component == "rpc_registry" for e in observer.buffer)
    assert check.ignored == {"replayed": 2, "unsigned": 3, "bad_signature": 1, "stale": 1}


def test_a_registration_read_late_makes_older_events_old_news_not_alarms():
    clock = Clock()
    observer = Observer(100, False, 1.0)
    check = AnnouncementCheck(b"k" * 32, observer)
    check.verifier = signing.Verifier(b"k" * 32, clock=clock)
    signer = signing.Signer(b"k" * 32, clock)
    registration = json.loads(json.dumps(signer.sign({"instance": "host1:42", "seq": 10, "state": "up"})))
    assert check.registration(registration, "10.0.0.5:50052", window=75)
    assert not check.registration(registration, "10.0.0.5:50052", window=75)           # written again: replayed
    assert not check.event(node_event(signer, 9, "heartbeat"), "10.0.0.5:50052")        # queued before the read
    assert check.event(node_event(signer, 11, "heartbeat"), "10.0.0.5:50052")
    assert [e.message for e in observer.buffer] == ["ignored a replayed announcement for 10.0.0.5:50052"]
    clock.now += 80
    late = json.loads(json.dumps(signer.sign({"instance": "host1:42", "seq": 12})))
    clock.now += 80
    assert not check.registration(late, "10.0.0.5:50052", window=75)


def test_a_shell_without_a_key_uses_plain_nodes_and_names_the_missing_key_for_linked_ones():
    observer = Observer(100, False, 1.0)
    check = AnnouncementCheck(None, observer)
    signed = node_event(signing.Signer(b"k" * 32), 1)
    assert not check.event(signed, "10.0.0.5:50052")                 # behind a link it cannot open
    plain = node_event(None, 1, address="10.0.0.6:50052")
    plain["details"]["link"] = "plain"
    assert check.event(plain, "10.0.0.6:50052")
    assert check.ignored == {NEEDS_KEY: 1}
    [event] = observer.buffer
    assert event.message.startswith("ignored node 10.0.0.5:50052: it serves rpc-server only through an encrypted link")


def test_the_publisher_signs_what_it_sends():
    signer = signing.Signer(b"k" * 32)
    event = Event(1.0, "node", "heartbeat", "m", {"address": "10.0.0.5:50052", "path": Path("/x")}, "info",
                  {"instance": "h:1"}, 4, 0)
    payload = json.loads(encode(event, signer))
    assert signing.Verifier(b"k" * 32).check(payload) is None and payload["details"]["path"] == "/x"
    assert Event.from_json(encode(event, signer)).seq == 4        # readers that know nothing of auth still read it
    assert "auth" not in json.loads(encode(event))


def test_the_viewer_marks_node_events_the_key_does_not_vouch_for():
    import io

    from synapticllamas.events.viewer import Viewer

    out = io.StringIO()
    viewer = Viewer("redis://127.0.0.1:1", 0, out=out, err=io.StringIO(), announce_key=b"k" * 32)
    signed = node_event(signing.Signer(b"k" * 32), 1, "heartbeat")
    for payload in (signed, node_event(None, 2, "heartbeat"), node_event(signing.Signer(b"z" * 32), 3, "heartbeat")):
        assert viewer.handle(json.dumps(payload).encode(), "test")
    lines = out.getvalue().splitlines()
    assert not lines[0].startswith("[") and lines[1].startswith("[unsigned] ") and \
        lines[2].startswith("[bad signature] "), lines


def test_what_a_node_publishes_passes_the_schema_then_the_check_on_the_same_object():
    """Discovery's one path: schema.load_json, the schema's decode (which normalises the parsed
    object in place), then AnnouncementCheck on that object, `auth` and all."""
    from synapticllamas.events import schema
    from synapticllamas.rpc.addresses import backend_id

    key = b"k" * 32
    signer, check = signing.Signer(key), AnnouncementCheck(key)
    address = backend_id("10.0.0.5:50052")                       # a node announces the parser's spelling
    details = {"address": address, "state": "up", "rpc_version": "7.0.0", "link": "tls-psk", "threads": 2,
               "devices": [{"name": "CPU", "description": "Xeon", "total_mib": 24105, "free_mib": 24000}],
               "memory_offered_mib": 24000, "latency_ms": 0.42, "restarts": 0, "cache": Path("/var/cache")}
    event = Event(1_800_000_000.0, "node", "node_up", "node up", details, "info",
                  {"app": "synapticllamas-node", "instance": "host1:42:0a0b0c0d", "host": "host1"}, 3, 0)
    raw = schema.load_json(encode(event, signer))
    decoded = schema.event_from_dict(raw)
    assert type(decoded.details["address"]).__name__ == "BackendId" and raw["details"]["address"] is decoded.details[
        "address"]                                               # normalised in the very object checked
    assert check.event(raw, decoded.details["address"])

    registration = {"address": address, "instance": "host1:42:0a0b0c0d", "state": "up", "link": "tls-psk",
                    "devices": details["devices"], "heartbeat_interval": 30.0, "last_heartbeat": 1_800_000_000.5,
                    "seq": 3, "cache": {"enabled": True, "dir": "/var/cache", "bytes": 0, "max_bytes": None}}
    field, reg = schema.decode_node_entry(str(address), json.dumps(signer.sign(registration)))
    assert check.registration(reg, field, window=75)

    # what the schema normalises differently from what was signed fails: the signed form is the
    # normal one, so only a message made by hand (or forged) can differ
    spelled = schema.load_json(json.dumps(signer.sign({**event.to_dict(), "details": {**details,
                                                                                      "address": "LOCALHOST:50052"}})))
    assert schema.event_from_dict(spelled).details["address"] == "127.0.0.1:50052"
    assert not check.event(spelled, "127.0.0.1:50052") and check.ignored == {signing.BAD_SIGNATURE: 1}
