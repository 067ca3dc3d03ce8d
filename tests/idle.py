"""Connections that never authenticate, from a chosen loopback address, and which of them the
server has closed: for the tests of the bound on unauthenticated connections
(node/admission.py). Linux routes all of 127.0.0.0/8 to loopback, so 127.0.0.2 and on are
other source addresses on the same host."""

from __future__ import annotations

import select
import socket
import time


class IdleConnections:
    """`count` connections to `port` from `source`, opened in order, each sending `first` (and
    nothing more); closed when the `with` block ends."""

    def __init__(
        self, port: int, count: int, *, source: str = "127.0.0.1", first: bytes = b""
    ) -> None:
        self.sockets: list[socket.socket] = []
        self._closed: set[int] = set()
        try:
            for _ in range(count):
                sock = socket.create_connection(("127.0.0.1", port), 10, (source, 0))
                self.sockets.append(sock)
                if first:
                    sock.sendall(first)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> IdleConnections:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()

    def closed(self) -> set[int]:
        """The numbers (in the order opened) of the connections the server has closed."""
        poller = select.poll()
        numbers = {}
        for number, sock in enumerate(self.sockets):
            if number not in self._closed:
                poller.register(sock, select.POLLIN)
                numbers[sock.fileno()] = number
        for fd, _ in poller.poll(0):
            sock = self.sockets[numbers[fd]]
            try:
                ended = sock.recv(1, socket.MSG_DONTWAIT) == b""
            except BlockingIOError:
                ended = False
            except ConnectionResetError:
                ended = True
            if ended:
                self._closed.add(numbers[fd])
        return set(self._closed)

    def wait_closed(self, count: int, timeout: float) -> set[int]:
        """Wait (at most `timeout` s) until `count` are closed; the numbers of those closed."""
        deadline = time.monotonic() + timeout
        while len(closed := self.closed()) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return closed
