"""The loopback guard: an audit hook that refuses socket operations which could put a packet on
a network other than loopback (connect, sendto, sendmsg to an address outside 127.0.0.0/8 and
::1, and the resolution of a host name other than `localhost`).

The test process switches it on per test (`tests.conftest.loopback_only`). Every Python process
the tests start gets it too: the test session puts this directory first on PYTHONPATH, so
Python imports this file as `sitecustomize` at start-up, and with CPNODE_TEST_LOOPBACK_LOG set
it installs the hook for the life of the process, appending each refusal to that file (the
session fails the test during which one was written).
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import ipaddress

# `socket` and `ipaddress` are imported only once a socket event arrives: a process that never
# touches the network must not load them because of this file (tests check that the protocol
# package loads no I/O module).

LOG_VARIABLE = "CPNODE_TEST_LOOPBACK_LOG"

_SENDS = frozenset({"socket.connect", "socket.sendto", "socket.sendmsg"})
_LOOKUPS = frozenset({"socket.gethostbyname", "socket.gethostbyname_ex"})
_INET = (2, 10)  # socket.AF_INET, socket.AF_INET6 on Linux (checked by the test of this file)


def _literal(host: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    import ipaddress

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


class _LoggingGuard(LoopbackGuard):
    """The guard of a child process: always on, each refusal appended to `path`."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.active = True
        self._path = path

    def _refuse(self, event: str, target: str) -> None:
        line = f"{os.getpid()} {sys.argv[:3]!r}: {event} to {target}\n"
        fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode(errors="replace"))
        finally:
            os.close(fd)
        super()._refuse(event, target)


def install_from_environment() -> None:
    path = os.environ.get(LOG_VARIABLE)
    if path:
        sys.addaudithook(_LoggingGuard(path))


if __name__ == "sitecustomize":
    install_from_environment()
