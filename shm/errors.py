"""Errors of the shared-memory and storage layer.

A ``StoreError`` is the answer to one task: ``str(error)`` is exactly the text the node puts in
the task's ``Error`` result, so the texts that upstream nodes write ("Key not found", "Invalid
path", "quota exceeded", "No such file or directory (os error 2)") are kept verbatim and any
detail for the log lives in attributes. ``NodeDirectoryInUse`` is not about a task: it stops a
node from starting.
"""

from __future__ import annotations

import errno
import os

__all__ = [
    "FileError",
    "InvalidKey",
    "InvalidPath",
    "KeyNotFound",
    "NodeDirectoryInUse",
    "QuotaExceeded",
    "StoreError",
    "StoreFullError",
]


class StoreError(Exception):
    """A store operation failed; ``str()`` is the text for the task's ``Error`` result."""


class KeyNotFound(StoreError, LookupError):
    """``RetrieveData`` of a key that was never stored."""

    def __init__(self, key: str) -> None:
        super().__init__("Key not found")
        self.key = key


class InvalidPath(StoreError, ValueError):
    """A path or disk-store key that would leave its directory (``..``, absolute, NUL, symlink)."""

    def __init__(self, path: str, why: str) -> None:
        super().__init__("Invalid path")
        self.path = path
        self.why = why


class InvalidKey(StoreError, ValueError):
    """A memory-store key that cannot be stored (not encodable as UTF-8)."""

    def __init__(self, key: str, why: str) -> None:
        super().__init__(f"Invalid key: {why}")
        self.key = key


class FileError(StoreError):
    """An operating-system error on a store file, worded as upstream's Rust node words it:
    ``No such file or directory (os error 2)``."""

    def __init__(self, error_number: int, path: str) -> None:
        super().__init__(f"{os.strerror(error_number)} (os error {error_number})")
        self.errno = error_number
        self.path = path

    @classmethod
    def from_os_error(cls, error: OSError, path: str) -> FileError:
        return cls(error.errno if error.errno is not None else errno.EIO, path)


class QuotaExceeded(StoreError):
    """A disk write that would take the store above ``disk_space_mb``.

    The text is upstream's, ``quota exceeded``; ``detail`` says by how much, for the log.
    ``directory`` names the directory of ``path`` that was to be made, when that was refused.
    """

    def __init__(
        self, *, path: str, used: int, change: int, quota: int, directory: str | None = None
    ) -> None:
        super().__init__("quota exceeded")
        self.path = path
        self.used = used
        self.change = change
        self.quota = quota
        self.directory = directory

    @property
    def detail(self) -> str:
        over = self.used + self.change - self.quota
        doing = f"writing {self.path!r}"
        if self.directory is not None:
            doing = f"making the directory {self.directory!r} for {self.path!r}"
        return (
            f"{doing} would change the store's use by {self.change} bytes, from "
            f"{self.used} to {self.used + self.change}, above the quota of {self.quota} bytes "
            f"(by {over} bytes)"
        )


class StoreFullError(StoreError, OSError):
    """The filesystem under a store or segment (a tmpfs for ``/dev/shm``) has no room.

    Raised before anything is written: free space is checked first and space is reserved with
    ``posix_fallocate``, so a full tmpfs never kills a writer with SIGBUS.
    """

    def __init__(self, message: str, *, path: str, needed: int, available: int) -> None:
        super().__init__(errno.ENOSPC, message)
        self.message = message
        self.path = path
        self.needed = needed
        self.available = available

    def __str__(self) -> str:
        return self.message


class NodeDirectoryInUse(RuntimeError):
    """Another live process holds the lock of this ``node_id``'s directory."""

    def __init__(self, node_id: str, pid: int | None, lock_path: str) -> None:
        holder = f"pid {pid}" if pid is not None else "another process (its pid is not written yet)"
        super().__init__(
            f"node_id {node_id!r} is in use by {holder} (lock {lock_path}); stop that node or "
            f"give this one another node_id"
        )
        self.node_id = node_id
        self.pid = pid
        self.lock_path = lock_path
