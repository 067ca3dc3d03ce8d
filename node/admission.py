"""Slots for connections that have not authenticated yet: a bound on them all, and on the share
of them one source address may hold. The direct port and the local master use one each.

    accepted ──admit(peer's IP)──▶ Slot ──token accepted, or closed──▶ release()
                   │
                   ├─ its address holds `per_source` already ──▶ that address's oldest slot
                   │      is taken back (its `evict()` closes that connection), then a Slot
                   └─ `limit` slots are held ──▶ None: the caller closes the connection at once

Whoever reaches a port can open connections and send nothing. Each one holds a file descriptor
of the process (which its other sockets, workers and files share) until its token is due, so
their number is bounded; but then idle connections, opened again as each is closed, can hold
every slot and keep real peers out. The share bounds what one address can take: it needs
`limit / per_source` addresses to fill the port.

Over its share an address loses its oldest connection, not the new one: it holds its share
either way, and a real peer behind that address (another node on the host, a NAT, a test on
loopback) still gets in, since its connection is the newest and authenticates in milliseconds,
long before that address opens `per_source` more. Refusing the newcomer instead would lock out
everyone behind an address while one process there holds its share.

An address is an IP address: an IPv4-mapped IPv6 address counts as its IPv4 address, and an
IPv6 address by its /64, the least one host (or one customer's network) is given: counting
each IPv6 address apart would give such a host 2^64 shares. Every operation is O(1).
"""

from __future__ import annotations

import collections
import ipaddress
import logging
from collections.abc import Callable
from typing import Final

from node.throttle import Throttle, more_since

__all__ = ["Admission", "Slot", "source_of"]

log = logging.getLogger("cpnode.admission")

# Connections closed for the bound or for an address's share: logged at most this often.
_LOG_EVERY_S: Final = 10.0


def source_of(host: str) -> str:
    """The address whose share a connection from `host` counts against (see the docstring)."""
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

    __slots__ = ("_admission", "evict", "source")

    def __init__(self, admission: Admission, source: str) -> None:
        self._admission: Admission | None = admission
        self.source = source
        self.evict: Callable[[], object] = _nothing

    @property
    def held(self) -> bool:
        return self._admission is not None

    def release(self) -> None:
        admission, self._admission = self._admission, None
        if admission is not None:
            admission._release(self)


class Admission:
    """At most `limit` connections not authenticated yet, at most `per_source` of them from one
    address; `what` names the service in log lines ("direct links", "master")."""

    def __init__(self, limit: int, per_source: int, what: str) -> None:
        if not 1 <= per_source <= limit:
            raise ValueError(f"per_source must be from 1 to limit ({limit}), got {per_source}")
        self.limit = limit
        self.per_source = per_source
        self.what = what
        self.held = 0
        self.refused = 0  # closed at once: `limit` slots were held
        self.evicted = 0  # closed for their address's share
        # Oldest first; every address here holds at least one slot.
        self._by_source: dict[str, collections.OrderedDict[Slot, None]] = {}
        # Anyone who reaches the port can make either as often as it connects.
        self._full_lines = Throttle(_LOG_EVERY_S)
        self._share_lines = Throttle(_LOG_EVERY_S)

    def held_by(self, host: str) -> int:
        """Slots held by the address `host` counts against."""
        return len(self._by_source.get(source_of(host), ()))

    def admit(self, host: str) -> Slot | None:
        """A slot for a connection from `host`, or None when it is to be closed at once."""
        source = source_of(host)
        slots = self._by_source.get(source)
        if slots is not None and len(slots) >= self.per_source:
            oldest, _ = slots.popitem(last=False)
            oldest._admission = None
            self.held -= 1
            self.evicted += 1
            if count := self._share_lines.hit():
                log.warning(
                    "%s: %s holds %d connections not authenticated yet, the most one address "
                    "may: its oldest closed%s", self.what, source, self.per_source,
                    more_since(count),
                )  # fmt: skip
            oldest.evict()
        elif self.held >= self.limit:
            self.refused += 1
            if count := self._full_lines.hit():
                log.warning(
                    "%s: connection from %s closed at once: %d are not authenticated yet%s",
                    self.what, source, self.limit, more_since(count),
                )  # fmt: skip
            return None
        slot = Slot(self, source)
        if slots is None:
            slots = self._by_source[source] = collections.OrderedDict()
        slots[slot] = None
        self.held += 1
        return slot

    def _release(self, slot: Slot) -> None:
        slots = self._by_source[slot.source]
        del slots[slot]
        if not slots:
            del self._by_source[slot.source]
        self.held -= 1
