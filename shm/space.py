"""Room on the filesystem under a store or segment; whole-file reads and writes; temporary files.

Every writer in ``shm`` follows the same order: ``check_free`` (psutil says whether the bytes fit,
leaving the caller's reserve), create a temporary file, ``reserve`` its size with
``posix_fallocate`` (a tmpfs allocates the pages now, so running out is an ``ENOSPC`` here and
never a SIGBUS later in a mapping) and look again that the reserve is still free (writers
running at once each passed ``check_free``), then ``write_all``. (``write_segment`` writes
its pieces without ``posix_fallocate`` and looks again after.) Every failure raises
``StoreFullError`` saying which directory, how much was needed and how much was free.

Temporary files (and the disk store's temporary directories) are named ``<prefix><pid>-<uuid>``,
so that what a writer killed mid-write left behind can be told apart from a live writer's
(``writer_alive``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import uuid

import psutil

from shm.errors import StoreFullError

__all__ = [
    "check_free",
    "check_left_free",
    "dead_temporaries",
    "free_bytes",
    "has_temporary_files",
    "read_all",
    "remove_dead_temporaries",
    "remove_quietly",
    "reserve",
    "temporary_name",
    "unlink_quietly",
    "write_all",
    "writer_alive",
]

_ZEROS = bytes(1 << 20)


def free_bytes(target: str | int) -> int:
    """Bytes free for us on the filesystem of ``target``, a path or an open descriptor: blocks
    available to us times their size, as psutil counts them."""
    if isinstance(target, int):
        info = os.fstatvfs(target)
        return info.f_bavail * info.f_frsize
    return int(psutil.disk_usage(target).free)


def check_free(
    directory: str, needed: int, reserve_bytes: int, what: str, *, dir_fd: int | None = None
) -> None:
    """Raise ``StoreFullError`` unless ``needed`` bytes fit in ``directory``'s filesystem with
    ``reserve_bytes`` still free afterwards (``dir_fd``: that directory, open, looked at instead
    of its path)."""
    free = free_bytes(directory if dir_fd is None else dir_fd)
    if needed + reserve_bytes > free:
        short = needed + reserve_bytes - free
        keep = f" and keep {reserve_bytes} bytes free" if reserve_bytes else ""
        raise StoreFullError(
            f"no room for {what}: {directory} has {free} bytes free, {needed} bytes are needed"
            f"{keep} (short by {short} bytes)",
            path=directory,
            needed=needed,
            available=free,
        )


def reserve(fd: int, size: int, path: str, *, for_mapping: bool, keep_free: int = 0) -> None:
    """Allocate ``size`` bytes of the file ``fd`` now, so later writes cannot run out of space,
    and then make sure ``keep_free`` bytes are still free on its filesystem.

    The second look is what holds the reserve when writers run at once: each one's
    `check_free` may have seen the room before another took it. When it fails, the caller
    removes its file as on any error (under a race both writers may then be refused; a retry
    finds the room). Filesystems without ``posix_fallocate`` are left to report ``ENOSPC`` on
    ``write`` — except for files that will be mapped (``for_mapping``), which are then filled
    with zeros, because a mapping that runs out of pages kills the process with SIGBUS
    instead of raising.
    """
    if size == 0:
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise _full(path, size) from error
        if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        if for_mapping:
            _fill_with_zeros(fd, size, path)
    check_left_free(fd, size, path, keep_free)


def check_left_free(fd: int, size: int, path: str, keep_free: int) -> None:
    """Raise ``StoreFullError`` unless ``keep_free`` bytes are free on the filesystem of the
    file ``fd`` now that its ``size`` bytes are allocated (whole pages and blocks: a 50-byte
    file takes 4 KiB of a tmpfs)."""
    if not keep_free:
        return
    free = free_bytes(fd)
    if free < keep_free:
        directory = os.path.dirname(path) or "."
        raise StoreFullError(
            f"no room for {size} bytes in {directory}: with them set aside {free} bytes are"
            f" left free, below the {keep_free} bytes kept free (short by {keep_free - free}"
            " bytes; other writes may have taken the room at the same time)",
            path=path,
            needed=size,
            available=free + size,
        )


def _fill_with_zeros(fd: int, size: int, path: str) -> None:
    written = 0
    try:
        while written < size:
            written += os.pwrite(fd, _ZEROS[: min(len(_ZEROS), size - written)], written)
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise _full(path, size) from error
        raise


def write_all(fd: int, data: bytes | bytearray | memoryview, path: str, offset: int = 0) -> None:
    """Write all of ``data`` at ``offset``; a full filesystem raises ``StoreFullError``."""
    view = memoryview(data).cast("B")
    done = 0
    try:
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise _full(path, len(view)) from error
        raise


def read_all(fd: int, size: int, offset: int = 0) -> bytes:
    """Read ``size`` bytes from ``offset`` (fewer only if the file is shorter)."""
    first = os.pread(fd, size, offset)
    if len(first) == size or not first:
        return first
    parts = bytearray(first)
    while len(parts) < size:
        more = os.pread(fd, size - len(parts), offset + len(parts))
        if not more:
            break
        parts += more
    return bytes(parts)


def _full(path: str, size: int) -> StoreFullError:
    directory = os.path.dirname(path) or "."
    try:
        free = free_bytes(directory)
    except OSError:
        free = 0
    return StoreFullError(
        f"no room for {size} bytes in {directory}: the filesystem is full ({free} bytes free)",
        path=path,
        needed=size,
        available=free,
    )


def temporary_name(prefix: str) -> str:
    """A fresh temporary file name that records this process's pid."""
    return f"{prefix}{os.getpid()}-{uuid.uuid4().hex}"


def writer_alive(name: str, prefix: str) -> bool:
    """Whether the process that created the temporary file ``name`` still runs (a reused pid
    counts as alive: the file is then kept, never removed from under a live writer)."""
    pid_text = name[len(prefix) :].partition("-")[0]
    if not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def dead_temporaries(dir_fd: int, prefix: str, pid: int | None = None) -> list[str]:
    """The names of the temporary files and directories (named by `temporary_name(prefix)`) in
    the directory ``dir_fd`` whose writer died in the middle of a write, only those of ``pid``
    when given. A running process's are never among them."""
    start = prefix if pid is None else f"{prefix}{pid}-"
    return [
        name
        for name in os.listdir(dir_fd)
        if name.startswith(start) and not writer_alive(name, prefix)
    ]


def remove_dead_temporaries(dir_fd: int, prefix: str, pid: int | None = None) -> list[str]:
    """Remove the `dead_temporaries` in the directory ``dir_fd``; return their names."""
    removed = dead_temporaries(dir_fd, prefix, pid)
    for name in removed:
        remove_quietly(name, dir_fd)
    return removed


def has_temporary_files(directory: str | os.PathLike[str], prefix: str, pid: int) -> bool:
    """Whether process ``pid`` left temporary files (`temporary_name(prefix)`) in
    ``directory`` (False when there is no such directory): a look before opening a store."""
    start = f"{prefix}{pid}-"
    try:
        with os.scandir(directory) as entries:
            return any(entry.name.startswith(start) for entry in entries)
    except (FileNotFoundError, NotADirectoryError):
        return False


def remove_quietly(name: str, dir_fd: int) -> None:
    """Remove the file or empty directory ``name`` from the directory ``dir_fd`` if it is still
    there (a directory that is not empty stays)."""
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        with contextlib.suppress(OSError):  # gone, or not empty
            os.rmdir(name, dir_fd=dir_fd)


def unlink_quietly(name: str, dir_fd: int) -> None:
    """Remove ``name`` from the directory ``dir_fd`` if it is still there."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)
