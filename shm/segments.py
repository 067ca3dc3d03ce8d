"""Payload segments: one blob handed from one process to another through shared memory.

A segment is a file ``<prefix>-seg-<creator><random>`` in ``shm_dir`` (a tmpfs, ``/dev/shm`` by
default; the node's prefix is ``cpnode-<node_id>``, the creator is the pid of the process that
made it), mapped with ``mmap`` by both sides. Only its name crosses the queue; the bytes are
written once and read in place::

    producer                                        consumer
    seg = PayloadSegment.create(shm_dir, prefix, n)
          check free space, posix_fallocate, mmap
    fill seg.buffer
    queue.put(seg.name) ──────────────────────────► seg = PayloadSegment.open(shm_dir, name,
    seg.close()                                                              unlink=True)
                                                    (the file is gone; the mapping stays)
                                                    read seg.buffer in place, seg.close()

Ownership is explicit: whoever holds the segment last unlinks it — usually the consumer, at
once with ``unlink=True``; the producer when the consumer never came (its worker died).
``sweep_segments`` removes what a crashed run left under its prefix, and only that prefix, or
only what one dead process created (a worker killed while it wrote a result).

Why files and ``mmap`` rather than ``multiprocessing.shared_memory``: on Python 3.11 every
``SharedMemory`` attach, the consumer's too, registers the segment with that process's resource
tracker (``track=False`` only comes in 3.13). A consumer's tracker then unlinks a segment the
producer still owns when the consumer exits, and warns about "leaked shared_memory objects" —
an error under our ``filterwarnings = error``. Plain files give us the names, the lifetime and
the cleanup we choose, and ``posix_fallocate`` makes a full tmpfs an ``ENOSPC`` at creation
instead of a SIGBUS in the middle of a copy.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import uuid
from collections.abc import Callable, Iterable
from typing import Final, Self

from shm import space
from shm.closing import Closing

__all__ = [
    "SEGMENT_NAME",
    "PayloadSegment",
    "SpilledPayload",
    "new_segment_name",
    "spill_reference",
    "spilled",
    "sweep_segments",
    "write_segment",
]

SEGMENT_NAME: Final = re.compile(
    r"(?P<prefix>[A-Za-z0-9_.-]+)-seg-(?P<creator>[0-9a-f]{8})[0-9a-f]{24}"
)
"""What a segment's file name looks like; ``open`` refuses anything else."""

_PREFIX: Final = re.compile(r"[A-Za-z0-9_.-]+")


class PayloadSegment(Closing):
    """A blob in a file under ``shm_dir``, mapped into this process.

    ``buffer`` is a memoryview of the mapping (read-only for ``open`` without ``writable``).
    ``close`` unmaps; ``unlink`` removes the file. A context manager closes, never unlinks:
    who unlinks is the caller's decision (see the module docstring).
    """

    def __init__(
        self, path: str, name: str, size: int, mapping: mmap.mmap | None, *, writable: bool
    ) -> None:
        self.path = path
        self.name = name
        self.size = size
        self._mapping = mapping
        if mapping is None:
            self._buffer: memoryview | None = memoryview(bytearray() if writable else b"")
        else:
            self._buffer = memoryview(mapping)

    @classmethod
    def create(
        cls, shm_dir: str | os.PathLike[str], prefix: str, size: int, *, reserve_bytes: int = 0
    ) -> Self:
        """Create a segment of ``size`` bytes named by ``new_segment_name``, mapped writable.

        Raises ``StoreFullError`` when ``shm_dir`` lacks ``size`` free bytes (plus
        ``reserve_bytes``); nothing is left behind then.
        """
        name, path, fd = _new_segment_file(shm_dir, prefix, size, reserve_bytes, os.O_RDWR)
        try:
            space.reserve(fd, size, path, for_mapping=True, keep_free=reserve_bytes)
            mapping = mmap.mmap(fd, size) if size else None
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        return cls(path, name, size, mapping, writable=True)

    @classmethod
    def open(
        cls,
        shm_dir: str | os.PathLike[str],
        name: str,
        *,
        writable: bool = False,
        unlink: bool = False,
    ) -> Self:
        """Map the existing segment ``name``; with ``unlink`` remove its file at once (the
        mapping keeps the bytes until ``close``), taking ownership."""
        if not SEGMENT_NAME.fullmatch(name):
            raise ValueError(f"not a payload segment name: {name!r}")
        path = os.path.join(os.fspath(shm_dir), name)
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(path, flags)
        try:
            size = os.fstat(fd).st_size
            access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
            mapping = mmap.mmap(fd, size, access=access) if size else None
        finally:
            os.close(fd)
        segment = cls(path, name, size, mapping, writable=writable)
        if unlink:
            segment.unlink()
        return segment

    @property
    def buffer(self) -> memoryview:
        if self._buffer is None:
            raise ValueError(f"segment {self.name} is closed")
        return self._buffer

    @property
    def closed(self) -> bool:
        return self._buffer is None

    def close(self) -> None:
        """Unmap. Views taken from ``buffer`` (slices, numpy arrays) must be released first;
        otherwise ``BufferError`` says so and ``close`` can be called again later."""
        try:
            if self._buffer is not None:
                self._buffer.release()
                self._buffer = None
            if self._mapping is not None:
                self._mapping.close()
                self._mapping = None
        except BufferError as error:
            raise BufferError(
                f"segment {self.name}: a view of .buffer is still in use; release it (or drop "
                f"the numpy array made from it) before close()"
            ) from error

    def detach(self) -> memoryview:
        """Hand the mapping over to a view of it: return ``buffer`` and forget it here. The
        mapping is unmapped when the last reference to that view (or a slice of it) is gone,
        so a consumer can pass it on (to a transport's write queue, say) without tracking
        when the last writer finished with it."""
        view = self.buffer
        self._buffer = None
        self._mapping = None
        return view

    def unlink(self) -> bool:
        """Remove the segment's file; return False if it was already gone."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            return False
        return True

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<PayloadSegment {self.name} {self.size} bytes {state}>"


def new_segment_name(prefix: str) -> str:
    """``<prefix>-seg-`` and 32 hex digits: the creating process's pid (8), then random (24),
    so that what a process that died left behind can be found (``sweep_segments``)."""
    return f"{prefix}-seg-{os.getpid():08x}{uuid.uuid4().hex[:24]}"


def _new_segment_file(
    shm_dir: str | os.PathLike[str], prefix: str, size: int, reserve_bytes: int, access: int
) -> tuple[str, str, int]:
    """Check the prefix and the room for ``size`` bytes, then create a fresh segment file
    opened with ``access``: (name, path, file descriptor)."""
    if not _PREFIX.fullmatch(prefix):
        raise ValueError(f"segment prefix must match {_PREFIX.pattern}, got {prefix!r}")
    if size < 0:
        raise ValueError(f"segment size must be >= 0, got {size}")
    directory = os.fspath(shm_dir)
    space.check_free(directory, size, reserve_bytes, f"a payload segment of {size} bytes")
    name = new_segment_name(prefix)
    path = os.path.join(directory, name)
    flags = access | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return name, path, os.open(path, flags, 0o600)


def sweep_segments(
    shm_dir: str | os.PathLike[str], prefix: str, *, creator: int | None = None
) -> list[str]:
    """Remove every segment file in ``shm_dir`` whose name has exactly this ``prefix`` (a sibling
    node whose id merely starts the same is never touched) and, with ``creator``, only those
    that process created; return the names removed."""
    removed = []
    created_by = None if creator is None else f"{creator:08x}"
    with os.scandir(shm_dir) as entries:
        for entry in entries:
            match = SEGMENT_NAME.fullmatch(entry.name)
            if match is None or match["prefix"] != prefix:
                continue
            if created_by is not None and match["creator"] != created_by:
                continue
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            removed.append(entry.name)
    return removed


def write_segment(
    shm_dir: str | os.PathLike[str],
    prefix: str,
    pieces: Iterable[bytes | bytearray | memoryview],
    size: int,
    *,
    reserve_bytes: int = 0,
) -> str:
    """Create a segment holding ``pieces`` back to back, ``size`` bytes in all, and return its
    name (the producer's side when the bytes are produced in pieces, an encoder's output say:
    written with ``pwrite`` as they come, never mapped here).

    Raises ``StoreFullError`` when ``shm_dir`` lacks the room (plus ``reserve_bytes``), or
    ``OSError``; ``ValueError`` when the pieces do not add up to ``size``. Nothing is left
    behind then. The consumer opens it with ``unlink=True``.
    """
    name, path, fd = _new_segment_file(shm_dir, prefix, size, reserve_bytes, os.O_WRONLY)
    try:
        # No posix_fallocate: every byte is written before the consumer maps the file, so a
        # full filesystem is an ENOSPC from write (StoreFullError) here, never a SIGBUS there.
        offset = 0
        for piece in pieces:
            if offset + len(piece) > size:
                raise ValueError(f"segment {name}: pieces longer than the {size} bytes announced")
            space.write_all(fd, piece, path, offset)
            offset += len(piece)
        if offset != size:
            raise ValueError(f"segment {name}: {offset} bytes written, {size} announced")
        space.check_left_free(fd, size, path, reserve_bytes)  # writers that looked at once
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)
    return name


SPILL_MARK: Final = b"\x00"
"""First byte of a spilled payload's reference: no JSON payload starts with NUL."""
SPILL_HEAD_BYTES: Final = 4096


class SpilledPayload(bytes):
    """A spilled payload's reference as the supervisor holds it. Its type, not its first byte,
    is what makes it one there: a peer's frame that starts with NUL is plain `bytes`, a
    malformed frame, and never names a file to open or remove. (A worker gets references
    only from its supervisor, which never passes a peer's NUL-led frame on: it reads them
    with `spill_reference`.)"""

    __slots__ = ()


class IncomingSegment:
    """A large frame body written into a segment as its bytes arrive off the socket (a
    `FrameDecoder` spill): the supervisor never holds it in memory, and the worker that runs
    the task maps it in place.

    Nothing is reserved up front (a peer's announced length is not allocated); a write that
    finds the filesystem full removes the file, and the reference then carries the reason for
    the worker's `Error`. `finish` returns the reference: `SPILL_MARK`, the segment name, NUL,
    the error text (empty when none), NUL, and the first `SPILL_HEAD_BYTES` of the body (for
    a look at its variant and id).

    Removing the file frees what was written: tens of ms for a few hundred MiB of tmpfs.
    `write` runs where the bytes arrive, the supervisor's event loop, so after a failed write
    it hands the removal (`discard`) to `offload` when given (the supervisor's runs it in a
    thread) and does it at once only without one.
    """

    def __init__(
        self,
        shm_dir: str | os.PathLike[str],
        prefix: str,
        size: int,
        *,
        offload: Callable[[Callable[[], None]], object] | None = None,
    ) -> None:
        if not _PREFIX.fullmatch(prefix):
            raise ValueError(f"segment prefix must match {_PREFIX.pattern}, got {prefix!r}")
        self.name = new_segment_name(prefix)
        self.path = os.path.join(os.fspath(shm_dir), self.name)
        self.size = size
        self.error = ""
        self._head = bytearray()
        self._offset = 0
        self._offload = offload
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        self._fd: int | None = os.open(self.path, flags, 0o600)

    def write(self, data: bytes) -> None:
        if len(self._head) < SPILL_HEAD_BYTES:
            self._head += data[: SPILL_HEAD_BYTES - len(self._head)]
        if self._fd is None:
            return
        try:
            space.write_all(self._fd, data, self.path, self._offset)
        except OSError as error:  # StoreFullError included
            self.error = f"the payload does not fit in {os.path.dirname(self.path)}: {error}"
            # Closing frees nothing while the file is still linked; the unlink frees it all.
            os.close(self._fd)
            self._fd = None
            if self._offload is None:
                self.discard()
            else:
                self._offload(self.discard)
            return
        self._offset += len(data)

    def finish(self) -> bytes:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        return SpilledPayload(
            SPILL_MARK + self.name.encode() + b"\x00" + self.error.encode() + b"\x00"
            + bytes(self._head)
        )  # fmt: skip

    def discard(self) -> None:
        """Close and remove the segment (its body will not be complete, or does not fit)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def spilled(payload: bytes) -> tuple[str, str, bytes] | None:
    """(segment name, error text, head) of a spilled payload's reference (a `SpilledPayload`
    made by this process), else None."""
    if type(payload) is not SpilledPayload:
        return None
    return spill_reference(payload)


def spill_reference(payload: bytes) -> tuple[str, str, bytes] | None:
    """(segment name, error text, head) of a payload that starts with `SPILL_MARK`, the form a
    reference crosses to a worker in; None when it does not start so or is no well-formed
    reference (a segment name `SEGMENT_NAME` matches, UTF-8 error text)."""
    if payload[:1] != SPILL_MARK:
        return None
    parts = payload[1:].split(b"\x00", 2)
    if len(parts) != 3:
        return None
    name, error, head = parts
    try:
        text, reason = name.decode(), error.decode()
    except UnicodeDecodeError:
        return None
    if not SEGMENT_NAME.fullmatch(text):
        return None
    return text, reason, head


def read_spilled(shm_dir: str | os.PathLike[str], payload: bytes) -> bytes:
    """The whole payload a reference stands for, read and unlinked (the rare paths that need
    it as bytes); a payload that is no reference comes back unchanged."""
    reference = spilled(payload)
    if reference is None:
        return payload
    name, error, _ = reference
    if error:
        raise OSError(error)
    segment = PayloadSegment.open(shm_dir, name, unlink=True)
    try:
        return bytes(segment.buffer)
    finally:
        segment.close()


def discard_spilled(shm_dir: str | os.PathLike[str], payload: bytes) -> None:
    """Remove the segment of a reference that will not be run."""
    reference = spilled(payload)
    if reference is not None and reference[0]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(os.fspath(shm_dir), reference[0]))
