"""/contract.js: the event contract's names (components, event types, levels) and the event schema's
rules (limits, patterns, typed details) for the page's script.

Generated from synapticllamas/events/contract.py and events/schema.py, so the page compares against
the same constants the emitters use, and refuses the same malformed events the Python readers
refuse: a renamed event type or a changed limit cannot leave the page behind.
"""
from __future__ import annotations

import json
from functools import lru_cache

from synapticllamas.events import contract, schema


def _names(namespace: type) -> dict[str, str]:
    return {k: v for k, v in vars(namespace).items() if k.isupper()}


@lru_cache(maxsize=1)
def script() -> str:
    data = {
        "components": list(contract.COMPONENTS),
        "levels": list(contract.LEVELS),
        "component": _names(contract.Component),
        "type": {
            contract.Component.COORDINATOR: _names(contract.CoordinatorEvent),
            contract.Component.MODEL: _names(contract.ModelEvent),
            contract.Component.RPC_BACKEND: _names(contract.BackendEvent),
            contract.Component.RPC_REGISTRY: _names(contract.RegistryEvent),
            contract.Component.SYSTEM: _names(contract.SystemEvent),
            contract.Component.RAW: _names(contract.RawEvent),
            contract.Component.NODE: _names(contract.NodeEvent),
            contract.Component.GATEWAY: _names(contract.GatewayEvent),
        },
        "schema": schema.rules(),
    }
    return ("// Generated from synapticllamas/events/contract.py and schema.py: the names and rules the page follows.\n"
            f"window.SYNAPTICLLAMAS_CONTRACT = Object.freeze({json.dumps(data, sort_keys=True)});\n")
