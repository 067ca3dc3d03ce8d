"""The node-wide memory store: ``StoreData``/``RetrieveData`` on Worker nodes, ``GetGlobalRam``.

Every key is one file in ``<shm_dir>/cpnode-<node_id>/mem/`` (a tmpfs). Each worker process
opens that directory on its own, so a key stored by one worker is read by any other; the
supervisor's ``claim_node_dir`` creates it and its ``release`` removes it (the store is
volatile: gone when the node stops)::

    store(key, data)   check free space ─► .tmp-<pid>-<uuid>: posix_fallocate, write
                       ─► rename over the key's file (atomic: readers see old or new, never half)
    retrieve(key)      open the key's file ─► read it (an open file is never changed in place)

A worker killed in the middle of a ``store`` leaves its temporary file; the pool removes it as
soon as it sees the worker die (``sweep_temporary(pid)``).

File names never contain the key's characters, so any key is just a key — ``../x``,
``/etc/passwd``, a NUL, 10,000 characters, the empty string. A key whose UTF-8 form takes at most
150 bytes is stored as ``k`` + its URL-safe base64 (no padding), and listing decodes the name. A
longer key is stored as ``h`` + the SHA-256 of its UTF-8 form, and the file begins with the key
itself (8-byte little-endian length, then the UTF-8 bytes): listing reads it back, and
``retrieve`` checks it, so a hash collision would be a miss, never someone else's blob. Keys that
are not valid Unicode text (lone surrogates) raise ``InvalidKey``.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import os
import struct
from collections.abc import Iterator
from typing import Final

from shm import space
from shm.closing import Closing
from shm.errors import FileError, InvalidKey, KeyNotFound, StoreError
from shm.nodedir import MEM_DIR, node_dir_path

__all__ = ["MemoryStore"]

_SHORT_KEY_BYTES: Final = 150
_HEADER: Final = struct.Struct("<Q")
_TEMPORARY: Final = ".tmp-"
_READ: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_CREATE: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class MemoryStore(Closing):
    """The memory store of node ``node_id``; open one per process, close it when done.

    ``reserve_bytes`` is left free in ``shm_dir`` by every store (for payload segments).
    """

    def __init__(
        self, shm_dir: str | os.PathLike[str], node_id: str, *, reserve_bytes: int = 0
    ) -> None:
        self.path = os.path.join(node_dir_path(shm_dir, node_id), MEM_DIR)
        self.reserve_bytes = reserve_bytes
        try:
            self._dir_fd: int | None = os.open(
                self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
            )
        except FileNotFoundError:
            raise FileNotFoundError(
                errno.ENOENT,
                "memory store directory does not exist; the supervisor creates it with "
                "claim_node_dir() before starting workers",
                self.path,
            ) from None

    @property
    def _fd(self) -> int:
        if self._dir_fd is None:
            raise ValueError(f"memory store {self.path} is closed")
        return self._dir_fd

    def store(self, key: str, data: bytes | bytearray | memoryview) -> None:
        """Store ``data`` under ``key``, replacing what was there, atomically."""
        name, header = _file_name(key)
        try:
            self._store(name, header, data)
        except StoreError:
            raise
        except OSError as error:
            raise FileError.from_os_error(error, self.path) from error

    def _store(self, name: str, header: bytes, data: bytes | bytearray | memoryview) -> None:
        size = len(header) + memoryview(data).nbytes
        space.check_free(
            self.path, size, self.reserve_bytes, f"a memory-store entry of {size} bytes"
        )
        temporary = space.temporary_name(_TEMPORARY)
        temporary_path = os.path.join(self.path, temporary)
        fd = os.open(temporary, _CREATE, 0o600, dir_fd=self._fd)
        try:
            try:
                space.reserve(
                    fd, size, temporary_path, for_mapping=False, keep_free=self.reserve_bytes
                )
                space.write_all(fd, header, temporary_path)
                space.write_all(fd, data, temporary_path, offset=len(header))
            finally:
                os.close(fd)
            os.rename(temporary, name, src_dir_fd=self._fd, dst_dir_fd=self._fd)
        except BaseException:
            space.unlink_quietly(temporary, self._fd)
            raise

    def retrieve(self, key: str) -> bytes:
        """Return what is stored under ``key``; ``KeyNotFound`` ("Key not found") if nothing."""
        name, header = _file_name(key)
        try:
            fd = os.open(name, _READ, dir_fd=self._fd)
        except FileNotFoundError:
            raise KeyNotFound(key) from None
        except OSError as error:
            raise FileError.from_os_error(error, self.path) from error
        try:
            size = os.fstat(fd).st_size
            if header and space.read_all(fd, len(header)) != header:
                raise KeyNotFound(key)
            return space.read_all(fd, size - len(header), len(header))
        except OSError as error:
            raise FileError.from_os_error(error, self.path) from error
        finally:
            os.close(fd)

    def list_entries(self) -> list[tuple[str, int]]:
        """Every key with the size of its data, sorted by key."""
        return sorted(self._entries())

    def global_ram_report(self) -> str:
        """The ``GetGlobalRam`` response: ``key: N bytes`` lines sorted by key (upstream lists
        them in hash order), or ``No entries found``."""
        entries = self.list_entries()
        if not entries:
            return "No entries found\n"
        return "".join(f"{key}: {size} bytes\n" for key, size in entries)

    def sweep_temporary(self, pid: int | None = None) -> list[str]:
        """Remove temporary files of processes that died in the middle of a ``store`` (a worker
        killed at its time limit) — only those of ``pid``, if given (the pool names a worker
        it saw die); return their names. A running process's files are never touched."""
        return space.remove_dead_temporaries(self._fd, _TEMPORARY, pid)

    def close(self) -> None:
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None

    def _entries(self) -> Iterator[tuple[str, int]]:
        with os.scandir(self._fd) as entries:
            for entry in entries:
                try:
                    if entry.name.startswith("k"):
                        size = entry.stat(follow_symlinks=False).st_size
                        yield _decode_short_name(entry.name), size
                    elif entry.name.startswith("h"):
                        yield self._read_long_key(entry.name)
                except (FileNotFoundError, ValueError):
                    continue

    def _read_long_key(self, name: str) -> tuple[str, int]:
        fd = os.open(name, _READ, dir_fd=self._fd)
        try:
            size = os.fstat(fd).st_size
            (length,) = _HEADER.unpack(space.read_all(fd, _HEADER.size))
            key = space.read_all(fd, length, _HEADER.size).decode()
        finally:
            os.close(fd)
        return key, size - _HEADER.size - length


def _file_name(key: str) -> tuple[str, bytes]:
    """Return the file name for ``key`` and the header its file starts with (empty for short
    keys)."""
    try:
        encoded = key.encode()
    except UnicodeEncodeError as error:
        raise InvalidKey(key, f"not valid Unicode text ({error.reason})") from None
    if len(encoded) <= _SHORT_KEY_BYTES:
        return "k" + base64.urlsafe_b64encode(encoded).decode().rstrip("="), b""
    return "h" + hashlib.sha256(encoded).hexdigest(), _HEADER.pack(len(encoded)) + encoded


def _decode_short_name(name: str) -> str:
    text = name[1:]
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError) as error:
        raise ValueError(f"not a memory-store file name: {name!r}") from error
