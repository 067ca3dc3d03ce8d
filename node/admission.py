"""Slots for connections that have not authenticated yet: a bound on them, and, once every slot
is held, a choice of which connection gives way. The direct port and the local master use one
each.

    accepted ──admit(peer's IP)──▶ Slot ──token accepted, or closed──▶ release()
                   │
                   └─ `limit` slots are held ──▶ the oldest slot of the address that holds the
                          most (the newcomer's own when it holds as many) is taken back (its
                          `evict()` closes that connection), then a Slot

Whoever reaches a port can open connections and send nothing. Each one holds a file descriptor
of the process (which its other sockets, workers and files share) until its token is due, so
their number is bounded. But idle connections, opened again as each is closed, could then hold
every slot and keep real peers out; so a full port does not turn newcomers away: it closes the
oldest connection of the address holding the most slots (the newcomer's own address when that
holds as many as any). A real peer's connection is the newest of its address and authenticates
in milliseconds; the ones that give way are the oldest, held by whoever opened the most.

Nothing is closed while there is room: many nodes on one host restarting at once (a burst from
one address, whose tokens may wait in the kernel while the loop is busy) all get in. A flood
from one address closes another address's connections only while that one holds more (it can
bring an address holding over half the slots down to its own count); a flood from many can
close anyone's, oldest first, which no bound on one host can prevent (IPv6 addresses counted
by /64: one customer's /48 holds 65,536 of them).

An address is an IP address: an IPv4-mapped IPv6 address counts as its IPv4 address, and an
IPv6 address by its /64, the least one host (or one customer's network) is given: counting
each IPv6 address apart would make each connection of such a host its own address. Admitting
is O(1) while there is room, O(addresses) once the port is full.
"""

from __future__ import annotations

import collections
import ipaddress
import itertools
import logging
from collections.abc import Callable
from typing import Final

from node.throttle import Throttle, more_since

__all__ = ["Admission", "Slot", "source_of"]

log = logging.getLogger("cpnode.admission")

# Connections closed to make room: logged at most this often.
_LOG_EVERY_S: Final = 10.0


def source_of(host: str) -> str:
    """The address a connection from `host` counts as (see the module docstring)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


def _nothing() -> None:
    pass


class Slot:
    """One connection's place among those not authenticated yet.

    Its owner (the listener while it peeks and handshakes, then the connection) sets `evict`
    to what closes the connection at once; `release()` when it authenticates or closes
    (again is harmless, as is a release after an eviction)."""

    __slots__ = ("_admission", "evict", "number", "source")

    def __init__(self, admission: Admission, source: str, number: int) -> None:
        self._admission: Admission | None = admission
        self.source = source
        self.number = number  # the order slots were given in: lower is older
        self.evict: Callable[[], object] = _nothing

    @property
    def held(self) -> bool:
        return self._admission is not None

    def release(self) -> None:
        admission, self._admission = self._admission, None
        if admission is not None:
            admission._release(self)

    def _detach(self) -> None:
        """Taken back by its admission, which counts it no more."""
        self._admission = None


class Admission:
    """At most `limit` connections not authenticated yet; `what` names the service in log
    lines ("direct links", "master")."""

    def __init__(self, limit: int, what: str) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self.limit = limit
        self.what = what
        self.held = 0
        self.evicted = 0  # closed to make room for a newcomer
        self._numbers = itertools.count()
        # Oldest first; every address here holds at least one slot.
        self._by_source: dict[str, collections.OrderedDict[Slot, None]] = {}
        # Anyone who reaches the port can make these as often as it connects.
        self._evictions = Throttle(_LOG_EVERY_S)

    def admit(self, host: str) -> Slot:
        """A slot for a connection from `host`; when every slot is held, the oldest of the
        address holding the most (this one's when it holds as many) is closed first."""
        source = source_of(host)
        if self.held >= self.limit:
            self._evict_for(source)
        slot = Slot(self, source, next(self._numbers))
        slots = self._by_source.get(source)
        if slots is None:
            slots = self._by_source[source] = collections.OrderedDict()
        slots[slot] = None
        self.held += 1
        return slot

    def _evict_for(self, newcomer: str) -> None:
        mine = self._by_source.get(newcomer)
        most = max(map(len, self._by_source.values()))
        if mine is not None and len(mine) == most:
            victims = mine  # it holds as many as any: it gives way to itself
        else:  # of those holding the most, the one whose oldest is oldest
            victims = min(
                (slots for slots in self._by_source.values() if len(slots) == most),
                key=lambda slots: next(iter(slots)).number,
            )
        oldest, _ = victims.popitem(last=False)
        if not victims:
            del self._by_source[oldest.source]
        oldest._detach()
        self.held -= 1
        self.evicted += 1
        if count := self._evictions.hit():
            log.warning(
                "%s: %d connections are not authenticated yet, the most it holds: the oldest "
                "of %s's %d closed for a connection from %s%s", self.what, self.limit,
                oldest.source, most, newcomer, more_since(count),
            )  # fmt: skip
        try:
            oldest.evict()
        except Exception:  # a bug in a protocol's close: the bound still holds
            log.exception("%s: closing a connection from %s failed", self.what, oldest.source)

    def _release(self, slot: Slot) -> None:
        slots = self._by_source[slot.source]
        del slots[slot]
        if not slots:
            del self._by_source[slot.source]
        self.held -= 1
