"""Which node announcements a shell believes: the check discovery runs on each one before acting.

With a cluster key, an announcement (a node event on synapticllamas:llama_cpp:node, an entry of
synapticllamas:nodes) is used only when it is signed with the key, recent, and not a replay
(trust/signing.py). Anything else is ignored, never added as a backend and never marking a held
one down, and said once per address and reason: a `rpc_registry/announcement_ignored` warning
event (which the shell prints), e.g. "ignored an unsigned announcement for 127.0.0.99:50052".

Without a key the shell cannot check signatures, so it takes signed and unsigned announcements
alike (as before there were keys), except those of a node that serves only through an encrypted
link: it could not use that node, so it ignores it and says the key is missing.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from synapticllamas.trust import signing
from synapticllamas.util.text import shown

if TYPE_CHECKING:
    from synapticllamas.events.observer import Observer

NEEDS_KEY = "needs_key"
OLDER = "older"               # at or before the registration read: the registration already said it
WARNED_KEPT = 1024            # (address, reason) pairs already said; past that, only counted


class AnnouncementCheck:
    def __init__(self, announce_key: bytes | None, observer: Observer | None = None) -> None:
        self.verifier = signing.Verifier(announce_key) if announce_key else None
        self.guard = signing.ReplayGuard()
        self.observer = observer
        self.ignored: dict[str, int] = {}
        self._warned: set[tuple[str, str]] = set()
        self._by_registration: set[str] = set()   # streams whose position a registration set

    @property
    def keyed(self) -> bool:
        return self.verifier is not None

    def event(self, event: dict[str, Any], address: str) -> bool:
        """Is this node event (the parsed JSON) to be acted on?"""
        details = event.get("details")
        link = details.get("link") if isinstance(details, dict) else None
        reason = self._signature(event, None, link)
        if reason is None and self.verifier is not None:
            source = event.get("source")
            instance = source.get("instance") if isinstance(source, dict) else None
            seq = event.get("seq")
            stream = f"events:{instance}"
            if not isinstance(instance, str) or isinstance(seq, bool) or not isinstance(seq, int):
                reason = signing.REPLAYED
            elif not self.guard.accept(stream, seq):
                # queued before the hash was read, and older than it: not news, not an attack either
                reason = OLDER if stream in self._by_registration else signing.REPLAYED
            else:
                self._by_registration.discard(stream)
        return self._verdict(reason, address, event, str(event.get("event_type") or "event"))

    def registration(self, registration: dict[str, Any], address: str, window: float) -> bool:
        """Is this entry of the nodes hash to be believed? `window`: how old it may be (it is
        rewritten with each heartbeat, so a few heartbeat intervals)."""
        reason = self._signature(registration, window, registration.get("link"))
        if reason is None and self.verifier is not None:
            ts = signing.signed_at(registration)
            if ts is None or not self.guard.accept(f"registration:{address}", ts):
                reason = signing.REPLAYED
            else:
                instance, seq = registration.get("instance"), registration.get("seq")
                stream = f"events:{instance}"
                if isinstance(instance, str) and isinstance(seq, int) and not isinstance(seq, bool) \
                        and (self.guard.position(stream) or -1) < seq:
                    self.guard.advance(stream, seq)     # events up to seq are older than this
                    self._by_registration.add(stream)
                    if len(self._by_registration) > signing.STREAMS_KEPT:
                        self._by_registration.clear()
        return self._verdict(reason, address, registration, "registration")

    def _signature(self, obj: dict[str, Any], window: float | None, link: Any) -> str | None:
        if self.verifier is None:
            return NEEDS_KEY if link == "tls-psk" else None
        return self.verifier.check(obj, window)

    def _verdict(self, reason: str | None, address: str, obj: dict[str, Any], what: str) -> bool:
        if reason is None:
            return True
        self.ignored[reason] = self.ignored.get(reason, 0) + 1
        if reason == OLDER or (address, reason) in self._warned or len(self._warned) >= WARNED_KEPT:
            return False
        self._warned.add((address, reason))
        if reason == NEEDS_KEY:
            message = (f"ignored node {shown(address, 80)}: it serves rpc-server only through an encrypted link and "
                       "this shell has no cluster key (copy cluster.key from the machine that made it)")
        else:
            age = self.verifier.age(obj) if self.verifier is not None else None
            window = self.verifier.window if self.verifier is not None else signing.WINDOW
            message = f"ignored {signing.describe(reason, age, window)} for {shown(address, 80)}"
        if self.observer is not None:
            from synapticllamas.events.contract import Component, RegistryEvent

            self.observer.emit(Component.RPC_REGISTRY, RegistryEvent.ANNOUNCEMENT_IGNORED, message,
                               {"address": shown(address, 80), "reason": reason, "what": shown(what, 40)},
                               level="warning")
        return False
