"""The node's own directory in ``shm_dir``, held by the supervisor for its lifetime.

::

    <shm_dir>/cpnode-<node_id>/          claimed by one live process (flock on ``lock``)
        lock                             the holder's pid; flock'ed while the node runs
        mem/                             the memory store (``MemoryStore``)
        ledger/                          the disk store's usage ledger (``DiskStore``)
    <shm_dir>/cpnode-<node_id>-seg-<hex>    payload segments (``PayloadSegment``)

``claim_node_dir`` takes an exclusive, non-blocking ``flock`` on ``lock``. Holding it proves no
other live process uses this ``node_id``, so whatever is already there was left by a run that
crashed, and is removed: the directory's contents and this id's segments — never another id's.
If a live process holds the lock, ``NodeDirectoryInUse`` names its pid. ``release`` (clean
shutdown) removes everything, the directory included. The lock dies with its holder, so a
SIGKILLed supervisor leaves files but never a stale lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import stat
from typing import Final

from shm.closing import Closing
from shm.errors import NodeDirectoryInUse
from shm.segments import sweep_segments

__all__ = ["NODE_ID", "NodeDirectory", "claim_node_dir", "node_dir_path", "node_prefix"]

NODE_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""What a ``node_id`` may look like: it becomes part of file names in a shared directory."""

MEM_DIR: Final = "mem"
LEDGER_DIR: Final = "ledger"
_LOCK: Final = "lock"
_CLAIM_ATTEMPTS: Final = 20


def node_prefix(node_id: str) -> str:
    """``cpnode-<node_id>``: the node directory's name and its segments' prefix."""
    if not NODE_ID.fullmatch(node_id):
        raise ValueError(
            f"node_id must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or "
            f"digit, got {node_id!r}"
        )
    return f"cpnode-{node_id}"


def node_dir_path(shm_dir: str | os.PathLike[str], node_id: str) -> str:
    return os.path.join(os.fspath(shm_dir), node_prefix(node_id))


class NodeDirectory(Closing):
    """A claimed node directory; ``release`` (or leaving the ``with`` block) removes it."""

    def __init__(self, shm_dir: str, node_id: str, dir_fd: int, lock_fd: int) -> None:
        self.shm_dir = shm_dir
        self.node_id = node_id
        self.segment_prefix = node_prefix(node_id)
        self.path = os.path.join(shm_dir, self.segment_prefix)
        self.mem_dir = os.path.join(self.path, MEM_DIR)
        self.ledger_dir = os.path.join(self.path, LEDGER_DIR)
        self._dir_fd: int | None = dir_fd
        self._lock_fd: int | None = lock_fd

    @property
    def released(self) -> bool:
        return self._lock_fd is None

    def close(self) -> None:
        self.release()

    def release(self) -> None:
        """Remove the directory, this node's segments and the lock, then unlock."""
        if self._dir_fd is None or self._lock_fd is None:
            return
        try:
            sweep_segments(self.shm_dir, self.segment_prefix)
            _remove_contents(self._dir_fd, keep=_LOCK)
            os.unlink(_LOCK, dir_fd=self._dir_fd)
            os.rmdir(self.path)
        finally:
            os.close(self._lock_fd)
            os.close(self._dir_fd)
            self._lock_fd = self._dir_fd = None

    def __repr__(self) -> str:
        state = "released" if self.released else "held"
        return f"<NodeDirectory {self.path} {state}>"


def claim_node_dir(shm_dir: str | os.PathLike[str], node_id: str) -> NodeDirectory:
    """Claim ``<shm_dir>/cpnode-<node_id>`` for this process, clearing a crashed run's leftovers.

    Raises ``NodeDirectoryInUse`` when a live process holds it, ``PermissionError`` when the
    path is a symlink or belongs to another user.
    """
    shm = os.fspath(shm_dir)
    path = node_dir_path(shm, node_id)
    for _ in range(_CLAIM_ATTEMPTS):
        claimed = _try_claim(shm, node_id, path)
        if claimed is not None:
            return claimed
    raise RuntimeError(f"could not claim {path}: it kept being removed and re-created")


def _try_claim(shm_dir: str, node_id: str, path: str) -> NodeDirectory | None:
    """One attempt; None when the directory or lock changed under us (a holder releasing)."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    try:
        dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as error:
        if error.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise
        raise PermissionError(f"{path} is not a directory (a symlink?); remove it") from error
    lock_fd = -1
    try:
        owner = os.fstat(dir_fd).st_uid
        if owner != os.geteuid():
            raise PermissionError(f"{path} belongs to uid {owner}, not to us; remove it")
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            lock_fd = os.open(_LOCK, flags, 0o600, dir_fd=dir_fd)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise NodeDirectoryInUse(
                node_id, _read_pid(lock_fd), os.path.join(path, _LOCK)
            ) from None
        if not _still_in_place(path, dir_fd, lock_fd):
            return None
        # The lock is ours: nothing live uses this node_id, anything here is a crash leftover.
        sweep_segments(shm_dir, node_prefix(node_id))
        _remove_contents(dir_fd, keep=_LOCK)
        os.ftruncate(lock_fd, 0)
        os.pwrite(lock_fd, f"{os.getpid()}\n".encode(), 0)
        os.mkdir(MEM_DIR, 0o700, dir_fd=dir_fd)
        os.mkdir(LEDGER_DIR, 0o700, dir_fd=dir_fd)
    except BaseException:
        if lock_fd >= 0:
            os.close(lock_fd)
        os.close(dir_fd)
        raise
    return NodeDirectory(shm_dir, node_id, dir_fd, lock_fd)


def _still_in_place(path: str, dir_fd: int, lock_fd: int) -> bool:
    """True if ``path`` is still our directory and its ``lock`` still our locked file: a
    holder's ``release`` unlinks both, and a lock on an unlinked file guards nothing."""
    try:
        on_disk_dir = os.stat(path, follow_symlinks=False)
        on_disk_lock = os.stat(_LOCK, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held_dir, held_lock = os.fstat(dir_fd), os.fstat(lock_fd)
    return (on_disk_dir.st_dev, on_disk_dir.st_ino) == (held_dir.st_dev, held_dir.st_ino) and (
        on_disk_lock.st_dev,
        on_disk_lock.st_ino,
    ) == (held_lock.st_dev, held_lock.st_ino)


def _read_pid(lock_fd: int) -> int | None:
    text = os.pread(lock_fd, 32, 0).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None


def _remove_contents(dir_fd: int, *, keep: str) -> None:
    """Remove every entry of the directory ``dir_fd`` except ``keep``, never following links
    (``shutil.rmtree`` with ``dir_fd`` works on file descriptors all the way down)."""
    for name in os.listdir(dir_fd):
        if name == keep:
            continue
        try:
            mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
            if stat.S_ISDIR(mode):
                shutil.rmtree(name, dir_fd=dir_fd)
            else:
                os.unlink(name, dir_fd=dir_fd)
        except FileNotFoundError:
            continue
