"""Writes and reads that never hold the event loop for long, whatever their size.

A plain transport takes a large write by reference, but a TLS transport encrypts (and copies)
all of it inside ``write()``: one 128 MiB `RetrieveData` result held the loop for 0.6 s, so a
1 GiB one would miss heartbeats for seconds. `PacedWriter` hands a write larger than
`SLICE_BYTES` to the transport a slice per turn of the loop, in order: a write made while a
large one is under way waits behind it (frames never interleave), and everything between the
slices (heartbeats, reads, other connections) runs on time.

Reads: uvloop hands a protocol up to 8 MiB from one socket in a turn of the loop (32 reads of
256 KiB); a burst of 200,000 tasks from the master held the loop, and the heartbeat timer,
for 0.2 s. `PacedReader` pauses the transport's reading once `TURN_READ_BYTES` arrived in a
turn and resumes it at the next, after the timers and the other connections.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Final

__all__ = ["SLICE_BYTES", "TURN_READ_BYTES", "PacedReader", "PacedWriter"]

SLICE_BYTES: Final = 1 << 20
"""Bytes handed to the transport per turn of the event loop: about 5 ms of TLS encryption."""
TURN_READ_BYTES: Final = 256 * 1024
"""Bytes a protocol handles per turn of the event loop before its reading pauses (one read)."""


class PacedReader:
    """Call `received(len(data))` first thing in `data_received`."""

    def __init__(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.ReadTransport = transport  # type: ignore[assignment]
        self._turn_bytes = 0

    def received(self, size: int) -> None:
        self._turn_bytes += size
        if self._turn_bytes >= TURN_READ_BYTES and not self.transport.is_closing():
            self.transport.pause_reading()
            asyncio.get_running_loop().call_soon(self._next_turn)

    def _next_turn(self) -> None:
        self._turn_bytes = 0
        if not self.transport.is_closing():
            self.transport.resume_reading()


class PacedWriter:
    """Writes to one transport in order; what is queued goes `SLICE_BYTES` per turn of the
    loop (a small write with nothing queued goes at once)."""

    def __init__(self, transport: asyncio.WriteTransport) -> None:
        self.transport = transport
        self._backlog: collections.deque[memoryview] = collections.deque()
        self.backlog_bytes = 0
        """Bytes accepted by `write` and not yet handed to the transport."""
        self._scheduled = False
        self._close_when_written = False

    def close(self) -> None:
        """Close the transport once everything written is handed to it: as a transport's own
        `close()` delivers its buffer first. (A connection lost or aborted drops the backlog:
        the master link keeps what it wrote in its outbox for the next connection.)"""
        if self._backlog:
            self._close_when_written = True
        else:
            self.transport.close()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._backlog and len(data) <= SLICE_BYTES:
            self.transport.write(data)
            return
        view = memoryview(data).cast("B")
        self._backlog.append(view)
        self.backlog_bytes += view.nbytes
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._turn)

    def _turn(self) -> None:
        self._scheduled = False
        transport = self.transport
        if transport.is_closing():  # what was not written stays in the caller's outbox
            self._backlog.clear()
            self.backlog_bytes = 0
            return
        budget = SLICE_BYTES
        backlog = self._backlog
        while backlog and budget > 0:
            head = backlog[0]
            if head.nbytes <= budget:
                backlog.popleft()
                piece = head
            else:
                piece = head[:budget]
                backlog[0] = head[budget:]
            transport.write(piece)
            budget -= piece.nbytes
            self.backlog_bytes -= piece.nbytes
        if backlog:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._turn)
        elif self._close_when_written:
            transport.close()
