"""The disk store: files below ``storage_dir``, confined to it, under one quota for all workers.

Disk nodes use it for ``StoreData``/``RetrieveData``/``DiskWrite``/``DiskRead``/``GetStorage``;
every other role for ``DiskWrite``/``DiskRead`` only. ``StoreData`` keys and ``DiskWrite`` paths
are one namespace (``DiskRead`` of ``k1`` returns what ``StoreData`` stored under ``k1``), so a
key is a path and follows the same rules; unlike upstream, ``../x`` cannot escape as a key, and a
key with ``/`` creates its subdirectories as a ``DiskWrite`` path does.

Confinement. A path is split on ``/``; empty and ``.`` parts are dropped; an absolute path, a
``..`` part, a NUL, text that is not valid Unicode (a lone surrogate), a part that looks like our
temporary files, more than ``MAX_PATH_PARTS`` parts, or nothing left at all is ``InvalidPath``
("Invalid path"; the log says which rule). A path of 4096 bytes or more gets the
``ENAMETOOLONG`` error upstream gets from the system; a path that names a directory (ending in
``/`` or ``/.``) gets the system's errors too: ``EISDIR`` to write it, and to read it
``ENOENT``, ``ENOTDIR`` or ``EISDIR`` as the name is missing, a file or a directory.
``RetrieveData`` answers "Key not found" for those three errors only; any other keeps its own
text. The directories are then opened one by one with
``openat(O_NOFOLLOW | O_DIRECTORY)`` from a descriptor of ``storage_dir``, and the file is opened
or renamed into place relative to its directory's descriptor. A symlink is never followed,
wherever it points — including one swapped in between a check and its use, since nothing is
ever looked up by path twice.

Writes::

    each missing directory: check quota (a first look) and free space ─► mkdir
    .cpnode-tmp-<pid>-<uuid> in storage_dir, free space again ─► under the ledger's flock:
    still missing?, check the quota, add DIRECTORY_BYTES, rename it into place
    the file: check quota (a first look) and free space ─► .cpnode-tmp-<pid>-<uuid> in
    storage_dir: posix_fallocate, free space again, write ─► under the ledger's flock: measure
    the old file, check the quota, add (new size - old size) to the ledger, rename over the target

A refused write leaves the old content as it was, and removes the directories it created (those
still empty), giving their count back under the lock. Such a directory may be on the path of
another write that found it there and has not yet renamed its file (or next directory) into it:
that rename (or ``mkdir``) then fails with ``ENOENT`` in a directory left with no links. The write
gives back what it made and starts again, making the directory anew, up to ``_WRITE_ATTEMPTS``
times in all; each new attempt needs yet another writer's refusal to land in its way (eight writers
in lock step needed at most two more). Only the commits hold the lock, so workers write
their data in parallel and the quota still holds for all of them together; a directory is looked
for, counted and put in place under one hold of the lock, so two writers making the same one count
it once. The count changes before the rename (and back if the rename fails), so a writer killed at
any point leaves either a ledger that is right or its temporary file or directory. A refused
write's directories leave no temporary behind as they go: while they are removed and their count
given back, the ledger says "unknown", so a writer killed then leaves the next process to take the
lock a full count to make. Temporaries live directly in ``storage_dir`` (a rename crosses
directories, not devices), so what a killed worker left is found with one look at one directory:
the pool calls ``sweep_temporary(pid)`` as soon as it sees a worker die, which removes them and,
with a quota, recounts the ledger from the tree. The exception is a directory on another filesystem
mounted inside ``storage_dir``: its temporaries go beside their targets (no rename crosses into
it), and while one is there, with a quota, an empty temporary file in ``storage_dir`` marks the
write, so the sweep finds it all the same; the recount removes a dead writer's temporaries at any
depth. (Counting after the rename instead leaves a wide window: renaming over a big file frees its
blocks, and a kill then loses the count with no trace.) Without a quota a directory is made in
place, after the same free-space checks.

Quota. ``quota_bytes`` (``disk_space_mb`` * 1,048,576) counts the size of every regular file
below ``storage_dir`` — ``StoreData`` and ``DiskWrite`` alike (upstream counts ``StoreData`` only)
— and ``DIRECTORY_BYTES`` for every directory below it (not ``storage_dir`` itself, not our
temporaries): without that, empty files in deep new directories filled the disk while the quota
saw nothing. The running total lives in a 16-byte ledger file in ``ledger_dir`` (in the node's
directory under ``shm_dir``, so it starts afresh with each run), changed only under an exclusive
``flock``; the first process to open a fresh ledger scans ``storage_dir`` to fill it. Worker-role
nodes pass ``quota_bytes=None``: like upstream, their ``DiskWrite`` has no quota, but every write
and every directory — with or without a quota — must leave ``reserve_bytes`` free on the
filesystem (psutil), and the error says so and by how much.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import stat
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Final

from shm import space
from shm.closing import Closing
from shm.errors import FileError, InvalidPath, KeyNotFound, QuotaExceeded, StoreError

__all__ = [
    "DEFAULT_RESERVE_BYTES",
    "DIRECTORY_BYTES",
    "MAX_PATH_PARTS",
    "MIB",
    "TEMPORARY",
    "DiskStore",
    "UsageLedger",
    "has_temporary_files",
]

MIB: Final = 1_048_576
"""Bytes per ``disk_space_mb``."""

DEFAULT_RESERVE_BYTES: Final = 16 * MIB
"""Free space every write leaves on the filesystem under ``storage_dir``, unless told otherwise."""

DIRECTORY_BYTES: Final = 4096
"""What each directory below ``storage_dir`` counts against the quota, and the room it must find
free: one ext4 block, fixed so that the count does not depend on the filesystem."""

MAX_PATH_PARTS: Final = 64
"""The most parts (directories and the file name) a path or key may have: one write makes at
most ``MAX_PATH_PARTS - 1`` directories."""

TEMPORARY: Final = ".cpnode-tmp-"
"""Names of files and directories being written (a writer's pid in them): counted by no one."""
_WRITE_ATTEMPTS: Final = 8  # a write whose directory vanished starts again: see "Writes"
_NO_SUCH_KEY: Final = frozenset((errno.ENOENT, errno.ENOTDIR, errno.EISDIR))
_PATH_MAX: Final = 4096
_DIRECTORY: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_CREATE: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class DiskStore(Closing):
    """Confined files below ``storage_dir``; open one per process, close it when done.

    With a ``quota_bytes``, ``ledger_dir`` names the directory of the usage ledger that all
    processes sharing this store must share. ``storage_dir`` itself comes from the node's
    configuration and is trusted (it may be a symlink); everything below it is not.
    """

    def __init__(
        self,
        storage_dir: str | os.PathLike[str],
        quota_bytes: int | None,
        ledger_dir: str | os.PathLike[str] | None = None,
        *,
        reserve_bytes: int = DEFAULT_RESERVE_BYTES,
    ) -> None:
        if quota_bytes is not None and quota_bytes < 0:
            raise ValueError(f"quota_bytes must be >= 0 or None, got {quota_bytes}")
        if quota_bytes is not None and ledger_dir is None:
            raise ValueError("a DiskStore with a quota needs a ledger_dir shared by its processes")
        self.path = os.path.abspath(storage_dir)
        self.quota_bytes = quota_bytes
        self.reserve_bytes = reserve_bytes
        os.makedirs(self.path, exist_ok=True)
        self._root: int | None = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._root_device = os.fstat(self._root).st_dev
        self._ledger: UsageLedger | None = None
        if ledger_dir is not None and quota_bytes is not None:
            # One ledger per storage directory, even if two stores were given one ledger_dir.
            digest = hashlib.sha256(self.path.encode(errors="surrogateescape")).hexdigest()
            ledger_path = os.path.join(os.fspath(ledger_dir), f"disk-usage-{digest[:16]}")
            try:
                self._ledger = UsageLedger(ledger_path, self._scan_usage)
            except BaseException:
                self.close()
                raise

    # --- the tasks -------------------------------------------------------------------------

    def write(self, path: str, data: bytes | bytearray | memoryview) -> None:
        """``DiskWrite``: put ``data`` in the file at ``path``, creating its directories."""
        dirs, leaf, directory = _split(path)
        if directory:
            raise FileError(errno.EISDIR, path)
        for _ in range(_WRITE_ATTEMPTS):
            try:
                with self._parent(path, dirs, create=True) as parent:
                    self._write(parent, leaf, path, data)
                return
            except _DirectoryRemoved:
                continue  # make it again: see "Writes"
            except StoreError:
                raise
            except OSError as error:
                raise FileError.from_os_error(error, path) from error
        raise FileError(errno.ENOENT, path)

    def read(self, path: str) -> bytes:
        """``DiskRead``: the content of the file at ``path``."""
        dirs, leaf, directory = _split(path)
        try:
            with self._parent(path, dirs, create=False) as parent:
                return self._read(parent, leaf, path, directory=directory)
        except StoreError:
            raise
        except OSError as error:
            raise FileError.from_os_error(error, path) from error

    def store(self, key: str, data: bytes | bytearray | memoryview) -> None:
        """``StoreData`` on a Disk node: ``key`` is a path like any other."""
        self.write(key, data)

    def retrieve(self, key: str) -> bytes:
        """``RetrieveData`` on a Disk node; ``KeyNotFound`` when ``key`` names no file (it is
        missing, below a file, or a directory); other errors as ``read`` raises them."""
        try:
            return self.read(key)
        except FileError as error:
            if error.errno in _NO_SUCH_KEY:
                raise KeyNotFound(key) from error
            raise

    def get_storage_report(self) -> str:
        """The ``GetStorage`` response: ``free: N bytes`` (quota minus use), then ``name: N
        bytes`` for each regular file directly in ``storage_dir``, sorted by name."""
        lines = [f"free: {self.free_bytes()} bytes\n"]
        files = sorted(self._top_level_files())
        lines += [f"{name}: {size} bytes\n" for name, size in files] or ["No entries found\n"]
        return "".join(lines)

    def sweep_temporary(self, pid: int) -> list[str]:
        """Remove the temporary files of process ``pid``, which died in the middle of a write
        (if ``pid`` runs, it is a new process and nothing is removed); return their names.

        With a quota, finding any recounts the ledger from the files, under its lock: the
        writer may have died after counting its file and before renaming it into place. The
        ledger says "unknown" from before the removal until the recount, so a removal or a
        recount that fails (or a kill in between) leaves the next process to take the lock a
        full count to make, not the dead writer's count with nothing left to correct it.
        Finding none writes nothing.
        """
        if self._ledger is None:
            return self._remove_temporary(pid)
        root = self._root_fd
        with self._ledger.locked() as usage:
            dead = space.dead_temporaries(root, TEMPORARY, pid)
            if dead:
                usage.forget()
                for name in dead:
                    space.remove_quietly(name, root)
                usage.used = self._scan_usage()
        return dead

    # --- accounting --------------------------------------------------------------------------

    def used_bytes(self) -> int:
        """Bytes of all regular files below ``storage_dir``, and ``DIRECTORY_BYTES`` for each
        directory below it (the ledger's count, with a quota)."""
        if self._ledger is not None:
            return self._ledger.peek()
        return self._scan_usage()

    def free_bytes(self) -> int:
        """What may still be written: quota minus use (never below 0); without a quota, the
        filesystem's free space minus the reserve."""
        if self.quota_bytes is None:
            return max(0, space.free_bytes(self.path) - self.reserve_bytes)
        return max(0, self.quota_bytes - self.used_bytes())

    def close(self) -> None:
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None
        if self._root is not None:
            os.close(self._root)
            self._root = None

    # --- inside ------------------------------------------------------------------------------

    @property
    def _root_fd(self) -> int:
        if self._root is None:
            raise ValueError(f"disk store {self.path} is closed")
        return self._root

    @contextmanager
    def _parent(self, path: str, dirs: list[str], *, create: bool) -> Iterator[int]:
        """Open the directory that holds ``path``'s file, one ``O_NOFOLLOW`` step at a time.

        With ``create``, missing directories are made, and removed again (if still empty) when
        the body raises: a refused write leaves the tree as it found it. An ``ENOENT`` because
        one of them was removed meanwhile raises ``_DirectoryRemoved``: see "Writes"."""
        fd = self._root_fd
        opened: list[int] = []  # every directory opened below the root, the last is ``fd``
        created: list[tuple[int, str]] = []  # (descriptor of its parent, name)
        try:
            for depth, name in enumerate(dirs):
                parent = fd
                directory = "/".join(dirs[: depth + 1])
                fd, made = self._open_directory(parent, directory, path, create=create)
                if made:
                    created.append((parent, name))
                opened.append(fd)
            yield fd
        except BaseException as error:
            self._remove_directories(created[::-1])
            if create and _vanished(error, opened):
                raise _DirectoryRemoved from error
            raise
        finally:
            for descriptor in opened:
                os.close(descriptor)

    def _write(
        self, parent: int, leaf: str, path: str, data: bytes | bytearray | memoryview
    ) -> None:
        root = self._root_fd
        size = memoryview(data).nbytes
        old = _existing_size(parent, leaf, path)
        if self._ledger is not None and self.quota_bytes is not None:
            used = self._ledger.peek()
            if used - old + size > self.quota_bytes:
                raise QuotaExceeded(path=path, used=used, change=size - old, quota=self.quota_bytes)
        here, where = root, self.path
        if self._on_another_filesystem(parent):
            here, where = parent, os.path.dirname(os.path.join(self.path, path))
        what = f"{size} bytes for {path!r}"
        space.check_free(where, size, self.reserve_bytes, what, dir_fd=here)
        temporary = space.temporary_name(TEMPORARY)
        temporary_path = os.path.join(self.path, temporary)
        with self._marked(here, path):
            try:
                fd = os.open(temporary, _CREATE, 0o644, dir_fd=here)
            except OSError as error:
                raise FileError.from_os_error(error, path) from error
            try:
                try:
                    space.reserve(
                        fd, size, temporary_path, for_mapping=False, keep_free=self.reserve_bytes
                    )
                    space.write_all(fd, data, temporary_path)
                finally:
                    os.close(fd)
                self._commit(here, temporary, parent, leaf, path, size)
            except BaseException:
                space.unlink_quietly(temporary, here)
                raise

    def _commit(
        self, root: int, temporary: str, parent: int, leaf: str, path: str, size: int
    ) -> None:
        if self._ledger is None or self.quota_bytes is None:
            _rename(root, temporary, parent, leaf, path)
            return
        with self._ledger.locked() as usage:
            change = size - _existing_size(parent, leaf, path)
            if usage.used + change > self.quota_bytes:
                raise QuotaExceeded(
                    path=path, used=usage.used, change=change, quota=self.quota_bytes
                )
            before = usage.used
            usage.used = before + change  # written at once, before the rename: see "Writes"
            try:
                _rename(root, temporary, parent, leaf, path)
            except BaseException:
                usage.used = before  # not `-= change`: the setter clamps a drifted sum at 0
                raise

    def _on_another_filesystem(self, directory: int) -> bool:
        """Whether ``directory`` is on a filesystem mounted inside ``storage_dir``: no rename
        crosses into it, so a temporary for it goes beside its target, and the room is that
        filesystem's."""
        return directory != self._root_fd and os.fstat(directory).st_dev != self._root_device

    @contextmanager
    def _marked(self, here: int, path: str) -> Iterator[None]:
        """With a quota, while the block keeps a temporary in ``here`` on another filesystem
        (beside its target, not in ``storage_dir``), keep an empty one in ``storage_dir`` too:
        all that the sweep of a killed writer looks at (see "Writes")."""
        if self._ledger is None or here == self._root_fd:
            yield
            return
        mark = space.temporary_name(TEMPORARY)
        try:
            os.close(os.open(mark, _CREATE, 0o600, dir_fd=self._root_fd))
        except OSError as error:
            raise FileError.from_os_error(error, path) from None
        try:
            yield
        finally:
            space.unlink_quietly(mark, self._root_fd)

    def _open_directory(
        self, parent: int, directory: str, path: str, *, create: bool
    ) -> tuple[int, bool]:
        """Open ``directory`` (its path below ``storage_dir``; ``parent`` is its parent, open)
        without following a symlink, making it if ``create``; return its descriptor and whether
        this call made it."""
        name = directory.rpartition("/")[2]
        made = False
        for attempt in (1, 2):
            try:
                return os.open(name, _DIRECTORY, dir_fd=parent), made
            except FileNotFoundError as error:
                if not create:
                    raise FileError.from_os_error(error, path) from None
                if attempt == 2:  # made or found a moment ago: another writer removed it
                    raise _DirectoryRemoved from None
            except OSError as error:
                if error.errno in (errno.ELOOP, errno.ENOTDIR) and _is_symlink(parent, name):
                    raise InvalidPath(path, f"{name!r} is a symlink") from None
                raise FileError.from_os_error(error, path) from None
            made = self._make_directory(parent, directory, path)
        raise AssertionError("unreachable")

    def _make_directory(self, parent: int, directory: str, path: str) -> bool:
        """Make ``directory`` (in ``parent``) for the write of ``path`` as a file of
        ``DIRECTORY_BYTES`` is written: within the quota, leaving the reserve free. False when
        another writer made it meanwhile (and counted it)."""
        head, _, name = directory.rpartition("/")
        where, full = os.path.join(self.path, head), os.path.join(self.path, directory)
        if self._ledger is not None and self.quota_bytes is not None:
            used = self._ledger.peek()
            if used + DIRECTORY_BYTES > self.quota_bytes:
                raise QuotaExceeded(
                    path=path,
                    used=used,
                    change=DIRECTORY_BYTES,
                    quota=self.quota_bytes,
                    directory=directory,
                )
        what = f"the directory {directory!r} of {path!r}"
        space.check_free(where, DIRECTORY_BYTES, self.reserve_bytes, what, dir_fd=parent)
        if self._ledger is None:
            try:
                os.mkdir(name, 0o755, dir_fd=parent)
            except FileExistsError:
                return False
            except OSError as error:
                raise FileError.from_os_error(error, path) from None
            try:
                space.check_left_free(parent, DIRECTORY_BYTES, full, self.reserve_bytes)
            except BaseException:
                _remove_empty(parent, name)
                raise
            return True
        here = parent if self._on_another_filesystem(parent) else self._root_fd
        temporary = space.temporary_name(TEMPORARY)
        with self._marked(here, path):
            try:
                os.mkdir(temporary, 0o755, dir_fd=here)
            except OSError as error:
                raise FileError.from_os_error(error, path) from None
            try:
                space.check_left_free(here, DIRECTORY_BYTES, full, self.reserve_bytes)
                return self._commit_directory(here, temporary, parent, directory, path)
            finally:
                _remove_empty(here, temporary)  # gone already once it is in place

    def _commit_directory(
        self, here: int, temporary: str, parent: int, directory: str, path: str
    ) -> bool:
        """Under the ledger's lock: unless ``directory`` is there by now, count it and rename
        the empty ``temporary`` (in ``here``) to it; whether this did."""
        assert self._ledger is not None and self.quota_bytes is not None
        name = directory.rpartition("/")[2]
        with self._ledger.locked() as usage:
            try:
                os.stat(name, dir_fd=parent, follow_symlinks=False)
                return False  # made meanwhile (if it is no directory, opening it says so)
            except FileNotFoundError:
                pass
            except OSError as error:
                raise FileError.from_os_error(error, path) from None
            if usage.used + DIRECTORY_BYTES > self.quota_bytes:
                raise QuotaExceeded(
                    path=path,
                    used=usage.used,
                    change=DIRECTORY_BYTES,
                    quota=self.quota_bytes,
                    directory=directory,
                )
            before = usage.used
            usage.used = before + DIRECTORY_BYTES  # before the rename: see "Writes"
            try:
                _rename(here, temporary, parent, name, path)
            except BaseException:
                usage.used = before
                raise
            return True

    def _remove_directories(self, created: list[tuple[int, str]]) -> None:
        """Remove the directories a refused write made (each ``(parent, name)``, the deepest
        first) that are still empty, and give their count back; one that is not empty holds
        another writer's file now and stays, counted. The ledger says "unknown" while they go
        (see "Writes")."""
        if not created:
            return
        if self._ledger is None:
            for parent, name in created:
                _remove_empty(parent, name)
            return
        with self._ledger.locked() as usage:
            usage.forget()
            removed = [name for parent, name in created if _remove_empty(parent, name)]
            usage.used -= DIRECTORY_BYTES * len(removed)

    def _read(self, parent: int, leaf: str, path: str, *, directory: bool) -> bytes:
        try:
            fd = os.open(leaf, _READ, dir_fd=parent)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise InvalidPath(path, "the file is a symlink") from None
            raise FileError.from_os_error(error, path) from None
        try:
            mode = os.fstat(fd)
            if stat.S_ISDIR(mode.st_mode):
                raise FileError(errno.EISDIR, path)
            if directory:  # "file/": the system finds no directory there
                raise FileError(errno.ENOTDIR, path)
            if not stat.S_ISREG(mode.st_mode):
                raise InvalidPath(path, "not a regular file")
            return space.read_all(fd, mode.st_size)
        finally:
            os.close(fd)

    def _remove_temporary(self, pid: int) -> list[str]:
        return space.remove_dead_temporaries(self._root_fd, TEMPORARY, pid)

    def _top_level_files(self) -> Iterator[tuple[str, int]]:
        with os.scandir(self._root_fd) as entries:
            for entry in entries:
                if entry.name.startswith(TEMPORARY):
                    continue
                try:
                    if entry.is_file(follow_symlinks=False):
                        yield entry.name, entry.stat(follow_symlinks=False).st_size
                except FileNotFoundError:
                    continue

    def _scan_usage(self) -> int:
        """Sum the sizes of all regular files below ``storage_dir`` and ``DIRECTORY_BYTES`` for
        each directory below it; remove the temporary files and directories of writers that
        died (a worker killed in the middle of a write), and count no temporary.

        Depth first, with one directory open at a time (plus the root's): a wide or deep tree
        never runs out of descriptors. Each level keeps its listing; the walk goes down with
        ``openat(name)`` and back up with ``openat("..")``, so no symlink is followed."""
        used = 0
        levels: list[tuple[list[str], int]] = []  # the listings above, and where each stopped
        dir_fd = os.dup(self._root_fd)
        try:
            names, position = os.listdir(dir_fd), 0
            while True:
                if position == len(names):
                    if not levels:
                        return used
                    parent = os.open("..", _DIRECTORY, dir_fd=dir_fd)
                    os.close(dir_fd)
                    dir_fd = parent
                    names, position = levels.pop()
                    continue
                name = names[position]
                position += 1
                if name.startswith(TEMPORARY):
                    if not space.writer_alive(name, TEMPORARY):
                        space.remove_quietly(name, dir_fd)
                    continue
                try:
                    info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                    if stat.S_ISDIR(info.st_mode):
                        child = os.open(name, _DIRECTORY, dir_fd=dir_fd)
                        used += DIRECTORY_BYTES
                        levels.append((names, position))
                        os.close(dir_fd)
                        dir_fd = child
                        names, position = os.listdir(dir_fd), 0
                        continue
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(info.st_mode):
                    used += info.st_size
        finally:
            os.close(dir_fd)


class UsageLedger:
    """The bytes a disk store uses, shared by every process that opens the store.

    A 16-byte file (magic, then the count as a little-endian u64) in a directory the processes
    share, read and written only under ``flock`` (exclusive to change it). A missing or empty
    file, or one without the magic (``Usage.forget``), is filled by ``scan`` under the lock, so
    exactly one process scans.
    """

    _FORMAT: Final = struct.Struct("<8sQ")
    _MAGIC: Final = b"cpnodeDU"

    class Usage:
        """The count while the lock is held; setting ``used`` writes it to the ledger at once
        (a process killed later in the block leaves what it last set)."""

        def __init__(self, ledger: UsageLedger, fd: int, used: int) -> None:
            self._ledger = ledger
            self._fd = fd
            self._used = used
            self._forgotten = False

        @property
        def used(self) -> int:
            return self._used

        @used.setter
        def used(self, value: int) -> None:
            value = max(0, value)
            if value != self._used or self._forgotten:
                self._ledger._write(self._fd, value)
                self._used = value
                self._forgotten = False

        def forget(self) -> None:
            """Leave the ledger unknown until ``used`` is set again, for changes that cannot
            be counted in the same step as they are made: a process killed in between leaves
            the next one to take the lock a full count to make, instead of a wrong count."""
            self._ledger._write_unknown(self._fd)
            self._forgotten = True

    def __init__(self, path: str, scan: Callable[[], int]) -> None:
        self.path = path
        self._scan = scan
        self._threads = threading.Lock()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        self._fd: int | None = os.open(path, flags, 0o600)
        try:
            with self.locked():
                pass
        except BaseException:
            self.close()
            raise

    def peek(self) -> int:
        """The count now (it may change as soon as this returns)."""
        with self._threads:
            fd = self._file
            fcntl.flock(fd, fcntl.LOCK_SH)
            try:
                used = self._read(fd)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        if used is None:
            with self.locked() as usage:
                return usage.used
        return used

    @contextmanager
    def locked(self) -> Iterator[UsageLedger.Usage]:
        """Hold the lock; the block reads and sets the count through the ``Usage`` it gets."""
        with self._threads:
            fd = self._file
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                used = self._read(fd)
                if used is None:
                    used = self._scan()
                    self._write(fd, used)
                yield UsageLedger.Usage(self, fd, used)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def _file(self) -> int:
        if self._fd is None:
            raise ValueError(f"usage ledger {self.path} is closed")
        return self._fd

    def _read(self, fd: int) -> int | None:
        raw = os.pread(fd, self._FORMAT.size, 0)
        if len(raw) != self._FORMAT.size:
            return None
        magic, used = self._FORMAT.unpack(raw)
        return int(used) if magic == self._MAGIC else None

    def _write(self, fd: int, used: int) -> None:
        os.pwrite(fd, self._FORMAT.pack(self._MAGIC, max(0, used)), 0)

    def _write_unknown(self, fd: int) -> None:
        os.pwrite(fd, bytes(self._FORMAT.size), 0)  # no magic: read as a file to fill


def has_temporary_files(storage_dir: str | os.PathLike[str], pid: int) -> bool:
    """Whether process ``pid`` left temporary files in ``storage_dir`` (False when there is no
    such directory): a look before opening the store to ``sweep_temporary`` them."""
    return space.has_temporary_files(storage_dir, TEMPORARY, pid)


def _split(path: str) -> tuple[list[str], str, bool]:
    """Return ``path``'s directories, its file name, and whether it names a directory (ends in
    ``/`` or ``/.``); or raise ``InvalidPath`` (or, for a path longer than the system allows,
    ``FileError`` as upstream gets it)."""
    try:
        encoded = path.encode()
    except UnicodeEncodeError as error:
        raise InvalidPath(path, f"not valid Unicode text ({error.reason})") from None
    if len(encoded) >= _PATH_MAX:
        raise FileError(errno.ENAMETOOLONG, path)
    if "\x00" in path:
        raise InvalidPath(path, "contains NUL")
    if path.startswith("/"):
        raise InvalidPath(path, "absolute path")
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if not parts:
        raise InvalidPath(path, "names no file")
    for part in parts:
        if part == "..":
            raise InvalidPath(path, "'..' leaves the directory")
        if part.startswith(TEMPORARY):
            raise InvalidPath(path, "reserved name")
    if len(parts) > MAX_PATH_PARTS:
        raise InvalidPath(
            path, f"{len(parts)} parts deep, more than the {MAX_PATH_PARTS} a path may have"
        )
    return parts[:-1], parts[-1], path.rpartition("/")[2] in ("", ".")


class _DirectoryRemoved(Exception):
    """A directory on a write's path was removed while the write used it (see "Writes")."""


def _vanished(error: BaseException, opened: list[int]) -> bool:
    """Whether ``error`` is the ``ENOENT`` of a write whose open directories (``opened``, from
    the top down) include one that has been removed: it has no links left."""
    if not isinstance(error, FileError) or error.errno != errno.ENOENT:
        return False
    return any(os.fstat(directory).st_nlink == 0 for directory in opened)


def _remove_empty(parent: int, name: str) -> bool:
    """Remove the directory ``name`` from ``parent`` if it is there and empty; whether it was."""
    try:
        os.rmdir(name, dir_fd=parent)
    except OSError:
        return False
    return True


def _existing_size(parent: int, leaf: str, path: str) -> int:
    """Size of the regular file ``leaf`` (0 if there is none); what cannot be replaced by a
    file raises."""
    try:
        info = os.stat(leaf, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return 0
    except OSError as error:
        raise FileError.from_os_error(error, path) from None
    if stat.S_ISREG(info.st_mode):
        return info.st_size
    if stat.S_ISDIR(info.st_mode):
        raise FileError(errno.EISDIR, path)
    if stat.S_ISLNK(info.st_mode):
        raise InvalidPath(path, "the file is a symlink")
    raise InvalidPath(path, "not a regular file")


def _rename(root: int, temporary: str, parent: int, leaf: str, path: str) -> None:
    try:
        os.rename(temporary, leaf, src_dir_fd=root, dst_dir_fd=parent)
    except OSError as error:
        if isinstance(error, StoreError):
            raise
        raise FileError.from_os_error(error, path) from None


def _is_symlink(parent: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode)
    except OSError:
        return False
