"""What every test shares: no hidden timing assertion, and a guard against traffic off loopback.

- Hypothesis fails an example that runs longer than its `deadline` (200 ms by default): a timing
  assertion in disguise, which a loaded machine trips. The profile loaded here turns it off for
  every test and keeps every other default (a test's own `@settings` still applies on top).
- `loopback_only`: a fixture that refuses, in this process, every socket operation that could
  put a packet on a network other than loopback (connect, sendto, sendmsg to an address outside
  127.0.0.0/8 and ::1, and the resolution of a host name other than `localhost`). The operation
  raises PermissionError before any system call and is recorded; the test fails at teardown
  when anything was attempted. Code under test in a child process is not covered.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import settings

from tests.scripted import ScriptedMaster

settings.register_profile("cpnode", deadline=None)
settings.load_profile("cpnode")


_SENDS = frozenset({"socket.connect", "socket.sendto", "socket.sendmsg"})
_LOOKUPS = frozenset({"socket.gethostbyname", "socket.gethostbyname_ex"})
_INET = (socket.AF_INET, socket.AF_INET6)


def _literal(host: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = host.decode() if isinstance(host, bytes) else str(host)
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _is_localhost(host: object) -> bool:
    text = host.decode() if isinstance(host, bytes) else str(host)
    return text.lower().rstrip(".") == "localhost"


def _stays_on_this_host(host: object) -> bool:
    """Whether a packet to `host` (an address or a name) cannot leave the machine."""
    if _is_localhost(host):
        return True
    ip = _literal(host)
    # 0.0.0.0 and :: as a destination mean this host.
    return ip is not None and (ip.is_loopback or ip.is_unspecified)


def _resolves_without_the_network(host: object) -> bool:
    """getaddrinfo() of no host, of an address literal or of `localhost` asks no DNS server."""
    return host is None or host in ("", b"") or _is_localhost(host) or _literal(host) is not None


class LoopbackGuard:
    """The audit hook behind `loopback_only`; `attempts` lists what it refused."""

    def __init__(self) -> None:
        self.active = False
        self.attempts: list[tuple[str, str]] = []

    def __call__(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.active or not event.startswith("socket."):
            return
        if event in _SENDS:
            sock, address = args
            if (
                address is None
                or getattr(sock, "family", None) not in _INET
                or _stays_on_this_host(address[0])
            ):
                return
            self._refuse(event, repr(address))
        elif event == "socket.getaddrinfo":
            if not _resolves_without_the_network(args[0]):
                self._refuse(event, repr(args[0]))
        elif event in _LOOKUPS:
            if not _stays_on_this_host(args[0]):
                self._refuse(event, repr(args[0]))
        elif event == "socket.gethostbyaddr" and not _stays_on_this_host(args[0]):
            self._refuse(event, repr(args[0]))

    def _refuse(self, event: str, target: str) -> None:
        self.attempts.append((event, target))
        raise PermissionError(f"loopback_only: {event} to {target} refused (off loopback)")


_guard: LoopbackGuard | None = None


@pytest.fixture
def loopback_only() -> Iterator[LoopbackGuard]:
    """Refuse and record any traffic off loopback from this process while the test runs."""
    global _guard
    if _guard is None:
        # An audit hook cannot be removed: install one, once, and switch it on per test.
        _guard = LoopbackGuard()
        sys.addaudithook(_guard)
    _guard.attempts.clear()
    _guard.active = True
    try:
        yield _guard
    finally:
        _guard.active = False
    attempts = list(_guard.attempts)
    _guard.attempts.clear()
    assert attempts == [], f"traffic off loopback was attempted (and refused): {attempts}"


@pytest.fixture
def scripted() -> Iterator[ScriptedMaster]:
    """A `tests.scripted.ScriptedMaster` on loopback, closed after the test."""
    master = ScriptedMaster()
    try:
        yield master
    finally:
        master.close()
