"""Errors of the protocol codec, typed by who is at fault (after h11).

- `RemoteProtocolError`: the peer sent something we cannot accept (a malformed frame, an unknown
  variant, a frame above the size limit). The message says what was wrong and where, e.g.
  ``AssignTask.task.Tcp.data[3]: expected an integer 0-255, got 256``. Nothing else escapes the
  decoder.
- `FrameTooLarge`: a `RemoteProtocolError` raised as soon as a length prefix above the limit is
  read; the stream cannot be resynchronised after it, so the connection must be closed.
- `LocalProtocolError`: our own code asked the encoder for something the wire cannot carry.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base of every error the codec raises."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol; skip the frame (or close, for framing errors)."""


class FrameTooLarge(RemoteProtocolError):
    """A length prefix announced more than `max_frame_bytes`; the stream is lost."""

    def __init__(self, length: int, limit: int, payloads: list[bytes] | None = None) -> None:
        super().__init__(
            f"frame of {length} bytes announced, above the limit of {limit} bytes (max_frame_bytes)"
        )
        self.length = length
        self.limit = limit
        # The payloads the same `feed` completed before the oversized frame, in order: they
        # are whole and valid, so a caller handles them before it closes the stream.
        self.payloads: list[bytes] = payloads if payloads is not None else []


class LocalProtocolError(ProtocolError):
    """We asked the encoder for a message the wire cannot carry (a bug in the caller)."""
