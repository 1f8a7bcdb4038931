"""The one decoder (events/schema.py): every bad case a reader has met, and properties over any JSON."""
import json
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from synapticllamas.events import schema
from synapticllamas.events.contract import Event
from synapticllamas.events.gaps import JUMP_LIMIT, Gaps
from synapticllamas.events.observer import Observer
from synapticllamas.events.schema import Invalid, Tally, decode_event, decode_node_entry, decode_registration
from synapticllamas.rpc.addresses import BackendId, backend_id

SOURCE = {"app": "synapticllamas-node", "instance": "w1:1:0a0b0c0d", "host": "w1"}
DEVICE = {"name": "CPU", "description": "AMD EPYC", "total_mib": 24105, "free_mib": 24000}


def event(**fields):
    base = {"timestamp": 1704067200.5, "component": "node", "event_type": "node_up", "message": "node up",
            "details": {"address": "10.0.0.5:50052", "state": "up", "rpc_version": "7.0.0", "devices": [DEVICE]},
            "level": "info", "source": SOURCE, "seq": 3, "sampled": 0}
    base.update(fields)
    return json.dumps(base)


def details(**fields):
    return event(details=dict({"address": "10.0.0.5:50052", "state": "up"}, **fields))


def test_a_node_event_decodes_with_its_address_normalised():
    ev = decode_event(event(details={"address": "LOCALHOST:50052", "state": "up", "devices": [DEVICE]}).encode())
    assert ev.details["address"] == "127.0.0.1:50052" and type(ev.details["address"]) is BackendId
    assert (ev.component, ev.event_type, ev.seq, ev.sampled, ev.source) == ("node", "node_up", 3, 0, SOURCE)
    assert Event.from_json(event()) == decode_event(event())           # the contract's reader is this one


# each case: the JSON text, where the decoder says it is wrong
BAD = [
    (event(source="w1:1"), "source"),                                   # killed discovery's task
    (event(timestamp=1e20), "timestamp"),                               # killed the viewer
    (event(seq=1e20), "seq"),
    (event().replace('"seq": 3', '"seq": 1e999'), "json"),              # inf: killed the viewer
    (event().replace('"seq": 3', '"seq": NaN'), "json"),
    (event().replace('"timestamp": 1704067200.5', '"timestamp": Infinity'), "json"),
    (event(seq=2**53), "seq"),
    (event(seq=-1), "seq"), (event(seq=True), "seq"), (event(seq="3"), "seq"), (event(seq=2.5), "seq"),
    (event(sampled=-1), "sampled"), (event(sampled=3), "sampled"), (event(sampled="x"), "sampled"),
    (event(timestamp="now"), "timestamp"), (event(timestamp=-5), "timestamp"), (event(timestamp=None), "timestamp"),
    (event(component=7), "component"), (event(component="Node!"), "component"), (event(component="x" * 65), "component"),
    (event(event_type=["node_up"]), "event_type"), (event(event_type="log\n"), "event_type"),
    (event(level=3), "level"), (event(level="in\x1bfo"), "level"),
    (event(message={"a": 1}), "message"), (event(message="x" * (schema.MAX_MESSAGE_CHARS + 1)), "message"),
    (event(details="oops"), "details"), (event(details=[1, 2]), "details"), (event(details=5), "details"),
    (event(source={"instance": 5}), "source.instance"), (event(source={"instance": "a\x1b[2Jb"}), "source.instance"),
    (event(source={"host": "x" * 200}), "source.host"),
    (details(rpc_version="7.0.0\x1b]0;pwned\x07"), "details.rpc_version"),   # reached the terminal
    (details(rpc_version="7" * 65), "details.rpc_version"), (details(rpc_version=7), "details.rpc_version"),
    (details(address="nowhere"), "details.address"), (details(address="10.0.0.5:99999"), "details.address"),
    (details(address=["10.0.0.5:1"]), "details.address"), (details(address="bad host:1"), "details.address"),
    (details(devices="CPU"), "details.devices"), (details(devices=[5]), "details.devices[0]"),
    (details(devices=[dict(DEVICE, name="CPU\x1b[31m")]), "details.devices[0].name"),
    (details(devices=[dict(DEVICE, total_mib=-1)]), "details.devices[0].total_mib"),
    (details(devices=[dict(DEVICE, free_mib="lots")]), "details.devices[0].free_mib"),
    (details(interval_s=0), "details.interval_s"), (details(interval_s=-1), "details.interval_s"),
    (details(memory_offered_mib=2**41), "details.memory_offered_mib"), (details(state="UP"), "details.state"),
    (details(state=1), "details.state"), (details(rpc_pid=1.5), "details.rpc_pid"),
    (details(blob="x" * (schema.MAX_STRING_CHARS + 1)), "details.blob"),
    (details(many=list(range(schema.MAX_LIST_ITEMS + 1))), "details.many"),
    (details(deep=[[[[[[[[[[1]]]]]]]]]]), "details.deep[0][0][0][0][0][0][0]"),
    (details(big=10**30), "details.big"),
    (json.dumps({"timestamp": 1.0, "component": "raw", "event_type": "log", "details": {"x": "y" * (1 << 20)}}), "size"),
    ("[" * 100000 + "]" * 100000, "json"),
    ("{" + '"a":' * 10, "json"), ("\xff", "json"), ("[1, 2]", ""), ('"text"', ""), ("null", ""),
    ('{"component": "raw", "event_type": "log"}', "timestamp"),
    ('{"timestamp": 1, "event_type": "log"}', "component"),
    ("1" * 5000, "json"),
    # a node's machine and speed: placement and the metrics compute with them
    (details(host="w1"), "details.host"), (details(host={"id": "a\x1b[2Jb"}), "details.host.id"),
    (details(host={"id": "h", "cpus": 0}), "details.host.cpus"),
    (details(host={"id": "h", "mem_available_mib": -5}), "details.host.mem_available_mib"),
    (details(speed={"ns_per_byte": {"F16": -1}}), "details.speed.ns_per_byte.F16"),
    (details(speed={"ns_per_byte": [0.1]}), "details.speed.ns_per_byte"),
    (details(speed={"threads": 1.5}), "details.speed.threads"), (details(speed_note=5), "details.speed_note"),
]


@pytest.mark.parametrize(("text", "where"), BAD, ids=range(len(BAD)))
def test_each_bad_case_is_refused_with_where_and_one_printable_line(text, where):
    payload = text.encode("utf-8", "surrogateescape") if text != "\xff" else b"\xff"
    with pytest.raises(Invalid) as caught:
        decode_event(payload)
    assert caught.value.where == where, str(caught.value)
    line = str(caught.value)
    assert "\n" not in line and len(line) < 400


def test_a_tally_counts_by_field_and_keeps_the_last_reason_printable():
    tally = Tally()
    for text, _ in BAD:
        try:
            decode_event(text.encode("utf-8", "surrogateescape"))
        except Invalid as exc:
            tally.count(exc)
    assert tally.total == len(BAD)
    assert tally.by_where["details.devices"] >= 5 and tally.by_where["seq"] >= 5
    assert tally.last is not None and schema.printable(tally.last)
    assert tally.summary().startswith(f"{len(BAD)} skipped (")


def test_registrations_of_the_two_hashes():
    reg = {"app": "synapticllamas", "instance": "h:1:00000000", "host": "h", "pid": 1, "version": "0.1.0",
           "mode": "distributed", "started_at": 1.7e9, "heartbeat_interval": 30, "backend_heartbeat": True,
           "backend_heartbeat_interval": 30, "redis_url": "redis://x", "publisher": {"run": "ab", "generation": 1}}
    assert decode_registration(json.dumps(reg))["mode"] == "distributed"
    for bad in ({"pid": "1"}, {"heartbeat_interval": 0}, {"publisher": {"generation": -1}}, {"host": "a\x00b"}):
        with pytest.raises(Invalid):
            decode_registration(json.dumps(dict(reg, **bad)))
    node = {"address": "localhost:50052", "hostname": "w1", "rpc_version": "7.0.0", "devices": [DEVICE],
            "state": "up", "heartbeat_interval": 1.0, "last_heartbeat": 1.7e9, "cache": {"enabled": True, "bytes": 5}}
    address, decoded = decode_node_entry(b"127.0.0.1:50052", json.dumps(node))
    assert address == "127.0.0.1:50052" and decoded["address"] == address
    with pytest.raises(Invalid, match="is not the field"):
        decode_node_entry(b"10.0.0.9:50052", json.dumps(node))
    machine = {"id": "boot-0a", "id_source": "boot id", "name": "w1", "cpus": 0.5, "mem_total_mib": 4096,
               "mem_available_mib": 3000}
    speed = {"ns_per_byte": {"F16": 0.05, "Q4_K": 0.1}, "layer_ns": 5000.0, "threads": 1, "cpus": 0.5,
             "repack": False, "repack_failed": None, "seconds": 2.6, "measured_at": 1.7e9}
    _, decoded = decode_node_entry(b"127.0.0.1:50052", json.dumps(dict(node, host=machine, speed=speed)))
    assert decoded["host"] == machine and decoded["speed"] == speed
    for bad in ({"host": dict(machine, cpus=-1)}, {"speed": dict(speed, measured_at=1e20)}):
        with pytest.raises(Invalid):
            decode_node_entry(b"127.0.0.1:50052", json.dumps(dict(node, **bad)))
    for field, value in ((b"no-port", node), (b"\xff", node), (b"127.0.0.1:50052", dict(node, cache={"bytes": -1})),
                         (b"127.0.0.1:50052", dict(node, devices=[{"name": "\x1b[2J"}]))):
        with pytest.raises(Invalid):
            decode_node_entry(field, json.dumps(value))


def test_our_own_events_decode_unchanged():
    obs = Observer(max_events=10, sampling=False)
    emitted = [
        obs.emit("node", "node_up", "up", {"address": backend_id("10.0.0.5:50052"),
                                           "devices": [DEVICE], "rpc_version": "7.0.0", "rpc_pid": None}),
        obs.emit("coordinator", "start", "running", {"port": 18080, "rpc_backends": (backend_id("h:1"),),
                                                      "devices": {"CPU": {"model_mib": 1.5}}, "state": "running"}),
        obs.emit("raw", "log", "\x1b[0m a line \t with controls", {"pid": 5}),
        obs.emit("coordinator", "inference", "done", {"tokens_per_second": None, "prompt_tokens": 4}),
        obs.emit("raw", "log", "y" * (schema.MAX_MESSAGE_CHARS * 2)),
    ]
    from synapticllamas.events.publisher import encode

    for ev in emitted:
        back = decode_event(encode(ev))
        assert back.seq == ev.seq and back.message == ev.message[:schema.MAX_MESSAGE_CHARS]
        assert json.loads(json.dumps(back.details)) == json.loads(json.dumps(ev.details))
    assert emitted[-1].message.endswith(f"[cut: {schema.MAX_MESSAGE_CHARS * 2} characters]")


def test_a_backend_id_is_made_only_by_the_parser():
    with pytest.raises(TypeError):
        BackendId("127.0.0.1:50052")
    ident = backend_id("LocalHost:50052")
    assert ident == "127.0.0.1:50052" and {ident: 1}["127.0.0.1:50052"] == 1
    assert backend_id(ident) is ident and backend_id("[::1]:7") == "[::1]:7"
    assert pickle.loads(pickle.dumps(ident)) == ident and type(pickle.loads(pickle.dumps(ident))) is BackendId


def test_rules_for_the_page_are_json_and_name_every_kind():
    rules = json.loads(json.dumps(schema.rules()))
    kinds = {"count", "port", "number", "positive", "mib", "timestamp", "bool", "state", "label", "text",
             "version", "address"}
    specs = [rules["registration"], rules["node_registration"], *rules["shapes"].values(),
             *(spec for per in rules["details"].values() for spec in per.values())]
    for spec in specs:
        for kind in spec.values():
            base, _, inner = kind.partition(":")
            compound = base in ("list", "map", "shape") and (inner in rules["shapes"] or inner in kinds)
            assert base in kinds or compound, kind
    assert rules["max_seq"] == 2**53 - 1 and rules["jump_limit"] == JUMP_LIMIT


# ---------------------------------------------------------------- properties

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)
FIELDS = ["timestamp", "component", "event_type", "message", "details", "level", "source", "seq", "sampled"]


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from([*FIELDS, "other"]), json_values, max_size=9) |
       st.dictionaries(st.text(max_size=5), json_values))
def test_any_json_object_decodes_or_is_invalid_and_never_anything_else(data):
    try:
        text = json.dumps(data)
    except ValueError:
        return
    try:
        ev = decode_event(text)
    except Invalid:
        return
    assert 0 <= ev.timestamp <= schema.MAX_TIMESTAMP and 0 <= ev.seq <= schema.MAX_SEQ
    assert all(schema.printable(v) for v in ev.source.values())
    assert decode_event(ev.to_json()) == ev        # what a reader forwards decodes the same


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_decode_or_are_invalid(payload):
    try:
        decode_event(payload)
    except Invalid:
        pass


valid_events = st.builds(
    lambda ts, comp, msg, seq, sampled, inst, dev: Event(
        ts, comp, "heartbeat", msg, {"address": "10.0.0.1:50052", "devices": [dev]} if comp == "node" else {},
        "info", {"instance": inst}, seq, min(sampled, max(seq - 1, 0)) if seq else sampled),
    st.floats(0, schema.MAX_TIMESTAMP), st.sampled_from(["node", "raw", "system", "future_part"]),
    st.text(max_size=50), st.integers(0, schema.MAX_SEQ), st.integers(0, schema.MAX_SEQ),
    st.text(st.characters(codec="utf-8", exclude_categories=schema.UNPRINTABLE_CATEGORIES), min_size=1, max_size=20),
    st.fixed_dictionaries({"name": st.text("abcXYZ09", min_size=1, max_size=8), "description": st.text("ab ()", max_size=9),
                           "total_mib": st.integers(0, 10**6), "free_mib": st.integers(0, 10**6)}))


@settings(max_examples=200, deadline=None)
@given(valid_events)
def test_valid_events_survive_the_round_trip(ev):
    assert decode_event(ev.to_json()) == ev


# ---------------------------------------------------------------- the seq sums (events/gaps.py)

def test_one_forged_huge_seq_neither_freezes_nor_poisons_a_real_app():
    gaps = Gaps()
    for seq in range(1, 101):
        gaps.note("real", seq, 0)
    assert gaps.note("real", 2**53 - 1, 0) is None           # too big a jump to be a loss: a run of its own
    shown = [gaps.note("real", seq, 0) for seq in range(101, 201)]
    assert shown == [None] * 100                              # the real sequence goes on
    t = gaps.totals("real")
    assert (t.lost, t.confirmed_lost, t.sampled) == (0, 0, 0)
    assert gaps.note("real", 205, 2).lost == 2                # and real losses are still seen


def test_one_forged_event_with_a_small_jump_is_dropped_when_the_real_one_lands_before_it():
    gaps = Gaps()
    for seq in range(1, 11):
        gaps.note("real", seq, 0)
    assert gaps.note("real", 510, 0).lost == 499              # shown at once: nobody can tell yet
    assert gaps.totals("real").confirmed_lost == 0            # but not confirmed
    assert gaps.note("real", 11, 0) is None                   # the real next one: 510 was out of sequence
    gaps.note("real", 12, 0)
    t = gaps.totals("real")
    assert (t.lost, t.confirmed_lost, t.out_of_sequence) == (0, 0, 1)


def test_a_forged_low_seq_starts_a_stray_run_and_the_real_one_carries_on():
    gaps = Gaps()
    for seq in range(1, 1001):
        gaps.note("real", seq, 0)
    assert gaps.note("real", 1, 0) is None                    # a run of its own: the real one is not reset
    assert gaps.note("real", 5, 0).lost == 3                  # (in the stray run, pending)
    assert gaps.note("real", 1001, 0) is None and gaps.note("real", 1003, 0).lost == 1
    gaps.note("real", 1004, 0)
    t = gaps.totals("real")
    assert (t.confirmed_lost, t.lost) == (1, 4)               # the stray's gap is never confirmed


def test_a_jump_within_the_limit_is_a_loss_beyond_it_a_new_run():
    gaps = Gaps()
    gaps.note("a", 1, 0)
    assert gaps.note("a", 2 + JUMP_LIMIT, 0).lost == JUMP_LIMIT
    assert gaps.note("a", 3 + 2 * JUMP_LIMIT + 1, 0) is None


def test_instances_are_bounded_and_forgetting_is_counted():
    gaps = Gaps(max_instances=100)
    for i in range(1000):
        gaps.note(f"forged:{i}", 1, 0)
    assert len(gaps) == 100 and gaps.forgotten == 900 and "forged:999" in gaps and "forged:0" not in gaps
