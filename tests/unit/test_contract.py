"""The event contract's names live in one place (synapticllamas/events/contract.py); the page's
script, the shell's notices and docs/EVENTS.md follow them."""
import json
import re
from pathlib import Path

from synapticllamas.dashboard.contract_script import script
from synapticllamas.events.contract import COMPONENTS, EVENT_TYPES
from synapticllamas.shell.repl import NOTABLE

ROOT = Path(__file__).resolve().parents[2]
APP_JS = (ROOT / "synapticllamas" / "dashboard" / "static" / "app.js").read_text()


def test_contract_js_carries_every_component_and_event_type():
    body = script()
    assert body.startswith("// Generated") and "window.SYNAPTICLLAMAS_CONTRACT = Object.freeze(" in body
    data = json.loads(body.split("Object.freeze(", 1)[1].rsplit(");", 1)[0])
    assert data["components"] == list(COMPONENTS)
    assert {c: sorted(t.values()) for c, t in data["type"].items()} == {c: sorted(t) for c, t in EVENT_TYPES.items()}


def test_the_page_compares_events_only_through_the_contract():
    # a literal such as ev.event_type === "start" would not follow a renamed type
    assert not re.findall(r"""(?:event_type|component)\s*[!=]==\s*["']""", APP_JS)
    for component in COMPONENTS:      # (an element id such as $("raw") is not a component)
        assert not re.search(rf'(?<!\$\()"{component}"', APP_JS), component
    for name in re.findall(r"\bT\.(\w+)\.(\w+)", APP_JS):
        assert name[0] in EVENT_TYPES, name
    for name in re.findall(r"\bC\.([A-Z_]+)", APP_JS):
        assert name.lower() in COMPONENTS, name


def test_the_shells_notices_are_contract_types():
    for component, event_type in NOTABLE:
        assert event_type in EVENT_TYPES[component], (component, event_type)


def test_docs_events_lists_every_event_type():
    doc = (ROOT / "docs" / "EVENTS.md").read_text()
    sections = dict(re.findall(r"^### (\w+).*?\n(.*?)(?=^### |\Z)", doc, flags=re.S | re.M))
    for component, types in EVENT_TYPES.items():
        assert component in sections, f"docs/EVENTS.md has no section for {component}"
        for event_type in types:
            assert f"| `{event_type}`" in sections[component], f"{component}/{event_type} is not in docs/EVENTS.md"
