"""(instance, seq) de-duplication, shared by the dashboard hub and the terminal viewer."""
import pytest

from synapticllamas.events.contract import Event
from synapticllamas.events.dedup import SeenEvents, identity


def test_an_event_is_known_by_its_instance_and_seq():
    event = Event(1.0, "system", "note", "hi", source={"instance": "h:1"}, seq=3)
    assert identity(event.source, event.seq) == ("h:1", 3)
    assert identity({"instance": 7}, 3) == ("7", 3)       # foreign JSON: any instance, as text


@pytest.mark.parametrize("source, seq", [
    ({"instance": "h:1"}, 0),        # an Event parsed without a seq
    ({"instance": "h:1"}, None), ({"instance": "h:1"}, "3"), ({"instance": "h:1"}, True), ({"instance": "h:1"}, 2.0),
    ({}, 3), ({"instance": ""}, 3), (None, 3), ("h:1", 3),
])
def test_without_both_there_is_no_identity(source, seq):
    assert identity(source, seq) is None


def test_a_repeat_is_dropped_and_memory_is_bounded():
    seen = SeenEvents(capacity=3)
    assert [seen.add(("a", n)) for n in (1, 2, 1, 3)] == [True, True, False, True]
    assert ("a", 1) in seen and len(seen) == 3
    assert seen.add(("b", 1))                             # a fourth key: the oldest, ("a", 1), goes
    assert ("a", 1) not in seen and len(seen) == 3
    assert seen.add(("a", 1))                             # so a repeat that late gets through again
    assert ("a", 2) not in seen                           # ...and pushes out the next oldest


def test_clear_forgets_everything():
    seen = SeenEvents(10)
    seen.add(b"payload")                                  # any hashable key: the hub keys text-only events by payload
    seen.clear()
    assert len(seen) == 0 and seen.add(b"payload")
    with pytest.raises(ValueError, match="capacity"):
        SeenEvents(0)
