"""Length-prefixed framing: a 4-byte big-endian length, then that many bytes.

`FrameDecoder.feed(chunk)` takes bytes in any split and returns the complete payloads in order.
A length prefix above `max_frame_bytes` raises `FrameTooLarge` the moment its four bytes are
known, before any of that frame's body is buffered; nothing is ever allocated from what the peer
merely announces (the body buffer grows with what actually arrives).

    socket bytes ──feed()──▶ [payload, payload, ...] ──codec.decode()──▶ messages

`frame(payload)` is the inverse: prefix + payload. Where the compiled `_speedups` module was
built, the loop over whole small frames runs in C (`split_frames`); the rest stays here.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Callable, Sequence
from typing import Final, Protocol

from node.protocol.errors import FrameTooLarge, LocalProtocolError
from shm import native

DEFAULT_MAX_FRAME_BYTES: Final = 1 << 30  # 1 GiB; a 16 MiB blob is ~57 MiB of JSON
MAX_WIRE_LENGTH: Final = 0xFFFF_FFFF

_HEADER: Final = struct.Struct(">I")
_unpack_header = _HEADER.unpack_from
_pack_header = _HEADER.pack

# The loop over whole small frames, compiled (see node/protocol/_speedups.c), or None.
_speedups = native.load("node.protocol._speedups")
_split_frames: Callable[[bytes, int, int, int, list[bytes]], int] | None = (
    None if _speedups is None else _speedups.split_frames
)
_NEVER: Final = sys.maxsize
"""`spill_from` for a decoder without a spill (no frame is ever spilled), and the largest limit
handed to the compiled loop (a Py_ssize_t; 2**31 - 1 on a 32-bit build)."""


class Spill(Protocol):
    """Where the body of a large frame goes instead of memory (see `FrameDecoder`)."""

    def write(self, data: bytes) -> None: ...

    def discard(self) -> None:
        """The stream ended before the body did: remove what was written."""
        ...

    def finish(self) -> bytes:
        """The payload to hand on in place of the body (a reference the consumer resolves)."""
        ...


SpillFactory = Callable[[int], Spill | None]  # body length -> a spill, or None to decline


def frame(payload: bytes) -> bytes:
    """Return `payload` with its length prefix."""
    if len(payload) > MAX_WIRE_LENGTH:
        raise LocalProtocolError(f"payload of {len(payload)} bytes does not fit a u32 length")
    return _pack_header(len(payload)) + payload


def python_frames_of(payloads: list[bytes]) -> bytes:
    """The frames of `payloads`, back to back: the reference of the compiled `frames_of`."""
    for payload in payloads:
        if len(payload) > MAX_WIRE_LENGTH:
            raise OverflowError(f"frames_of(): a payload of {len(payload)} bytes is too long")
    pieces = [piece for payload in payloads for piece in (_pack_header(len(payload)), payload)]
    return b"".join(pieces)


frames_of: Callable[[list[bytes]], bytes] = (
    python_frames_of if _speedups is None else _speedups.frames_of
)
"""``b"".join(map(frame, payloads))`` in one copy, in C where `_speedups` was built."""


def frame_joined(pieces: Sequence[bytes]) -> bytes:
    """``frame(b"".join(pieces))`` with one copy of the pieces instead of two."""
    length = sum(map(len, pieces))
    if length > MAX_WIRE_LENGTH:
        raise LocalProtocolError(f"payload of {length} bytes does not fit a u32 length")
    return b"".join((_pack_header(length), *pieces))


class FrameDecoder:
    """Incremental frame splitter; sans-I/O: feed it bytes, get payloads."""

    __slots__ = (
        "_body", "_header", "_limit", "_need", "_sink", "_sink_left", "received", "spill",
        "spill_from",
    )  # fmt: skip

    def __init__(
        self,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        *,
        spill: SpillFactory | None = None,
        spill_from: int = 1 << 20,
    ) -> None:
        if max_frame_bytes < 0:
            raise ValueError("max_frame_bytes must be >= 0")
        self._limit = max_frame_bytes
        # Bodies of `spill_from` bytes or more go to `spill(length)` as they arrive, when it
        # accepts them: the caller decides where (a shared-memory segment), this stays I/O-free.
        self.spill = spill
        self.spill_from = spill_from
        self._sink: Spill | None = None
        self._sink_left = 0
        self._header = bytearray()
        self._body = bytearray()
        self._need = -1  # body length of the frame being assembled, -1 while reading a header
        self.received = 0  # total bytes fed; liveness is judged by bytes, not frames

    @property
    def max_frame_bytes(self) -> int:
        return self._limit

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held so far (header + body)."""
        return len(self._header) + len(self._body)

    @property
    def expecting(self) -> int:
        """Body length of the frame being assembled, or -1 when between frames."""
        return self._need

    @property
    def spilling(self) -> bool:
        """A large body is being written to a spill (see `abort`)."""
        return self._sink is not None

    def abort(self) -> None:
        """The stream ended: discard the large body being spilled, if any (its frame will never
        be whole)."""
        sink = self._sink
        if sink is not None:
            self._sink = None
            self._need = -1
            sink.discard()

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Consume `data`; return every payload it completes, in order."""
        if type(data) is not bytes:
            data = bytes(data)
        self.received += len(data)
        out: list[bytes] = []
        pos = 0
        end = len(data)
        limit = self._limit
        while pos < end:
            need = self._need
            if need < 0:
                header = self._header
                if not header and end - pos >= 4:
                    if _split_frames is not None:
                        # The whole small frames in C; the frame it stops at is handled below.
                        spill_from = self.spill_from if self.spill is not None else _NEVER
                        pos = _split_frames(data, pos, min(limit, _NEVER), spill_from, out)
                        if end - pos < 4:
                            continue
                    (length,) = _unpack_header(data, pos)
                    pos += 4
                else:
                    take = min(4 - len(header), end - pos)
                    header += data[pos : pos + take]
                    pos += take
                    if len(header) < 4:
                        break
                    (length,) = _unpack_header(header)
                    header.clear()
                if length > limit:
                    raise FrameTooLarge(length, limit, out)
                if length >= self.spill_from and length and self.spill is not None:
                    sink = self.spill(length)
                    if sink is not None:
                        self._sink, self._sink_left, self._need = sink, length, length
                        continue
                if end - pos >= length:
                    out.append(data[pos : pos + length])
                    pos += length
                    continue
                self._need = length
            elif self._sink is not None:
                take = min(self._sink_left, end - pos)
                self._sink.write(data[pos : pos + take])
                pos += take
                self._sink_left -= take
                if not self._sink_left:
                    out.append(self._sink.finish())
                    self._sink = None
                    self._need = -1
            else:
                body = self._body
                take = min(need - len(body), end - pos)
                body += data[pos : pos + take]
                pos += take
                if len(body) == need:
                    out.append(bytes(body))
                    self._body = bytearray()
                    self._need = -1
        return out
